"""The stages in order: the task export, the trainers (pretrain, sft, rm, then ppo or a DPO
variant) with the gold scorer PPO logs, the rankings and eval stages, and `run_pipeline`."""
from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Callable, Mapping

import numpy as np

from rlhf_jax import evaluation, loading, preference, tasks
from rlhf_jax.metrics import check_wandb
from rlhf_jax.algorithms.catalog import ALGORITHMS
from rlhf_jax.pipeline.evaluate import evaluate
from rlhf_jax.pipeline.layout import Layout, run_stage, stage_configs, stage_info
from rlhf_jax.pipeline.rankings import collect_ranking_data
from rlhf_jax.pipeline import verifiable
from rlhf_jax.pipeline.sampling import read_prompt_ids
from rlhf_jax.data import chat
from rlhf_jax.trainers import rl_config, rm, setup, sft


# ----------------------------------------------------------------------------------------------
# Stage checks and hand-offs
# ----------------------------------------------------------------------------------------------
def check_special_tokens(config, tokenizer) -> None:
    """The RL rollout's stop set / pad id must be the tokenizer's (errors name config.ppo.rollout.*)."""
    rl_config.check_special_tokens(config.ppo.rollout, tokenizer, "config.ppo.rollout")


def make_gold_scorer(prompts_path: str, gold: Mapping[str, Any], tokenizer) -> Callable:
    """PPO's host-side `gold_scorer(index, tokens, mask) -> [B]`: row `index` of the prompts file
    -> its hidden gold example -> gold score of the decoded response (for the `gold/mean` curve)."""
    examples = [gold[i] for i in read_prompt_ids(prompts_path)]
    stop = chat.stop_ids(tokenizer)

    def gold_scorer(index, tokens, mask):
        texts = evaluation.decode_responses(tokenizer, tokens, mask, stop)
        return tasks.gold_scores([examples[int(i)] for i in index], texts)

    return gold_scorer


class StageInterrupted(RuntimeError):
    """A trainer stopped early on a signal (its checkpoint is saved; re-run to resume). The scripts
    exit with `setup.EXIT_PREEMPTED` on it."""


def _trained(name: str, result) -> dict:
    if result.preempted:
        raise StageInterrupted(f"{name} stopped at step {result.step} on a signal; its checkpoint is saved: run the "
                               "same command again to resume")
    return {"step": int(result.step), "last_metrics": {k: v for k, v in result.last_row.items()
                                                       if isinstance(v, (int, float)) and np.isfinite(v)}}


# ----------------------------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------------------------
def export_stage(config, layout: Layout) -> dict:
    """The task files, plus `sft_eval.jsonl` (demonstrations of held-out prompts, for the SFT eval
    loss; a different seed stream than the final evaluation's prompts)."""
    t = config.instructions
    paths = tasks.export_task(layout.task, seed=config.seed, n_sft=t.n_sft,
                              n_rm_prompts=t.n_rm_prompts, n_ppo_prompts=t.n_ppo_prompts,
                              n_heldout=t.n_heldout, n_corpus=t.n_corpus, error_rate=t.error_rate,
                              verbose_rate=t.verbose_rate)
    eval_examples = tasks.sample_examples(t.n_sft_eval, seed=config.seed + 1000, split="heldout")
    tasks.write_demonstrations(layout.task_file("sft_eval.jsonl"), eval_examples, config.seed + 1,
                               error_rate=t.error_rate, verbose_rate=t.verbose_rate)
    return {"files": sorted(paths)}


def ppo_stage(config, layout: Layout, ppo_config, workdir: str | pathlib.Path) -> dict:
    # late import: the PPO trainer imports rlhf_jax.data, i.e. TensorFlow-Datasets, which
    # `import rlhf_jax.pipeline` (flag parsing, the unit tests) does not need
    from rlhf_jax.trainers import ppo

    tokenizer = loading.load_tokenizer(layout.tokenizer)
    scorer = make_gold_scorer(ppo_config.data.prompts, tasks.load_gold(layout.task_file("gold.jsonl")), tokenizer)
    return _trained(ppo_config.algorithm.name, ppo.train(ppo_config, str(workdir), gold_scorer=scorer))


def dpo_stage(config, layout: Layout, dpo_config, workdir: str | pathlib.Path) -> dict:
    """The DPO variants' stage: offline on the rankings stage's data, or online rounds."""
    from rlhf_jax.trainers import dpo

    if preference.VARIANTS[config.algorithm][2]:
        from rlhf_jax.pipeline import online_dpo

        return online_dpo.run_rounds(config, layout, dpo_config, pathlib.Path(workdir))
    return _trained(config.algorithm, dpo.train(dpo_config, str(workdir)))


def check_algorithm(algorithm: str) -> None:
    """An RL algorithm (algorithms/catalog.py) or a DPO variant (preference.VARIANTS), else one line."""
    if algorithm not in ALGORITHMS and algorithm not in preference.VARIANTS:
        raise ValueError(f"config.algorithm={algorithm!r} (allowed: {', '.join(map(repr, ALGORITHMS))}, and the "
                         f"DPO variants {', '.join(map(repr, preference.VARIANTS))})")


