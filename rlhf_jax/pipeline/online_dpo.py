"""Online (iterative) DPO: rounds of sampling from the current policy, ranking, and a DPO pass.

Round r (DIR/online_dpo/dpo/round<r>/, a DONE marker each, so an interrupted stage resumes at its
unfinished round): sample `online_dpo.candidates` responses to each of the round's
`prompts_per_round` PPO-training prompts (consecutive slices, wrapping) from round r-1's policy
(round 0: SFT) at the rollout temperature, keep the first K = `num_responses` distinct non-empty
ones, rank them by the reward model (`ranker="rm"`) or the task's simulated labelers
(`"labeler"`: gold scores + Plackett-Luce noise at `rankings.labeler_temperature`), write
rankings.jsonl and train one DPO run on it (section `dpo`; every ordered pair of a ranking) from
round r-1's policy with the SFT model as the frozen reference. The policy to evaluate is the last
round's run. Xiong et al. 2024 ("Iterative Preference Learning from Human Feedback") and Guo et al.
2024 ("Direct Language Model Alignment from Online AI Feedback") describe this online variant.
"""
from __future__ import annotations

import pathlib

import jax
import numpy as np

from rlhf_jax import evaluation, loading, tasks
from rlhf_jax.pipeline.layout import Layout, run_stage
from rlhf_jax.pipeline.sampling import load_prompt_set, sample_texts, sampling_settings

RANKERS = ("rm", "labeler")


def round_rows(round_index: int, per_round: int, num_prompts: int) -> np.ndarray:
    """Prompt rows of a round: the round_index-th consecutive slice of `per_round`, wrapping."""
    return (round_index * per_round + np.arange(per_round)) % num_prompts


def distinct_indices(texts: list[str], k: int) -> list[int] | None:
    """Indices of the first `k` distinct non-empty texts (None when there are fewer)."""
    nonempty = [i for i, t in enumerate(texts) if t]
    picked = evaluation.distinct_first([texts[i] for i in nonempty], k)
    return None if picked is None else [nonempty[j] for j in picked]


def rank_round(examples, texts, scores, ranker: str, k: int, rng, labeler_temperature: float) -> list[dict]:
    """Ranking records {"prompt", "responses", "ranking"} (best first) of the prompts with `k` distinct
    samples: by `scores [R, C]` (the RM's) or by a simulated labeler on the gold scores."""
    records = []
    for row, (example, candidates) in enumerate(zip(examples, texts)):
        picked = distinct_indices(candidates, k)
        if picked is None:
            continue
        responses = [candidates[i] for i in picked]
        if ranker == "rm":
            ranking = [int(i) for i in np.argsort(-np.asarray(scores[row])[picked], kind="stable")]
            records.append({"prompt": example.prompt, "responses": responses, "ranking": ranking})
        else:
            records.extend(tasks.collect_rankings([example], [responses], rng, labeler_temperature))
    return records


def sample_and_rank(config, layout: Layout, policy_dir, round_index: int, out_path: pathlib.Path) -> dict:
    """Sample, rank and write one round's rankings; returns facts (prompts ranked, sample gold mean)."""
    o = config.online_dpo
    tokenizer = loading.load_tokenizer(layout.tokenizer)
    gold = tasks.load_gold(layout.task_file("gold.jsonl"))
    prompts = load_prompt_set(layout.task_file("ppo_prompts.jsonl"), tokenizer, gold, config.ppo.rollout.prompt_len,
                              layout.data_cache)
    prompts = prompts.take(round_rows(round_index, o.prompts_per_round, len(prompts)))
    model, params = loading.load_model(policy_dir, heads=("lm",))
    sampling = sampling_settings(config, tokenizer, config.ppo.rollout.temperature, config.rankings.batch_size)
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), 29), round_index)
    out, texts = sample_texts(model, params, prompts, rng, o.candidates, sampling, tokenizer)
    scores = None
    if o.ranker == "rm":
        rm_model, rm_params, rm_norm = loading.load_reward_model(layout.stage("rm"))
        scores = evaluation.score_responses(evaluation.make_score_fn(rm_model, rm_norm), rm_params,
                                            prompts.prompt_ids, prompts.prompt_mask, out["tokens"], out["mask"],
                                            sampling.batch_size)
    labeler_rng = np.random.default_rng([config.seed, 29, round_index])
    records = rank_round(prompts.examples, texts, scores, o.ranker, o.num_responses, labeler_rng,
                         config.rankings.labeler_temperature)
    if not records:
        raise ValueError(f"config.online_dpo.candidates={o.candidates}: in round {round_index} no prompt had "
                         f"{o.num_responses} distinct samples; raise it")
    tasks.write_rankings(out_path, records)
    sample_gold = np.concatenate([tasks.gold_scores([e] * len(t), t) for e, t in zip(prompts.examples, texts)])
    return {"ranked_prompts": len(records), "sample_gold": float(sample_gold.mean())}


