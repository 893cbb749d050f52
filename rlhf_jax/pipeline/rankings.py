"""The rankings stage: K distinct SFT samples per RM prompt, gold-scored and ranked by a
simulated labeler (Plackett-Luce at `rankings.labeler_temperature`); the last
`instructions.n_rm_heldout` prompts are held out for the RM's accuracy."""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from rlhf_jax import evaluation, loading, tasks
from rlhf_jax.pipeline.layout import Layout
from rlhf_jax.pipeline.sampling import load_prompt_set, sample_texts, sampling_settings


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


def label_rankings(examples: list, responses: list[list[str]], temperature: float,
                   seed: int) -> tuple[list[dict], list]:
    """Simulated labeler rankings plus the gold scores behind them (for the agreement ceiling)."""
    rng = np.random.default_rng(seed)
    records = tasks.collect_rankings(examples, responses, rng, temperature)
    gold_sets = [tasks.gold_scores([e] * len(r), r) for e, r in zip(examples, responses)]
    return records, gold_sets


def collect_ranking_data(config, layout: Layout, echo: Callable[[str], None] = print) -> dict:
    """Sample `rankings.candidates` SFT responses per RM prompt, keep the first K distinct ones,
    let a simulated labeler rank them; the last `instructions.n_rm_heldout` prompts are held out.

    Returns the stage facts: counts and the labelers' agreement / Bayes accuracy on the held-out
    rankings (the ceiling the RM is compared to).
    """
    cfg = config.rankings
    tokenizer = loading.load_tokenizer(layout.tokenizer)
    gold = tasks.load_gold(layout.task_file("gold.jsonl"))
    prompts = load_prompt_set(layout.task_file("rm_prompts.jsonl"), tokenizer, gold, config.ppo.rollout.prompt_len,
                              layout.data_cache)
    model, params = loading.load_model(layout.stage("sft"), heads=("lm",))
    sampling = sampling_settings(config, tokenizer, cfg.temperature, cfg.batch_size)
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 11)
    _, texts = sample_texts(model, params, prompts, rng, cfg.candidates, sampling, tokenizer)
    rows, responses = distinct_candidates(texts, cfg.num_responses)
    examples = [prompts.examples[r] for r in rows]
    records, gold_sets = label_rankings(examples, responses, cfg.labeler_temperature, seed=config.seed)

    n_train_prompts = len(prompts) - config.instructions.n_rm_heldout
    train = [rec for r, rec in zip(rows, records) if r < n_train_prompts]
    heldout = [rec for r, rec in zip(rows, records) if r >= n_train_prompts]
    heldout_gold = [g for r, g in zip(rows, gold_sets) if r >= n_train_prompts]
    if not train or not heldout:
        raise ValueError(f"rankings: {len(train)} train / {len(heldout)} held-out prompts have "
                         f"{cfg.num_responses} distinct SFT samples out of {cfg.candidates}; raise "
                         f"config.rankings.candidates or config.instructions.n_rm_prompts / n_rm_heldout")
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
