"""Device mesh, logical-axis rule tables and multi-host initialisation.

Modules never name mesh axes: parameters carry logical names in their ``out_sharding`` metadata and
activations are constrained with ``constrain(x, ("batch", "length", "embed"))``. One rule table per
layout maps logical names to the mesh axes ``data``, ``fsdp``, ``expert``, ``tensor``.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from moejax.config import ConfigError, MeshConfig

MESH_AXES = MeshConfig.AXES
BATCH_AXES = ("data", "fsdp", "expert")

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

RULES: dict[str, LogicalRules] = {
    # Activations shard their batch over every non-tensor axis; weights shard `embed` over fsdp
    # and the wide dims over tensor. A mesh axis is used at most once per array (first dim wins).
    "default": (
        ("batch", BATCH_AXES),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("vocab", "tensor"),
        ("expert", "expert"),
        ("length", None),
        ("head_dim", None),
        ("layers", None),
    ),
}


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all) with axes (data, fsdp, expert, tensor), all Auto.

    Devices of several slices (``device.slice_index``: a multi-slice TPU job, or an AOT
    topology with ``num_slices``) get a hybrid mesh: ``cfg`` lays out one slice's chips (ICI)
    and the ``data`` axis also runs across the slices (DCN), ``data = cfg's data x slices``
    (``device_grid``)."""
    devices = list(jax.devices() if devices is None else devices)
    grid = device_grid(cfg, devices)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def num_slices(devices: Sequence) -> int:
    """How many slices ``devices`` span (1 where devices carry no ``slice_index``: CPU, GPU)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def device_grid(cfg: MeshConfig, devices: Sequence) -> np.ndarray:
    """The devices as an array of the mesh's shape. One slice: ``mesh_utils.create_device_mesh``
    (physical-topology aware on TPU). Several: ``create_hybrid_device_mesh`` with the config's
    sizes over each slice and the slices stacked along ``data``; every slice must hold as many
    devices."""
    per_slice = collections.Counter(getattr(d, "slice_index", 0) for d in devices)
    slices = len(per_slice)
    if len(set(per_slice.values())) > 1:
        raise ConfigError(f"devices per slice {dict(sorted(per_slice.items()))}: a mesh needs "
                          "as many devices in every slice")
    # as jax.make_mesh: v5e's 2D slices may split a physical axis, other chips' may not
    split = getattr(devices[0], "device_kind", "") in ("TPU v5 lite", "TPU v5e")
    sizes = cfg.resolve(len(devices) // slices)
    ici = tuple(sizes[a] for a in MESH_AXES)
    if slices == 1:
        return mesh_utils.create_device_mesh(ici, devices=devices, allow_split_physical_axes=split)
    dcn = tuple(slices if a == "data" else 1 for a in MESH_AXES)
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                allow_split_physical_axes=split)


def rules_for(cfg: MeshConfig) -> LogicalRules:
    return RULES[cfg.rules]


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: LogicalRules) -> Iterator[Mesh]:
    """Activate ``mesh`` and the logical rules: modules created inside are sharded eagerly."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        yield mesh


def logical_to_spec(names: Sequence[str | None], rules: LogicalRules | None = None) -> P:
    """PartitionSpec for logical ``names``; a mesh axis already taken by an earlier dim is dropped."""
    if rules is None:
        from flax.core import spmd
        rules = spmd.get_logical_axis_rules()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in names:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op when no mesh is active."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def named_sharding(mesh: Mesh, names: Sequence[str | None], rules: LogicalRules) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, rules))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_count: int | None = None,
                           timeout_s: int = 300) -> None:
    """Start multi-host JAX. On TPU pods and SLURM all arguments are auto-detected; on CPU
    (tests, 2 processes x 4 devices) pass them explicitly. Idempotent."""
    if jax.distributed.is_initialized():
        return
    if local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", local_device_count)
    if (num_processes is None) != (process_id is None):
        raise ConfigError("initialize_distributed: give both num_processes and process_id, or neither")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s)
