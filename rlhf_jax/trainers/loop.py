"""The one host loop every trainer runs: progress bar, logging, evaluation, checkpoints,
preemption and the non-finite streak stop.

    result = loop.train_loop(config, state=state, step_fn=step, batches=batches, place=place,
                             checkpointer=checkpointer, writer=writer, meta_fn=meta_fn,
                             eval_fn=eval_fn, on_step=on_step, desc="sft")

A stage plugs in what it adds through `eval_fn(state) -> metrics` (held-out evaluation) and
`on_step(step, host_batch, outputs, row) -> metrics` (e.g. RL's gold score and KL blow-up check).
"""
from __future__ import annotations

import dataclasses
import signal
import threading
import time
from typing import Any, Callable, Iterator

import jax
from absl import logging

from rlhf_jax import checkpoint as checkpoint_lib
from rlhf_jax import metrics as metrics_lib
from rlhf_jax.trainers import setup


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


@dataclasses.dataclass
class LoopResult:
    state: Any
    step: int
    preempted: bool
    last_row: dict


def train_loop(config, *, state: Any, step_fn: Callable, batches: Iterator, place: Callable[[Any], Any],
               checkpointer: checkpoint_lib.Checkpointer, writer: metrics_lib.MetricWriter,
               meta_fn: Callable[[Any], dict], items_fn: Callable[[Any], dict],
               eval_fn: Callable[[Any], dict] | None = None,
               on_step: Callable[[int, Any, Any, dict], dict] | None = None,
               num_steps: int | None = None, desc: str = "train", what: str = "steps",
               postfix: tuple[str, ...] = ("loss", "eval/loss", "eval/accuracy", "reward/mean", "kl",
                                           "gold/mean")) -> LoopResult:
    """Run up to `num_steps` (default config.num_steps) from `state.step`.

    `batches` yields host batches; `place(host_batch)` puts one on the devices; `step_fn(state,
    device_batch)` returns (state, metrics) or (state, metrics, outputs), metrics being scalars
    with `nonfinite_streak` among them. Metrics are read on the host (a sync) every
    `config.log_every` steps, at checkpoints and at the last step; then `on_step(step, host_batch,
    outputs, row)` may add host-side metrics, and a `nonfinite_streak` >= config.max_nonfinite_streak
    stops the run with `NonFiniteError` (the row is logged, the last good checkpoint kept).
    `eval_fn(state)` runs every config.eval_every steps (0 = only at the end) and at the end.
    `meta_fn(state)` / `items_fn(state)` give the JSON metadata / pytree items of a checkpoint,
    saved every config.checkpoint.save_every steps, at the end and when a signal stops the run.
    Timing metrics: `time/step` (wall seconds per step since the last row), `time/data` (host
    seconds fetching and placing batches per step), `time/eval`.
    The resolved config is written to config.json in the writer's directory just before the first
    step (`setup.record_config`: nothing is written when there is nothing to train; a different
    earlier config.json is kept as config.<n>.json), and Weights & Biases logging starts then when
    `config.wandb.enabled`.
    """
    num_steps = config.num_steps if num_steps is None else num_steps
    step = int(jax.device_get(state.step))
    start_step, last_saved, last_row = step, checkpointer.latest_step(), {}
    bar = metrics_lib.progress_bar(num_steps, initial=step, desc=desc)
    tick, data_time, steps_since_log = time.perf_counter(), 0.0, 0
    preempted = False
    if step < num_steps:
        setup.record_config(config, writer.path.parent, step)
        writer.start_wandb(config)  # only with config.wandb.enabled

    try:  # the bar is closed also when an error stops the run, so the script's FATAL line starts a line of its own
        with PreemptionGuard() as guard:
            while step < num_steps:
                # ---- one step --------------------------------------------------------------------
                t0 = time.perf_counter()
                host_batch = next(batches)
                device_batch = place(host_batch)
                data_time += time.perf_counter() - t0
                state, step_metrics, *outputs = step_fn(state, device_batch)
                step += 1
                steps_since_log += 1
                bar.update(1)

                is_last = step == num_steps
                stop = guard.should_stop(step)
                do_log = step % config.log_every == 0 or is_last or stop
                do_eval = eval_fn is not None and (is_last or (config.eval_every and step % config.eval_every == 0))
                do_save = is_last or stop or step % config.checkpoint.save_every == 0

                # ---- metrics on the host: also where a run of non-finite steps is caught ---------
                if do_log or do_save:
                    row = {k: metrics_lib.to_scalar(v) for k, v in step_metrics.items()}
                    if row["nonfinite_streak"] >= config.max_nonfinite_streak:
                        writer.write(step, row)
                        checkpointer.wait()  # earlier (good) saves are committed before the process stops
                        raise nonfinite_error(row["nonfinite_streak"], step, last_saved, checkpointer.directory, what)
                    if on_step is not None:
                        row.update(on_step(step, host_batch, outputs[0] if outputs else None, row))
                if do_log:
                    elapsed = time.perf_counter() - tick
                    row.update({"time/step": elapsed / steps_since_log, "time/data": data_time / steps_since_log})
                    if do_eval:
                        t0 = time.perf_counter()
                        row.update(eval_fn(state))
                        row["time/eval"] = time.perf_counter() - t0
                    last_row = writer.write(step, row)
                    bar.set_postfix(metrics_lib.short_postfix(last_row, postfix))
                    tick, data_time, steps_since_log = time.perf_counter(), 0.0, 0
                elif do_eval:
                    last_row = writer.write(step, eval_fn(state))

                # ---- checkpoint, preemption ------------------------------------------------------
                if do_save:
                    checkpointer.save(step, items_fn(state), meta_fn(state))
                    last_saved = step
                if stop and not is_last:
                    preempted = True
                    break
            checkpointer.wait()  # still under the guard: a signal now cannot kill a save half-way
    finally:
        bar.close()
    if preempted:
        logging.warning("Stopped by %s at step %d (started at %d). Checkpoint saved to %s/%d; run the same "
                        "command again to resume.", guard.signal_name, step, start_step, checkpointer.directory, step)
        print(f"Preempted ({guard.signal_name}) at step {step}: checkpoint {checkpointer.directory}/{step} saved; "
              f"rerun the same command to resume.", flush=True)
    return LoopResult(state=state, step=step, preempted=preempted, last_row=last_row)
