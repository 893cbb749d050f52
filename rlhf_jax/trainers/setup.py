"""Starting a run: distributed init, config checks that name the key, DIR/config.json, the mesh."""
from __future__ import annotations

import dataclasses
import pathlib
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
