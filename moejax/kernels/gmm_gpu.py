"""Grouped matmul for Hopper GPUs in Pallas Mosaic GPU: forward, dlhs, drhs and a custom_vjp.

A grouped linear layer has three products, all computed here by two persistent, warp-specialised
kernels (one TMA producer warpgroup, ``wgs`` wgmma consumer warpgroups splitting the tile):

  forward  out[M,N]  = lhs[M,K] @ rhs[g]        per row group g       (``_row_kernel``)
  dlhs     dlhs[M,K] = dout[M,N] @ rhs[g]^T     same kernel, B read transposed from smem
  drhs     drhs[g]   = lhs[rows_g]^T @ dout[rows_g]  ragged contraction (``_tgmm_kernel``)

Why not JAX's example kernels (``ragged_dot_mgpu`` / ``transposed_ragged_dot_mgpu``): they find a
tile's group with an O(G) unrolled scan *inside* the kernel, tile rows at multiples of block_m (so
every group boundary costs a whole extra tile: ~25% waste at 512 rows per group), use one
warpgroup without a producer, and are forward only. Here the per-tile metadata is built once on
device with jnp (``row_tasks`` / ``group_blocks``, no host sync), tiles start at the group's own
(8-aligned) first row, empty groups cost nothing, rows past sum(group_sizes) are written as zeros
by cheap "tail" tasks, and the tile order is banded (``band_order``) so concurrently running tiles
share the weights in L2.

Backends (all consume the *same* metadata, so CPU tests check the GPU tiling logic):
  'mosaic'    the Mosaic GPU kernels (H100/H200);
  'interpret' the same kernels under Mosaic GPU interpret mode on CPU (slow; tests only). The
              interpreter has no ``transpose_ref``, so there the transposed operand (dlhs: rhs,
              drhs: lhs) is transposed in HBM first, and operands get one tile of zero rows in
              place of TMA's out-of-bounds zero fill; outputs start as NaN (catches unwritten rows);
  'jnp'       a jnp "tile body" that walks the same tasks/blocks (``gmm_tiling.jnp_rows``).
Tile configs, metadata and the autotune cache live in ``gmm_tiling`` (plain jnp): the ``TUNED``
table, else ``default_config``; ``autotune=True`` (or env MOEJAX_GMM_AUTOTUNE=1) times
``candidates`` once per shape and caches the winner in memory and in
``~/.cache/moejax/gmm_gpu_tiles.json``. Written against jax 0.10.2's Mosaic GPU API (the GPU
machine runs 0.11.2): Mosaic imports are guarded, and ``test_kernels_lower_for_cuda`` lowers every
kernel for CUDA on CPU (Mosaic's layout inference included) to catch API misuse without a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moejax.kernels.gmm_tiling import (OPS, SMEM_BYTES, TUNED, GroupBlocks, RowTasks,  # noqa: F401
                                       TileConfig, autotune, band_order, candidates, config_ok,
                                       default_config, group_blocks, jnp_rows, jnp_tgmm,
                                       num_row_tasks, row_tasks, smem_bytes, swiglu)

try:  # Mosaic GPU Pallas: present in CPU jaxlib too (interpret mode), but guard for other builds.
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    HAVE_MOSAIC = True
except (ImportError, AttributeError):  # pragma: no cover
    pl = plgpu = None
    HAVE_MOSAIC = False

BACKENDS = ("mosaic", "interpret", "jnp")
_F32 = jnp.dtype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Mosaic GPU kernels
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static parameters of one kernel instance."""
    m: int
    k: int
    n: int  # output width (row kernel) / drhs columns
    groups: int
    tasks: int  # row kernel: T; tgmm: unused
    cfg: TileConfig
    transpose_rhs: bool
    n_b: int  # number of B operands (2 = fused gate/up)
    out_dtype: jnp.dtype
    num_sms: int
    interpret: bool = False  # Mosaic GPU interpret mode: no layout_cast, no transpose_ref
    lhs_t: bool = False  # tgmm: lhs arrives transposed [K, M] (interpret mode)


