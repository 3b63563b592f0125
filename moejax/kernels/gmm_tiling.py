"""Tiling for the grouped-matmul kernels, in plain jnp/Python (CPU-testable).

What ``gmm_gpu``'s Mosaic GPU kernels consume, split out so it can be tested without a GPU:
  * ``TileConfig``, the tuned table ``TUNED``, validity/shared-memory rules, autotune candidates
    and the autotune cache (memory + ``~/.cache/moejax/gmm_gpu_tiles.json``);
  * the per-tile metadata built on device with jnp (``row_tasks`` for the row-ragged products,
    ``group_blocks`` for the ragged-contraction product) and the tile order (``band_order``);
  * jnp "tile bodies" (``jnp_rows`` / ``jnp_tgmm``) that walk exactly those tasks and blocks, with
    the kernels' masking and TMA zero-fill semantics; the 'jnp' backend of ``gmm_gpu``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SMEM_BYTES = 224 * 1024  # H100 allows 227 KiB per block; keep a margin for barriers/alignment


# ----------------------------------------------------------------------------------------------
# Tile configurations
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One kernel's tiling. Row kernel: a CTA computes [block_m, wgs*block_n] of the output,
    stepping block_k over K. tgmm: a CTA computes [wgs*block_m, block_n] of drhs[g], stepping
    block_k over the group's rows. ``stages`` = pipeline depth; ``group_m`` = band width of the
    tile order (L2 reuse); ``align`` = row alignment of tile starts."""
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    stages: int = 3
    wgs: int = 2
    group_m: int = 8
    align: int = 8


OPS = ("fwd", "dlhs", "drhs", "swiglu")

# (op, K, N, G) -> config; K, N as the op sees them (dlhs: K=N_layer, N=K_layer). Seeded from the
# JAX example sweep in notes/gpu.md (block_m=128, block_k=64 best; wide tiles come from two
# consumer warpgroups, not block_n=256); re-tune on an H100 with `benchmarks/gmm.py --autotune`.
TUNED: dict[tuple[str, int, int, int], TileConfig] = {
    ("fwd", 2048, 768, 128): TileConfig(128, 128, 64, 3, 2, 8),   # shape A
    ("dlhs", 768, 2048, 128): TileConfig(128, 128, 64, 3, 2, 8),
    ("drhs", 2048, 768, 128): TileConfig(128, 128, 64, 3, 2, 4),
    ("fwd", 4096, 14336, 8): TileConfig(128, 128, 64, 3, 2, 16),  # shape B
    ("dlhs", 14336, 4096, 8): TileConfig(128, 128, 64, 3, 2, 16),
    ("drhs", 4096, 14336, 8): TileConfig(128, 128, 64, 3, 2, 8),
    ("fwd", 1024, 512, 64): TileConfig(128, 128, 64, 3, 2, 8),    # shape C
    ("dlhs", 512, 1024, 64): TileConfig(128, 128, 64, 3, 2, 8),
    ("drhs", 1024, 512, 64): TileConfig(128, 128, 64, 3, 2, 4),
}


def smem_bytes(op: str, cfg: TileConfig, in_bytes: int = 2, out_bytes: int = 2) -> int:
    """Shared memory a config needs: pipeline buffers + the per-warpgroup output staging tile."""
    c = cfg
    if op == "drhs":
        stage = c.block_k * (c.wgs * c.block_m + c.block_n) * in_bytes
    else:
        stage = (c.block_m * c.block_k + (2 if op == "swiglu" else 1)
                 * c.block_k * c.wgs * c.block_n) * in_bytes
    return c.stages * stage + c.wgs * c.block_m * c.block_n * out_bytes + 1024


def config_ok(op: str, k: int, n: int, cfg: TileConfig, in_bytes=2, out_bytes=2) -> bool:
    """Divisibility and shared-memory rules of the kernels (K, N as the op sees them)."""
    c = cfg
    if op == "drhs":
        fits = k % (c.wgs * c.block_m) == 0 and n % c.block_n == 0
    else:
        fits = k % c.block_k == 0 and n % (c.wgs * c.block_n) == 0
    return fits and c.block_m % 64 == 0 and smem_bytes(op, c, in_bytes, out_bytes) <= SMEM_BYTES


def candidates(op: str, k: int, n: int, in_bytes=2, out_bytes=2) -> list[TileConfig]:
    """The autotune search space (~16 configs): two consumer warpgroups with 64/128-wide tiles
    (band widths 1/8/16 for the 128x128 tile), or one warpgroup with 128/256-wide tiles; for each,
    the two deepest pipelines that fit in shared memory. Widest tiles and deepest pipelines
    first, so the first entry is also the untuned default."""
    families = [(2, 128, 128, 8), (2, 128, 128, 16), (2, 128, 128, 1), (2, 128, 64, 8),
                (2, 64, 128, 8), (2, 64, 64, 8), (1, 256, 128, 8), (1, 128, 128, 8)]
    out = []
    for wgs, bn, bm, gm in families:
        if op == "swiglu" and bn > 64:  # two fp32 accumulators per warpgroup
            continue
        fits = [TileConfig(bm, bn, 64, st, wgs, gm) for st in (5, 4, 3, 2)]
        out += [c for c in fits if config_ok(op, k, n, c, in_bytes, out_bytes)][:2]
    return out


