"""Optimizers and the one non-finite update guard, shared by every trainer and the RL iteration.

AdamW (decoupled weight decay, Loshchilov & Hutter 2019) after global-norm clipping, with linear
warmup and cosine decay (optax). `guarded_update` applies an update only when the loss, the
gradients and the update are all finite; otherwise parameters and optimizer state stay as they
were (`jnp.where`, inside the jitted program) and the caller counts the skipped step.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlhf_jax import sharding


def make_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine decay to `learning_rate * final_lr_ratio`
    at `decay_steps` (0 = `num_steps`), in optimizer updates. Also the `lr` that is logged: lr of
    step s = schedule(s - 1)."""
    decay_steps = optim_cfg.decay_steps or num_steps
    warmup = min(optim_cfg.warmup_steps, decay_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim_cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(decay_steps, warmup + 1), end_value=optim_cfg.learning_rate * optim_cfg.final_lr_ratio)


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices ("kernel", "embedding") only; not on norm scales or biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params)


def make_optimizer(optim_cfg, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW after global-norm clipping (configs/common.optim_config); returns the optimizer and
    its learning-rate schedule."""
    schedule = make_schedule(optim_cfg, num_steps)
    parts = []
    if optim_cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.max_grad_norm))
    parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


def opt_state_shardings(optimizer: optax.GradientTransformation, params_shape: Any, param_sh: Any,
                        mesh: Mesh) -> Any:
    """Optimizer-state shardings: parameter-shaped leaves (Adam moments) follow their parameter,
    the rest (counts) is replicated."""
    state_shape = jax.eval_shape(optimizer.init, params_shape)
    return optax.tree_map_params(optimizer, lambda _, sh: sh, state_shape, param_sh,
                                 transform_non_params=lambda _: sharding.replicated(mesh))


def tree_all_finite(tree: Any) -> jax.Array:
    """Scalar bool: every element of every leaf is finite (True for an empty tree)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def guarded_update(optimizer: optax.GradientTransformation, params: Any, opt_state: Any, grads: Any,
                   loss: jax.Array) -> tuple[Any, Any, jax.Array]:
    """One optimizer step, skipped when `loss`, a gradient or the update is not finite.

    Returns (params, opt_state, finite): the new ones when `finite` (scalar bool), else the old.
    """
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & tree_all_finite(grads) & tree_all_finite(updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    return keep(new_params, params), keep(new_opt_state, opt_state), finite
