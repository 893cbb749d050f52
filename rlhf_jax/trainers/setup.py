"""Starting a run: distributed init, config checks that name the key, workdir ownership
(DIR/run.json), DIR/config.json (written when training starts), the mesh, the scripts' exit statuses."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import sys
import time
import uuid
from typing import Callable

import jax
from absl import logging
from jax.sharding import Mesh

from rlhf_jax import sharding


@dataclasses.dataclass
class DataFiles:
    """Resolved data paths: training files, held-out file (or None) and tokenizer directory."""

    train: list[str]
    eval: str | None
    tokenizer: str


def compiler_options(config) -> dict | None:
    """XLA options for a stage's jitted programs. `config.fast_compile` turns off backend (LLVM)
    optimisation: roughly halves CPU compile time of tiny models at some cost in step time (tests,
    smoke runs)."""
    return {"xla_backend_optimization_level": 0} if config.get("fast_compile", False) else None


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


def validate_positive(config, keys: tuple[str, ...], prefix: str = "config") -> None:
    """Each dotted config key must hold a positive int."""
    for key in keys:
        value = config
        for part in key.split("."):
            value = value[part]
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{prefix}.{key}={value!r} must be a positive integer")


def validate_paths(section, keys: tuple[str, ...], prefix: str = "config.data") -> None:
    """Non-empty path fields (comma-separated lists allowed) must exist."""
    for key in keys:
        for path in (p.strip() for p in str(section[key]).split(",") if p.strip()):
            if not pathlib.Path(path).exists():
                raise ValueError(f"{prefix}.{key}: {path!r} does not exist")


def validate_sequence_length(prompt_len: int, max_new_tokens: int, max_len: int, key: str, where: str) -> None:
    """prompt_len + max_new_tokens must fit the model's position table (the one definition)."""
    if prompt_len + max_new_tokens > max_len:
        raise ValueError(f"{key}.prompt_len + max_new_tokens = {prompt_len + max_new_tokens} exceeds {where} "
                         f"(max_len={max_len})")


def validate_workdir(workdir) -> None:
    """The run directory must be a directory (or not exist yet)."""
    if not workdir:
        raise ValueError("--workdir is empty: give the run directory (config, metrics, checkpoints)")
    if pathlib.Path(workdir).exists() and not pathlib.Path(workdir).is_dir():
        raise ValueError(f"--workdir={str(workdir)!r} exists and is not a directory")


