"""The InstructGPT recipe end to end on the built-in task: stage orchestration and evaluation.

    task -> pretrain -> sft -> rankings -> rm -> ppo -> eval        (DIR/<stage>/ for each)

- task:     export the instruction task (demonstrations, prompts, corpus, hidden gold key, tokenizer).
- pretrain: the SFT trainer on the corpus with the loss on every token (a small base model).
- sft:      the SFT trainer on the imperfect demonstrations, from the pretrained model.
- rankings: K distinct SFT samples per RM prompt, gold-scored and ranked by a simulated labeler
            (Plackett-Luce at `rankings.labeler_temperature`); a held-out share of prompts for RM accuracy.
- rm:       the RM trainer on the rankings (ranking loss), from the SFT model.
- ppo:      the PPO trainer: actor and reference from SFT, critic and reward from the RM.
- eval:     held-out prompts: SFT vs PPO samples under the gold judge, best-of-4 reranked by the RM,
            KL to SFT; summary.json, report.md and plots in DIR.

A stage writes `DIR/<stage>/DONE` (JSON: seconds, stage facts) after it completes; a re-run
with the same DIR skips finished stages, and an interrupted stage resumes from its own
checkpoints (the trainers resume from their workdir).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
import tqdm

from rlhf_jax import evaluation, report, tasks
from rlhf_jax.trainers import common

DONE = "DONE"
STAGES = ("task", "pretrain", "sft", "rankings", "rm", "ppo", "eval")


# ----------------------------------------------------------------------------------------------
# Stage bookkeeping
# ----------------------------------------------------------------------------------------------
def stage_info(stage_dir: str | pathlib.Path) -> dict | None:
    """The DONE record of a finished stage, or None when the stage has not completed."""
    marker = pathlib.Path(stage_dir) / DONE
    if not marker.exists():
        return None
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{marker}: unreadable stage marker ({err}); delete it to re-run the stage") from err


def mark_done(stage_dir: str | pathlib.Path, record: Mapping[str, Any]) -> None:
    """Write the DONE marker atomically (write a temp file, then rename)."""
    stage_dir = pathlib.Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / f".{DONE}.tmp"
    tmp.write_text(json.dumps(dict(record), indent=2, allow_nan=False) + "\n")
    tmp.rename(stage_dir / DONE)


def run_stage(name: str, stage_dir: str | pathlib.Path, fn: Callable[[], Mapping[str, Any] | None],
              echo: Callable[[str], None] = print, settings: Mapping[str, Any] | None = None) -> dict:
    """Run `fn()` unless `stage_dir` has a DONE marker; returns the DONE record.

    The record is {"stage", "seconds", "info", "settings"}: info is what `fn` returned (JSON-able
    facts later stages need, e.g. the labeler agreement), settings the config the stage ran with.
    A finished stage whose recorded settings differ from `settings` is still skipped, with a
    warning: its results stand until its directory is deleted.
    """
    done = stage_info(stage_dir)
    settings = json.loads(json.dumps(settings, sort_keys=True, default=str)) if settings is not None else None
    if done is not None:
        echo(f"[{name}] done already ({done['seconds']:.0f}s when it ran): skipping")
        if settings is not None and done.get("settings") not in (None, settings):
            echo(f"[{name}] WARNING: the config of this stage changed since it ran; its old results are used. "
                 f"Delete {stage_dir} to run it again with the new settings.")
        return done
    echo(f"[{name}] running in {stage_dir}")
    start = time.perf_counter()
    info = dict(fn() or {})
    record = {"stage": name, "seconds": time.perf_counter() - start, "info": info, "settings": settings}
    mark_done(stage_dir, record)
    echo(f"[{name}] finished in {record['seconds']:.0f}s")
    return record


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where every stage of one pipeline run lives under its workdir."""

    root: pathlib.Path

    def stage(self, name: str) -> pathlib.Path:
        if name not in STAGES:
            raise ValueError(f"unknown pipeline stage {name!r} (stages: {STAGES})")
        return self.root / name

    @property
    def task(self) -> pathlib.Path:
        return self.stage("task")

    def task_file(self, name: str) -> str:
        return str(self.task / name)

    @property
    def tokenizer(self) -> str:
        return self.task_file("tokenizer")

    @property
    def rankings_train(self) -> str:
        return str(self.stage("rankings") / "rankings_train.jsonl")

    @property
    def rankings_heldout(self) -> str:
        return str(self.stage("rankings") / "rankings_heldout.jsonl")

    @property
    def data_cache(self) -> str:
        return str(self.root / "data_cache")


