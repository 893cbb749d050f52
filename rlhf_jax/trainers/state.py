"""Train state of a single-model stage (SFT, RM), its shardings, and the jitted sharded step.

Gradient accumulation is an in-step `lax.scan` over `grad_accum` microbatches (not
optax.MultiSteps), so one jitted call is one optimizer update and `step` counts updates. Row `i`
of a batch goes to microbatch `i % grad_accum`: every device keeps its own rows (no resharding),
and the split does not depend on the mesh. Microbatch results are combined with weights from
`weight_fn` (e.g. the number of target tokens), so accumulation gives the same loss and gradient
as one big batch. Non-finite steps are skipped by `optim.guarded_update` and counted.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax
from absl import logging
from jax.sharding import Mesh

from rlhf_jax import checkpoint as checkpoint_lib
from rlhf_jax import loading, optim, sharding
from rlhf_jax.models import Transformer

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
    """Everything a stage needs to continue exactly: saved whole in each checkpoint.

    step: updates taken (skipped non-finite steps included); step t uses rng fold_in(rng, t).
    rng: raw uint32[2] PRNG key (plain array so Orbax saves it).
    nonfinite_steps / nonfinite_streak: total and current-consecutive skipped steps.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_steps: jax.Array
    nonfinite_streak: jax.Array

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
        zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (one buffer each: steps donate them)
        return cls(step=zero(), params=params, opt_state=optimizer.init(params), rng=rng,
                   nonfinite_steps=zero(), nonfinite_streak=zero())


def train_state_shardings(optimizer: optax.GradientTransformation, params_shape: Any, param_sh: Any,
                          mesh: Mesh) -> TrainState:
    """`TrainState` of shardings: params/optimizer state sharded, scalars and RNG replicated."""
    rep = sharding.replicated(mesh)
    return TrainState(step=rep, params=param_sh,
                      opt_state=optim.opt_state_shardings(optimizer, params_shape, param_sh, mesh),
                      rng=rep, nonfinite_steps=rep, nonfinite_streak=rep)


def init_train_state(params: Any, optimizer: optax.GradientTransformation, rng: jax.Array,
                     state_sh: TrainState, options: dict | None = None) -> TrainState:
    """Build the state on device with its shardings (optimizer moments are created sharded);
    `options`: XLA compiler options (`setup.compiler_options`)."""
    params = sharding.shard_params(params, state_sh.params)
    create = jax.jit(lambda p, r: TrainState.create(p, optimizer, r), out_shardings=state_sh,
                     compiler_options=options)
    return create(params, sharding.shard_params(rng, state_sh.rng))


# ----------------------------------------------------------------------------------------------
# The jitted step
# ----------------------------------------------------------------------------------------------
def split_microbatches(batch: Mapping[str, jax.Array], grad_accum: int) -> dict:
    """[B, ...] -> [grad_accum, B / grad_accum, ...] with row i in microbatch i % grad_accum."""
    def split(x):
        if x.shape[0] % grad_accum:
            raise ValueError(f"batch of {x.shape[0]} rows is not divisible by grad_accum={grad_accum}")
        return jnp.swapaxes(x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]), 0, 1)
    return {key: split(value) for key, value in batch.items()}


