"""The eval stage: SFT vs PPO on held-out prompts under the gold judge, best-of-n reranked by the
RM, KL to SFT, the RM's held-out ranking accuracy; summary.json, report.md and plots."""
from __future__ import annotations

import json
import pathlib
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from rlhf_jax import evaluation, loading, losses, metrics, preference, report, rl, tasks
from rlhf_jax.environment import environment
from rlhf_jax.models import reward as reward_lib
from rlhf_jax.pipeline.layout import Layout
from rlhf_jax.pipeline.sampling import load_prompt_set, sample_texts, sampling_settings


def ranking_scores(model, params, path: str, tokenizer, max_len: int, data_dir: str,
                   batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw RM scores `[P, K]` and labeler ranks `[P, K]` of every ranking in a rankings JSONL file."""
    # late import: rlhf_jax.data imports TensorFlow-Datasets, needed only when the stage runs
    from rlhf_jax import data

    split = data.load_split("rankings", path, tokenizer, max_len=max_len, data_dir=data_dir)
    if split.num_dropped:
        raise ValueError(f"{path}: {split.num_dropped} rankings were dropped when tokenizing ({split.drop_counts}); "
                         "the held-out accuracy would not cover every ranking")
    batch = split.collate(np.arange(len(split)))
    score = jax.jit(lambda input_ids, attention_mask: {"score": reward_lib.ranking_scores(
        model, params, {"input_ids": input_ids, "attention_mask": attention_mask})})
    out = evaluation.map_batched(score, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                                 max(1, batch_size // batch["input_ids"].shape[1]))
    return out["score"], batch["ranks"]


def rm_heldout_accuracy(scores: np.ndarray, ranks: np.ndarray) -> float:
    """`losses.ranking_accuracy` of RM scores `[P, K]` against labeler ranks `[P, K]` (0 = best;
    a score tie counts 1/2), the same rule as the RM trainer's `eval/accuracy`."""
    if scores.shape != ranks.shape or scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"RM accuracy: scores {scores.shape} and ranks {ranks.shape} need one shape [P, K>=2]")
    return float(losses.ranking_accuracy(jnp.asarray(scores), jnp.asarray(ranks)))


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
    - kl_to_sft: mean over prompts of sum_t log pi_ppo - log pi_sft on the PPO samples
      (`rl.kl_k1` summed over each response, a single-sample estimate: Ziegler et al. 2019, and the RL
      stage's `kl`). Unbiased for KL(pi || pi_sft) >= 0, but one response's term can be negative, so
      the mean can come out slightly below 0 from sampling noise; `kl_to_sft_stderr` is its standard
      error over prompts and `kl_to_sft_k3` the same mean with `rl.kl_k3` (also unbiased, >= 0 by
      construction, as the RL stage's `kl/k3`);
    - rm_heldout_accuracy: RM pairwise accuracy on the held-out labeler rankings.
    """
    start = time.perf_counter()
    cfg = config.eval
    algorithm = config.get("algorithm", "ppo")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = loading.load_tokenizer(layout.tokenizer)
    gold = tasks.load_gold(layout.task_file("gold.jsonl"))
    prompts = load_prompt_set(layout.task_file("heldout_prompts.jsonl"), tokenizer, gold,
                              config.ppo.rollout.prompt_len, layout.data_cache)
    temperature = eval_temperature(config)
    sampling = sampling_settings(config, tokenizer, temperature, cfg.batch_size)
    sft_model, sft_params = loading.load_model(layout.stage("sft"), heads=("lm",))
    ppo_model, ppo_params = loading.load_model(ppo_dir, heads=("lm",))
    rm_model, rm_params, rm_norm = loading.load_reward_model(layout.stage("rm"))
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
    # [R, S]: per-response sums in float32 (as in training), averaged over prompts in float64
    kl = np.asarray(jnp.sum(rl.kl_k1(ppo_lp, sft_lp, ppo_out["mask"]), axis=-1), np.float64)
    kl_k3 = np.asarray(jnp.sum(rl.kl_k3(ppo_lp, sft_lp, ppo_out["mask"]), axis=-1), np.float64)
    bar.update()

    scores, ranks = ranking_scores(rm_model, rm_params, layout.rankings_heldout, tokenizer,
                                   config.rm.data.max_len, layout.data_cache, cfg.batch_size)
    bar.update()
    bar.close()

    summary = {
        "sft_gold": float(sft_gold.mean()),
        "best_of_4_gold": float(best_gold.mean()),
        "ppo_gold": float(ppo_gold.mean()),
        "rm_heldout_accuracy": rm_heldout_accuracy(scores, ranks),
        "labeler_agreement": float(labeler_agreement),
        "kl_to_sft": float(kl.mean(axis=1).mean()),
        "kl_to_sft_stderr": report.standard_error(kl.mean(axis=1)),
        "kl_to_sft_estimator": report.KL_TO_SFT_ESTIMATOR,
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
        "algorithm": algorithm,
        "policy_gold": float(ppo_gold.mean()),
    }
    if np.isfinite(kl_k3).all():  # exp(log r) can overflow float32 for a token the policy all but never samples
        summary["kl_to_sft_k3"] = float(kl_k3.mean(axis=1).mean())
    if algorithm != "ppo":  # ppo_gold is the PPO policy's; other algorithms report policy_gold only
        del summary["ppo_gold"]
    samples = [{"prompt": prompts.examples[i].prompt, "sft": sft_texts[i][0], "sft_gold": float(sft_gold[i, 0]),
                "ppo": ppo_texts[i][0], "ppo_gold": float(ppo_gold[i, 0])}
               for i in range(min(cfg.num_report_samples, len(prompts)))]
    with open(out_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        for i, example in enumerate(prompts.examples):
            f.write(json.dumps({"id": example.id, "prompt": example.prompt, "answer": example.answer,
                                "sft": sft_texts[i], "sft_gold": sft_gold[i].tolist(), "ppo": ppo_texts[i],
                                "ppo_gold": ppo_gold[i].tolist(), "kl": kl[i].tolist()}) + "\n")

    plots = write_plots(layout, ppo_dir, out_dir, labeler_agreement, algorithm)
    summary["wall_seconds"] = float(prior_seconds + time.perf_counter() - start)
    summary["environment"] = environment()  # library versions and machine of this evaluation
    report.write_summary(out_dir / "summary.json", summary)
    notes = [f"{len(prompts)} held-out prompts x {cfg.num_samples} samples at temperature {temperature}; "
             f"mean response length {summary['sft_length']:.1f} words (SFT) -> {summary['ppo_length']:.1f} "
             f"({algorithm.upper()}); normalised RM score {summary['sft_rm_score']:.2f} (SFT) -> "
             f"{summary['ppo_rm_score']:.2f} ({algorithm.upper()}). (ppo_* keys describe the RL policy whatever "
             "the algorithm.)"]
    report.write_report(out_dir / "report.md", summary, samples, plots, notes)
    echo(f"[eval] win rate {summary['win_rate_vs_sft']:.2f}, gold {summary['sft_gold']:.3f} -> "
         f"{summary['policy_gold']:.3f}, KL {summary['kl_to_sft']:.2f} ± {summary['kl_to_sft_stderr']:.2f} "
         "(sampled estimate: small negative values are noise)")
    return summary


def write_plots(layout: Layout, ppo_dir: str | pathlib.Path, out_dir: pathlib.Path,
                labeler_agreement: float, algorithm: str = "ppo") -> dict[str, str]:
    """The policy's curves (RL: PPO curves; DPO variants: implicit-reward accuracy) and RM accuracy
    as PNGs in `out_dir`; returns {title: file name}."""
    plots = {}
    ppo_rows = metrics.read_metrics(ppo_dir)
    if algorithm in preference.VARIANTS:
        report.plot_rm_accuracy(ppo_rows, out_dir / "dpo_accuracy.png", curves=(
            ("rewards/accuracy", "train"), ("eval/rewards/accuracy", "held-out")), ceiling=labeler_agreement)
        plots[f"{algorithm}: implicit-reward pair accuracy (train / held-out)"] = "dpo_accuracy.png"
    else:
        report.plot_ppo_curves(ppo_rows, out_dir / "ppo_curves.png")
        plots["PPO: RM reward, gold score, KL and KL coefficient per iteration"] = "ppo_curves.png"
    rm_rows = metrics.read_metrics(layout.stage("rm"))
    report.plot_rm_accuracy(rm_rows, out_dir / "rm_accuracy.png", ceiling=labeler_agreement)
    plots["Reward model: pairwise accuracy (train / held-out)"] = "rm_accuracy.png"
    return plots
