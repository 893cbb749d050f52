"""Device mesh, logical-axis rules and shardings for parameters, optimizer states and batches.

One `Mesh` with axes ("data", "fsdp", "tensor") comes from the config (`mesh.data`, `mesh.fsdp`,
`mesh.tensor`; -1 = all remaining devices). Model parameters carry logical axis names (`vocab`,
`embed`, `heads`, `kv`, `mlp`, `layers`, and LoRA's `lora_rank`); `DEFAULT_RULES` maps each name
to mesh axes in one place (MaxText style). A dimension that the mapped mesh axes do not divide evenly is replicated instead,
so any model runs on any mesh. Batches are split over ("data", "fsdp") along their leading axis:
with FSDP every device sees a different slice of the batch and gathers parameters on use (ZeRO-3).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # mesh axes that split the batch (data-parallel size = their product)

# Logical axis name -> mesh axis (str), axes (tuple) or None (replicated). The one rules table.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("length", None),
    ("lora_rank", None),  # LoRA's rank r (8-64): replicated, its A [in, r] / B [r, out] follow in / out
)
LORA_RANK_DIM = {"_lora_a": -1, "_lora_b": -2}  # where an adapter's rank axis sits (rlhf_jax.lora)


# ----------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------
def resolve_mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes with at most one -1 filled in; errors name the config key."""
    sizes = {}
    for axis in MESH_AXES:
        if axis not in mesh_cfg:
            raise ValueError(f"config.mesh.{axis} is missing (mesh needs keys {MESH_AXES})")
        size = mesh_cfg[axis]
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"config.mesh.{axis}={size!r}: must be a positive int or -1 (all remaining devices)")
        sizes[axis] = size
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh: only one axis may be -1, got {free}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"config.mesh: {num_devices} devices are not divisible by the fixed axes' "
                             f"product {fixed} ({dict(sizes)}), so mesh.{free[0]}=-1 cannot be filled")
        sizes[free[0]] = num_devices // fixed
    product = math.prod(sizes.values())
    if product != num_devices:
        raise ValueError(f"config.mesh: data*fsdp*tensor = {sizes['data']}*{sizes['fsdp']}*{sizes['tensor']}"
                         f" = {product} but jax.device_count() = {num_devices}; set one axis to -1 or "
                         f"make the product {num_devices}")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh with axes ("data", "fsdp", "tensor") over all (global) devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    """Number of batch slices: product of the ("data", "fsdp") mesh axes."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


# ----------------------------------------------------------------------------------------------
# Logical axes -> shardings
# ----------------------------------------------------------------------------------------------
def _as_tuple(mesh_axes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def logical_to_mesh_spec(logical: PartitionSpec, shape: Sequence[int], mesh: Mesh,
                         rules=DEFAULT_RULES) -> PartitionSpec:
    """Mesh `PartitionSpec` for one array from its logical names and shape.

    A dimension is replicated when its name has no rule, when the mesh axes do not divide its
    size, or when one of its mesh axes is already used by an earlier dimension of the array.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
        axes = tuple(a for a in _as_tuple(table.get(name)) if mesh.shape.get(a, 1) > 1)
        if not axes or used & set(axes) or dim % math.prod(mesh.shape[a] for a in axes):
            spec.append(None)
            continue
        used |= set(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def logical_shardings(logical_specs: Any, shapes: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """`NamedSharding` pytree from a pytree of logical `PartitionSpec`s and a matching shape pytree."""
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, logical_to_mesh_spec(spec, leaf.shape, mesh, rules)),
        logical_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def param_logical_axes(model) -> Any:
    """`transformer.param_logical_axes(model)` with the rank axis of LoRA adapters (qwix leaves it
    unnamed: A `(.., <in>, None)`, B `(.., None, <out>)`) named "lora_rank"."""
    from rlhf_jax.models import transformer

    def name_rank(path, spec):
        key = getattr(path[-1], "key", "")
        dim = next((d for suffix, d in LORA_RANK_DIM.items() if str(key).endswith(suffix)), None)
        if dim is None:
            return spec
        names = list(spec)
        names[dim] = "lora_rank"
        return PartitionSpec(*names)
    return jax.tree_util.tree_map_with_path(name_rank, transformer.param_logical_axes(model),
                                            is_leaf=lambda x: isinstance(x, PartitionSpec))


def param_shardings(model, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """Shardings of `init_params(model, ...)`'s tree, from `param_logical_axes(model)`."""
    from rlhf_jax.models import transformer

    shapes = jax.eval_shape(lambda: transformer.init_params(model, jax.random.PRNGKey(0)))
    return logical_shardings(param_logical_axes(model), shapes, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    """Same full value on every device (scalars, RNG keys, step counters)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ("data", "fsdp"); any rank, other axes replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


# ----------------------------------------------------------------------------------------------
# Placing data
# ----------------------------------------------------------------------------------------------
def shard_batch(np_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host numpy batch -> global arrays split along axis 0 over ("data", "fsdp").

    Multi-process aware: each process passes only ITS rows (its data shard); the global batch is
    the concatenation over processes (`jax.make_array_from_process_local_data`).
    """
    sharding = batch_sharding(mesh)
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in np_batch.items()}


def shard_params(params: Any, shardings: Any) -> Any:
    """Place a (host or device) parameter pytree onto its shardings."""
    return jax.device_put(params, shardings)