# ----------------------------------------------------------------------------------------------
# Prompts with their hidden gold examples
# ----------------------------------------------------------------------------------------------
def read_prompt_ids(path: str) -> list[str]:
    """The "id" of every row of a prompts JSONL file, in file order (row i <-> batch index i)."""
    ids = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                record = json.loads(line)
                if "id" not in record:
                    raise ValueError(f"{path}:{line_no}: prompt record lacks 'id' (needed to find its gold key)")
                ids.append(record["id"])
    return ids


@dataclasses.dataclass
class PromptSet:
    """All prompts of one file as one left-padded batch, plus their hidden gold examples."""

    prompt_ids: np.ndarray  # [R, P]
    prompt_mask: np.ndarray  # [R, P]
    examples: list  # [R] tasks.Example, row-aligned

    def __len__(self) -> int:
        return len(self.examples)

    def take(self, rows: np.ndarray | slice) -> "PromptSet":
        rows_list = np.arange(len(self))[rows]
        return PromptSet(self.prompt_ids[rows_list], self.prompt_mask[rows_list],
                         [self.examples[i] for i in rows_list])


def load_prompt_set(path: str, tokenizer, gold: Mapping[str, Any], prompt_len: int, data_dir: str) -> PromptSet:
    """Tokenize a prompts JSONL exactly as the PPO trainer does (data package, chat template,
    left padding to `prompt_len`) and attach each row's gold example by its id."""
    from rlhf_jax import data  # late import: TFDS is only needed when a stage actually runs

    split = data.load_split("prompts", path, tokenizer, max_len=prompt_len, data_dir=data_dir)
    batch = split.collate(np.arange(len(split)))
    ids = read_prompt_ids(path)
    missing = [ids[i] for i in batch["index"] if ids[i] not in gold]
    if missing:
        raise ValueError(f"{path}: prompt ids {missing[:5]} have no entry in the gold key")
    return PromptSet(batch["prompt_ids"], batch["prompt_mask"], [gold[ids[i]] for i in batch["index"]])


