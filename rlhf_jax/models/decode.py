"""KV-cache decoding for `rlhf_jax.generation`: the decode layout and the cached attention.

`Transformer.__call__(..., cache=..., cache_index=...)` runs its layers through `cached_layers`
below; that is the only switch between the plain model and this code. The decode layout:

- parameters: `unstack_layers(params)` turns the scanned `params["layers"]` (leading layer axis)
  into a tuple of per-layer trees (do it once, outside the decode loop);
- cache: `init_cache(config, batch, slots)`, one `{"k", "v"}` of head-major
  `[batch, kv_heads, slots, head_dim]` arrays per layer, in the compute dtype;
- `attention_mask [B, slots]` covers every cache slot; the T new tokens are written at slots
  `[cache_index, cache_index + T)` and attend to the slots before them plus themselves.

The results equal the plain model's forward pass over the whole sequence (tests check it). Why
the code has this shape (per-layer trees, keys split into cache and new part, a zero term before
the cache write) is measured in docs/benchmarks.md, "Why the model code looks like this".
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.models.transformer import (MLP, Dense, Norm, TransformerConfig, allowed_keys, masked_scores,
                                         qkv_projections)


def init_cache(config: TransformerConfig, batch_size: int, slots: int) -> tuple:
    """Zeroed per-layer KV cache: `n_layers` x `{"k", "v"}` of `[batch, kv_heads, slots, head_dim]`."""
    shape = (batch_size, config.kv_heads, slots, config.dim_per_head)
    return tuple({"k": jnp.zeros(shape, config.compute_dtype), "v": jnp.zeros(shape, config.compute_dtype)}
                 for _ in range(config.n_layers))


def unstack_layers(params: dict) -> dict:
    """Parameters in the decode layout: `params["layers"]` (stacked on a leading layer axis) becomes
    a tuple of per-layer trees; everything else is unchanged."""
    stacked = params["layers"]
    if isinstance(stacked, tuple):
        return params
    n_layers = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    return {**params, "layers": tuple(jax.tree_util.tree_map(lambda p: p[i], stacked) for i in range(n_layers))}


class CachedAttention(nn.Module):
    """`Attention` with a KV cache: same parameters (q, k, v, o) and the same values."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, cache, key_mask, rope, cache_index):
        cfg = self.config
        dt = cfg.compute_dtype
        batch, q_len, _ = x.shape
        q, k, v = qkv_projections(cfg, x, rope)
        query_slot = cache_index + jnp.arange(q_len)[:, None]
        new_slot = cache_index + jnp.arange(q_len)[None, :]
        new_mask = jax.lax.dynamic_slice_in_dim(key_mask, cache_index, q_len, 1)
        # Keys in two parts: the slots written before `cache_index` (read from the cache, which is
        # only written at the end) and the T new keys. A prefill at slot 0 has no first part.
        parts = [(k, v, allowed_keys(query_slot, new_slot, new_mask, cfg.sliding_window))]
        if not (isinstance(cache_index, int) and cache_index == 0):
            old_slot = jnp.arange(cache["k"].shape[2])[None, :]
            old_mask = key_mask.astype(bool) & (old_slot < cache_index)
            parts.insert(0, (cache["k"], cache["v"], allowed_keys(query_slot, old_slot, old_mask, cfg.sliding_window)))

        # Softmax over both parts without concatenating them: one shared max and normaliser.
        scores = [masked_scores(q, keys, allowed) for keys, _, allowed in parts]
        top = functools.reduce(jnp.maximum, [s.max(axis=-1, keepdims=True) for s in scores])
        weights = [jnp.exp(s - top) for s in scores]
        total = functools.reduce(jnp.add, [w.sum(axis=-1, keepdims=True) for w in weights])
        out = 0.0
        for (_, values, _), w in zip(parts, weights):
            out = out + jnp.einsum("bhkd,bhgqk->bqhgd", values, (w / total).astype(dt))
        out = out.reshape(batch, q_len, -1)
        # Write the new keys and values after the reads above: the zero term makes the written values
        # depend on the attention output, so the in-place update is ordered after the reads.
        after_reads = (0.0 * out[:, 0, 0]).astype(dt)[:, None, None, None]
        cache = {"k": jax.lax.dynamic_update_slice_in_dim(cache["k"], k + after_reads, cache_index, axis=2),
                 "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], v + after_reads, cache_index, axis=2)}
        out = Dense(cfg.d_model, ("heads", "embed"), cfg.attn_bias, dt, "embed", name="o")(out)
        return out, cache


class CachedBlock(nn.Module):
    """`Block` with a KV cache (no dropout: decoding is deterministic)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, cache, key_mask, rope, cache_index):
        cfg = self.config
        attn_out, cache = CachedAttention(cfg, name="attn")(Norm(cfg, name="attn_norm")(x), cache, key_mask, rope,
                                                            cache_index)
        x = x + attn_out
        x = x + MLP(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x))
        return x, cache


def cached_layers(model: nn.Module, x, cache: tuple, key_mask, rope, cache_index) -> tuple:
    """The blocks of the bound `Transformer` one after another, each with its parameters and cache:
    `x [B, T, d_model]` -> `(x, new cache)`."""
    layer_params = model.variables["params"]["layers"]
    if not isinstance(layer_params, tuple) or not isinstance(cache, tuple):
        raise ValueError("Transformer: decoding with a cache needs the decode layout: params from "
                         "decode.unstack_layers(params) and a cache from decode.init_cache(...); got "
                         f"params['layers'] of type {type(layer_params).__name__} and a cache of type "
                         f"{type(cache).__name__}")
    if not len(layer_params) == len(cache) == model.config.n_layers:
        raise ValueError(f"Transformer: {len(layer_params)} layers of parameters and {len(cache)} of cache, "
                         f"config.n_layers={model.config.n_layers}")
    new_cache = []
    for params, layer_cache in zip(layer_params, cache):
        x, layer_cache = CachedBlock(model.config, parent=None).apply(
            {"params": params}, x, layer_cache, key_mask, rope, cache_index)
        new_cache.append(layer_cache)
    return x, tuple(new_cache)
