"""One device mesh and the sharding rules every jitted function uses.

Data parallel: batches split over the `data` axis, parameters and optimizer state replicated.
FSDP (`fsdp=True`): additionally each parameter's largest divisible dimension is split over the
same axis, so ViT-L/g parameters and Adam moments fit; XLA inserts the all-gathers.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh() -> Mesh:
    """A 1-D mesh over every device of every process (Auto axes: XLA propagates shardings)."""
    return jax.make_mesh(
        (jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
    )


def data_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _fsdp_spec(shape: tuple[int, ...], axis_size: int, min_size: int) -> PartitionSpec:
    if np.prod(shape, dtype=np.int64) < min_size:
        return PartitionSpec()
    for dim in np.argsort(shape)[::-1]:
        if shape[dim] % axis_size == 0:
            spec = [None] * len(shape)
            spec[dim] = DATA_AXIS
            return PartitionSpec(*spec)
    return PartitionSpec()


def state_shardings(abstract_state, mesh: Mesh, *, fsdp: bool = False, min_size: int = 2**14):
    """Shardings for a pytree of arrays (or ShapeDtypeStructs): replicated, or FSDP-split."""
    axis_size = mesh.shape[DATA_AXIS]

    def rule(leaf):
        if not fsdp or not getattr(leaf, "shape", ()):
            return replicated(mesh)
        return NamedSharding(mesh, _fsdp_spec(tuple(leaf.shape), axis_size, min_size))

    return jax.tree.map(rule, abstract_state)
