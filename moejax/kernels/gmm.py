"""Grouped-matmul kernel bodies behind ``kernels.gmm``: XLA ragged_dot, a blocked jnp path (CPU, and
GPU without tokamax), tokamax, Pallas (GPU/TPU).

Each takes lhs [M,K] (rows sorted by group), rhs [G,K,N], group_sizes [G] int32 and returns [M,N];
rows past sum(group_sizes) are zeros. Selection by name happens only in ``moejax.kernels.gmm``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def xla(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
        preferred_element_type=None) -> jax.Array:
    """``jax.lax.ragged_dot``: differentiable everywhere; on CPU it lowers to a masked dense dot
    (about G x the FLOPs), so use it for correctness there, not for speed (notes section 2)."""
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype("int32"),
                              preferred_element_type=preferred_element_type)


def blocked(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
            preferred_element_type=None, block: int | None = None) -> jax.Array:
    """Exact block-sparse grouped matmul in plain jnp, for CPU (where ``ragged_dot`` lowers to a
    masked dense dot costing G x the FLOPs): each group's rows are padded to a multiple of
    ``block`` rows, every block is multiplied by its group's weights in one batched einsum
    ([NB,b,K] x [NB,K,N]), and rows are gathered back. FLOPs ~ (M + G*block) * K * N.
    ``block`` defaults to M/(4G) rounded down to a power of two in [8, 512] (measured on 2 CPU
    cores: 4.7-6.8x faster than ragged_dot forward+backward at M=4k-16k, G=8). Also the GPU
    fallback without tokamax: dense batched matmuls instead of ragged_dot's ~1% of peak (the
    block heuristic and the gathered [NB,K,N] weights are not yet measured on a GPU)."""
    M, K = lhs.shape
    G, _, N = rhs.shape
    if block is None:
        block = int(min(512, max(8, 2 ** int(math.log2(max(M // (4 * G), 1))))))
    gs = group_sizes.astype(jnp.int32)
    padded = (gs + block - 1) // block * block
    end_in, end_out = jnp.cumsum(gs), jnp.cumsum(padded)
    start_in, start_out = end_in - gs, end_out - padded
    NB = M // block + G  # >= sum_g ceil(gs_g / block) for any split of <= M rows
    p = jnp.arange(NB * block, dtype=jnp.int32)  # padded row -> group, source row
    g = jnp.minimum(jnp.searchsorted(end_out, p, side="right"), G - 1)
    r = p - start_out[g]
    valid = (r < gs[g]) & (p < end_out[-1])
    x = jnp.where(valid[:, None], lhs[jnp.where(valid, start_in[g] + r, 0)], 0)
    y = jnp.einsum("nbk,nkd->nbd", x.reshape(NB, block, K), rhs[g[::block]],
                   preferred_element_type=preferred_element_type).reshape(NB * block, N)
    m = jnp.arange(M, dtype=jnp.int32)  # original row -> padded row
    gm = jnp.minimum(jnp.searchsorted(end_in, m, side="right"), G - 1)
    pm = jnp.minimum(start_out[gm] + m - start_in[gm], NB * block - 1)
    return jnp.where((m < end_in[-1])[:, None], y[pm], 0)


@functools.lru_cache(maxsize=None)
def have_tokamax() -> bool:
    """Whether the optional tokamax package imports (it needs jax >= 0.11.1, Python >= 3.12)."""
    try:
        import tokamax as _  # noqa: F401
        return True
    except ImportError:
        return False


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
    from moejax.kernels.platform import current
    platform = current()
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