def round_config(dpo_config, layout: Layout, rankings: pathlib.Path, start: pathlib.Path, steps: int):
    """The DPO run of one round: its rankings, from `start` (the previous round's policy), the SFT
    model as the frozen reference, the held-out labeler rankings for eval/ metrics."""
    cfg = dpo_config.copy_and_resolve_references()
    cfg.data.update(train=str(rankings), eval=layout.rankings_heldout)
    cfg.init.update(source="checkpoint", path=str(start))
    cfg.dpo.reference_path = str(layout.stage("sft"))
    cfg.num_steps, cfg.num_epochs = steps, 1
    return cfg


def run_rounds(config, layout: Layout, dpo_config, workdir: pathlib.Path, echo=print) -> dict:
    """Every unfinished round; returns the stage facts: per-round facts and `policy_dir` (the last
    round's DPO run, the policy the eval stage samples), relative to `workdir`."""
    from rlhf_jax.trainers import dpo

    o = config.online_dpo
    if o.ranker not in RANKERS:
        raise ValueError(f"config.online_dpo.ranker={o.ranker!r} (allowed: {', '.join(map(repr, RANKERS))})")
    for key in ("rounds", "prompts_per_round", "num_responses", "candidates"):
        if not isinstance(o[key], int) or o[key] < (2 if key in ("num_responses", "candidates") else 1):
            raise ValueError(f"config.online_dpo.{key}={o[key]!r} must be a positive integer (>= 2 for K)")
    policy, rounds = layout.stage("sft"), []
    for r in range(o.rounds):
        round_dir = workdir / f"round{r}"

        def one_round(round_dir=round_dir, start=policy, r=r):
            facts = sample_and_rank(config, layout, start, r, round_dir / "rankings.jsonl")
            cfg = round_config(dpo_config, layout, round_dir / "rankings.jsonl", start, o.steps_per_round)
            if facts["ranked_prompts"] < cfg.batch_size:  # the DPO run would have an empty epoch
                raise ValueError(f"config.dpo.batch_size={cfg.batch_size} is larger than the {facts['ranked_prompts']} "
                                 f"prompts ranked in online DPO round {r} (those with {o.num_responses} distinct "
                                 "samples): raise config.online_dpo.prompts_per_round or lower config.dpo.batch_size")
            result = dpo.train(cfg, str(round_dir / "dpo"))
            if result.preempted:
                from rlhf_jax.pipeline.run import StageInterrupted

                raise StageInterrupted(f"online_dpo round {r} stopped at step {result.step} on a signal; its "
                                       "checkpoint is saved: run the same command again to resume")
            return {**facts, "step": int(result.step),
                    "eval/rewards/accuracy": result.last_row.get("eval/rewards/accuracy")}

        record = run_stage(f"online_dpo round {r}", round_dir, one_round, echo)
        rounds.append(record["info"])
        policy = round_dir / "dpo"
    return {"rounds": rounds, "policy_dir": str(pathlib.Path(policy).relative_to(workdir))}
