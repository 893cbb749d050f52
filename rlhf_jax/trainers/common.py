"""Shared training machinery: optimizer, train state, jitted sharded steps, run setup, the loop.

Every single-model stage (SFT, RM) follows the same shape (big_vision style):

    mesh = setup_run(config, workdir, validate)           # checks, distributed init, config.json
    model = architecture(config, heads=...)               # scratch / earlier checkpoint / HF dir
    setup = build_state(config, model, mesh, workdir, num_steps)   # optimizer + resumed or new state
    step_fn = make_train_step(loss_fn, setup.optimizer, setup.schedule, grad_accum=...)
    train_loop(config, state=setup.state, train_step=jit_train_step(step_fn, ...), ...)

Gradient accumulation is an in-step `lax.scan` over `grad_accum` microbatches (not
optax.MultiSteps), so one jitted call is one optimizer update and `step` counts updates. Row `i`
of a batch goes to microbatch `i % grad_accum`: every device keeps its own rows (no resharding),
and the split does not depend on the mesh. Microbatch results are combined with weights from
`weight_fn` (e.g. the number of target tokens), so accumulation gives the same loss and gradient
as one big batch.

Non-finite loss, gradients or updates skip the update inside the jitted step (`jnp.where` keeps the old
params and optimizer state); `nonfinite_steps` counts them and `train_loop` stops with an error
after `max_nonfinite_streak` consecutive bad steps, leaving the last good checkpoint intact.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax
from absl import logging
from jax.sharding import Mesh

from rlhf_jax import checkpoint as checkpoint_lib
from rlhf_jax import metrics as metrics_lib
from rlhf_jax import sharding
from rlhf_jax.models import Transformer, TransformerConfig, init_params, lm_params_to_scalar

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]


# ----------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------
def make_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine decay to `learning_rate * final_lr_ratio`
    at `decay_steps` (0 = `num_steps`). Also the `lr` that is logged: lr of step s = schedule(s - 1).
    """
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
    """AdamW (decoupled weight decay, Loshchilov & Hutter) after global-norm clipping; returns the
    optimizer and its learning-rate schedule."""
    schedule = make_schedule(optim_cfg, num_steps)
    parts = []
    if optim_cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.max_grad_norm))
    parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------------------------
# Train state and its shardings
# ----------------------------------------------------------------------------------------------
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


def opt_state_shardings(optimizer: optax.GradientTransformation, params_shape: Any, param_sh: Any,
                        mesh: Mesh) -> Any:
    """Optimizer-state shardings: parameter-shaped leaves (Adam moments) follow their parameter,
    the rest (counts) is replicated."""
    state_shape = jax.eval_shape(optimizer.init, params_shape)
    return optax.tree_map_params(optimizer, lambda _, sh: sh, state_shape, param_sh,
                                 transform_non_params=lambda _: sharding.replicated(mesh))


def train_state_shardings(optimizer: optax.GradientTransformation, params_shape: Any, param_sh: Any,
                          mesh: Mesh) -> TrainState:
    """`TrainState` of shardings: params/optimizer state sharded, scalars and RNG replicated."""
    rep = sharding.replicated(mesh)
    return TrainState(step=rep, params=param_sh,
                      opt_state=opt_state_shardings(optimizer, params_shape, param_sh, mesh),
                      rng=rep, nonfinite_steps=rep, nonfinite_streak=rep)


def init_train_state(params: Any, optimizer: optax.GradientTransformation, rng: jax.Array,
                     state_sh: TrainState, options: dict | None = None) -> TrainState:
    """Build the state on device with its shardings (optimizer moments are created sharded);
    `options`: XLA compiler options (`compiler_options`)."""
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


def tree_all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


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
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        finite = jnp.isfinite(loss) & tree_all_finite(grads) & tree_all_finite(updates)
        keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        bad = (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            params=keep_if_finite(params, state.params),
            opt_state=keep_if_finite(opt_state, state.opt_state),
            nonfinite_steps=state.nonfinite_steps + bad,
            nonfinite_streak=(state.nonfinite_streak + 1) * bad)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
                   # the optimizer's count (hence its schedule) does not advance on skipped steps
                   "lr": schedule(state.step - state.nonfinite_steps), "nonfinite_steps": new_state.nonfinite_steps,
                   "nonfinite_streak": new_state.nonfinite_streak}
        return new_state, metrics

    return train_step


