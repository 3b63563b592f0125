"""Grouped-matmul kernel bodies behind ``kernels.gmm``: XLA ragged_dot, tokamax, Pallas (GPU/TPU).

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
    """The Pallas kernels: Mosaic GPU on a CUDA GPU (``gmm_gpu``, Hopper wgmma + TMA), megablox or
    tokamax on TPU (``gmm_tpu``). The platform picks the kernel *body*; the config picked
    'pallas'. On CPU there is no Pallas kernel to run (interpret mode is for tests only)."""
    platform = jax.default_backend()
    kw = dict(preferred_element_type=preferred_element_type)
    if platform == "gpu":
        from moejax.kernels import gmm_gpu
        return gmm_gpu.gmm(lhs, rhs, group_sizes, **kw)
    if platform == "tpu":
        from moejax.kernels import gmm_tpu
        return gmm_tpu.gmm(lhs, rhs, group_sizes, **kw)
    raise NotImplementedError(
        f"model.moe.gmm_impl='pallas' runs the Pallas grouped-matmul kernel on a GPU (Mosaic GPU, "
        f"moejax/kernels/gmm_gpu.py) or a TPU (megablox/tokamax, gmm_tpu.py); the backend here is "
        f"{platform!r}: use gmm_impl='xla' (jax.lax.ragged_dot) or 'reference' (masked jnp loop)")
