"""Reward-model scoring: one definition for RM training, RM evaluation, RL and the pipeline.

A reward model is the decoder with a scalar head (`heads=("value",)`). The score of a sequence is
the scalar at its last real token (`heads.last_token_values`), normalised with the `norm` stored
with the RM checkpoint: score = (raw − mean) / std (Ouyang et al. 2022, §3.5: the RM is offset
so that reference responses score 0 on average).
"""
from __future__ import annotations

from typing import Mapping

import jax

from rlhf_jax.models.heads import last_token_values
from rlhf_jax.models.transformer import Transformer


def raw_scores(model: Transformer, params, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Unnormalised reward `[B]` fp32: the value head at the last real token of each row of
    `input_ids [B, T]` (int) under `attention_mask [B, T]` (1 = real token)."""
    values = model.apply({"params": params}, input_ids, attention_mask).values
    return last_token_values(values, attention_mask)


def score(model: Transformer, params, norm: Mapping[str, float], input_ids: jax.Array,
          attention_mask: jax.Array) -> jax.Array:
    """Normalised reward `[B]` = (raw − norm["mean"]) / norm["std"] (traceable; jit as needed)."""
    return (raw_scores(model, params, input_ids, attention_mask) - norm["mean"]) / norm["std"]


def ranking_scores(model: Transformer, params, batch: Mapping[str, jax.Array], rng: jax.Array | None = None,
                   deterministic: bool = True) -> jax.Array:
    """Raw scores `[P, K]` of a ranking batch: `input_ids` / `attention_mask` `[P, K, T]` are
    flattened to `[P*K, T]` for the model; dropout with `rng` when not `deterministic`."""
    num_prompts, k, length = batch["input_ids"].shape
    ids = batch["input_ids"].reshape(num_prompts * k, length)
    mask = batch["attention_mask"].reshape(num_prompts * k, length)
    values = model.apply({"params": params}, ids, mask, deterministic=deterministic,
                         rngs=None if deterministic else {"dropout": rng}).values
    return last_token_values(values, mask).reshape(num_prompts, k)
