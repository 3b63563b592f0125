"""Model layers. ``param`` is the one way layers create parameters (logical axis names attached)."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def param(init: Callable, key: jax.Array | None, shape: Sequence[int], dtype,
          names: Sequence[str | None]) -> nnx.Param:
    """An ``nnx.Param`` of ``init(key, shape, dtype)`` carrying logical axis ``names``.

    Under a mesh (``moejax.mesh.use_mesh``) the value is sharded eagerly by the logical rules. With
    no mesh the names are attached after construction (flax would otherwise demand a mesh), so the
    metadata, and hence the state's tree structure, is the same with and without a mesh.
    """
    assert len(names) == len(shape), (names, shape)
    value = init(key, tuple(shape), jnp.dtype(dtype))
    if not jax.sharding.get_abstract_mesh().empty:
        return nnx.Param(value, out_sharding=tuple(names))
    p = nnx.Param(value)
    p.set_metadata("out_sharding", tuple(names))
    return p


def ones_init(key, shape, dtype):
    del key
    return jnp.ones(shape, dtype)


def zeros_init(key, shape, dtype):
    del key
    return jnp.zeros(shape, dtype)