def default_config(op: str, k: int, n: int, g: int, in_bytes=2, out_bytes=2) -> TileConfig:
    """Table entry if there is one, else the first valid candidate (deepest pipeline that fits)."""
    cfg = TUNED.get((op, k, n, g))
    if cfg is not None and config_ok(op, k, n, cfg, in_bytes, out_bytes):
        return cfg
    found = candidates(op, k, n, in_bytes, out_bytes)
    if not found:
        raise ValueError(
            f"gmm_gpu {op}: no tile config fits K={k}, N={n} (the kernels need the contraction a "
            "multiple of 64 and the output width a multiple of 64 (128 for drhs rows); pad the "
            "expert dimensions or use model.moe.gmm_impl='xla')")
    return found[0]


def _cache_path() -> pathlib.Path:
    root = os.environ.get("MOEJAX_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache",
                                                           "moejax"))
    return pathlib.Path(root) / "gmm_gpu_tiles.json"


_TUNE_MEMO: dict[str, TileConfig] = {}


def autotune(key: str, cands: list[TileConfig], time_fn, *, verbose=False) -> TileConfig:
    """Best of ``cands`` by ``time_fn(cfg) -> seconds`` (inf or raising = unusable), once per key.

    The choice is memoised in process and in the JSON cache file (``MOEJAX_CACHE_DIR``), so later
    processes reuse it without timing again."""
    if key in _TUNE_MEMO:
        return _TUNE_MEMO[key]
    path = _cache_path()
    disk = json.loads(path.read_text()) if path.exists() else {}
    if key in disk:
        _TUNE_MEMO[key] = TileConfig(**disk[key]["config"])
        return _TUNE_MEMO[key]
    timings = []
    for cfg in cands:
        try:
            t = float(time_fn(cfg))
        except Exception as e:  # e.g. "exceeds available shared memory"  # noqa: BLE001
            t = float("inf")
            if verbose:
                print(f"autotune {key}: {cfg} failed: {str(e).splitlines()[0][:120]}")
        timings.append(t)
        if verbose:
            print(f"autotune {key}: {cfg} {t * 1e6:.1f} us")
    best = int(np.argmin(timings))
    if not np.isfinite(timings[best]):
        raise RuntimeError(f"autotune {key}: no candidate config ran")
    _TUNE_MEMO[key] = cands[best]
    disk = json.loads(path.read_text()) if path.exists() else {}
    disk[key] = {"config": dataclasses.asdict(cands[best]), "seconds": timings[best]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(disk, indent=1, sort_keys=True))
    tmp.replace(path)
    return cands[best]


# ----------------------------------------------------------------------------------------------
# Metadata (plain jnp, on device, no host sync)
# ----------------------------------------------------------------------------------------------
class RowTasks(NamedTuple):
    """Row tiles of the forward/dlhs kernel, one entry per task (T = ``num_row_tasks``).

    Task t computes lhs rows [start, start+block_m) against group ``group`` and stores rows
    [lo, hi). group == G marks the tail rows past sum(group_sizes) (stored as zeros); hi == lo
    marks a no-op (all no-ops come last). Rows of [0, M) are stored by exactly one task."""
    group: jax.Array  # [T] int32
    start: jax.Array  # [T] int32
    lo: jax.Array  # [T] int32
    hi: jax.Array  # [T] int32


def num_row_tasks(m: int, g: int, block_m: int, align: int) -> int:
    """Static bound on row tasks: each of the G groups and the tail adds at most one partial
    tile, and 8-aligned starts add at most (align-1) rows per group."""
    return -(-(m + (g + 1) * (align - 1)) // block_m) + g + 1


def _group_ranges(group_sizes: jax.Array, m: int):
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)  # [G], clipped to M
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), ends[:-1]])
    return starts, ends