def setup_run(config, workdir: str, validate: Callable[[tuple[int, int, int]], None] | None = None,
              stage: str | None = None) -> Mesh:
    """Start a run: distributed init, config checks (before any compilation), workdir ownership, mesh.

    `validate(mesh_shape)` is the stage's own config check; it runs after the mesh shape is known.
    `stage` ("pretrain", "sft", "rm", "ppo", "dpo") claims the workdir for that stage (`claim_workdir`):
    a directory of another stage or a pipeline stops here, before anything is written. DIR/config.json
    is written later, when training starts (`record_config`, called by the loop).
    """
    maybe_initialize_distributed(config.distributed)
    mesh_shape = sharding.resolve_mesh_shape(dict(config.mesh), jax.device_count())
    if validate is not None:
        validate(mesh_shape)
    validate_workdir(workdir)
    if stage is not None:
        claim_workdir(workdir, stage)
    mesh = sharding.make_mesh(dict(config.mesh))
    logging.info("Mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(), jax.process_count())
    return mesh


# ----------------------------------------------------------------------------------------------
# Workdir ownership: DIR/run.json says which stage (and which run) a directory belongs to
# ----------------------------------------------------------------------------------------------
RUN_FILE = "run.json"
OWNERS = ("pretrain", "sft", "rm", "ppo", "dpo", "pipeline", "policy", "comparison")
WHAT = {"pretrain": "a pretraining run (experiments/train_sft.py, data.kind='text')",
        "sft": "an SFT run (experiments/train_sft.py)", "rm": "a reward-model run (experiments/train_rm.py)",
        "ppo": "an RL run (experiments/train_ppo.py)",
        "dpo": "a preference-optimisation run (experiments/train_dpo.py)",
        "pipeline": "a pipeline (experiments/run_pipeline.py)",
        "policy": "one RL algorithm's run inside a pipeline (DIR/<algorithm> of run_pipeline.py --config.algorithm)",
        "comparison": "an algorithm comparison (experiments/compare_algorithms.py)"}


class WorkdirError(ValueError):
    """A workdir that belongs to another stage / run, or whose owner cannot be told (one line)."""


@dataclasses.dataclass
class Owner:
    stage: str | None  # None: no run's files there (a new or unrelated directory)
    evidence: str  # what the stage was read from
    record: dict | None = None  # DIR/run.json when there is one


def _json(path: pathlib.Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _stage_of_config(config: dict) -> str | None:
    """Which stage wrote a (legacy) config.json, from its top-level sections."""
    if {"pretrain", "sft", "rm", "ppo", "task"} <= set(config):
        return "pipeline"
    if "rollout" in config:
        return "ppo"
    if "dpo" in config:
        return "dpo"
    if "normalize" in config:
        return "rm"
    kind = config.get("data", {}).get("kind") if isinstance(config.get("data"), dict) else None
    return {"text": "pretrain", None: None}.get(kind, "sft")


def workdir_owner(workdir: str | pathlib.Path) -> Owner:
    """Which stage a directory belongs to: DIR/run.json, else (directories made before run.json)
    what is there: DONE markers of pipeline stages, the newest checkpoint's metadata "stage"
    (pretraining and SFT told apart by config.json), config.json's sections. Raises `WorkdirError`
    when a run's files are there but their stage cannot be told."""
    root = pathlib.Path(workdir)
    if not root.is_dir():
        return Owner(None, "new directory")
    if (root / RUN_FILE).exists():
        record = _json(root / RUN_FILE)
        if record is None or record.get("stage") not in OWNERS:
            raise WorkdirError(f"{root / RUN_FILE} is unreadable or names no known stage ({', '.join(OWNERS)}); "
                               "nothing was changed: fix or remove it, or give another --workdir")
        return Owner(record["stage"], RUN_FILE, record)
    done = sorted(p.parent.name for p in root.glob("*/DONE"))
    if done:
        return Owner("pipeline", f"finished pipeline stages {done}")
    if any(root.glob("*/*/DONE")) or any(_json(p) and _json(p).get("stage") == "pipeline"
                                         for p in root.glob(f"*/{RUN_FILE}")):
        return Owner("comparison", "pipeline directories inside it")
    config = _json(root / "config.json")
    steps = sorted((int(p.name) for p in (root / "checkpoints").glob("*") if p.name.isdigit()), reverse=True)
    for step in steps:
        meta = _json(root / "checkpoints" / str(step) / "meta" / "metadata")
        if meta is None or "stage" not in meta:
            continue
        stage = meta["stage"]
        if stage == "sft" and config is not None:
            stage = _stage_of_config(config)
        elif stage == "sft":
            raise WorkdirError(f"--workdir {root} holds checkpoints of a pretraining or SFT run (checkpoint {step}) "
                               "but no config.json to tell which; nothing was changed: give another --workdir, or "
                               f"write {root / RUN_FILE} with {{\"stage\": \"sft\"}} (or \"pretrain\")")
        return Owner(stage, f"checkpoint {step} metadata")
    if config is not None and _stage_of_config(config):
        return Owner(_stage_of_config(config), "config.json")
    leftovers = [name for name in ("checkpoints", "metrics.jsonl") if (root / name).exists()]
    if leftovers:
        raise WorkdirError(f"--workdir {root} holds {' and '.join(leftovers)} of a run whose stage cannot be told "
                           "(no run.json, no readable checkpoint metadata or config.json); nothing was changed: give "
                           "another --workdir")
    return Owner(None, "no run files")


def claim_workdir(workdir: str | pathlib.Path, stage: str) -> dict:
    """Make sure `workdir` belongs to `stage` (else `WorkdirError`, one line, nothing written) and
    record it in DIR/run.json: stage, run id, creation time, library version. A directory made
    before run.json gets one recording what its stage was inferred from. Returns the record."""
    if stage not in OWNERS:
        raise ValueError(f"unknown stage {stage!r} (stages: {OWNERS})")
    root = pathlib.Path(workdir)
    owner = workdir_owner(root)
    if owner.stage not in (None, stage):
        raise WorkdirError(f"--workdir {root} holds {WHAT[owner.stage]} (from {owner.evidence}), not {WHAT[stage]}; "
                           "nothing was changed: give this run its own --workdir")
    if owner.record is not None:
        return owner.record
    from rlhf_jax import __version__

    record = {"stage": stage, "run_id": uuid.uuid4().hex,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "version": __version__}
    if owner.stage is not None:
        record["inferred_from"] = owner.evidence
    if jax.process_index() == 0:
        root.mkdir(parents=True, exist_ok=True)
        _write_atomic(root / RUN_FILE, json.dumps(record, indent=2) + "\n")
    return record


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# DIR/data_summary.json: what each split read, dropped and truncated
# ----------------------------------------------------------------------------------------------
def report_data(workdir: str | pathlib.Path, name: str, split, length_keys: str | tuple[str, str]) -> dict:
    """The data summary of one split (`TokenizedSplit.summary`): one line on stdout, each problem
    (`split.warnings(length_keys)`) as a "WARNING data[name]: ..." line on stderr, and the summary stored under `name` in
    WORKDIR/data_summary.json (this run's file: it describes the data the run is using now). A packed
    text corpus says how many sequences its rows became (nothing of it is lost)."""
    summary, problems = split.summary(), split.warnings(length_keys)
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(summary["dropped"].items())) or "none"
    if jax.process_index() == 0:
        files = ", ".join(summary["files"])
        if summary["packed_sequences"] is not None:
            print(f"data[{name}] {files}: {summary['rows_read']} rows read, packed into {summary['packed_sequences']} "
                  f"sequences of up to {summary['max_len']} tokens ({summary['tokens']} tokens), dropped: {dropped}; "
                  f"unknown tokens {summary['unk_pct']}%", flush=True)
        else:
            print(f"data[{name}] {files}: {summary['rows_read']} rows read, {summary['rows_kept']} kept, dropped: "
                  f"{dropped}; truncated prompts {summary['prompts_truncated_pct']}%, responses "
                  f"{summary['responses_truncated_pct']}%; template {summary['template']}; unknown tokens "
                  f"{summary['unk_pct']}%", flush=True)
        for line in problems:  # a plain line, not an absl log record: scripts keep absl quiet
            print(f"WARNING data[{name}]: {line}", file=sys.stderr, flush=True)
        path = pathlib.Path(workdir) / "data_summary.json"
        recorded = _json(path) or {}
        _write_atomic(path, json.dumps({**recorded, name: {**summary, "warnings": problems}}, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------------------------
# DIR/config.json: written when training starts; an earlier, different one is kept
# ----------------------------------------------------------------------------------------------
def settings_of(recorded: dict) -> dict:
    """A config.json's settings: everything but its "environment" record."""
    return {k: v for k, v in recorded.items() if k != ENVIRONMENT_KEY}


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()} if tree else {
        prefix: {}}


ENVIRONMENT_KEY = "environment"  # config.json's record of library versions and machine (rlhf_jax.environment)


def record_config(config, workdir: str | pathlib.Path, step: int = 0) -> pathlib.Path | None:
    """Write DIR/config.json (process 0) for a run that is about to train from `step`: the resolved
    config plus, under "environment", the library versions and machine it starts on. When the
    directory already has a config.json with different settings (a run continued with changed
    settings), that one is kept as config.<n>.json (n = 1, 2, ...; it describes the checkpoints
    before `step`) and a warning names the changed keys; with the same settings it is left alone.
    Returns the path of the kept earlier config, if any."""
    from rlhf_jax.environment import environment

    root = pathlib.Path(workdir)
    settings = json.loads(config.to_json_best_effort())
    text = json.dumps({**settings, ENVIRONMENT_KEY: environment()}, indent=2, sort_keys=True) + "\n"
    if jax.process_index() != 0:
        return None
    root.mkdir(parents=True, exist_ok=True)
    path, kept = root / "config.json", None
    if path.exists():
        old = path.read_text()
        before, after = _flat(settings_of(json.loads(old))), _flat(settings)
        if before == after:
            return None
        n = 1
        while (root / f"config.{n}.json").exists():
            n += 1
        kept = root / f"config.{n}.json"
        _write_atomic(kept, old)
        changed = sorted(k.rstrip(".") for k in set(before) | set(after) if before.get(k) != after.get(k))
        logging.warning("%s: settings changed since the earlier checkpoints (%s); continuing from step %d with the "
                        "new config, the earlier one kept as %s", root, ", ".join(changed[:8]) +
                        (f" and {len(changed) - 8} more" if len(changed) > 8 else ""), step, kept.name)
    _write_atomic(path, text)
    return kept


# ----------------------------------------------------------------------------------------------
# What the experiments/*.py scripts share: exit statuses and one-line errors
# ----------------------------------------------------------------------------------------------
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: stopped by SIGTERM/SIGINT after saving; rerun to resume
EXIT_ERROR = 1  # configuration, workdir, data or I/O error: rerunning unchanged will not help


def show_tracebacks() -> bool:
    """True when the script was given --traceback (rlhf_jax.cli): expected errors keep their traceback."""
    from absl import flags

    return "traceback" in flags.FLAGS and flags.FLAGS.is_parsed() and flags.FLAGS.traceback


@contextlib.contextmanager
def one_line_errors(*expected: type[BaseException]):
    """In a script: a workdir, checkpoint-mismatch, data (a bad file row: file, line, field), I/O (disk
    full, permissions) or config error (a ValueError naming its `config.` key), or one of the
    script's own `expected` exception types,
    is printed as one `FATAL ...` line on stderr and the script exits with EXIT_ERROR. With
    --traceback the error is raised as usual (full traceback)."""
    from rlhf_jax import checkpoint
    from rlhf_jax.data.formats import DataError

    try:
        yield
    except (WorkdirError, checkpoint.CheckpointMismatch, DataError, OSError, *expected) as error:
        if show_tracebacks():
            raise
        text = " ".join(str(error).split())
        sys.stderr.write(f"FATAL {type(error).__name__}: {text}\n")
        sys.exit(EXIT_ERROR)
    except ValueError as error:  # a config check names its key ("config. ..."); anything else keeps its traceback
        if not str(error).startswith("config.") or show_tracebacks():
            raise
        sys.stderr.write(f"FATAL config error: {' '.join(str(error).split())}\n")
        sys.exit(EXIT_ERROR)
