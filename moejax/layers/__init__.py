"""Model layers. ``param`` is the one way layers create parameters (logical axis names attached)."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def param(init: Callable, key: jax.Array | None, shape: Sequence[int], dtype,
          names: Sequence[str | None]) -> nnx.Param:
    """An ``nnx.Param`` of ``init(key, shape, dtype)`` carrying logical axis ``names``.

    Under a mesh (``moejax.mesh.use_mesh``) the value is sharded eagerly by the logical rules; with
    no mesh, eager sharding is switched off for this variable so single-device models still build.
    """
    assert len(names) == len(shape), (names, shape)
    value = init(key, tuple(shape), jnp.dtype(dtype))
    extra = {} if not jax.sharding.get_abstract_mesh().empty else {"eager_sharding": False}
    return nnx.Param(value, out_sharding=tuple(names), **extra)


def ones_init(key, shape, dtype):
    del key
    return jnp.ones(shape, dtype)


def zeros_init(key, shape, dtype):
    del key
    return jnp.zeros(shape, dtype)
