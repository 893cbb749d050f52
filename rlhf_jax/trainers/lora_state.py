"""LoRA in a single-model stage (SFT, RM): what `config.lora` changes in the train state.

With `config.lora.rank > 0` the stage's `TrainState.params` (optimizer state, checkpoint "params"
item) is the trainable tree only: the adapters plus `modules_to_save` (the RM's scalar head, any configured). The
frozen base is read from `config.init` at every start (fresh or resumed; the checkpoint metadata
points at it under "lora"/"base"), lives on device once, and enters the jitted step as an
argument that is neither donated nor differentiated. `loading.load_checkpoint_params` merges such
a checkpoint back into plain weights for later stages, `rlhf_jax.load` and export. With
`config.lora.quantize` (QLoRA) the frozen base is held quantised (`lora.quantize_base`); the
memory report counts its int8 / nf4 bytes.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import loading, lora, sharding
from rlhf_jax.models import Transformer
from rlhf_jax.trainers import state as state_lib


def validate(config, key: str = "config") -> None:
    """One-line errors naming the key: a bad `lora` section, or LoRA on a freshly initialised model."""
    spec = lora.LoraSpec.from_config(config.lora, f"{key}.lora")
    if spec is not None and config.init.source == "scratch":
        raise ValueError(f"{key}.lora.rank={spec.rank} needs {key}.init.source 'checkpoint' or 'hf' "
                         "(LoRA adapts a trained model; the frozen base is read from there)")


@dataclasses.dataclass
class LoraStage:
    """spec; model: LoRA model of the training step (adapter dropout on); eval_model: without
    dropout (evaluation, sampling); frozen / frozen_sh: the base weights on device and their
    shardings; full_sh: shardings of `lora.combine(trainable, frozen)`; trainable: (shapes,
    shardings, init_fn) for `state.build_state`; meta: checkpoint metadata entry; initial_saved:
    the starting values of `spec.modules_to_save` (`setup(keep_initial=True)`, for a reference
    model; else {})."""

    spec: lora.LoraSpec
    model: Transformer
    eval_model: Transformer
    frozen: Any
    frozen_sh: Any
    full_sh: Any
    trainable: tuple
    meta: dict
    initial_saved: Any = dataclasses.field(default_factory=dict)

    def full(self, state: state_lib.TrainState) -> state_lib.TrainState:
        """`state` with the whole LoRA parameter tree (for evaluation and sampling; no copies)."""
        return state.replace(params=lora.combine(state.params, self.frozen))


def setup(config, model: Transformer, mesh, options: dict | None = None,
          modules_to_save: tuple = (), keep_initial: bool = False) -> LoraStage | None:
    """`None` when `config.lora.rank == 0`; else the LoRA view of the stage with the frozen base
    loaded from `config.init` onto `mesh` (the same rng as a full fine-tune's init, so a fresh
    scalar head is the same too)."""
    spec = lora.LoraSpec.from_config(config.lora, "config.lora", modules_to_save)
    if spec is None:
        return None
    lmodel = lora.lora_model(model, spec)
    eval_model = lora.lora_model(model.clone(config=model.config.replace(dropout_rate=0.0)), spec, train=False)
    full_sh = sharding.param_shardings(lmodel, mesh)
    train_shapes, _ = lora.split(loading.param_shapes(lmodel), spec)
    train_sh, frozen_sh = lora.split(full_sh, spec)
    init_rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]  # as state.build_state's
    base = loading.initial_params(config.init, model, sharding.param_shardings(model, mesh), init_rng, options)
    heads, frozen = lora.split(base, spec)
    del base
    if spec.quantized:  # QLoRA: the frozen kernels stored quantised (the fp32 copy is dropped here)
        frozen = jax.jit(lambda f: lora.quantize_base(lmodel, f), out_shardings=frozen_sh,
                         compiler_options=options)(frozen)

    def init_fn(rng):
        adapters = jax.jit(lambda b: lora.init_adapters(lmodel, b, jax.random.fold_in(rng, 1)),
                           compiler_options=options)(lora.combine(heads, frozen))
        return sharding.shard_params(lora.combine(adapters, heads), train_sh)

    path = config.init.path
    meta = {**spec.meta(), "base": {"source": config.init.source,
                                    "path": str(pathlib.Path(path).absolute()) if path else ""}}
    return LoraStage(spec, lmodel, eval_model, frozen, frozen_sh, full_sh, (train_shapes, train_sh, init_fn), meta,
                     jax.tree.map(jnp.copy, heads) if keep_initial else {})  # a copy: the state is donated


def jit_train_step(stage: LoraStage, loss_fn: Callable, built: state_lib.StageState, batch_sh: Any,
                   options: dict | None = None, **step_kwargs) -> Callable:
    """`step(state, batch) -> (state, metrics)`: `state.make_train_step` of
    `loss_fn(combine(trainable, frozen), batch, rng)`, gradients and AdamW on the trainable tree
    only; the frozen base is a (not donated) argument of the jitted program."""
    def step(state, batch, frozen):
        fn = lambda params, b, rng: loss_fn(lora.combine(params, frozen), b, rng)  # noqa: E731
        return state_lib.make_train_step(fn, built.optimizer, built.schedule, **step_kwargs)(state, batch)

    mesh = jax.tree.leaves(built.state_sh)[0].mesh
    jitted = jax.jit(step, in_shardings=(built.state_sh, batch_sh, stage.frozen_sh),
                     out_shardings=(built.state_sh, sharding.replicated(mesh)), donate_argnums=(0,),
                     compiler_options=options)
    return lambda state, batch: jitted(state, batch, stage.frozen)


def per_device_bytes(tree) -> int:
    """Bytes the largest-loaded device holds of a pytree of sharded arrays."""
    total: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            total[shard.device] = total.get(shard.device, 0) + shard.data.nbytes
    return max(total.values(), default=0)


def memory_report(state: state_lib.TrainState, frozen: Any = None) -> dict:
    """Parameters, trainable parameters and optimizer state (counts; MiB per device), logged."""
    return memory_line(state.params, frozen, state.opt_state)


def memory_line(trainable: Any, frozen: Any, opt_state: Any, what: str = "") -> dict:
    """The start-up `memory:` line of a LoRA stage (printed by process 0) and its numbers: parameters
    (trainable + frozen pytrees; a quantised kernel counts its weights), the trainable share, and
    MiB per device (the most-loaded device) of the parameters and of the optimizer state (the
    buffers' real bytes: XLA:CPU holds an nf4 code in a byte). `what` names the models counted."""
    frozen = {} if frozen is None else frozen
    report = {"params": lora.count(trainable) + lora.count(frozen), "trainable_params": lora.count(trainable),
              "params_MiB_per_device": (per_device_bytes(trainable) + per_device_bytes(frozen)) / 2**20,
              "opt_state_MiB_per_device": per_device_bytes(opt_state) / 2**20}
    if jax.process_index() == 0:  # a start-up line on stdout like the data summary (scripts keep absl quiet)
        print(f"memory: {what + ': ' if what else ''}{report['params']:,} parameters ({report['trainable_params']:,} trainable, "
              f"{100.0 * report['trainable_params'] / max(report['params'], 1):.2f}%); per device: parameters "
              f"{report['params_MiB_per_device']:.1f} MiB, optimizer state {report['opt_state_MiB_per_device']:.1f} MiB",
              flush=True)
    return {k: float(np.round(v, 3)) if isinstance(v, float) else v for k, v in report.items()}