def compiler_options(config) -> dict | None:
    """XLA options for a stage's jitted programs. `config.fast_compile` turns off backend (LLVM)
    optimisation: roughly halves CPU compile time of tiny models at some cost in step time (tests,
    smoke runs)."""
    return {"xla_backend_optimization_level": 0} if config.get("fast_compile", False) else None


def jit_train_step(step_fn: Callable, state_sh: Any, batch_sh: Any, options: dict | None = None):
    """`jax.jit` with explicit in/out shardings, the state donated (updated in place), metrics
    replicated; `options` are XLA compiler options (`compiler_options`)."""
    mesh = jax.tree.leaves(state_sh)[0].mesh
    return jax.jit(step_fn, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,),
                   compiler_options=options)


# ----------------------------------------------------------------------------------------------
# Run setup and config validation
# ----------------------------------------------------------------------------------------------
def maybe_initialize_distributed(dist_cfg) -> None:
    """`jax.distributed.initialize` when `config.distributed.initialize`; empty/-1 fields are
    auto-detected by JAX (SLURM, TPU pods, Open MPI, ...)."""
    if not dist_cfg.initialize or jax.distributed.is_initialized():
        return
    kwargs = {}
    if dist_cfg.coordinator_address:
        kwargs["coordinator_address"] = dist_cfg.coordinator_address
    if dist_cfg.num_processes > 0:
        kwargs["num_processes"] = dist_cfg.num_processes
    if dist_cfg.process_id >= 0:
        kwargs["process_id"] = dist_cfg.process_id
    jax.distributed.initialize(**kwargs)


def validate_batch(name: str, batch_size: int, mesh_shape: tuple[int, int, int], divisor: int = 1,
                   divisor_name: str = "") -> None:
    """Batch must split evenly over data-parallel devices (data*fsdp) and microbatches/minibatches."""
    data, fsdp, _ = mesh_shape
    need = data * fsdp * divisor
    if batch_size <= 0 or batch_size % need:
        extra = f" * {divisor_name}={divisor}" if divisor_name else ""
        raise ValueError(f"config.{name}={batch_size} must be a positive multiple of data*fsdp={data * fsdp}"
                         f"{extra} = {need}")


def validate_init(init_cfg, stage: str, allowed: tuple[str, ...]) -> None:
    """`config.init.source` in `allowed`; a non-scratch source needs an existing `config.init.path`."""
    if init_cfg.source not in allowed:
        raise ValueError(f"config.init.source={init_cfg.source!r} (allowed: {', '.join(map(repr, allowed))})")
    if init_cfg.source == "scratch":
        return
    if not init_cfg.path:
        raise ValueError(f"config.init.path is empty but config.init.source={init_cfg.source!r}: the {stage} "
                         f"stage needs the path of its starting point (--config.init.path=...)")
    if not pathlib.Path(init_cfg.path).exists():
        raise ValueError(f"config.init.path={init_cfg.path!r} does not exist")
    directory = pathlib.Path(init_cfg.path)
    if init_cfg.source == "hf" and not ((directory / "config.json").is_file() and any(directory.glob("*.safetensors"))):
        raise ValueError(f"config.init.path={init_cfg.path!r} is not a Hugging Face model directory: "
                         "config.init.source='hf' needs config.json + *.safetensors (pickled weights are never read)")


def validate_positive(config, keys: tuple[str, ...]) -> None:
    """Each dotted config key must hold a positive int."""
    for key in keys:
        value = config
        for part in key.split("."):
            value = value[part]
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"config.{key}={value!r} must be a positive integer")


def validate_paths(section, keys: tuple[str, ...], prefix: str = "data") -> None:
    """Non-empty path fields (comma-separated lists allowed) must exist."""
    for key in keys:
        for path in (p.strip() for p in str(section[key]).split(",") if p.strip()):
            if not pathlib.Path(path).exists():
                raise ValueError(f"config.{prefix}.{key}: {path!r} does not exist")