def row_tasks(group_sizes: jax.Array, m: int, block_m: int, align: int = 8) -> RowTasks:
    """Per-tile group id and row ranges for ``m`` rows sorted by group ([G] sizes, sum <= m)."""
    g = group_sizes.shape[0]
    starts, ends = _group_ranges(group_sizes, m)
    starts = jnp.append(starts, ends[-1])  # [G+1]: the tail is pseudo-group G
    ends = jnp.append(ends, m)
    first = starts // align * align  # tiles of a group start at its first row, aligned down
    ntiles = jnp.where(ends > starts, (ends - first + block_m - 1) // block_m, 0)  # [G+1]
    offset = jnp.cumsum(ntiles) - ntiles
    t_bound = num_row_tasks(m, g, block_m, align)
    t = jnp.arange(t_bound, dtype=jnp.int32)
    grp = jnp.repeat(jnp.arange(g + 1, dtype=jnp.int32), ntiles, total_repeat_length=t_bound)
    valid = t < jnp.sum(ntiles)
    start = first[grp] + (t - offset[grp]) * block_m
    lo = jnp.where(valid, jnp.maximum(start, starts[grp]), 0)
    hi = jnp.where(valid, jnp.minimum(start + block_m, ends[grp]), 0)
    return RowTasks(jnp.where(valid, grp, g), jnp.where(valid, start, 0), lo, hi)


class GroupBlocks(NamedTuple):
    """Contraction blocks of the drhs kernel: group g sums rows [start, end) in ``nblocks``
    blocks of block_k rows beginning at row ``first`` (start aligned down); rows outside
    [start, end) are masked in the first and last block."""
    start: jax.Array  # [G] int32
    end: jax.Array  # [G] int32
    first: jax.Array  # [G] int32
    nblocks: jax.Array  # [G] int32


def group_blocks(group_sizes: jax.Array, m: int, block_k: int, align: int = 8) -> GroupBlocks:
    starts, ends = _group_ranges(group_sizes, m)
    first = starts // align * align
    nblocks = jnp.where(ends > starts, (ends - first + block_k - 1) // block_k, 0)
    return GroupBlocks(starts, ends, first, nblocks.astype(jnp.int32))


def band_order(lin, rows: int, cols: int, width: int):
    """Linear step -> (row, col) visiting ``width`` rows at a time, column by column inside a
    band, so tiles running together share a few row tiles and column tiles (L2 reuse)."""
    band = lax.div(lin, jnp.int32(width * cols))
    r0 = band * width
    w = jnp.minimum(jnp.int32(width), jnp.int32(rows) - r0)
    within = lin - band * (width * cols)
    return r0 + lax.rem(within, w), lax.div(within, w)


def swiglu(gate, up):
    return gate * (1.0 / (1.0 + jnp.exp(-gate))) * up


# ----------------------------------------------------------------------------------------------
# jnp tile bodies: the same tasks/blocks, for CPU tests
# ----------------------------------------------------------------------------------------------
def jnp_rows(lhs, w, tasks: RowTasks, n_b: int, block_m: int, out_dtype):
    """Row tasks in jnp: w [G, K, n_b*N]. Each task multiplies a block_m row window (zero past
    M, as TMA fills) and scatters rows [lo, hi); tail tasks (group G) give zeros."""
    m, g = lhs.shape[0], w.shape[0]
    lhs_p = jnp.pad(lhs, ((0, block_m), (0, 0)))

    def one(grp, start, lo, hi):
        a = lax.dynamic_slice_in_dim(lhs_p, start, block_m)  # [block_m, K]
        acc = jnp.dot(a, w[jnp.minimum(grp, g - 1)], preferred_element_type=jnp.float32)
        vals = swiglu(*jnp.split(acc, 2, axis=1)) if n_b == 2 else acc  # [block_m, N]
        rows = start + jnp.arange(block_m)
        keep = (rows >= lo) & (rows < hi) & (grp < g)
        return rows, jnp.where(keep[:, None], vals, 0.0)

    rows, vals = jax.vmap(one)(*tasks)  # [T, block_m], [T, block_m, N]
    out = jnp.zeros((m + block_m, vals.shape[-1]), jnp.float32)
    out = out.at[rows.reshape(-1)].add(vals.reshape(-1, vals.shape[-1]))
    return out[:m].astype(out_dtype)


def jnp_tgmm(lhs, dout, blocks: GroupBlocks, block_k: int, out_dtype):
    """drhs in jnp, block by block over each group's rows with the kernel's masking."""
    m = lhs.shape[0]
    nmax = -(-m // block_k) + 1
    lhs_p = jnp.pad(lhs, ((0, nmax * block_k), (0, 0)))
    dout_p = jnp.pad(dout, ((0, nmax * block_k), (0, 0)))

    def group(start, end, first, nblk):
        def blk(i, acc):
            r0 = first + i * block_k
            rows = r0 + jnp.arange(block_k)
            keep = (rows >= start) & (rows < end) & (i < nblk)
            a = jnp.where(keep[:, None], lax.dynamic_slice_in_dim(lhs_p, r0, block_k), 0)
            d = lax.dynamic_slice_in_dim(dout_p, r0, block_k)
            return acc + jnp.dot(a.T, d, preferred_element_type=jnp.float32)
        zero = jnp.zeros((lhs.shape[1], dout.shape[1]), jnp.float32)
        return lax.fori_loop(0, nmax, blk, zero)

    return jax.vmap(group)(*blocks).astype(out_dtype)  # [G, K, N]
