"""Grouped-matmul kernel bodies behind ``kernels.gmm``: XLA ragged_dot, a blocked jnp path (CPU, and
GPU without tokamax), tokamax, Pallas (GPU/TPU).

Each takes lhs [M,K] (rows sorted by group), rhs [G,K,N], group_sizes [G] int32 and returns [M,N];
rows past sum(group_sizes) are zeros. Selection by name happens only in ``moejax.kernels.gmm``.
``block_layout`` (the padded layout behind ``blocked``) is shared with the MoE layer, which keeps
its whole expert FFN in that layout (``layers/moe_dispatch.py``; on CPU as ``expert_loop``).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


def xla(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
        preferred_element_type=None) -> jax.Array:
    """``jax.lax.ragged_dot``: differentiable everywhere; on CPU it lowers to a masked dense dot
    (about G x the FLOPs), so use it for correctness there, not for speed (notes section 2)."""
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype("int32"),
                              preferred_element_type=preferred_element_type)


class BlockLayout(NamedTuple):
    """Rows sorted by group, each group padded to a multiple of ``block`` rows: the layout of
    ``blocked`` and of the fused MoE expert FFN (``moe_dispatch``). NB = M // block + G blocks
    bound sum_g ceil(gs_g / block) for any split of <= M rows."""

    block: int  # rows per block
    num_blocks: int  # NB
    block_group: jax.Array  # [NB] group of each block (G-1 for the unused tail blocks)
    src: jax.Array  # [NB*block] source row of each padded row; M = padding (no row)
    dest: jax.Array  # [M] padded row of each source row; NB*block = a row past sum(group_sizes)
    used: jax.Array  # [] int32 blocks in use, sum_g ceil(gs_g / block) <= NB (they come first)


DECODE_ROWS, DECODE_BLOCK = (256, 1024), 32  # MoE decode-sized row counts: >= 32-row blocks


def default_block(rows: int, groups: int) -> int:
    """rows/(4*groups) rounded down to a power of two in [8, 512] (measured on 2 CPU cores:
    4.7-6.8x faster than ragged_dot forward+backward at M=4k-16k, G=8); at least 32 for 256-1024
    rows (MoE decode steps), where 8-row blocks gather each expert's weights ~5 times over
    (NB = rows/8 + G blocks) and 32-row ones ~2: one core, G=8, D=F=256, fused SwiGLU experts,
    256 rows 8.8 -> 5.1 ms, 512 rows 40 -> 6.9 ms (block 64: 6.3 / 8.9 ms). Below 256 rows the
    rule is unchanged (32 also measured faster at 128 rows, 4.7 -> 3.1 ms, but the dispatch
    tests pin 8-row blocks at 128 rows for their most-padding edge case)."""
    block = int(min(512, max(8, 2 ** int(math.log2(max(rows // (4 * groups), 1))))))
    low, high = DECODE_ROWS
    return max(block, DECODE_BLOCK) if low <= rows <= high else block


def block_layout(group_sizes: jax.Array, rows: int, block: int | None = None) -> BlockLayout:
    """The padded layout of ``rows`` rows sorted into groups of ``group_sizes`` [G] (sum <= rows);
    ``src`` and ``dest`` are inverse maps between the valid rows of both layouts (integer work)."""
    G = group_sizes.shape[0]
    block = default_block(rows, G) if block is None else block
    gs = group_sizes.astype(jnp.int32)
    padded = (gs + block - 1) // block * block
    end_in, end_out = jnp.cumsum(gs), jnp.cumsum(padded)
    start_in, start_out = end_in - gs, end_out - padded
    NB = rows // block + G
    p = jnp.arange(NB * block, dtype=jnp.int32)  # padded row -> group, rank inside it
    g = jnp.minimum(jnp.searchsorted(end_out, p, side="right"), G - 1).astype(jnp.int32)
    r = p - start_out[g]
    src = jnp.where((r < gs[g]) & (p < end_out[-1]), start_in[g] + r, rows).astype(jnp.int32)
    m = jnp.arange(rows, dtype=jnp.int32)  # source row -> group -> padded row
    gm = jnp.minimum(jnp.searchsorted(end_in, m, side="right"), G - 1)
    dest = jnp.where(m < end_in[-1], start_out[gm] + m - start_in[gm], NB * block).astype(jnp.int32)
    used = (end_out[-1] // block).astype(jnp.int32)
    return BlockLayout(block, NB, g[::block], src, dest, used)


def take_rows(a: jax.Array, idx: jax.Array) -> jax.Array:
    """a[idx] with zero rows where idx is out of range (the layouts' 'no row' markers)."""
    return jnp.asarray(a).at[idx].get(mode="fill", fill_value=0)


def blocked(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
            preferred_element_type=None, block: int | None = None) -> jax.Array:
    """Exact block-sparse grouped matmul in plain jnp, for CPU (where ``ragged_dot`` lowers to a
    masked dense dot costing G x the FLOPs): each group's rows are padded to a multiple of
    ``block`` rows (``block_layout``; default ``default_block``), every block is multiplied by its
    group's weights in one batched einsum ([NB,b,K] x [NB,K,N]), and rows are gathered back.
    FLOPs ~ (M + G*block) * K * N. Also the GPU fallback without tokamax: dense batched matmuls
    instead of ragged_dot's ~1% of peak (the block heuristic and the gathered [NB,K,N] weights are
    not yet measured on a GPU)."""
    M, K = lhs.shape
    lay = block_layout(group_sizes, M, block)
    x = take_rows(lhs, lay.src).reshape(lay.num_blocks, lay.block, K)
    y = jnp.einsum("nbk,nkd->nbd", x, rhs[lay.block_group],
                   preferred_element_type=preferred_element_type)
    return take_rows(y.reshape(lay.num_blocks * lay.block, -1), lay.dest)


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