def define_config_flag(default: str, help_text: str):
    """`--config` flag of the experiments/train_*.py scripts: a locked ml_collections config file
    (`config_flags.DEFINE_config_file`), so `--config.<key>=value` may only set existing keys to
    values of their type. A wrong type is absl's one-line `FATAL Flags parsing error`; an unknown
    key (which ml_collections reports as a long AttributeError traceback while the flag is defined)
    becomes the same kind of one-line error naming the key, exit code 1."""
    from ml_collections import config_flags

    try:
        return config_flags.DEFINE_config_file("config", default, help_text, lock_config=True)
    except (AttributeError, KeyError) as error:
        cause = error.args[0] if error.args else error
        text = cause.args[0] if isinstance(cause, BaseException) and cause.args else cause
        overrides = [arg.split("=")[0] for arg in sys.argv[1:] if arg.startswith("--config.")]
        sys.stderr.write(f"FATAL Flags parsing error: unknown config key {' '.join(str(text).split())} "
                         f"(in {', '.join(overrides)})\n")
        sys.exit(1)


def quiet_script_logging() -> None:
    """absl logging of the experiments/*.py scripts: WARNING unless --verbosity is given (Orbax logs
    every save at INFO, which buries the progress bars), and without Orbax's warning on each
    read-only restore of an earlier stage's checkpoint (that is how stages hand off)."""
    from absl import flags, logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    logging.get_absl_logger().addFilter(lambda record: "Given directory is read only" not in record.getMessage())


def validate_workdir(workdir) -> None:
    """The run directory must be a directory (or not exist yet)."""
    if not workdir:
        raise ValueError("--workdir is empty: give the run directory (config, metrics, checkpoints)")
    if pathlib.Path(workdir).exists() and not pathlib.Path(workdir).is_dir():
        raise ValueError(f"--workdir={str(workdir)!r} exists and is not a directory")


def setup_run(config, workdir: str, validate: Callable[[tuple[int, int, int]], None] | None = None) -> Mesh:
    """Start a run: distributed init, config checks (before any compilation), DIR/config.json, mesh.

    `validate(mesh_shape)` is the stage's own config check; it runs after the mesh shape is known.
    """
    maybe_initialize_distributed(config.distributed)
    mesh_shape = sharding.resolve_mesh_shape(dict(config.mesh), jax.device_count())
    if validate is not None:
        validate(mesh_shape)
    validate_workdir(workdir)
    workdir = pathlib.Path(workdir)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    mesh = sharding.make_mesh(dict(config.mesh))
    logging.info("Mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(), jax.process_count())
    return mesh


# ----------------------------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------------------------
class PreemptionGuard:
    """SIGTERM/SIGINT ask the loop to stop after the current step, save and exit cleanly.

    A second SIGINT interrupts at once. With several processes SIGTERM is left to JAX's
    preemption notifier and all processes agree on the stop step through
    `multihost_utils.reached_preemption_sync_point`.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            signals = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        logging.warning("%s received: finishing the current step, then saving a checkpoint and exiting.",
                        self.signal_name)

    def should_stop(self, step: int) -> bool:
        if self.signal_name is not None:
            return True
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signal_name = "SIGTERM"
                return True
        return False


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps."""


def nonfinite_error(streak: int, step: int, last_saved: int | None, directory, what: str = "steps") -> NonFiniteError:
    """The error that stops a diverged run: which steps were bad and which checkpoint to go back to
    (it stays intact: a diverged step is never saved)."""
    good = "none saved yet" if last_saved is None else f"{directory}/{last_saved}"
    return NonFiniteError(f"{streak} consecutive non-finite {what} ({step - streak + 1}..{step}); stopping. "
                          f"Last good checkpoint: {good}")


# ----------------------------------------------------------------------------------------------
# Checkpoint plumbing shared by the stages
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


def build_state(config, model: Transformer, mesh: Mesh, workdir: str, num_steps: int) -> StageState:
    """Optimizer, shardings and the train state: resumed from WORKDIR/checkpoints when it holds a
    checkpoint (no init work then), else initialised from config.init (`initial_params`)."""
    optimizer, schedule = make_optimizer(config.optim, num_steps)
    param_sh = sharding.param_shardings(model, mesh)
    params_shape = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    state_sh = train_state_shardings(optimizer, params_shape, param_sh, mesh)
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))

    def init_state():
        params = initial_params(config, model, mesh, param_sh, init_rng)
        return init_train_state(params, optimizer, state_rng, state_sh, compiler_options(config))

    checkpointer = checkpoint_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints",
                                               max_to_keep=config.checkpoint.max_to_keep)
    state_shape = jax.eval_shape(lambda: TrainState.create(params_shape, optimizer, state_rng))
    state, meta, resumed = restore_or_init(checkpointer, state_shape, state_sh, init_state)
    return StageState(optimizer, schedule, param_sh, state_sh, state, meta, resumed, checkpointer)


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoopResult:
    state: Any
    step: int
    preempted: bool
    last_row: dict