def run_pipeline(config, workdir: str | pathlib.Path, echo: Callable[[str], None] = print) -> dict:
    """Run every unfinished stage in order under `workdir`; returns the summary (see `evaluate`).

    `workdir` must be a pipeline directory (or new): a stage's run dir stops here, before anything
    is written (`setup.claim_workdir`). DIR/config.json (and DIR/<algorithm>/config.json) are
    written only when a stage is going to run; a different earlier one is kept as config.<n>.json."""
    start = time.perf_counter()
    layout = Layout(pathlib.Path(workdir).absolute())
    algorithm = config.get("algorithm", "ppo")
    check_algorithm(algorithm)
    verifiable.check_task(config)
    for section in ("pretrain", "sft", "rm", "ppo", "dpo"):
        if section in config:
            check_wandb(config[section], f"config.{section}")
    setup.claim_workdir(layout.root, "pipeline")
    rl_dir, eval_dir, out_dir = policy_dirs(layout, algorithm)
    if out_dir != layout.root:  # DIR/<algorithm> belongs to this pipeline's algorithm run, not a pipeline
        setup.claim_workdir(out_dir, "policy")
    shared = [layout.stage(name) for name in ("task", "pretrain", "sft", "rankings", "rm")]
    policy_pending = any(stage_info(d) is None for d in (rl_dir, eval_dir))
    if algorithm == "ppo" and (policy_pending or any(stage_info(d) is None for d in shared)) \
            or not (layout.root / "config.json").exists():
        setup.record_config(config, layout.root)
    if out_dir != layout.root and policy_pending:
        setup.record_config(config, out_dir)
    if config.task == "arithmetic":  # verifiable rewards: no rankings, no RM (rlhf_jax/pipeline/verifiable.py)
        verifiable.run_arithmetic(config, layout, (rl_dir, eval_dir, out_dir), echo)
        echo(f"pipeline: {time.perf_counter() - start:.0f}s in this run; report in {out_dir / 'report.md'}")
        return json.loads((out_dir / "summary.json").read_text())
    cfgs = stage_configs(config, layout)
    seeded = lambda section: {"seed": config.seed, **section.to_dict()}  # noqa: E731
    records = {"task": run_stage("task", layout.task, lambda: export_stage(config, layout), echo,
                                 seeded(config.instructions))}
    check_special_tokens(config, loading.load_tokenizer(layout.tokenizer))
    for name in ("pretrain", "sft"):
        records[name] = run_stage(name, layout.stage(name), lambda: _trained(
            name, sft.train(cfgs[name], str(layout.stage(name)))), echo, cfgs[name].to_dict())
    records["rankings"] = run_stage("rankings", layout.stage("rankings"),
                                    lambda: collect_ranking_data(config, layout, echo), echo,
                                    {**seeded(config.rankings), "n_rm_heldout": config.instructions.n_rm_heldout,
                                     "rollout": config.ppo.rollout.to_dict()})
    records["rm"] = run_stage("rm", layout.stage("rm"), lambda: _trained(
        "rm", rm.train(cfgs["rm"], str(layout.stage("rm")))), echo, cfgs["rm"].to_dict())
    if algorithm in preference.VARIANTS:
        records["dpo"] = run_stage(algorithm, rl_dir, lambda: dpo_stage(config, layout, cfgs["dpo"], rl_dir), echo,
                                   cfgs["dpo"].to_dict())
    else:
        records["ppo"] = run_stage(algorithm, rl_dir, lambda: ppo_stage(config, layout, cfgs["ppo"], rl_dir), echo,
                                   cfgs["ppo"].to_dict())
    prior = sum(r["seconds"] for r in records.values())
    policy_dir = rl_dir / records.get("dpo", {}).get("info", {}).get("policy_dir", "")  # online DPO: its last round
    run_stage("eval", eval_dir, lambda: evaluate(
        config, layout, policy_dir, out_dir, labeler_agreement=records["rankings"]["info"]["labeler_agreement"],
        prior_seconds=prior, echo=echo), echo, seeded(config.eval))
    echo(f"pipeline: {time.perf_counter() - start:.0f}s in this run; report in {out_dir / 'report.md'}")
    return json.loads((out_dir / "summary.json").read_text())


def policy_dirs(layout: Layout, algorithm: str) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """(policy run dir, eval stage dir, summary/report dir) of `algorithm`: DIR/ppo, DIR/eval and DIR
    for PPO (the recipe's own layout), DIR/<algorithm>/{dpo, eval} for the DPO variants,
    DIR/<algorithm>/{rl, eval} for the other RL algorithms, and DIR/<algorithm>."""
    if algorithm == "ppo":
        return layout.stage("ppo"), layout.stage("eval"), layout.root
    run = "dpo" if algorithm in preference.VARIANTS else "rl"
    return layout.root / algorithm / run, layout.root / algorithm / "eval", layout.root / algorithm
