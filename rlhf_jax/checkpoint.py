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
import json
import os
import re
import shutil
import time
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

META = "meta"
TMP_MARKER = ".orbax-checkpoint-tmp"  # Orbax's name for a step directory whose save has not committed


class CheckpointMismatch(ValueError):
    """A checkpoint that reads fine but is not the state the config builds (a configuration error)."""


class StorageError(OSError):
    """A checkpoint could not be written (disk full, permissions, I/O error); the message is one line
    (`errno`, `strerror` and `filename` are the OS error's)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()


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
            self._remove_uncommitted("left by an interrupted or failed save")
        self._failed: StorageError | None = None
        self._saving: int | None = None  # step of the newest save started (async: may still be running)
        if _drop_save_failure_tracebacks not in logging.get_absl_logger().filters:
            logging.get_absl_logger().addFilter(_drop_save_failure_tracebacks)
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
        self.wait()  # the previous async save's failure (if any) surfaces here, naming its step
        self._saving = step
        try:
            self._manager.save(step, args=ocp.args.Composite(**args), force=True)
        except Exception as error:  # noqa: BLE001 — an OS error becomes one line; anything else is re-raised
            self._raise_storage_error(error, step)

    def restore(self, targets: Mapping[str, Any], step: int | None = None) -> Restored | None:
        """Restore `targets` (name -> abstract pytree) from `step` or the newest readable step.

        Returns None when the directory has no checkpoint. When the newest step is unreadable it
        is moved aside with a warning and the next older one is tried.
        """
        candidates = [step] if step is not None else self.all_steps()[::-1]
        for candidate in candidates:
            try:
                restored = self._restore_step(candidate, targets)
            except Exception as error:  # noqa: BLE001 — a read failure means "unusable step" unless it reads fine
                difference = self.mismatch(candidate, targets)
                if difference is not None:
                    raise CheckpointMismatch(
                        f"checkpoint {self.directory}/{candidate} does not match the state this config builds: "
                        f"{difference}. Nothing was changed: use the config that run was started with, or another "
                        f"--workdir") from None
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

    def mismatch(self, step: int, targets: Mapping[str, Any]) -> str | None:
        """The first difference between a readable step and `targets` (missing item, missing or
        extra key, other shape), or None when they agree or the step's own metadata is unreadable
        (then the step is corrupt, not a mismatch). Reads only metadata, never array data."""
        step_dir = self.directory / str(step)
        try:
            stored_items = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
        except Exception:  # noqa: BLE001 — no readable step metadata: corrupt
            return None
        for name, target in targets.items():
            if name not in stored_items:
                held = sorted(item for item in stored_items if item != META)
                return f"it has no item {name!r} (it holds {held})"
            try:
                stored = ocp.StandardCheckpointHandler().metadata(step_dir / name).tree
            except Exception:  # noqa: BLE001 — listed but unreadable: corrupt
                return None
            want, have = _flat_shapes(target), _flat_shapes(stored)
            for keys, side in ((sorted(set(want) - set(have)), "the config builds keys the checkpoint lacks"),
                               (sorted(set(have) - set(want)), "the checkpoint has keys the config does not build")):
                if keys:
                    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
                    return f"item {name!r}: {side}: {', '.join('/'.join(k) for k in keys[:3])}{more}"
            for key in sorted(want):
                if tuple(want[key]) != tuple(have[key]):
                    return (f"item {name!r} key {'/'.join(key)}: shape {tuple(have[key])} in the checkpoint, "
                            f"{tuple(want[key])} in this config")
        return None

    def _remove_uncommitted(self, why: str, warn: bool = True) -> None:
        """Delete `<step>.orbax-checkpoint-tmp*` directories (never a committed step) on process 0."""
        if jax.process_index() != 0 or not self.directory.exists():
            return
        for path in self.directory.iterdir():
            if TMP_MARKER in path.name:
                (logging.warning if warn else logging.info)("Removing uncommitted checkpoint %s (%s).", path, why)
                shutil.rmtree(path, ignore_errors=True)

    def _raise_storage_error(self, error: BaseException, step: int | None) -> None:
        """Re-raise `error` as one-line `StorageError` when an OS error caused it (cleaning up the
        half-written step), else unchanged."""
        cause = _os_error(error)
        if cause is None:
            raise error
        if self._failed is None:
            where = cause.filename or self.directory
            what = f"step {step}" if step is not None else "a checkpoint"
            self._remove_uncommitted("the failed save", warn=False)
            self._failed = StorageError(f"could not save {what} in {self.directory}: [Errno {cause.errno}] "
                                        f"{cause.strerror or cause}: {where}. The half-written step was removed; "
                                        f"steps saved before it are intact ({self._committed()}): free space or fix "
                                        f"the path, then rerun the same command to resume")
            self._failed.errno, self._failed.strerror, self._failed.filename = cause.errno, cause.strerror, str(where)
        raise self._failed from None

    def _committed(self) -> str:
        steps = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit()) if self.directory.exists() \
            else []
        return f"steps {steps}" if steps else "none yet"

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
        """Block until every pending async save is committed (`StorageError` when one failed)."""
        try:
            self._manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001
            self._raise_storage_error(error, self._saving)

    def close(self) -> None:
        """Wait for pending saves and release the manager. After a `StorageError` (already raised)
        the manager's follow-up errors are the same failure and are not raised again."""
        try:
            self.wait()
            self._manager.close()
        except Exception:  # noqa: BLE001
            if self._failed is None:
                raise


def describe_error(error: BaseException, limit: int = 1000) -> str:
    """One line naming what failed: the exception type and message, whitespace collapsed, without
    the (long) TensorStore spec that Orbax appends, capped at `limit` characters."""
    text = " ".join(str(error).split()).split(" [tensorstore_spec=")[0]
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(error).__name__}: {text}"


def _os_error(error: BaseException) -> OSError | None:
    """The OS error behind `error`: itself, its causes/contexts or group members, or the one a
    TensorStore message reports (`... No space left on device [os_error_code='28']`)."""
    seen, todo = set(), [error]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        code = re.search(r"os_error_code='(\d+)'", str(current))
        if code:
            paths = re.findall(r'"(/[^"]+)"', str(current))
            return OSError(int(code.group(1)), os.strerror(int(code.group(1))), paths[-1] if paths else None)
        todo += [current.__cause__, current.__context__, *getattr(current, "exceptions", ())]
    return None


_SAVE_FAILURE_LOGS = re.compile(r"raised an exception|background save thread|Save Finalize thread")


def _drop_save_failure_tracebacks(record) -> bool:
    """Orbax logs every failed async save from each of its threads with a full traceback (hundreds
    of lines for one full disk); the same failure is raised in the main thread, where
    `Checkpointer` turns it into one line. Only Orbax's own ERROR records about it are dropped."""
    return not (record.levelname in ("ERROR", "CRITICAL") and "orbax" in record.pathname
                and _SAVE_FAILURE_LOGS.search(record.getMessage()))


def _flat_shapes(tree: Any) -> dict[tuple[str, ...], tuple]:
    """{key path as names: shape} of a pytree of arrays / ShapeDtypeStructs / Orbax array metadata."""
    def name(key) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    return {tuple(name(k) for k in path): tuple(getattr(leaf, "shape", ()))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


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


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step that `read_meta` / `load_params` read at `path`: a step dir's own, else the newest."""
    checkpointer, step = _open_step(path)
    checkpointer.close()
    return step


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