def train_loop(config, *, state: TrainState, train_step: Callable, batches: Iterator, mesh: Mesh,
               checkpointer: checkpoint_lib.Checkpointer, writer: metrics_lib.MetricWriter,
               meta_fn: Callable[[TrainState], dict], eval_fn: Callable[[TrainState], dict] | None = None,
               num_steps: int | None = None, desc: str = "train") -> LoopResult:
    """Run up to `num_steps` (default config.num_steps) from `state.step`: log, eval, save, handle
    preemption and NaNs.

    Reads config.log_every, eval_every (0 = only at the end), checkpoint.save_every,
    max_nonfinite_streak. `batches` yields host numpy batches; `meta_fn(state)` gives the JSON
    metadata saved with each checkpoint (data position, model config, ...). The final step is always saved
    and evaluated. Timing metrics: `time/step` (wall seconds per step since the last log),
    `time/data` (host seconds fetching + placing batches per step), `time/eval`.
    """
    num_steps = config.num_steps if num_steps is None else num_steps
    step = int(jax.device_get(state.step))
    start_step, last_saved, last_row = step, checkpointer.latest_step(), {}
    bar = metrics_lib.progress_bar(num_steps, initial=step, desc=desc)
    tick, data_time, steps_since_log = time.perf_counter(), 0.0, 0
    preempted = False

    def save(at_step):
        nonlocal last_saved
        checkpointer.save(at_step, state_items(state), meta_fn(state))
        last_saved = at_step

    with PreemptionGuard() as guard:
        while step < num_steps:
            t0 = time.perf_counter()
            batch = sharding.shard_batch(next(batches), mesh)
            data_time += time.perf_counter() - t0
            state, step_metrics = train_step(state, batch)
            step += 1
            steps_since_log += 1
            bar.update(1)

            is_last = step == num_steps
            stop = guard.should_stop(step)
            do_log = step % config.log_every == 0 or is_last or stop
            do_eval = eval_fn is not None and (is_last or (config.eval_every and step % config.eval_every == 0))
            do_save = is_last or stop or step % config.checkpoint.save_every == 0

            diverged = False
            if do_log or do_save:  # host sync: also the point where a run of NaN steps is caught
                host = {k: metrics_lib.to_scalar(v) for k, v in step_metrics.items()}
                diverged = host["nonfinite_streak"] >= config.max_nonfinite_streak
            if do_log:
                elapsed = time.perf_counter() - tick
                row = {**host, "time/step": elapsed / steps_since_log, "time/data": data_time / steps_since_log}
                if do_eval and not diverged:
                    t0 = time.perf_counter()
                    row.update(eval_fn(state))
                    row["time/eval"] = time.perf_counter() - t0
                last_row = writer.write(step, row)
                bar.set_postfix(metrics_lib.short_postfix(last_row))
                tick, data_time, steps_since_log = time.perf_counter(), 0.0, 0
            elif do_eval and not diverged:
                last_row = writer.write(step, eval_fn(state))
            if diverged:
                checkpointer.wait()  # earlier (good) saves are committed before the process stops
                raise nonfinite_error(host["nonfinite_streak"], step, last_saved, checkpointer.directory)
            if do_save:
                save(step)
            if stop and not is_last:
                preempted = True
                break
        checkpointer.wait()  # still under the guard: a signal now cannot kill a save half-way
    bar.close()
    if preempted:
        logging.warning("Stopped by %s at step %d (started at %d). Checkpoint saved to %s/%d; run the same "
                        "command again to resume.", guard.signal_name, step, start_step, checkpointer.directory, step)
        print(f"Preempted ({guard.signal_name}) at step {step}: checkpoint {checkpointer.directory}/{step} saved; "
              f"rerun the same command to resume.", flush=True)
    return LoopResult(state=state, step=step, preempted=preempted, last_row=last_row)