def _transforms(minor_elems: int, dtype):
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor_elems * bits)
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def _row_transforms(minor_elems: int, dtype):
    """Output staging tile: rows addressable one by one (the store ladder slices at any row)."""
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor_elems * bits)
    return (plgpu.TilingTransform((1, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def _spec(shape, index_map, transforms):
    """delay_release=0 (with wgmma_wait(0) in the body): a warp-specialised pipeline only
    quiesces the slots it released, so with delay_release=1 the producer of the *next* tile
    could refill a slot the last wgmma still reads (the interpreter caught this as a double
    barrier completion on short dynamic grids). Two consumer warpgroups keep the tensor cores
    busy while one waits."""
    return plgpu.BlockSpec(shape, index_map, transforms=transforms)  # delay_release: default 0


def _aligned(row, align: int):
    """Identity on the (align-multiple) row read from the metadata. Written as div*mul because
    Mosaic GPU's layout inference rejected a GMEM-loaded scalar used directly as a TMA view
    offset (found by lowering for CUDA on CPU); the arithmetic also tells it the alignment."""
    return lax.div(row, jnp.int32(align)) * align


def _store_rows(src, dst, offset, size, block_m: int):
    """TMA-store ``size`` (dynamic, <= block_m) rows of smem ``src`` from row ``offset`` to gmem
    ``dst`` rows [base+offset, ...): a ladder of power-of-two TMA boxes (static box sizes)."""
    p = block_m
    while p >= 1:
        @pl.when((size & p) != 0)
        def _(p=p, offset=offset):
            plgpu.copy_smem_to_gmem(src.at[pl.ds(offset, p)], dst(offset, p), commit_group=False)
        offset = offset + (size & p)
        p //= 2
    plgpu.commit_smem_to_gmem_group()


def _row_kernel(group_ref, start_ref, lo_ref, hi_ref, lhs_gmem, rhs_gmem, out_gmem, *, p: _Plan):
    """Persistent forward/dlhs kernel: loop over (row task, column tile) pairs in band order."""
    c = p.cfg
    wg = lax.axis_index("wg")
    cta_n = c.wgs * c.block_n
    n_tiles = p.n // cta_n
    tin = _transforms(c.block_k, lhs_gmem.dtype)
    b_shape = (cta_n, c.block_k) if p.transpose_rhs else (c.block_k, cta_n)
    b_map = (lambda k: (0, k)) if p.transpose_rhs else (lambda k: (k, 0))
    b_tr = _transforms(c.block_k if p.transpose_rhs else cta_n, lhs_gmem.dtype)
    specs = [_spec((c.block_m, c.block_k), lambda k: (0, k), tin)]
    specs += [_spec(b_shape, b_map, b_tr) for _ in range(p.n_b)]

    def pipeline(body, ctx):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(p.k // c.block_k,), memory_registers=40, in_specs=specs, wg_axis="wg",
            num_compute_wgs=c.wgs, max_concurrent_steps=c.stages, compute_context=ctx)

    def views(g, start, n0):
        a = lhs_gmem.at[pl.ds(start, c.block_m), :]  # may run past M: TMA fills zeros
        if p.transpose_rhs:  # rhs [G, N_out, K]: B^T blocks
            return a, [rhs_gmem.at[g, pl.ds(n0, cta_n), :]]
        return a, [rhs_gmem.at[g, :, pl.ds(n0 + j * p.n, cta_n)] for j in range(p.n_b)]

    a0, b0 = views(0, 0, 0)
    ignore = lambda *_, **__: None  # noqa: E731

    @functools.partial(pl.run_scoped,
                       allocs=pipeline(ignore, ignore).get_allocations(a0, *b0),
                       out_smem=plgpu.SMEM((c.wgs, c.block_m, c.block_n), p.out_dtype,
                                           transforms=_row_transforms(c.block_n, p.out_dtype)),
                       collective_axes="wg")
    def _scope(allocs, out_smem):
        sm = lax.axis_index("sm")
        total = p.tasks * n_tiles

        def step(i, carry):
            t, nt = band_order(sm + i * p.num_sms, p.tasks, n_tiles, c.group_m)
            g, lo, hi = group_ref[t], lo_ref[t], hi_ref[t]
            start = _aligned(start_ref[t], c.align)
            n0 = nt * cta_n

            def store(vals):  # [block_m, block_n] fp32 -> rows [lo, hi) of this wg's columns
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # previous tile left the buffer
                out_smem[wg] = vals.astype(p.out_dtype)
                plgpu.commit_smem()
                dst = lambda off, rows: out_gmem.at[pl.ds(start + off, rows),  # noqa: E731
                                                    pl.ds(n0 + wg * c.block_n, c.block_n)]
                _store_rows(out_smem.at[wg], dst, lo - start, hi - lo, c.block_m)

            def ctx(eval_pipeline):
                def run(*accs):
                    accs = eval_pipeline(tuple(accs))
                    vals = [acc[...] for acc in accs]
                    store(swiglu(*vals) if p.n_b == 2 else vals[0])
                pl.run_scoped(run, *[plgpu.ACC((c.block_m, c.block_n), jnp.float32)] * p.n_b)

            def mma(_, a_smem, *rest):
                *b_smems, accs = rest
                for b_smem, acc in zip(b_smems, accs):
                    if p.transpose_rhs:
                        b = plgpu.transpose_ref(b_smem.at[pl.ds(wg * c.block_n, c.block_n), :],
                                                (1, 0))
                    else:
                        b = b_smem.at[:, pl.ds(wg * c.block_n, c.block_n)]
                    plgpu.wgmma(acc, a_smem, b)
                plgpu.wgmma_wait(0)
                return accs

            @pl.when((hi > lo) & (g < p.groups))
            def _():
                a, bs = views(g, start, n0)
                pipeline(mma, ctx)(a, *bs, allocations=allocs)

            @pl.when((hi > lo) & (g >= p.groups) & (wg < c.wgs))
            def _():
                store(jnp.zeros((c.block_m, c.block_n), jnp.float32))
            return carry

        lax.fori_loop(0, (total - sm + p.num_sms - 1) // p.num_sms, step, None)
        plgpu.wait_smem_to_gmem(0)


def _tgmm_kernel(start_ref, end_ref, first_ref, nblk_ref, lhs_gmem, dout_gmem, out_gmem, *,
                 p: _Plan):
    """Persistent drhs kernel: loop over (group, K tile, N tile); warpgroups split the K tile."""
    c = p.cfg
    wg = lax.axis_index("wg")
    cta_m = c.wgs * c.block_m
    m_tiles, n_tiles = p.k // cta_m, p.n // c.block_n
    if p.lhs_t:  # lhs_gmem is lhs^T [K, M] (interpret mode): A blocks [cta_m, block_k]
        a_spec = _spec((cta_m, c.block_k), lambda i: (0, i), _transforms(c.block_k, lhs_gmem.dtype))
    else:  # lhs [M, K]: blocks [block_k, cta_m], transposed in smem for the wgmma
        a_spec = _spec((c.block_k, cta_m), lambda i: (i, 0), _transforms(cta_m, lhs_gmem.dtype))
    specs = [a_spec, _spec((c.block_k, c.block_n), lambda i: (i, 0),
                           _transforms(c.block_n, dout_gmem.dtype))]

    def pipeline(body, ctx, nblk):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(nblk,), memory_registers=40, in_specs=specs, wg_axis="wg",
            num_compute_wgs=c.wgs, max_concurrent_steps=c.stages, compute_context=ctx)

    def views(first, m0, n0):  # row windows of static length M (the tail is never read)
        a = (lhs_gmem.at[pl.ds(m0, cta_m), pl.ds(first, p.m)] if p.lhs_t
             else lhs_gmem.at[pl.ds(first, p.m), pl.ds(m0, cta_m)])
        return a, dout_gmem.at[pl.ds(first, p.m), pl.ds(n0, c.block_n)]

    ignore = lambda *_, **__: None  # noqa: E731

    @functools.partial(pl.run_scoped,
                       allocs=pipeline(ignore, ignore, c.stages).get_allocations(*views(0, 0, 0)),
                       out_smem=plgpu.SMEM((c.wgs, c.block_m, c.block_n), p.out_dtype,
                                           transforms=_transforms(c.block_n, p.out_dtype)),
                       collective_axes="wg")
    def _scope(allocs, out_smem):
        sm = lax.axis_index("sm")
        total = p.groups * m_tiles * n_tiles

        def step(i, carry):
            lin = sm + i * p.num_sms
            g = lax.div(lin, jnp.int32(m_tiles * n_tiles))
            mt, nt = band_order(lin - g * (m_tiles * n_tiles), m_tiles, n_tiles, c.group_m)
            start, end, nblk = start_ref[g], end_ref[g], nblk_ref[g]
            first = _aligned(first_ref[g], c.align)
            m0, n0 = mt * cta_m, nt * c.block_n

            def store(vals):
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                out_smem[wg] = vals.astype(p.out_dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(
                    out_smem.at[wg],
                    out_gmem.at[g, pl.ds(m0 + wg * c.block_m, c.block_m), pl.ds(n0, c.block_n)])

            def ctx(eval_pipeline):
                def run(acc):
                    store(eval_pipeline(acc)[...])
                pl.run_scoped(run, plgpu.ACC((c.block_m, c.block_n), jnp.float32))

            def mma(idx, l_smem, d_smem, acc):
                row0 = first + idx[0] * c.block_k
                wg_cols = pl.ds(wg * c.block_m, c.block_m)
                mine = l_smem.at[wg_cols, :] if p.lhs_t else l_smem.at[:, wg_cols]

                @pl.when((row0 < start) | (row0 + c.block_k > end))  # first/last block only
                def _():  # zero the rows of other groups (lhs side only: dout there is finite)
                    rows = lax.broadcasted_iota(jnp.int32, mine.shape, 1 if p.lhs_t else 0)
                    if not p.interpret:
                        rows = plgpu.layout_cast(rows, plgpu.Layout.WGMMA)
                    rows = row0 + rows
                    keep = (rows >= start) & (rows < end)
                    mine[...] = jnp.where(keep, mine[...], jnp.zeros_like(mine[...]))
                    plgpu.commit_smem()

                a = mine if p.lhs_t else plgpu.transpose_ref(mine, (1, 0))  # [block_m, block_k]
                plgpu.wgmma(acc, a, d_smem)
                plgpu.wgmma_wait(0)
                return acc

            @pl.when(nblk > 0)
            def _():
                pipeline(mma, ctx, nblk)(*views(first, m0, n0), allocations=allocs)

            @pl.when((nblk == 0) & (wg < c.wgs))
            def _():
                store(jnp.zeros((c.block_m, c.block_n), jnp.float32))
            return carry

        lax.fori_loop(0, (total - sm + p.num_sms - 1) // p.num_sms, step, None)
        plgpu.wait_smem_to_gmem(0)


def _interpret_params():
    params = getattr(plgpu, "InterpretParams", None)
    if params is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params()


def _launch(body, plan: _Plan, out_shape, args):
    kw = dict(grid=(plan.num_sms,), grid_names=("sm",), num_threads=plan.cfg.wgs + 1,
              thread_name="wg", compiler_params=plgpu.CompilerParams(
                  lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    if plan.interpret:
        kw["interpret"] = _interpret_params()
    kernel = plgpu.kernel(functools.partial(body, p=plan),
                          out_type=jax.ShapeDtypeStruct(out_shape, plan.out_dtype), **kw)
    return kernel(*args)


INTERPRET_SMS = 2  # simulated SMs in interpret mode: 2 exercises concurrent partial-tile stores


def _num_sms(backend: str) -> int:
    if backend == "interpret":
        return INTERPRET_SMS
    return int(getattr(jax.devices()[0], "core_count", 132) or 132)


# ----------------------------------------------------------------------------------------------
# The products, config resolution, custom_vjp
# ----------------------------------------------------------------------------------------------
def default_backend() -> str:
    """'mosaic' on a CUDA GPU; elsewhere a clear error (the CPU paths are for tests only)."""
    if jax.default_backend() == "gpu":
        return "mosaic"
    raise NotImplementedError(
        "gmm_gpu: the Pallas grouped-matmul kernel runs on CUDA GPUs (Hopper); the default "
        f"backend here is {jax.default_backend()!r}. Use model.moe.gmm_impl='xla' or "
        "'reference' on CPU (tests may pass backend='interpret' or 'jnp' to gmm_gpu directly)")


def _check(lhs, rhs, group_sizes, backend):
    if backend not in BACKENDS:
        raise ValueError(f"gmm_gpu backend={backend!r} is unknown; choose one of {BACKENDS}")
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"gmm_gpu: expected lhs [M,K], rhs [G,K,N], group_sizes [G]; got "
                         f"{lhs.shape}, {rhs.shape}, {group_sizes.shape}")
    if backend != "jnp" and (lhs.dtype != rhs.dtype
                             or lhs.dtype not in (jnp.bfloat16, jnp.float16)):
        raise ValueError(f"gmm_gpu: the wgmma kernels take bfloat16/float16 operands of one dtype, "
                         f"got {lhs.dtype} and {rhs.dtype}; set model.dtype='bfloat16'")


def _time_config(op, m, k, n, g, in_dtype, out_dtype, backend, cfg, iters=10) -> float:
    """Median seconds of one product at this shape with Dirichlet(2) groups (autotune probe).
    Runs eagerly even when called while an outer jit is tracing."""
    with jax.ensure_compile_time_eval():
        rng = np.random.default_rng(0)
        gs = jnp.asarray(rng.multinomial(m, rng.dirichlet(np.full(g, 2.0))), jnp.int32)
        r = lambda *s: jnp.asarray(rng.standard_normal(s), in_dtype)  # noqa: E731
        if op == "drhs":
            f = functools.partial(_tgmm, out_dtype=out_dtype, cfg=cfg, backend=backend)
            x, y = r(m, k), r(m, n)
        else:
            nb = 2 if op == "swiglu" else 1
            f = functools.partial(_rows, transpose_rhs=op == "dlhs", n_b=nb, out_dtype=out_dtype,
                                  cfg=cfg, backend=backend)
            x, y = r(m, k), (r(g, n, k) if op == "dlhs" else r(g, k, nb * n))
        fn = jax.jit(f).lower(x, y, gs).compile()
        fn(x, y, gs).block_until_ready()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn(x, y, gs).block_until_ready()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def resolve_config(op, m, k, n, g, in_dtype, out_dtype, *, config=None, autotune_=None,
                   backend="mosaic") -> TileConfig:
    """Explicit ``config`` (validated), else autotune (when asked), else the table/default."""
    ib, ob = jnp.dtype(in_dtype).itemsize, jnp.dtype(out_dtype).itemsize
    if config is not None:
        if not config_ok(op, k, n, config, ib, ob) and backend != "jnp":
            raise ValueError(f"gmm_gpu {op}: {config} does not fit K={k}, N={n}")
        return config
    tune = autotune_ if autotune_ is not None else os.environ.get("MOEJAX_GMM_AUTOTUNE") == "1"
    if tune:
        kind = getattr(jax.devices()[0], "device_kind", "?")
        key = (f"{kind}|{backend}|{op}|m{m}|k{k}|n{n}|g{g}|{jnp.dtype(in_dtype).name}|"
               f"{jnp.dtype(out_dtype).name}")
        return autotune(key, candidates(op, k, n, ib, ob), functools.partial(
            _time_config, op, m, k, n, g, in_dtype, out_dtype, backend))
    if backend == "jnp" and not candidates(op, k, n, ib, ob):
        return TileConfig()  # the jnp tile body has no divisibility or shared-memory rules
    return default_config(op, k, n, g, ib, ob)


def _rows(lhs, rhs, group_sizes, *, transpose_rhs, n_b, out_dtype, cfg, backend):
    """Row-ragged product: out[M,N] = lhs @ rhs[g] (rhs [G,K,n_b*N]) or lhs @ rhs[g]^T
    (rhs [G,N,K]); n_b=2 fuses SwiGLU over the two column halves."""
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2] // n_b
    mk = max(m, cfg.block_m)  # tiny M: pad rows (outside every group, so stored as zeros)
    lhs = jnp.pad(lhs, ((0, mk - m), (0, 0)))
    tasks = row_tasks(group_sizes, mk, cfg.block_m, cfg.align)
    if backend == "jnp":
        w = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
        return jnp_rows(lhs, w, tasks, n_b, cfg.block_m, out_dtype)[:m]
    interpret = backend == "interpret"
    if interpret and transpose_rhs:  # the interpreter has no transpose_ref: transpose in HBM
        rhs, transpose_rhs = jnp.swapaxes(rhs, 1, 2), False
    plan = _Plan(mk, k, n, rhs.shape[0], tasks.group.shape[0], cfg, transpose_rhs, n_b,
                 jnp.dtype(out_dtype), _num_sms(backend), interpret)
    if interpret:  # TMA zero-fills reads past M; the interpreter raises, so pad one tile
        lhs = jnp.pad(lhs, ((0, cfg.block_m), (0, 0)))
    return _launch(_row_kernel, plan, (mk, n), (*tasks, lhs, rhs))[:m]


def _tgmm(lhs, dout, group_sizes, *, out_dtype, cfg, backend):
    """Ragged contraction: out[g] = lhs[rows_g]^T @ dout[rows_g], [G,K,N]; empty groups 0."""
    m = lhs.shape[0]
    mk = max(m, cfg.block_k)
    lhs, dout = (jnp.pad(x, ((0, mk - m), (0, 0))) for x in (lhs, dout))
    blocks = group_blocks(group_sizes, mk, cfg.block_k, cfg.align)
    if backend == "jnp":
        return jnp_tgmm(lhs, dout, blocks, cfg.block_k, out_dtype)
    g, k, n = group_sizes.shape[0], lhs.shape[1], dout.shape[1]
    interpret = backend == "interpret"
    plan = _Plan(mk, k, n, g, 0, cfg, False, 1, jnp.dtype(out_dtype), _num_sms(backend),
                 interpret, lhs_t=interpret)
    if interpret:  # stand-in for TMA's zero fill past M (see _rows); lhs^T: no transpose_ref
        lhs, dout = (jnp.pad(x, ((0, cfg.block_k), (0, 0))) for x in (lhs, dout))
        lhs = lhs.T
    return _launch(_tgmm_kernel, plan, (g, k, n), (*blocks, lhs, dout))


@dataclasses.dataclass(frozen=True)
class Options:
    """Static options of the differentiable ops: backend, per-op configs, autotune."""
    backend: str = "mosaic"
    configs: tuple = ()  # ((op, TileConfig), ...); missing ops use resolve_config
    autotune: bool | None = None

    def config(self, op, m, k, n, g, in_dtype, out_dtype) -> TileConfig:
        return resolve_config(op, m, k, n, g, in_dtype, out_dtype,
                              config=dict(self.configs).get(op), autotune_=self.autotune,
                              backend=self.backend)


def _options(backend, config, autotune_) -> Options:
    backend = backend or default_backend()
    if isinstance(config, TileConfig):
        config = {op: config for op in OPS}
    return Options(backend, tuple(sorted((config or {}).items())), autotune_)


def _forward(lhs, rhs, gs, out_dtype, opts: Options, n_b=1):
    m, k = lhs.shape
    n = rhs.shape[2] // n_b
    cfg = opts.config("swiglu" if n_b == 2 else "fwd", m, k, n, rhs.shape[0], lhs.dtype,
                      out_dtype)
    return _rows(lhs, rhs, gs, transpose_rhs=False, n_b=n_b, out_dtype=out_dtype, cfg=cfg,
                 backend=opts.backend)


def _backward(lhs, rhs, gs, dh, opts: Options):
    """dlhs [M,K] = dh @ rhs[g]^T, drhs [G,K,N] = lhs[rows_g]^T dh[rows_g]; dh in lhs's dtype."""
    (m, k), (g, _, n) = lhs.shape, rhs.shape
    dh = dh.astype(lhs.dtype)
    cfg = opts.config("dlhs", m, n, k, g, lhs.dtype, lhs.dtype)
    dlhs = _rows(dh, rhs, gs, transpose_rhs=True, n_b=1, out_dtype=lhs.dtype, cfg=cfg,
                 backend=opts.backend)
    cfg = opts.config("drhs", m, k, n, g, lhs.dtype, rhs.dtype)
    return dlhs, _tgmm(lhs, dh, gs, out_dtype=rhs.dtype, cfg=cfg, backend=opts.backend)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(lhs, rhs, gs, out_dtype, opts):
    return _forward(lhs, rhs, gs, out_dtype, opts)


def _gmm_fwd(lhs, rhs, gs, out_dtype, opts):
    return _forward(lhs, rhs, gs, out_dtype, opts), (lhs, rhs, gs)


def _gmm_bwd(out_dtype, opts, res, dout):
    lhs, rhs, gs = res
    return (*_backward(lhs, rhs, gs, dout, opts), None)


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm_swiglu(lhs, w, gs, out_dtype, opts):
    return _forward(lhs, w, gs, out_dtype, opts, n_b=2)


def _gmm_swiglu_fwd(lhs, w, gs, out_dtype, opts):
    return _forward(lhs, w, gs, out_dtype, opts, n_b=2), (lhs, w, gs)


def _gmm_swiglu_bwd(out_dtype, opts, res, dact):
    """Recompute the [M,2N] pre-activations (fp32) instead of saving them, then one backward."""
    lhs, w, gs = res
    gate, up = jnp.split(_forward(lhs, w, gs, _F32, opts), 2, axis=1)
    s = jax.nn.sigmoid(gate)
    dact = dact.astype(jnp.float32)
    dh = jnp.concatenate([dact * up * s * (1 + gate * (1 - s)), dact * gate * s], axis=1)
    return (*_backward(lhs, w, gs, dh, opts), None)


_gmm_swiglu.defvjp(_gmm_swiglu_fwd, _gmm_swiglu_bwd)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, preferred_element_type=None,
        backend: str | None = None, config=None, autotune: bool | None = None) -> jax.Array:
    """Grouped matmul out[M,N] = lhs[m] @ rhs[g(m)], differentiable in lhs and rhs.

    lhs [M,K] rows sorted by group; rhs [G,K,N]; group_sizes [G] int (sum <= M); rows past the
    sum are zeros. ``backend``: 'mosaic' (default on GPU), 'interpret' or 'jnp' (CPU tests).
    ``config``: a TileConfig for every product or {op: TileConfig} (ops: fwd, dlhs, drhs);
    ``autotune``: time candidates once per shape (default: env MOEJAX_GMM_AUTOTUNE=1).
    Accumulates in fp32; the backward casts dout to lhs's dtype. Returns [M,N]."""
    opts = _options(backend, config, autotune)
    lhs, rhs, group_sizes = jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(group_sizes)
    _check(lhs, rhs, group_sizes, opts.backend)
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype))
    return _gmm(lhs, rhs, group_sizes.astype(jnp.int32), out_dtype, opts)


def gmm_swiglu(lhs: jax.Array, w_gate_up: jax.Array, group_sizes: jax.Array, *,
               preferred_element_type=None, backend: str | None = None, config=None,
               autotune: bool | None = None) -> jax.Array:
    """Fused expert gate/up: act[M,N] = silu(lhs @ w[g][:, :N]) * (lhs @ w[g][:, N:]).

    w_gate_up [G,K,2N] (gate columns first). The forward kernel keeps two accumulators per
    warpgroup and applies SwiGLU in the epilogue, so the [M,2N] pre-activations never reach HBM;
    the backward recomputes them (one extra forward GEMM) and runs the plain dlhs/drhs kernels.
    ``config`` ops: swiglu (forward), fwd (the recompute), dlhs, drhs."""
    opts = _options(backend, config, autotune)
    lhs, w_gate_up, group_sizes = map(jnp.asarray, (lhs, w_gate_up, group_sizes))
    _check(lhs, w_gate_up, group_sizes, opts.backend)
    if w_gate_up.shape[2] % 2:
        raise ValueError(f"gmm_swiglu: w_gate_up needs an even last dim, got {w_gate_up.shape}")
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs.dtype, w_gate_up.dtype))
    return _gmm_swiglu(lhs, w_gate_up, group_sizes.astype(jnp.int32), out_dtype, opts)