def accumulate_gradients(loss_fn: LossFn, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array,
                         grad_accum: int = 1, weight_fn: Callable | None = None):
    """(loss, metrics, grads) over `grad_accum` microbatches, averaged with weights `weight_fn(mb)`.

    `loss_fn(params, batch, rng) -> (loss, metrics)`; microbatch i gets rng fold_in(rng, i).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        (loss, metrics), grads = grad_fn(params, batch, rng)
        return loss, metrics, grads

    def weighted(micro, index):
        (loss, metrics), grads = grad_fn(params, micro, jax.random.fold_in(rng, index))
        weight = jnp.asarray(weight_fn(micro) if weight_fn else 1.0, jnp.float32)
        return jax.tree.map(lambda x: x * weight, (loss, metrics, grads)) + (weight,)

    micro = split_microbatches(batch, grad_accum)
    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(weighted, first, 0))

    def body(total, xs):
        index, mb = xs
        return jax.tree.map(jnp.add, total, weighted(mb, index)), None

    (loss, metrics, grads, weight), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro))
    weight = jnp.maximum(weight, 1e-9)
    return jax.tree.map(lambda x: x / weight, (loss, metrics, grads))


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    *, grad_accum: int = 1, weight_fn: Callable | None = None):
    """Pure `train_step(state, batch) -> (state, metrics)`: gradients, guarded AdamW update.

    Metrics: the loss_fn's metrics plus `loss`, `grad_norm` (before clipping), `lr`,
    `nonfinite_steps` (total skipped) and `nonfinite_streak`.
    """
    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        rng = jax.random.fold_in(state.rng, state.step)
        loss, metrics, grads = accumulate_gradients(loss_fn, state.params, batch, rng, grad_accum, weight_fn)
        params, opt_state, finite = optim.guarded_update(optimizer, state.params, state.opt_state, grads, loss)
        bad = (~finite).astype(jnp.int32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  nonfinite_steps=state.nonfinite_steps + bad,
                                  nonfinite_streak=(state.nonfinite_streak + 1) * bad)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
                   # the optimizer's count (hence its schedule) does not advance on skipped steps
                   "lr": schedule(state.step - state.nonfinite_steps), "nonfinite_steps": new_state.nonfinite_steps,
                   "nonfinite_streak": new_state.nonfinite_streak}
        return new_state, metrics

    return train_step


def jit_train_step(step_fn: Callable, state_sh: Any, batch_sh: Any, options: dict | None = None):
    """`jax.jit` with explicit in/out shardings, the state donated (updated in place), metrics
    replicated; `options` are XLA compiler options (`setup.compiler_options`)."""
    mesh = jax.tree.leaves(state_sh)[0].mesh
    return jax.jit(step_fn, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,),
                   compiler_options=options)


# ----------------------------------------------------------------------------------------------
# Checkpoint items, resume or init
# ----------------------------------------------------------------------------------------------
def state_items(state: TrainState) -> dict:
    """Checkpoint items: "params" (what later stages load) and "train" (everything else)."""
    return {"params": state.params, "train": state.replace(params=None)}


def state_from_items(items: Mapping[str, Any]) -> TrainState:
    return items["train"].replace(params=items["params"])


def restore_or_init(checkpointer: checkpoint_lib.Checkpointer, state_shape: TrainState, state_sh: TrainState,
                    init_fn: Callable[[], TrainState]) -> tuple[TrainState, dict, int | None]:
    """Resume from the newest readable checkpoint in the workdir, else `init_fn()`.

    Returns (state, meta, resumed step or None). The restore target carries the current mesh's
    shardings, so a run may resume on a different mesh shape / device count.
    """
    target = checkpoint_lib.abstract_tree(state_shape, state_sh)
    restored = checkpointer.restore(state_items(target))
    if restored is None:
        return init_fn(), {}, None
    logging.warning("Resuming from %s/%d", checkpointer.directory, restored.step)
    return state_from_items(restored.items), restored.meta, restored.step


@dataclasses.dataclass
class StageState:
    """What `build_state` sets up for a single-model stage (SFT, RM)."""

    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    param_sh: Any
    state_sh: TrainState
    state: TrainState
    meta: dict  # metadata of the resumed checkpoint ({} for a fresh run)
    resumed: int | None  # resumed step, None for a fresh run
    checkpointer: checkpoint_lib.Checkpointer


def build_state(config, model: Transformer, mesh: Mesh, workdir: str, num_steps: int,
                options: dict | None = None, trainable: tuple | None = None) -> StageState:
    """Optimizer, shardings and the train state: resumed from WORKDIR/checkpoints when it holds a
    checkpoint (no init work then), else initialised from config.init (`loading.initial_params`).
    `trainable`: (shapes, shardings, init_fn(rng)) of the trained parameters when they are not all
    of `model`'s (LoRA adapters and heads: `trainers.lora_state`)."""
    optimizer, schedule = optim.make_optimizer(config.optim, num_steps)
    if trainable is None:
        param_sh = sharding.param_shardings(model, mesh)
        params_shape = loading.param_shapes(model)
        init_params = lambda rng: loading.initial_params(config.init, model, param_sh, rng, options)  # noqa: E731
    else:
        params_shape, param_sh, init_params = trainable
    state_sh = train_state_shardings(optimizer, params_shape, param_sh, mesh)
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))

    def init_state():
        return init_train_state(init_params(init_rng), optimizer, state_rng, state_sh, options)

    checkpointer = checkpoint_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints",
                                               max_to_keep=config.checkpoint.max_to_keep)
    state_shape = jax.eval_shape(lambda: TrainState.create(params_shape, optimizer, state_rng))
    state, meta, resumed = restore_or_init(checkpointer, state_shape, state_sh, init_state)
    return StageState(optimizer, schedule, param_sh, state_sh, state, meta, resumed, checkpointer)