# ----------------------------------------------------------------------------------------------
# Models: architecture from config / earlier stage / HF dir, and the starting parameters
# ----------------------------------------------------------------------------------------------
def transformer_config(model_cfg, vocab_size: int | None = None) -> TransformerConfig:
    """`TransformerConfig` from a config.model section (configs/common.model_config fields).

    vocab_size 0 in the config means `vocab_size` (the tokenizer's); n_kv_heads 0 means n_heads.
    """
    fields = {k: v for k, v in model_cfg.items() if k != "family"}
    if not fields.get("vocab_size"):
        if not vocab_size:
            raise ValueError("config.model.vocab_size is 0 (= the tokenizer's) but no tokenizer size is known")
        fields["vocab_size"] = vocab_size
    fields["n_kv_heads"] = fields.get("n_kv_heads") or None
    families = {"llama": TransformerConfig.llama, "gpt2": TransformerConfig.gpt2}
    family = model_cfg.get("family", "llama")
    if family not in families:
        raise ValueError(f"config.model.family={family!r} (allowed: 'llama', 'gpt2')")
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = set(fields) - known
    if unknown:
        raise ValueError(f"config.model has fields {sorted(unknown)} that TransformerConfig does not know")
    return families[family](**fields)


def _runtime_fields(model_cfg) -> dict:
    """Fields a stage may change on a loaded architecture: compute dtype, remat, dropout."""
    return {k: model_cfg[k] for k in ("dtype", "remat", "dropout_rate") if k in model_cfg}


def model_meta(model: Transformer) -> dict:
    """JSON description of a model saved with each checkpoint (how later stages rebuild it)."""
    return {"config": dataclasses.asdict(model.config), "heads": list(model.heads)}


def model_from_meta(meta_model: Mapping[str, Any], **overrides) -> Transformer:
    return Transformer(TransformerConfig(**{**meta_model["config"], **overrides}), heads=tuple(meta_model["heads"]))


def load_stage_model(path: str, mesh: Mesh, rules=sharding.DEFAULT_RULES) -> tuple[Transformer, Any]:
    """(model, params on `mesh`) of an earlier stage's checkpoint (workdir, checkpoints/ dir or
    step dir), rebuilt from the model description in its metadata."""
    meta = checkpoint_lib.read_meta(path)
    if "model" not in meta:
        raise ValueError(f"{path}: checkpoint metadata has no 'model' entry (not written by an rlhf_jax trainer?)")
    model = model_from_meta(meta["model"])
    target = checkpoint_lib.abstract_tree(jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0))),
                                          sharding.param_shardings(model, mesh, rules))
    return model, checkpoint_lib.load_params(path, target)


def architecture(config, heads: tuple, vocab_size: int | None = None) -> Transformer:
    """The stage's model (no weights): from config.model when config.init.source is "scratch",
    else from the earlier stage's checkpoint metadata or the HF config.json; runtime fields
    (dtype, remat, dropout_rate) always come from config.model."""
    source, path = config.init.source, config.init.path
    if source == "scratch":
        return Transformer(transformer_config(config.model, vocab_size), heads=heads)
    runtime = _runtime_fields(config.model)
    if source == "checkpoint":
        meta = checkpoint_lib.read_meta(path)
        if "model" not in meta:
            raise ValueError(f"config.init.path={path!r}: checkpoint metadata has no 'model' entry "
                             "(not written by an rlhf_jax trainer?)")
        return Transformer(model_from_meta(meta["model"], **runtime).config, heads=heads)
    if source == "hf":
        from rlhf_jax.models import hf

        config_file = pathlib.Path(path) / "config.json"
        return Transformer(hf.config_from_hf(json.loads(config_file.read_text()), str(config_file), **runtime),
                           heads=heads)
    raise ValueError(f"config.init.source={source!r} (allowed: 'scratch', 'checkpoint', 'hf')")


