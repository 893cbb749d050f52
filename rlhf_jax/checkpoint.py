"""Orbax checkpoints: save / resume a stage's full state, and hand parameters to the next stage.

Layout: `DIR/checkpoints/<step>/<item>/...` written by one `ocp.CheckpointManager`. Each step holds
named pytree items (`ocp.args.StandardSave`; e.g. "params" and "train" = optimizer state, step,
RNG) plus a small JSON item "meta" (`ocp.args.JsonSave`: model config, data-iterator position,
reward normalisation, ...). Saves are asynchronous (the training loop continues while files are
written); `wait()` blocks until they are on disk and must be called before the process exits.

Restoring always goes onto an *abstract target* (`jax.ShapeDtypeStruct`s carrying the CURRENT
mesh's shardings), so a checkpoint written on 8 devices restores onto 1 device or another mesh
shape. A latest step that cannot be read (missing or truncated files) is moved aside to
`corrupt.<step>` with a warning naming the error, and the previous step is restored instead.
Incomplete (interrupted) saves never count: Orbax writes to a temporary directory and renames it
when the save is committed, so `all_steps()` only lists finished steps.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

META = "meta"


@dataclasses.dataclass
class Restored:
    """A restored checkpoint: its `step`, the pytree `items` by name, and the JSON `meta` dict."""

    step: int
    items: dict[str, Any]
    meta: dict


def _drop_read_only_warning(record) -> bool:
    return "Given directory is read only" not in record.getMessage()


def abstract_tree(shapes: Any, shardings: Any) -> Any:
    """Restore target: `ShapeDtypeStruct`s (from arrays or `jax.eval_shape`) with `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


class Checkpointer:
    """Keep-last-N async checkpoints of named pytree items plus JSON metadata in one directory."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = epath.Path(directory).absolute()
        if read_only:  # what Orbax forces for read-only managers (it warns when told otherwise)
            self._options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                                         save_interval_steps=0)
        else:
            self._options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save)
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        if not self._options.read_only:
            return ocp.CheckpointManager(self.directory, options=self._options)
        # Orbax warns "Given directory is read only" on every read-only open: that is how stages
        # hand off and how research code loads a run, so the warning is dropped here (only here).
        absl_logger = logging.get_absl_logger()
        absl_logger.addFilter(_drop_read_only_warning)
        try:
            return ocp.CheckpointManager(self.directory, options=self._options)
        finally:
            absl_logger.removeFilter(_drop_read_only_warning)

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, items: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> None:
        """Start an async save of `items` (name -> pytree) and `meta` (JSON-able) as `step`."""
        if META in items:
            raise ValueError(f"checkpoint item name {META!r} is reserved for the JSON metadata")
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        args[META] = ocp.args.JsonSave(dict(meta or {}))
        self._manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, targets: Mapping[str, Any], step: int | None = None) -> Restored | None:
        """Restore `targets` (name -> abstract pytree) from `step` or the newest readable step.

        Returns None when the directory has no checkpoint. When the newest step is unreadable it
        is moved aside with a warning and the next older one is tried.
        """
        candidates = [step] if step is not None else self.all_steps()[::-1]
        for candidate in candidates:
            try:
                restored = self._restore_step(candidate, targets)
            except Exception as error:  # noqa: BLE001 — any read failure means "unusable step"
                if step is not None:
                    raise
                logging.warning("Checkpoint %s/%d is unreadable (%s); falling back to the previous step.",
                                self.directory, candidate, describe_error(error))
                self._quarantine(candidate)
                continue
            return restored
        if candidates:
            raise RuntimeError(f"No readable checkpoint in {self.directory}: steps {candidates} all failed "
                               f"(moved aside as corrupt.<step>)")
        return None

    def _restore_step(self, step: int, targets: Mapping[str, Any]) -> Restored:
        args = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
        args[META] = ocp.args.JsonRestore()
        result = self._manager.restore(step, args=ocp.args.Composite(**args))
        return Restored(step=step, items={name: result[name] for name in targets}, meta=dict(result[META] or {}))

    def _quarantine(self, step: int) -> None:
        """Move an unreadable step out of the manager's sight (kept for inspection), then reopen."""
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            source = self.directory / str(step)
            source.rename(self.directory / f"corrupt.{step}.{int(time.time())}")
        _sync(f"quarantine_{step}")
        self._manager.close()
        self._manager = self._open()

    def wait(self) -> None:
        """Block until every pending async save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def describe_error(error: BaseException, limit: int = 1000) -> str:
    """One line naming what failed: the exception type and message, whitespace collapsed, without
    the (long) TensorStore spec that Orbax appends, capped at `limit` characters."""
    text = " ".join(str(error).split()).split(" [tensorstore_spec=")[0]
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(error).__name__}: {text}"


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------------------------
# Stage hand-off
# ----------------------------------------------------------------------------------------------
def _open_step(path: str | os.PathLike) -> tuple[Checkpointer, int]:
    """Read-only checkpointer and step from a stage's workdir, its `checkpoints/` dir or a step dir."""
    path = epath.Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    step = None
    if path.name.isdigit() and (path / META).exists():
        path, step = path.parent, int(path.name)
    elif (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    checkpointer = Checkpointer(path, read_only=True)
    step = step if step is not None else checkpointer.latest_step()
    if step is None:
        raise FileNotFoundError(f"no committed checkpoint steps under {path}")
    return checkpointer, step


def read_meta(path: str | os.PathLike) -> dict:
    """JSON metadata of a checkpoint (a workdir, its `checkpoints/` dir, or one step dir)."""
    checkpointer, step = _open_step(path)
    meta = checkpointer.restore({}, step=step).meta
    checkpointer.close()
    return meta


def load_params(path: str | os.PathLike, target: Any, item: str = "params") -> Any:
    """Parameters saved by an earlier stage, restored onto `target` (abstract tree with shardings).

    `path` is a stage's workdir, its `checkpoints/` directory (newest step is used) or one step
    directory. Build `target` from the model described by `read_meta(path)["model"]`.
    """
    checkpointer, step = _open_step(path)
    params = checkpointer.restore({item: target}, step=step).items[item]
    checkpointer.close()
    return params