# ----------------------------------------------------------------------------------------------
# Rankings: sample K distinct SFT responses per prompt, rank them with a simulated labeler
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to sample responses (shared by the rankings stage and evaluation)."""

    batch_size: int
    max_new_tokens: int
    temperature: float
    eos_id: int
    pad_id: int


def sample_texts(model, params, prompts: PromptSet, rng: jax.Array, num_samples: int, sampling: Sampling,
                 tokenizer) -> tuple[dict, list[list[str]]]:
    """`num_samples` responses per prompt: the raw arrays [R, S, N] and the decoded texts [R][S]."""
    out = evaluation.sample_responses(model, params, prompts.prompt_ids, prompts.prompt_mask, rng,
                                      num_samples=num_samples, batch_size=sampling.batch_size,
                                      max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                      eos_id=sampling.eos_id, pad_id=sampling.pad_id)
    flat = evaluation.decode_responses(tokenizer, out["tokens"].reshape(-1, out["tokens"].shape[-1]),
                                       out["mask"].reshape(-1, out["mask"].shape[-1]), sampling.eos_id)
    texts = [flat[r * num_samples:(r + 1) * num_samples] for r in range(len(prompts))]
    return out, texts


def distinct_candidates(texts: list[list[str]], k: int) -> tuple[list[int], list[list[str]]]:
    """Rows with at least `k` distinct non-empty responses and their first `k` distinct ones."""
    rows, chosen = [], []
    for row, candidates in enumerate(texts):
        picked = evaluation.distinct_first([c for c in candidates if c], k)
        if picked is not None:
            nonempty = [c for c in candidates if c]
            rows.append(row)
            chosen.append([nonempty[i] for i in picked])
    return rows, chosen


def label_rankings(examples: list, responses: list[list[str]], temperature: float, seed: int) -> tuple[list[dict], list]:
    """Simulated labeler rankings plus the gold scores behind them (for the agreement ceiling)."""
    rng = np.random.default_rng(seed)
    records = tasks.collect_rankings(examples, responses, rng, temperature)
    gold_sets = [tasks.gold_scores([e] * len(r), r) for e, r in zip(examples, responses)]
    return records, gold_sets


# ----------------------------------------------------------------------------------------------
# Models of finished stages (one device: evaluation and sampling are small)
# ----------------------------------------------------------------------------------------------
def _single_device_mesh():
    from rlhf_jax import sharding

    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def load_stage_model(stage_dir: str | pathlib.Path, heads: tuple[str, ...]):
    """(Transformer with `heads`, params) of a stage's newest checkpoint on one device
    (`common.load_stage_model`); parameters of heads not asked for are dropped."""
    from rlhf_jax.models import Transformer

    saved, params = common.load_stage_model(str(stage_dir), _single_device_mesh())
    missing = [h for h in heads if h not in saved.heads]
    if missing:
        raise ValueError(f"{stage_dir}: the saved model has heads {saved.heads}, not {tuple(missing)}")
    params = {name: value for name, value in params.items()
              if not (name == "lm_head" and "lm" not in heads) and not (name == "value_head" and "value" not in heads)}
    return Transformer(saved.config.replace(dropout_rate=0.0), heads=heads), params


def load_reward_model(rm_dir: str | pathlib.Path):
    """(model, params, norm) of the RM stage on one device (`rlhf_jax.trainers.rm.load_reward_model`)."""
    from rlhf_jax.trainers import rm

    return rm.load_reward_model(str(rm_dir), _single_device_mesh())


def sampling_settings(config, tokenizer, temperature: float, batch_size: int) -> Sampling:
    """Sampling as PPO does it: the rollout's response length, the tokenizer's EOS and pad ids."""
    return Sampling(batch_size=batch_size, max_new_tokens=config.ppo.rollout.max_new_tokens,
                    temperature=float(temperature), eos_id=int(tokenizer.eos_token_id),
                    pad_id=int(tokenizer.pad_token_id))


# ----------------------------------------------------------------------------------------------
# Stage: rankings
# ----------------------------------------------------------------------------------------------
def collect_ranking_data(config, layout: Layout, echo: Callable[[str], None] = print) -> dict:
    """Sample `rankings.candidates` SFT responses per RM prompt, keep the first K distinct ones,
    let a simulated labeler rank them; the last `task.n_rm_heldout` prompts are held out.

    Returns the stage facts: counts and the labelers' agreement / Bayes accuracy on the held-out
    rankings (the ceiling the RM is compared to).
    """
    cfg = config.rankings
    tokenizer = common.load_tokenizer(layout.tokenizer)
    gold = tasks.load_gold(layout.task_file("gold.jsonl"))
    prompts = load_prompt_set(layout.task_file("rm_prompts.jsonl"), tokenizer, gold, config.ppo.rollout.prompt_len,
                              layout.data_cache)
    model, params = load_stage_model(layout.stage("sft"), heads=("lm",))
    sampling = sampling_settings(config, tokenizer, cfg.temperature, cfg.batch_size)
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 11)
    _, texts = sample_texts(model, params, prompts, rng, cfg.candidates, sampling, tokenizer)
    rows, responses = distinct_candidates(texts, cfg.num_responses)
    examples = [prompts.examples[r] for r in rows]
    records, gold_sets = label_rankings(examples, responses, cfg.labeler_temperature, seed=config.seed)

    n_train_prompts = len(prompts) - config.task.n_rm_heldout
    train = [rec for r, rec in zip(rows, records) if r < n_train_prompts]
    heldout = [rec for r, rec in zip(rows, records) if r >= n_train_prompts]
    heldout_gold = [g for r, g in zip(rows, gold_sets) if r >= n_train_prompts]
    if not train or not heldout:
        raise ValueError(f"rankings: {len(train)} train / {len(heldout)} held-out prompts have "
                         f"{cfg.num_responses} distinct SFT samples out of {cfg.candidates}; raise "
                         f"config.rankings.candidates or config.task.n_rm_prompts / n_rm_heldout")
    tasks.write_rankings(layout.rankings_train, train)
    tasks.write_rankings(layout.rankings_heldout, heldout)
    info = {"train_prompts": len(train), "heldout_prompts": len(heldout),
            "skipped_prompts": len(prompts) - len(rows),
            "labeler_agreement": tasks.labeler_agreement(heldout_gold, cfg.labeler_temperature),
            "bayes_pair_accuracy": tasks.bayes_pair_accuracy(heldout_gold, cfg.labeler_temperature),
            "mean_candidate_gold": float(np.mean([np.mean(g) for g in gold_sets]))}
    echo(f"[rankings] {len(train)} train + {len(heldout)} held-out rankings of K={cfg.num_responses} "
         f"({info['skipped_prompts']} prompts had too few distinct samples); labeler agreement "
         f"{info['labeler_agreement']:.3f}")
    return info


# ----------------------------------------------------------------------------------------------
# Stage: evaluation
# ----------------------------------------------------------------------------------------------
def ranking_scores(model, params, path: str, tokenizer, max_len: int, data_dir: str,
                   batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw RM scores `[P, K]` and labeler ranks `[P, K]` of every ranking in a rankings JSONL file."""
    from rlhf_jax import data
    from rlhf_jax.trainers import rm

    split = data.load_split("rankings", path, tokenizer, max_len=max_len, data_dir=data_dir)
    if split.num_dropped:
        raise ValueError(f"{path}: {split.num_dropped} rankings were dropped when tokenizing ({split.drop_counts}); "
                         "the held-out accuracy would not cover every ranking")
    batch = split.collate(np.arange(len(split)))
    score = jax.jit(lambda input_ids, attention_mask: {"score": rm.flat_scores(
        model, params, {"input_ids": input_ids, "attention_mask": attention_mask})})
    out = evaluation.map_batched(score, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                                 max(1, batch_size // batch["input_ids"].shape[1]))
    return out["score"], batch["ranks"]


def eval_temperature(config) -> float:
    """config.eval.temperature, or the PPO rollout temperature when it is negative."""
    return float(config.eval.temperature if config.eval.temperature >= 0 else config.ppo.rollout.temperature)


def gold_matrix(examples: list, texts: list[list[str]]) -> np.ndarray:
    """Gold scores `[R, S]` of S responses per prompt."""
    return np.stack([tasks.gold_scores([e] * len(row), row) for e, row in zip(examples, texts)])


def evaluate(config, layout: Layout, ppo_dir: str | pathlib.Path, out_dir: str | pathlib.Path, *,
             labeler_agreement: float, prior_seconds: float, echo: Callable[[str], None] = print) -> dict:
    """Held-out evaluation of SFT vs PPO; writes summary.json, report.md and the plots to `out_dir`.

    Per held-out prompt, `eval.num_samples` samples from SFT and from PPO (at `eval_temperature`):
    - sft_gold / ppo_gold: mean gold score over all samples;
    - win_rate_vs_sft: sample s of PPO against sample s of SFT under the gold judge, ties 1/2;
    - best_of_4_gold: gold of the RM's favourite among the SFT samples (first `eval.best_of`);
    - kl_to_sft: mean over prompts of sum_t log pi_ppo - log pi_sft on the PPO samples;
    - rm_heldout_accuracy: RM pairwise accuracy on the held-out labeler rankings.
    """
    start = time.perf_counter()
    cfg = config.eval
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = common.load_tokenizer(layout.tokenizer)
    gold = tasks.load_gold(layout.task_file("gold.jsonl"))
    prompts = load_prompt_set(layout.task_file("heldout_prompts.jsonl"), tokenizer, gold,
                              config.ppo.rollout.prompt_len, layout.data_cache)
    temperature = eval_temperature(config)
    sampling = sampling_settings(config, tokenizer, temperature, cfg.batch_size)
    sft_model, sft_params = load_stage_model(layout.stage("sft"), heads=("lm",))
    ppo_model, ppo_params = load_stage_model(ppo_dir, heads=("lm",))
    rm_model, rm_params, rm_norm = load_reward_model(layout.stage("rm"))
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 23)

    bar = tqdm.tqdm(total=5, desc="eval", dynamic_ncols=True)
    sft_out, sft_texts = sample_texts(sft_model, sft_params, prompts, jax.random.fold_in(rng, 0), cfg.num_samples,
                                      sampling, tokenizer)
    bar.update()
    ppo_out, ppo_texts = sample_texts(ppo_model, ppo_params, prompts, jax.random.fold_in(rng, 1), cfg.num_samples,
                                      sampling, tokenizer)
    bar.update()
    sft_gold, ppo_gold = gold_matrix(prompts.examples, sft_texts), gold_matrix(prompts.examples, ppo_texts)

    score_fn = evaluation.make_score_fn(rm_model, rm_norm)
    sft_rm = evaluation.score_responses(score_fn, rm_params, prompts.prompt_ids, prompts.prompt_mask,
                                        sft_out["tokens"], sft_out["mask"], cfg.batch_size)
    ppo_rm = evaluation.score_responses(score_fn, rm_params, prompts.prompt_ids, prompts.prompt_mask,
                                        ppo_out["tokens"], ppo_out["mask"], cfg.batch_size)
    best = evaluation.best_of_n_indices(sft_rm[:, :cfg.best_of])
    best_gold = sft_gold[np.arange(len(prompts)), best]
    bar.update()

    logprob_fn = evaluation.make_logprob_fn(ppo_model, temperature=temperature)
    args = (prompts.prompt_ids, prompts.prompt_mask, ppo_out["tokens"], ppo_out["mask"], cfg.batch_size)
    ppo_lp = evaluation.teacher_forced_logprobs(logprob_fn, ppo_params, *args)
    sft_lp = evaluation.teacher_forced_logprobs(logprob_fn, sft_params, *args)
    kl = evaluation.sequence_kl(ppo_lp, sft_lp, ppo_out["mask"])  # [R, S]
    bar.update()

    scores, ranks = ranking_scores(rm_model, rm_params, layout.rankings_heldout, tokenizer,
                                   config.rm.data.max_len, layout.data_cache, cfg.batch_size)
    bar.update()
    bar.close()

    summary = {
        "sft_gold": float(sft_gold.mean()),
        "best_of_4_gold": float(best_gold.mean()),
        "ppo_gold": float(ppo_gold.mean()),
        "rm_heldout_accuracy": evaluation.pairwise_accuracy(scores, ranks),
        "labeler_agreement": float(labeler_agreement),
        "kl_to_sft": float(kl.mean(axis=1).mean()),
        "win_rate_vs_sft": tasks.win_rate(ppo_gold.ravel(), sft_gold.ravel()),
        "wall_seconds": 0.0,
        "sft_rm_score": float(sft_rm.mean()),
        "ppo_rm_score": float(ppo_rm.mean()),
        "sft_length": float(np.mean([len(t.split()) for row in sft_texts for t in row])),
        "ppo_length": float(np.mean([len(t.split()) for row in ppo_texts for t in row])),
        "num_prompts": len(prompts),
        "num_samples": int(cfg.num_samples),
        "temperature": temperature,
        "seed": int(config.seed),
    }
    samples = [{"prompt": prompts.examples[i].prompt, "sft": sft_texts[i][0], "sft_gold": float(sft_gold[i, 0]),
                "ppo": ppo_texts[i][0], "ppo_gold": float(ppo_gold[i, 0])}
               for i in range(min(cfg.num_report_samples, len(prompts)))]
    with open(out_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        for i, example in enumerate(prompts.examples):
            f.write(json.dumps({"id": example.id, "prompt": example.prompt, "answer": example.answer,
                                "sft": sft_texts[i], "sft_gold": sft_gold[i].tolist(), "ppo": ppo_texts[i],
                                "ppo_gold": ppo_gold[i].tolist(), "kl": kl[i].tolist()}) + "\n")

    plots = write_plots(layout, ppo_dir, out_dir, labeler_agreement)
    summary["wall_seconds"] = float(prior_seconds + time.perf_counter() - start)
    report.write_summary(out_dir / "summary.json", summary)
    notes = [f"{len(prompts)} held-out prompts x {cfg.num_samples} samples at temperature {temperature}; "
             f"mean response length {summary['sft_length']:.1f} words (SFT) -> {summary['ppo_length']:.1f} (PPO); "
             f"normalised RM score {summary['sft_rm_score']:.2f} (SFT) -> {summary['ppo_rm_score']:.2f} (PPO)."]
    report.write_report(out_dir / "report.md", summary, samples, plots, notes)
    echo(f"[eval] win rate {summary['win_rate_vs_sft']:.2f}, gold {summary['sft_gold']:.3f} -> "
         f"{summary['ppo_gold']:.3f}, KL {summary['kl_to_sft']:.2f}")
    return summary


def write_plots(layout: Layout, ppo_dir: str | pathlib.Path, out_dir: pathlib.Path,
                labeler_agreement: float) -> dict[str, str]:
    """PPO curves and RM accuracy as PNGs in `out_dir`; returns {title: file name}."""
    from rlhf_jax import metrics

    plots = {}
    ppo_rows = metrics.read_metrics(ppo_dir)
    report.plot_ppo_curves(ppo_rows, out_dir / "ppo_curves.png")
    plots["PPO: RM reward, gold score, KL and KL coefficient per iteration"] = "ppo_curves.png"
    rm_rows = metrics.read_metrics(layout.stage("rm"))
    report.plot_rm_accuracy(rm_rows, out_dir / "rm_accuracy.png", ceiling=labeler_agreement)
    plots["Reward model: pairwise accuracy (train / held-out)"] = "rm_accuracy.png"
    return plots


# ----------------------------------------------------------------------------------------------
# Stage configs: the pipeline's stage sections plus the paths that tie the stages together
# ----------------------------------------------------------------------------------------------
def stage_configs(config, layout: Layout) -> dict:
    """{stage: ConfigDict} for pretrain, sft, rm and ppo, with data files, tokenizer, init /
    checkpoint paths, the shared TFDS cache and `seed` filled in (copies; `config` is unchanged)."""
    tokenizer, cache = layout.tokenizer, layout.data_cache
    pretrain = config.pretrain.copy_and_resolve_references()
    pretrain.seed = config.seed
    pretrain.data.update(kind="text", train=layout.task_file("corpus.txt"), eval="", tokenizer=tokenizer,
                         cache_dir=cache)
    pretrain.init.update(source="scratch", path="")

    sft = config.sft.copy_and_resolve_references()
    sft.seed = config.seed
    sft.data.update(kind="demonstrations", train=layout.task_file("sft.jsonl"),
                    eval=layout.task_file("sft_eval.jsonl"), tokenizer=tokenizer, cache_dir=cache)
    sft.init.update(source="checkpoint", path=str(layout.stage("pretrain")))

    rm = config.rm.copy_and_resolve_references()
    rm.seed = config.seed
    rm.data.update(kind="rankings", train=layout.rankings_train, eval=layout.rankings_heldout, tokenizer=tokenizer,
                   cache_dir=cache)
    rm.init.update(source="checkpoint", path=str(layout.stage("sft")))

    ppo = config.ppo.copy_and_resolve_references()
    ppo.seed = config.seed
    # the checkpoints/ dirs, not the run dirs: a run dir holds the run's config.json, which the PPO
    # trainer would take for a Hugging Face model directory
    ppo.actor_checkpoint = str(layout.stage("sft") / "checkpoints")
    ppo.reward_checkpoint = str(layout.stage("rm") / "checkpoints")
    ppo.data.update(prompts=layout.task_file("ppo_prompts.jsonl"), tokenizer=tokenizer, cache_dir=cache,
                    ptx=layout.task_file("corpus.txt") if ppo.ptx.coef else "")
    return {"pretrain": pretrain, "sft": sft, "rm": rm, "ppo": ppo}


def check_special_tokens(config, tokenizer) -> None:
    """The PPO rollout's EOS / pad ids must be the tokenizer's (errors name the config key)."""
    for key, expected in (("eos_id", tokenizer.eos_token_id), ("pad_id", tokenizer.pad_token_id)):
        if config.ppo.rollout[key] != expected:
            raise ValueError(f"config.ppo.rollout.{key}={config.ppo.rollout[key]} but the task tokenizer's "
                             f"{key} is {expected}")


def make_gold_scorer(prompts_path: str, gold: Mapping[str, Any], tokenizer) -> Callable:
    """PPO's host-side `gold_scorer(index, tokens, mask) -> [B]`: row `index` of the prompts file
    -> its hidden gold example -> gold score of the decoded response (for the `gold/mean` curve)."""
    examples = [gold[i] for i in read_prompt_ids(prompts_path)]
    eos = int(tokenizer.eos_token_id)

    def gold_scorer(index, tokens, mask):
        texts = evaluation.decode_responses(tokenizer, tokens, mask, eos)
        return tasks.gold_scores([examples[int(i)] for i in index], texts)

    return gold_scorer


class StageInterrupted(RuntimeError):
    """A trainer stopped early on a signal (its checkpoint is saved; re-run to resume)."""


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
    t = config.task
    paths = tasks.export_task(layout.task, seed=config.seed, n_sft=t.n_sft,
                              n_rm_prompts=t.n_rm_prompts, n_ppo_prompts=t.n_ppo_prompts,
                              n_heldout=t.n_heldout, n_corpus=t.n_corpus, error_rate=t.error_rate,
                              verbose_rate=t.verbose_rate)
    eval_examples = tasks.sample_examples(t.n_sft_eval, seed=config.seed + 1000, split="heldout")
    tasks.write_demonstrations(layout.task_file("sft_eval.jsonl"), eval_examples, config.seed + 1,
                               error_rate=t.error_rate, verbose_rate=t.verbose_rate)
    return {"files": sorted(paths)}


def ppo_stage(config, layout: Layout, ppo_config, workdir: str | pathlib.Path) -> dict:
    from rlhf_jax.trainers import ppo

    tokenizer = common.load_tokenizer(layout.tokenizer)
    scorer = make_gold_scorer(ppo_config.data.prompts, tasks.load_gold(layout.task_file("gold.jsonl")), tokenizer)
    return _trained("ppo", ppo.train(ppo_config, str(workdir), gold_scorer=scorer))


def run_pipeline(config, workdir: str | pathlib.Path, echo: Callable[[str], None] = print) -> dict:
    """Run every unfinished stage in order under `workdir`; returns the summary (see `evaluate`)."""
    from rlhf_jax.trainers import rm, sft

    start = time.perf_counter()
    layout = Layout(pathlib.Path(workdir).absolute())
    layout.root.mkdir(parents=True, exist_ok=True)
    (layout.root / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    cfgs = stage_configs(config, layout)
    seeded = lambda section: {"seed": config.seed, **section.to_dict()}  # noqa: E731
    records = {"task": run_stage("task", layout.task, lambda: export_stage(config, layout), echo,
                                 seeded(config.task))}
    check_special_tokens(config, common.load_tokenizer(layout.tokenizer))
    for name in ("pretrain", "sft"):
        records[name] = run_stage(name, layout.stage(name), lambda: _trained(
            name, sft.train(cfgs[name], str(layout.stage(name)))), echo, cfgs[name].to_dict())
    records["rankings"] = run_stage("rankings", layout.stage("rankings"),
                                    lambda: collect_ranking_data(config, layout, echo), echo,
                                    {**seeded(config.rankings), "n_rm_heldout": config.task.n_rm_heldout,
                                     "rollout": config.ppo.rollout.to_dict()})
    records["rm"] = run_stage("rm", layout.stage("rm"), lambda: _trained(
        "rm", rm.train(cfgs["rm"], str(layout.stage("rm")))), echo, cfgs["rm"].to_dict())
    records["ppo"] = run_stage("ppo", layout.stage("ppo"),
                               lambda: ppo_stage(config, layout, cfgs["ppo"], layout.stage("ppo")), echo,
                               cfgs["ppo"].to_dict())
    prior = sum(r["seconds"] for r in records.values())
    run_stage("eval", layout.stage("eval"), lambda: evaluate(
        config, layout, layout.stage("ppo"), layout.root,
        labeler_agreement=records["rankings"]["info"]["labeler_agreement"], prior_seconds=prior, echo=echo), echo,
        seeded(config.eval))
    echo(f"pipeline: {time.perf_counter() - start:.0f}s in this run; report in {layout.root / 'report.md'}")
    return json.loads((layout.root / "summary.json").read_text())


# ----------------------------------------------------------------------------------------------
# Over-optimisation sweep: PPO + eval per KL coefficient on one pipeline's SFT and RM
# ----------------------------------------------------------------------------------------------
REUSED_STAGES = ("task", "pretrain", "sft", "rankings", "rm")
SWEEP_COLUMNS = ("kl_coef", "kl_to_sft", "ppo_gold", "ppo_rm_score", "win_rate_vs_sft", "sft_gold", "sft_rm_score",
                 "best_of_4_gold", "ppo_length", "wall_seconds")


def parse_override(text: str) -> tuple[str, Any]:
    """"a.b=value" -> ("a.b", value); the value is a Python literal when it parses as one, else a string."""
    import ast

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {text!r}: expected key=value (e.g. ppo.num_steps=200)")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()
    return key.strip(), value


def apply_overrides(config, overrides: list[str]):
    """A copy of `config` with `--set` overrides applied; keys must exist and may not touch the
    reused stages (their results would not change)."""
    config = config.copy_and_resolve_references()
    for text in overrides:
        key, value = parse_override(text)
        head = key.split(".")[0]
        if head in REUSED_STAGES or head in ("pretrain",):
            raise ValueError(f"--set {key}: the sweep reuses the finished '{head}' stage, so this override would have "
                             f"no effect; run experiments/run_pipeline.py with --config.{key}=... in a new workdir")
        parent, _, leaf = key.rpartition(".")
        section = config
        for part in [p for p in parent.split(".") if p]:
            if part not in section:
                raise ValueError(f"--set {key}: config has no field {part!r} here (fields: {sorted(section.keys())})")
            section = section[part]
        if leaf not in section:
            raise ValueError(f"--set {key}: config has no field {leaf!r} (fields: {sorted(section.keys())})")
        try:
            section[leaf] = value
        except TypeError as err:
            raise ValueError(f"--set {key}={value!r}: {err}") from err
    return config


def load_pipeline_config(workdir: str | pathlib.Path):
    """The resolved pipeline config a workdir was run with (DIR/config.json)."""
    import ml_collections

    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run experiments/run_pipeline.py --workdir {workdir} first")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


@dataclasses.dataclass
class SweepResult:
    directory: pathlib.Path
    rows: list
    table: str


def _sweep_name(overrides: list[str]) -> str:
    import hashlib

    if not overrides:
        return "base"
    return "set-" + hashlib.blake2b("\n".join(sorted(overrides)).encode(), digest_size=4).hexdigest()


def run_sweep(workdir: str | pathlib.Path, kl_coefs: list[float], overrides: list[str] = (), name: str = "",
              echo: Callable[[str], None] = print) -> SweepResult:
    """PPO + evaluation for each KL coefficient, reusing the workdir's finished stages; writes the
    table (markdown + CSV) and the over-optimisation plot into DIR/sweep/<name>/."""
    layout = Layout(pathlib.Path(workdir).absolute())
    unfinished = [s for s in REUSED_STAGES if stage_info(layout.stage(s)) is None]
    if unfinished:
        raise ValueError(f"{layout.root}: stages {unfinished} have not finished; run experiments/run_pipeline.py "
                         f"--workdir {workdir} first")
    if not kl_coefs or any(not np.isfinite(c) or c < 0 for c in kl_coefs):
        raise ValueError(f"--kl_coefs must be finite numbers >= 0, got {kl_coefs}")
    base = apply_overrides(load_pipeline_config(layout.root), list(overrides))
    labeler_agreement = stage_info(layout.stage("rankings"))["info"]["labeler_agreement"]
    directory = layout.root / "sweep" / (name or _sweep_name(list(overrides)))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "overrides.json").write_text(json.dumps(list(overrides), indent=2) + "\n")

    rows = []
    for coef in kl_coefs:
        run_dir = directory / f"kl_{coef:g}"
        config = base.copy_and_resolve_references()
        config.ppo.kl.coef = float(coef)
        ppo_config = stage_configs(config, layout)["ppo"]
        ppo_record = run_stage(f"ppo kl={coef:g}", run_dir / "ppo",
                               lambda: ppo_stage(config, layout, ppo_config, run_dir / "ppo"), echo)
        run_stage(f"eval kl={coef:g}", run_dir / "eval", lambda: evaluate(
            config, layout, run_dir / "ppo", run_dir, labeler_agreement=labeler_agreement,
            prior_seconds=ppo_record["seconds"], echo=echo), echo)
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append({"kl_coef": float(coef), **summary})

    rows.sort(key=lambda r: r["kl_to_sft"])
    table = report.markdown_table(rows, SWEEP_COLUMNS)
    (directory / "sweep.md").write_text(
        f"# KL sweep ({layout.root})\n\nOverrides: {list(overrides) or 'none'}. One row per KL coefficient, "
        f"sorted by the measured KL to SFT.\n\n{table}\n![over-optimisation](overoptimization.png)\n")
    report.write_csv(directory / "sweep.csv", rows, SWEEP_COLUMNS)
    report.plot_overoptimization(rows, directory / "overoptimization.png",
                                 baseline=(0.0, rows[0]["sft_gold"], rows[0]["sft_rm_score"]))
    return SweepResult(directory=directory, rows=rows, table=table)