def initial_params(config, model: Transformer, mesh: Mesh, param_sh: Any, rng: jax.Array) -> Any:
    """Starting parameters of `model`, placed on `param_sh`.

    scratch: fresh init (jitted straight onto the shardings). checkpoint / hf: the earlier model's
    weights; a value head that the source lacks is added fresh (reward model / critic from an LM:
    unembedding dropped, `heads.lm_params_to_scalar`), an unused lm_head or value_head is dropped.
    """
    source, path = config.init.source, config.init.path
    if source == "scratch":
        return jax.jit(lambda r: init_params(model, r), out_shardings=param_sh,
                       compiler_options=compiler_options(config))(rng)
    if source == "checkpoint":
        _, params = load_stage_model(path, mesh)
    else:
        from rlhf_jax.models import from_pretrained

        _, params = from_pretrained(path)
    params = dict(params)
    if "value" in model.heads and "value_head" not in params:
        params = lm_params_to_scalar(params, rng, model.config.d_model)
    if "value" not in model.heads:
        params.pop("value_head", None)
    if "lm" not in model.heads:
        params.pop("lm_head", None)
    if "lm" in model.heads and not model.config.tie_embeddings and "lm_head" not in params:
        raise ValueError(f"config.init.path={path!r} holds no LM head (a reward model?); this stage needs one")
    expected = jax.tree.structure(jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0))))
    if jax.tree.structure(params) != expected:
        raise ValueError(f"config.init.path={path!r}: parameter tree does not match the model "
                         f"({jax.tree.structure(params)} vs {expected})")
    return sharding.shard_params(params, param_sh)


def load_tokenizer(path: str):
    """A local Hugging Face tokenizer directory (no network, no remote code).

    Only JSON / text vocabulary files are read; a tokenizer_config.json that asks for custom Python
    code (`auto_map`) is refused up front with a one-line error instead of being imported.
    """
    from transformers import AutoTokenizer

    directory = pathlib.Path(path)
    if not (directory / "tokenizer_config.json").exists() and not (directory / "tokenizer.json").exists():
        raise ValueError(f"tokenizer path {path!r} has no tokenizer.json / tokenizer_config.json")
    config_file = directory / "tokenizer_config.json"
    if config_file.exists():
        try:
            tokenizer_config = json.loads(config_file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_file}: not valid JSON ({error})") from None
        if "auto_map" in tokenizer_config:
            raise ValueError(f"{config_file}: 'auto_map' asks for custom tokenizer code; remote/custom code is "
                             "never run (use a tokenizer.json-based tokenizer)")
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def tokenizer_path(config, task_files: Mapping[str, str] | None = None) -> str:
    """Tokenizer dir: config.data.tokenizer, else the HF init dir, else the one recorded in the
    init checkpoint's metadata, else the built-in task's; error naming the key when none applies."""
    if config.data.tokenizer:
        return config.data.tokenizer
    if config.init.source == "hf":
        return config.init.path
    if config.init.source == "checkpoint":
        recorded = checkpoint_lib.read_meta(config.init.path).get("tokenizer")
        if recorded and pathlib.Path(recorded).exists():
            return recorded
    if task_files:
        return task_files["tokenizer"]
    raise ValueError("config.data.tokenizer is empty and no tokenizer comes with config.init "
                     "(give a local Hugging Face tokenizer directory)")


def save_tokenizer(tokenizer, workdir: str) -> None:
    """Copy the run's tokenizer to WORKDIR/tokenizer (later stages find it through the checkpoint)."""
    if jax.process_index() == 0:
        tokenizer.save_pretrained(str(pathlib.Path(workdir) / "tokenizer"))


def check_vocab(model: Transformer, tokenizer) -> None:
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size} (config.model.vocab_size or the init checkpoint)")
