"""Device mesh, logical-axis rules and shardings for data- and FSDP-parallel training.

The mesh has two named axes: ``data`` (pure data parallelism: params replicated) and ``fsdp``
(data parallelism whose members also split every large parameter and its optimizer state).
Code never names mesh axes directly; it names *logical* axes, which config rules map to mesh
axes:

    rules = (("batch", ("data", "fsdp")),   # the batch is split over every device
             ("params", "fsdp"))            # large params are split over the fsdp axis

Typical use::

    mesh = make_mesh(config.mesh)                       # {"data": -1, "fsdp": 1}
    batch_sh = batch_sharding(mesh, rules)
    state_sh = param_shardings(state, mesh, rules)      # any pytree of arrays / shapes
    batch = global_batch(local_numpy_batch, batch_sh)   # per-host batch -> global jax.Array
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
DEFAULT_RULES = (("batch", ("data", "fsdp")), ("params", "fsdp"))


def make_mesh(mesh_config: Mapping[str, int] | None = None,
              devices: Sequence[Any] | None = None) -> Mesh:
    """Mesh of shape (data, fsdp) over all devices; one size may be -1 (= the rest).

    Devices are taken in jax.devices() order (process-major), so each process's devices form a
    contiguous block of the batch axis, as make_array_from_process_local_data expects.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {axis: int((mesh_config or {}).get(axis, -1 if axis == "data" else 1))
             for axis in MESH_AXES}
    known = math.prod(s for s in sizes.values() if s != -1)
    for axis, size in sizes.items():
        if size == -1:
            sizes[axis] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} does not use exactly the {len(devices)} devices")
    grid = np.asarray(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def mesh_axes(logical: str, rules=DEFAULT_RULES) -> tuple[str, ...]:
    """Mesh axes a logical axis maps to (empty tuple = replicated)."""
    for name, axes in rules:
        if name == logical:
            if axes is None:
                return ()
            return (axes,) if isinstance(axes, str) else tuple(axes)
    return ()


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) dimension split over the mesh axes of the logical axis ``batch``."""
    return NamedSharding(mesh, PartitionSpec(mesh_axes("batch", rules) or None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_spec(shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES,
               min_size: int = 2**12) -> PartitionSpec:
    """FSDP spec for one parameter: split its largest dimension divisible by the size of the
    ``params`` mesh axes; small tensors (< min_size elements) and scalars stay replicated."""
    axes = tuple(a for a in mesh_axes("params", rules) if mesh.shape[a] > 1)
    n_shards = math.prod(mesh.shape[a] for a in axes)
    if not axes or len(shape) == 0 or math.prod(shape) < min_size:
        return PartitionSpec()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % n_shards == 0:
            spec = [None] * len(shape)
            spec[dim] = axes if len(axes) > 1 else axes[0]
            return PartitionSpec(*spec)
    return PartitionSpec()


def param_shardings(tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedSharding for every leaf (arrays or ShapeDtypeStructs) of a params/state pytree."""
    return jax.tree.map(
        lambda x: NamedSharding(mesh, param_spec(tuple(getattr(x, "shape", ())), mesh, rules)), tree)


def global_batch(local_batch: Any, sharding: NamedSharding) -> Any:
    """Assemble the global batch from each process's slice (a pytree of numpy arrays whose
    leading dims are the per-process batch)."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
