"""Grouped-matmul kernel bodies behind ``kernels.gmm``: XLA ragged_dot, tokamax, and the GPU seam.

Each takes lhs [M,K] (rows sorted by group), rhs [G,K,N], group_sizes [G] int32 and returns [M,N];
rows past sum(group_sizes) are zeros. Selection by name happens only in ``moejax.kernels.gmm``.
"""

from __future__ import annotations

import jax


def xla(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
        preferred_element_type=None) -> jax.Array:
    """``jax.lax.ragged_dot``: differentiable everywhere; on CPU it lowers to a masked dense dot
    (about G x the FLOPs), so use it for correctness there, not for speed (notes section 2)."""
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype("int32"),
                              preferred_element_type=preferred_element_type)


def tokamax(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
            preferred_element_type=None) -> jax.Array:
    """tokamax's ragged_dot (Mosaic GPU / TPU kernels with their own VJP); an optional extra."""
    try:
        import tokamax as tkx
    except ImportError as e:  # tokamax needs jax >= 0.11.1, i.e. Python >= 3.12
        raise ImportError("model.moe.gmm_impl='tokamax' needs the tokamax package: "
                          "pip install moejax[gpu] on Python >= 3.12 (or use gmm_impl='xla')") from e
    return tkx.ragged_dot(lhs, rhs, group_sizes.astype("int32"),
                          preferred_element_type=preferred_element_type)


def pallas(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
           preferred_element_type=None) -> jax.Array:
    """Seam for the Pallas Mosaic GPU kernel (``moejax/kernels/gmm_gpu.py``), not landed yet."""
    raise NotImplementedError(
        "model.moe.gmm_impl='pallas': the Hopper Pallas grouped-matmul kernel (moejax/kernels/"
        "gmm_gpu.py, tracked in the GPU grouped-matmul kernel issue) has not landed yet; use "
        "gmm_impl='xla' (any backend) or 'tokamax' (GPU/TPU, Python >= 3.12)")
