"""`matmul`: `x @ w` for every projection of the Transformer (q/k/v/o, MLP, LM head).

On the backends in `CUSTOM_VJP_BACKENDS` (XLA:CPU) it carries a hand-written VJP, the textbook
dx = g·wᵀ and dw = xᵀ·g over the flattened leading axes; elsewhere it is plain `jnp.matmul`.
Values are jnp.matmul's either way, gradients equal autodiff's up to float rounding (tests check
both). Why XLA:CPU gets its own VJP: docs/benchmarks.md, "Why the model code looks like this".
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

CUSTOM_VJP_BACKENDS = ("cpu",)


def matmul(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """`x [..., K] @ w [K, N]` -> `[..., N]` in `out_dtype` if given, else x's dtype."""
    if jax.default_backend() in CUSTOM_VJP_BACKENDS:
        return _matmul_custom_vjp(x, w, out_dtype)
    return jnp.matmul(x, w, preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_custom_vjp(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    return jnp.matmul(x, w, preferred_element_type=out_dtype)


def _matmul_fwd(x, w, out_dtype):
    return _matmul_custom_vjp(x, w, out_dtype), (x, w)


def _matmul_bwd(out_dtype, residuals, g):
    x, w = residuals
    dx = jnp.matmul(g.astype(w.dtype), w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]).astype(x.dtype)
    dw = jnp.matmul(x2.T, g2, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


_matmul_custom_vjp.defvjp(_matmul_fwd, _matmul_bwd)
