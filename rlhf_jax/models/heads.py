"""Heads on the decoder trunk: LM head (policy, reference) and scalar head (reward model, critic).

InstructGPT stage 2: a reward model starts from the SFT model with the unembedding dropped and a
scalar head added (`lm_params_to_scalar`). The reward of a sequence is the scalar at its last real
token (`last_token_values`); a critic uses the scalar at every token.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.models.matmul import matmul


class LMHead(nn.Module):
    """Unembedding to fp32 logits; reuses the token embedding when it is tied (GPT-2)."""

    config: "TransformerConfig"  # noqa: F821 (rlhf_jax.models.transformer)

    @nn.compact
    def __call__(self, x, tied_embedding=None):
        cfg = self.config
        if tied_embedding is not None:
            kernel = tied_embedding.T
        else:
            kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                       ("embed", "vocab")),
                                (cfg.d_model, cfg.vocab_size), jnp.float32)
        dt = cfg.compute_dtype
        return matmul(x.astype(dt), kernel.astype(dt), jnp.float32)


class ScalarHead(nn.Module):
    """One fp32 scalar per token, N(0, 1/(d+1)) init as in Stiennon et al. 2020 (no bias)."""

    d_model: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.normal(1.0 / (self.d_model + 1) ** 0.5), ("embed", None)), (self.d_model, 1),
            jnp.float32)
        return jnp.einsum("btd,do->bto", x.astype(jnp.float32), kernel)[..., 0]


def last_token_index(mask: jax.Array) -> jax.Array:
    """Index of the last 1 in each row of `mask [B, T]` (0 for an all-zero row)."""
    positions = jnp.arange(mask.shape[-1])
    return jnp.max(jnp.where(mask.astype(bool), positions, 0), axis=-1)


def last_token_values(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Sequence score: `values [B, T]` read at the last real token of each row -> `[B]`."""
    return jnp.take_along_axis(values, last_token_index(mask)[:, None], axis=-1)[:, 0]


def lm_params_to_scalar(lm_params: dict, rng: jax.Array, d_model: int) -> dict:
    """Reward/critic parameters from LM parameters: drop the unembedding, add a fresh scalar head."""
    params = {k: v for k, v in lm_params.items() if k != "lm_head"}
    head = ScalarHead(d_model).init(rng, jnp.zeros((1, 1, d_model), jnp.float32))
    params["value_head"] = nn.meta.unbox(head["params"])
    return params