def grouped_matmul(lhs, rhs, group_sizes, *, transpose_rhs=False, preferred_element_type=None,
                   backend=None, config=None):
    """One row-ragged product without autodiff (forward, or dlhs with ``transpose_rhs``:
    rhs [G,N,K] read as rhs[g]^T). For benchmarks and tests."""
    opts = _options(backend, config, False)
    lhs, rhs, group_sizes = map(jnp.asarray, (lhs, rhs, group_sizes))
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    m, k = lhs.shape
    g, n = rhs.shape[0], rhs.shape[1] if transpose_rhs else rhs.shape[2]
    cfg = opts.config("dlhs" if transpose_rhs else "fwd", m, k, n, g, lhs.dtype, out_dtype)
    return _rows(lhs, rhs, group_sizes.astype(jnp.int32), transpose_rhs=transpose_rhs, n_b=1,
                 out_dtype=out_dtype, cfg=cfg, backend=opts.backend)


def grouped_matmul_t(lhs, dout, group_sizes, *, preferred_element_type=None, backend=None,
                     config=None):
    """drhs product without autodiff: out[g] = lhs[rows_g]^T @ dout[rows_g], [G,K,N]."""
    opts = _options(backend, config, False)
    lhs, dout, group_sizes = map(jnp.asarray, (lhs, dout, group_sizes))
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    (m, k), n, g = lhs.shape, dout.shape[1], group_sizes.shape[0]
    cfg = opts.config("drhs", m, k, n, g, lhs.dtype, out_dtype)
    return _tgmm(lhs, dout, group_sizes.astype(jnp.int32), out_dtype=out_dtype, cfg=cfg,
                 backend=opts.backend)
