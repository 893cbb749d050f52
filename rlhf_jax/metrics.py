"""Metric logging: DIR/metrics.jsonl + TensorBoard events and a tqdm progress bar (plots: report.py).

Names are the same in every trainer (DESIGN.md): `loss`, `lr`, `reward/mean`, `kl`, `kl_coef`,
`entropy`, `policy/clipfrac`, `policy/approx_kl`, `value/loss`, `value/explained_variance`,
`response/length`, `gold/mean`, `nonfinite_steps`, `eval/...`, `time/...` (seconds).
Only process 0 writes. A resumed run drops rows logged after the checkpoint it resumed from
(they are logged again), so metrics.jsonl of an interrupted + resumed run equals an uninterrupted one;
a fresh run (no checkpoint) counts as resumed from step 0. Nothing else is ever removed: the rows
up to the checkpoint stay, the file is rewritten atomically, and which run may use a directory is
decided before any writer opens (trainers.setup.claim_workdir).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Iterable, Mapping

import jax
import numpy as np
import tqdm

METRICS_FILE = "metrics.jsonl"


def to_scalar(value: Any) -> float | int:
    """Python number from a 0-d (device or numpy) array; rejects anything with more elements."""
    array = np.asarray(jax.device_get(value))
    if array.size != 1:
        raise ValueError(f"metric value must be a scalar, got shape {array.shape}")
    item = array.reshape(()).item()
    return item if isinstance(item, int) else float(item)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Rows of a metrics.jsonl (`path` is the file or its run directory)."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


WANDB_MODES = ("offline", "online")



def check_wandb(config, key: str = "config") -> None:
    """Before anything runs: ValueError naming `key`.wandb when `config.wandb.enabled` but the mode
    is unknown or the wandb package is not installed (a config without a wandb section passes)."""
    section = config.get("wandb") if hasattr(config, "get") else None
    if section is None or not section.enabled:
        return
    if section.mode not in WANDB_MODES:
        raise ValueError(f"{key}.wandb.mode={section.mode!r} (allowed: {', '.join(map(repr, WANDB_MODES))})")
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ValueError(f"{key}.wandb.enabled=True but the wandb package is not installed: pip install wandb "
                         f"(or --{key}.wandb.enabled=False)") from None

class MetricWriter:
    """Append `{"step": s, name: value, ...}` rows to DIR/metrics.jsonl and TensorBoard events
    (DIR/tensorboard), texts (sample responses) to TensorBoard's Text tab, and, after
    `start_wandb(config)` with `config.wandb.enabled`, both to Weights & Biases as well."""

    def __init__(self, workdir: str | os.PathLike, resume_step: int | None = None):
        self.path = pathlib.Path(workdir) / METRICS_FILE
        self.enabled = jax.process_index() == 0
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # rows after the restored checkpoint (step 0: none) are logged again
            self._truncate_after(resume_step or 0)
        from tensorboardX import SummaryWriter

        # purge_step makes TensorBoard hide events after the resume step from the interrupted run.
        purge = None if resume_step is None else resume_step + 1
        self._tb = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=purge)

    def _truncate_after(self, step: int) -> None:
        rows = read_metrics(self.path)
        kept = [row for row in rows if row["step"] <= step]
        if len(kept) == len(rows):
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")  # a crash mid-rewrite keeps the old file
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        tmp.replace(self.path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Log one row (values may be device scalars); returns the row as Python numbers."""
        row = {"step": int(step), **{name: to_scalar(value) for name, value in metrics.items()}}
        if self.enabled:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(row, allow_nan=True) + "\n")
            except OSError as error:  # e.g. disk full: name the file (a failed write() does not)
                raise OSError(error.errno, error.strerror, str(self.path)) from None
            finite = {name: value for name, value in row.items() if name != "step" and math.isfinite(value)}
            for name, value in finite.items():
                self._tb.add_scalar(name, value, step)
            self._tb.flush()
            if self._wandb is not None:
                self._wandb.log(finite, step=int(step))
        return row

    def write_text(self, step: int, tag: str, text: str) -> None:
        """A text (markdown) under `tag` at `step`: TensorBoard's Text tab, and a one-row W&B table."""
        if not self.enabled:
            return
        self._tb.add_text(tag, text, step)
        self._tb.flush()
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Table(columns=["step", "text"], data=[[int(step), text]])}, step=int(step))

    def start_wandb(self, config) -> None:
        """Also log to Weights & Biases when `config.wandb.enabled` (process 0): the run is
        DIR/run.json's run id (a resumed run continues it), its files go under DIR/wandb; mode
        "offline" needs no network or account (`wandb sync DIR/wandb/offline-run-*` uploads later).
        ValueError naming the key when wandb is not installed or the mode is unknown."""
        section = config.get("wandb") if hasattr(config, "get") else None
        if not self.enabled or section is None or not section.enabled or self._wandb is not None:
            return
        check_wandb(config)
        import wandb

        workdir = self.path.parent
        run_file = workdir / "run.json"
        run_id = json.loads(run_file.read_text()).get("run_id") if run_file.is_file() else None
        self._wandb = wandb.init(project=section.project, name=section.name or workdir.name, dir=str(workdir),
                                 mode=section.mode, id=run_id, resume="allow", config=config.to_dict())

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def samples_markdown(records: Iterable[Mapping[str, str]]) -> str:
    """Sample {"prompt", "response"} records as markdown for TensorBoard's Text tab (verbatim text)."""
    def quoted(text: str) -> str:
        return "\n".join("    " + line for line in str(text).splitlines() or [""])

    return "\n\n".join(f"**prompt**\n\n{quoted(r['prompt'])}\n\n**response**\n\n{quoted(r['response'])}"
                         for r in records)


def progress_bar(total: int, initial: int = 0, desc: str = "train") -> tqdm.tqdm:
    """Step progress bar (disabled on processes other than 0); `.set_postfix` shows metrics."""
    return tqdm.tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                     disable=jax.process_index() != 0)


def short_postfix(row: Mapping[str, Any], keys: Iterable[str] = ("loss", "eval/loss", "eval/accuracy",
                                                                    "reward/mean", "kl")) -> dict:
    """A few headline metrics formatted for the progress bar."""
    return {key: f"{row[key]:.4g}" for key in keys if key in row}
