"""`matmul`: x @ w with a VJP that XLA:CPU runs without transposing the output gradient.

Every projection of the Transformer (q/k/v/o, MLP, LM head) goes through it. Forward values are
exactly jnp.matmul's; only the layout of the backward dots differs from autodiff's own rule.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """`x [..., K] @ w [K, N]` (in `out_dtype` if given, else x's dtype), with a hand-written VJP.

    The values are jnp.matmul's. The VJP is the textbook one, dx = g·wᵀ and dw = xᵀ·g over the
    flattened leading axes, written so XLA:CPU sees a plain dot: from autodiff's own rule it chose
    to transpose g for the weight gradient and fused that strided copy into the activation's
    backward (the SwiGLU MLP of a d_model-512 SFT step spent 15% of the step in those copies).
    """
    return jnp.matmul(x, w, preferred_element_type=out_dtype)


def _matmul_fwd(x, w, out_dtype):
    return matmul(x, w, out_dtype), (x, w)


def _matmul_bwd(out_dtype, residuals, g):
    x, w = residuals
    dx = jnp.matmul(g.astype(w.dtype), w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]).astype(x.dtype)
    dw = jnp.matmul(x2.T, g2, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


matmul.defvjp(_matmul_fwd, _matmul_bwd)
