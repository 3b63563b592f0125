"""Grouped-matmul kernels (gmm_gpu / gmm_tiling / gmm_tpu) and the gmm benchmark.

On CPU: the per-tile metadata and tile order against numpy; the jnp tile bodies and the
custom_vjp against ``reference.gmm`` and a float64 numpy loop (plus ``check_grads``); the Mosaic
GPU kernels themselves in Mosaic GPU interpret mode (outputs start as NaN there, so unwritten
rows show); every kernel lowered for CUDA at the benchmark shapes (Mosaic layout inference
included); the tile table, autotune cache, TPU wrapper (megablox interpret) and benchmark smoke.
``gpu``-marked tests (deselected by default; ``pytest -m gpu``) re-run this file's GPU checks in
a subprocess, because conftest pins JAX to CPU.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.test_util import check_grads

from moejax import kernels
from moejax.kernels import gmm_gpu as gg
from moejax.kernels import gmm_tiling as gt
from moejax.kernels import gmm_tpu, reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH_SHAPES = {"A": (65536, 2048, 768, 128), "B": (32768, 4096, 14336, 8),
                "C": (65536, 1024, 512, 64)}  # (M, K, N, G)


def np_products(lhs, rhs, ct, sizes):
    """float64 loop over experts: out = lhs@rhs[g], dlhs = ct@rhs[g]^T, drhs[g] = lhs^T ct."""
    lhs, rhs, ct = (np.asarray(x, np.float64) for x in (lhs, rhs, ct))
    out, dl = np.zeros((lhs.shape[0], rhs.shape[2])), np.zeros_like(lhs)
    dr, s = np.zeros(rhs.shape), 0
    for g, n in enumerate(np.asarray(sizes)):
        out[s:s + n] = lhs[s:s + n] @ rhs[g]
        dl[s:s + n] = ct[s:s + n] @ rhs[g].T
        dr[g] = lhs[s:s + n].T @ ct[s:s + n]
        s += n
    return out, dl, dr


def rel(x, ref):
    x = np.asarray(x, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


# ---------------------------------------------------------------------------------------------
# Metadata and tile order
# ---------------------------------------------------------------------------------------------
_R = np.random.default_rng(3)
MD_M, MD_G = 200, 48  # metadata cases share M and are padded to G groups (empty groups at the end)
METADATA_CASES = {  # sizes with sum <= MD_M
    "random_with_zeros": [37, 0, 90, 1, 0, 50, 22],
    "one_takes_all": [0, 0, MD_M, 0],
    "straddling": [5, 70, 3, 1, 50, 17, 40],
    "tail_unassigned": [13, 0, 29, 40],
    "all_empty": [0] * 5,
    "many_tiny": list(_R.integers(0, 5, size=MD_G)),
    **{f"random_{i}": list(_R.multinomial(int(_R.integers(0, MD_M + 1)),
                                          _R.dirichlet(np.full(int(_R.integers(1, MD_G)), 0.3))))
       for i in range(12)},
}
TILINGS = ((16, 1), (16, 8), (64, 8), (128, 8), (256, 8))  # (block_m or block_k, align)


def padded_cases():
    return np.stack([np.pad(v, (0, MD_G - len(v))) for v in METADATA_CASES.values()])  # [C,G]


def check_row_tasks(m, sizes, tasks, block_m, align):
    g = len(sizes)
    grp, start, lo, hi = (np.asarray(x) for x in tasks)
    assert grp.shape == (gt.num_row_tasks(m, g, block_m, align),)
    owner = np.full(m, g)  # row -> its group (g = tail past the sum)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for i in range(g):
        owner[bounds[i]:bounds[i + 1]] = i
    valid = hi > lo
    n_valid = int(valid.sum())
    assert valid[:n_valid].all() and not valid[n_valid:].any(), "no-op tasks must come last"
    count = np.zeros(m, int)
    for t in np.nonzero(valid)[0]:
        assert start[t] % align == 0 and start[t] <= lo[t] < hi[t] <= start[t] + block_m
        assert np.all(owner[lo[t]:hi[t]] == grp[t]), (t, grp[t], lo[t], hi[t])
        count[lo[t]:hi[t]] += 1
    assert np.all(count == 1), "every row stored by exactly one task"
    ends = np.append(bounds[1:], m)  # minimal tile count per group, tail included
    starts = np.append(bounds[:-1], bounds[-1])
    need = [-(-(e - s // align * align) // block_m) if e > s else 0 for s, e in zip(starts, ends)]
    assert n_valid == sum(need)


@pytest.mark.parametrize("block_m,align", TILINGS)
def test_row_tasks_store_every_row_once(block_m, align):
    """Empty groups, one group with every row, groups straddling tiles, tail rows, M not a
    multiple of the tile (M=200), a 1-row group, 48 tiny groups and random Dirichlet(0.3) sizes."""
    cases = padded_cases()
    fn = jax.jit(jax.vmap(lambda s: gt.row_tasks(s, MD_M, block_m, align)))
    tasks = fn(jnp.asarray(cases, jnp.int32))
    for c, sizes in enumerate(cases):
        check_row_tasks(MD_M, sizes, [x[c] for x in tasks], block_m, align)
    small = jnp.asarray([[3, 30, 0], [0, 0, 40], [0, 0, 0]], jnp.int32)  # M=40 < block_m
    tasks = jax.jit(jax.vmap(lambda s: gt.row_tasks(s, 40, block_m, align)))(small)
    for c, sizes in enumerate(np.asarray(small)):
        check_row_tasks(40, sizes, [x[c] for x in tasks], block_m, align)


@pytest.mark.parametrize("block_k,align", TILINGS[:3])
def test_group_blocks_cover_each_group(block_k, align):
    cases = padded_cases()
    blocks = jax.jit(jax.vmap(lambda s: gt.group_blocks(s, MD_M, block_k, align)))(
        jnp.asarray(cases, jnp.int32))
    for c, sizes in enumerate(cases):
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        for i, (start, end, first, nblk) in enumerate(zip(*(np.asarray(x[c]) for x in blocks))):
            assert (start, end) == (bounds[i], bounds[i + 1])
            if end == start:
                assert nblk == 0
                continue
            assert first % align == 0 and first <= start < first + align
            assert first + (nblk - 1) * block_k < end <= first + nblk * block_k


def test_band_order_is_a_permutation():
    lin = jnp.arange(256, dtype=jnp.int32)
    for rows, cols, width in ((7, 5, 3), (1, 9, 8), (12, 1, 4), (16, 6, 16), (5, 5, 1)):
        r, c = (np.asarray(x)[:rows * cols] for x in gt.band_order(lin, rows, cols, width))
        assert sorted(zip(r.tolist(), c.tolist())) == [(i, j) for i in range(rows)
                                                        for j in range(cols)]
        assert np.all(r // width == np.sort(r // width)), "bands are visited in order"


# ---------------------------------------------------------------------------------------------
# jnp tile bodies and the custom_vjp (float32)
# ---------------------------------------------------------------------------------------------
M, K, N = 48, 16, 8
SIZES = {"random_with_zeros": [10, 0, 17, 3, 0, 18], "one_takes_all": [0, 0, M, 0, 0, 0],
         "tail_unassigned": [5, 0, 9, 0, 12, 1], "all_empty": [0] * 6}
SMALL = gt.TileConfig(block_m=16, block_n=8, block_k=8, stages=2, wgs=1, group_m=2)


@pytest.fixture(scope="module")
def f32_operands():
    rng = np.random.default_rng(0)
    return tuple(rng.normal(size=s).astype(np.float32) for s in ((M, K), (6, K, N), (M, N)))


@jax.jit
def JNP_PRODUCTS(lhs, rhs, ct, gs):
    kw = dict(backend="jnp", config=SMALL)
    return (gg.grouped_matmul(lhs, rhs, gs, **kw),
            gg.grouped_matmul(ct, rhs, gs, transpose_rhs=True, **kw),
            gg.grouped_matmul_t(lhs, ct, gs, **kw))


@pytest.mark.parametrize("case", list(SIZES))
def test_jnp_products_match_numpy(f32_operands, case):
    lhs, rhs, ct = f32_operands
    gs = jnp.asarray(SIZES[case], jnp.int32)
    out, dl, dr = np_products(lhs, rhs, ct, SIZES[case])
    got = JNP_PRODUCTS(lhs, rhs, ct, gs)  # out, dlhs, drhs
    for x, ref in zip(got, (out, dl, dr)):
        np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-4)
    assert np.all(np.asarray(got[0])[sum(SIZES[case]):] == 0), "rows past the sum are zeros"
    assert np.all(np.asarray(got[1])[sum(SIZES[case]):] == 0)


def test_custom_vjp_matches_reference_and_numpy(f32_operands):
    lhs, rhs, ct = f32_operands
    for case in ("random_with_zeros", "tail_unassigned"):
        gs = jnp.asarray(SIZES[case], jnp.int32)

        def grads(f):
            out, vjp = jax.vjp(lambda a, b: f(a, b, gs), lhs, rhs)
            return (out, *vjp(jnp.asarray(ct)))

        ours = jax.jit(lambda: grads(lambda a, b, g: gg.gmm(a, b, g, backend="jnp",
                                                            config=SMALL)))()
        ref = jax.jit(lambda: grads(reference.gmm))()
        for x, y, z in zip(ours, ref, np_products(lhs, rhs, ct, SIZES[case])):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(x, z, rtol=1e-5, atol=1e-4)


def test_check_grads_reference_and_custom_vjp(f32_operands):
    lhs, rhs, _ = f32_operands
    gs = jnp.asarray([3, 0, 5, 2, 0, 4], jnp.int32)  # 14 of 16 rows assigned
    for f in (lambda a, b: reference.gmm(a, b, gs),
              lambda a, b: gg.gmm(a, b, gs, backend="jnp", config=SMALL)):
        check_grads(jax.jit(f), (lhs[:16], rhs), order=1, modes=["rev"], atol=5e-2, rtol=5e-2)


def test_swiglu_fused_matches_composition(f32_operands):
    lhs, _, _ = f32_operands
    w = np.random.default_rng(1).normal(size=(6, K, 2 * N)).astype(np.float32)
    gs = jnp.asarray(SIZES["tail_unassigned"], jnp.int32)

    def unfused(a, b):
        h = reference.gmm(a, b, gs)
        return jax.nn.silu(h[:, :N]) * h[:, N:]

    fused = lambda a, b: gg.gmm_swiglu(a, b, gs, backend="jnp", config=SMALL)  # noqa: E731
    ct = np.random.default_rng(2).normal(size=(M, N)).astype(np.float32)
    (o1, g1), (o2, g2) = (jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(f(a, b) * ct),
                                                     argnums=(0, 1)))(lhs, w)
                          for f in (fused, unfused))
    np.testing.assert_allclose(jax.jit(fused)(lhs, w), unfused(lhs, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o1, o2, rtol=1e-5)
    for x, y in zip(g1, g2):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The Mosaic GPU kernels: interpret mode on CPU, and lowering for CUDA
# ---------------------------------------------------------------------------------------------
INTERP_CFG = gt.TileConfig(block_m=64, block_n=64, block_k=64, stages=2, wgs=2, group_m=2)
IM, IK, IN, I_SIZES = 72, 128, 128, [30, 0, 1, 24]  # 55 of 72 rows; empty, 1-row, straddling


def test_mosaic_kernels_interpret_vjp(monkeypatch):
    """fwd, dlhs and drhs kernels (two consumer warpgroups) on empty / 1-row / straddling groups
    and tail rows; the interpreter's outputs start as NaN, so any unwritten row fails. One
    simulated SM here (the interpreter's cost grows with SMs); the SwiGLU test runs two."""
    monkeypatch.setattr(gg, "INTERPRET_SMS", 1)
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.normal(size=(IM, IK)), jnp.bfloat16)
    rhs = jnp.asarray(rng.normal(size=(4, IK, IN)) / 8, jnp.bfloat16)
    ct = jnp.asarray(rng.normal(size=(IM, IN)), jnp.bfloat16)
    gs = jnp.asarray(I_SIZES, jnp.int32)
    out, vjp = jax.vjp(lambda a, b: gg.gmm(a, b, gs, backend="interpret", config=INTERP_CFG),
                       lhs, rhs)
    got = (out, *vjp(ct))
    for x, ref in zip(got, np_products(lhs, rhs, ct, I_SIZES)):
        assert not np.isnan(np.asarray(x, np.float32)).any()
        assert rel(x, ref) < 1e-2
    assert np.all(np.asarray(out, np.float32)[sum(I_SIZES):] == 0)


def test_mosaic_swiglu_interpret():
    """Fused gate/up forward (two accumulators per warpgroup, SwiGLU epilogue) on two simulated
    SMs: neighbouring row tasks store disjoint rows of one output tile concurrently."""
    assert gg.INTERPRET_SMS == 2
    rng = np.random.default_rng(1)
    lhs = jnp.asarray(rng.normal(size=(IM, IK)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(4, IK, 2 * IN)) / 8, jnp.bfloat16)
    gs = jnp.asarray(I_SIZES, jnp.int32)
    act = gg.gmm_swiglu(lhs, w, gs, backend="interpret", config=INTERP_CFG,
                        preferred_element_type=jnp.float32)
    h = np_products(lhs, w, np.zeros((IM, 2 * IN)), I_SIZES)[0]
    ref = h[:, :IN] / (1 + np.exp(-h[:, :IN])) * h[:, IN:]
    assert not np.isnan(np.asarray(act)).any()
    np.testing.assert_allclose(act, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", list(BENCH_SHAPES))
def test_kernels_lower_for_cuda(shape):
    """Every kernel (fwd, dlhs, drhs, fused SwiGLU) at the benchmark shapes with the table's
    configs passes Pallas -> Mosaic GPU lowering and layout inference for CUDA (no GPU needed)."""
    m, k, n, g = BENCH_SHAPES[shape]
    s = jax.ShapeDtypeStruct
    lhs, rhs, gs = s((m, k), jnp.bfloat16), s((g, k, n), jnp.bfloat16), s((g,), jnp.int32)

    def lowered(f, *args):
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

    loss = lambda f: jax.value_and_grad(  # noqa: E731  (value: keeps the forward kernel)
        lambda a, b, g: f(a, b, g).astype(jnp.float32).sum(), argnums=(0, 1))
    text = lowered(loss(lambda a, b, g: gg.gmm(a, b, g, backend="mosaic")), lhs, rhs, gs)
    assert text.count("custom_call @mosaic_gpu") == 3  # fwd, dlhs, drhs
    if shape == "A":
        w = s((g, k, 2 * n), jnp.bfloat16)
        text = lowered(loss(lambda a, b, g: gg.gmm_swiglu(a, b, g, backend="mosaic")), lhs, w, gs)
        assert text.count("custom_call @mosaic_gpu") == 4  # fused fwd, recompute, dlhs, drhs


# ---------------------------------------------------------------------------------------------
# Tile table and autotune cache
# ---------------------------------------------------------------------------------------------
def test_tile_table_and_defaults_fit():
    for m, k, n, g in BENCH_SHAPES.values():
        for op, kk, nn in (("fwd", k, n), ("dlhs", n, k), ("drhs", k, n), ("swiglu", k, n)):
            cfg = gt.default_config(op, kk, nn, g)
            assert gt.config_ok(op, kk, nn, cfg) and gt.smem_bytes(op, cfg) <= gt.SMEM_BYTES
    for (op, kk, nn, _), cfg in gt.TUNED.items():
        assert gt.config_ok(op, kk, nn, cfg), (op, cfg)
    with pytest.raises(ValueError, match="no tile config fits"):
        gt.default_config("fwd", 100, 768, 8)


def test_autotune_picks_fastest_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gt, "_TUNE_MEMO", {})
    cands = gt.candidates("fwd", 2048, 768)
    calls = []

    def fake_time(cfg):
        calls.append(cfg)
        if cfg.block_n == 64:
            raise ValueError("exceeds available shared memory")  # a failing candidate is skipped
        return 1.0 / cfg.stages + (cfg.group_m != 8)

    best = gt.autotune("key", cands, fake_time)
    assert best == min((c for c in cands if c.block_n != 64),
                       key=lambda c: 1.0 / c.stages + (c.group_m != 8))
    assert len(calls) == len(cands)
    assert gt.autotune("key", cands, fake_time) == best and len(calls) == len(cands)  # memo
    monkeypatch.setattr(gt, "_TUNE_MEMO", {})
    assert gt.autotune("key", cands, fake_time) == best and len(calls) == len(cands)  # disk
    disk = json.loads((tmp_path / "gmm_gpu_tiles.json").read_text())
    assert disk["key"]["config"] == gt.dataclasses.asdict(best)


def test_autotune_runs_under_jit(tmp_path, monkeypatch):
    """The timing probe runs eagerly while an outer jit traces (jnp backend stands in here)."""
    monkeypatch.setenv("MOEJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gt, "_TUNE_MEMO", {})
    monkeypatch.setattr(gg, "candidates", lambda *a, **k: [SMALL, gt.TileConfig(32, 8, 16, 2, 1)])
    lhs, rhs = jnp.ones((M, K)), jnp.ones((6, K, N))
    gs = jnp.asarray(SIZES["random_with_zeros"], jnp.int32)
    out = jax.jit(lambda a, b, g: gg.gmm(a, b, g, backend="jnp", autotune=True))(lhs, rhs, gs)
    np.testing.assert_allclose(out, np_products(lhs, rhs, np.zeros((M, N)), SIZES[
        "random_with_zeros"])[0], rtol=1e-6)
    keys = json.loads((tmp_path / "gmm_gpu_tiles.json").read_text())
    assert any("|jnp|fwd|m48|k16|n8|g6|" in key for key in keys)


# ---------------------------------------------------------------------------------------------
# The kernels.gmm seam, the TPU wrapper, the benchmark
# ---------------------------------------------------------------------------------------------
def test_pallas_impl_dispatch(f32_operands, monkeypatch):
    """CPU: a clear error naming the alternatives; GPU -> gmm_gpu, TPU -> gmm_tpu."""
    lhs, rhs, _ = f32_operands
    gs = jnp.asarray(SIZES["random_with_zeros"])
    with pytest.raises(NotImplementedError, match="gmm_impl='xla'.*'reference'"):
        kernels.gmm(lhs, rhs, gs, impl="pallas")
    with pytest.raises(NotImplementedError, match="backend='interpret' or 'jnp'"):
        gg.gmm(lhs, rhs, gs)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(gg, "default_backend", lambda: "jnp")  # stands in for 'mosaic'
    out = kernels.gmm(lhs, rhs, gs, impl="pallas")
    np.testing.assert_allclose(out, reference.gmm(lhs, rhs, gs), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(gmm_tpu, "gmm", lambda *a, **k: "tpu kernel")
    assert kernels.gmm(lhs, rhs, gs, impl="pallas") == "tpu kernel"


def test_gmm_tpu_megablox_interpret_matches_numpy(f32_operands):
    """M=47 (not a tile multiple), K/N below one TPU tile (padded), tail rows zero, grads."""
    lhs, rhs, ct = (x[:47] if x.shape[0] == M else x for x in f32_operands)
    sizes = [5, 0, 9, 0, 12, 1]
    gs = jnp.asarray(sizes, jnp.int32)
    f = lambda a, b: gmm_tpu.gmm(a, b, gs, impl="megablox", interpret=True)  # noqa: E731
    out, vjp = jax.vjp(f, lhs, rhs)
    for x, ref in zip((out, *vjp(jnp.asarray(ct))), np_products(lhs, rhs, ct, sizes)):
        np.testing.assert_allclose(x, ref, rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(out)[sum(sizes):] == 0)


def test_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_gmm", ROOT / "benchmarks" / "gmm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--smoke", "--out", str(tmp_path / "gmm.json")])
    assert json.loads((tmp_path / "gmm.json").read_text())["meta"]["smoke"] is True
    rows = result["rows"]
    assert {r["case"] for r in rows} == set(bench.CASES)
    assert all(r["status"].startswith("n/a") for r in rows if r["impl"] == "moejax")
    checked = [r for r in rows if r["impl"] in ("ragged_dot", "reference")]
    assert len(checked) == 6 and all(r["status"] == "ok" and r["nan_rows"] == 0 for r in checked)
    assert max(max(r["rel_fwd"], r["rel_dlhs"], r["rel_drhs"]) for r in checked) < 1e-2
    assert "| S | skewed |" in result["table"]
    sizes = bench.group_sizes("empty", 1000, 16)
    assert sizes.sum() == 1000 and (sizes == 0).sum() >= 8
    assert bench.group_sizes("skewed", 1000, 16)[0] == 500


# ---------------------------------------------------------------------------------------------
# GPU (run with `pytest -m gpu tests/test_gmm_gpu.py` on an H100/H200)
# ---------------------------------------------------------------------------------------------
GPU_CHECKS = ("products", "candidates", "swiglu_and_seam", "autotune")


@pytest.mark.gpu
@pytest.mark.parametrize("check", GPU_CHECKS)
def test_on_gpu(check, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env["MOEJAX_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, check], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def _gpu_case(m, k, n, g, sizes, cfg=None, seed=0):
    """bf16 kernels vs float64 numpy: rel err <= 1e-2, no NaN, tail rows exactly zero."""
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    rhs = jnp.asarray(rng.normal(size=(g, k, n)) / np.sqrt(k), jnp.bfloat16)
    ct = jnp.asarray(rng.normal(size=(m, n)), jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    jax.block_until_ready([jnp.full((m, max(k, n)), jnp.nan, jnp.bfloat16) for _ in range(3)])
    out, vjp = jax.vjp(lambda a, b: gg.gmm(a, b, gs, config=cfg), lhs, rhs)
    got = (out, *vjp(ct))
    for name, x, ref in zip(("out", "dlhs", "drhs"), got, np_products(lhs, rhs, ct, sizes)):
        x = np.asarray(x, np.float32)
        assert not np.isnan(x).any(), f"{name}: NaN (unwritten rows?)"
        assert rel(x, ref) <= 1e-2, (name, rel(x, ref))
    total = int(np.sum(sizes))
    assert np.all(np.asarray(got[0], np.float32)[total:] == 0)
    assert np.all(np.asarray(got[1], np.float32)[total:] == 0)


def _gpu_main(check):  # pragma: no cover (runs on the GPU machine)
    assert jax.default_backend() == "gpu", jax.devices()
    rng = np.random.default_rng(0)
    if check == "products":
        for m, k, n, g in ((1000, 256, 256, 8), (4096, 512, 768, 32), (64, 128, 256, 4)):
            for sizes in (rng.multinomial(m, rng.dirichlet(np.full(g, 2.0))),
                          np.eye(g, dtype=int)[g // 2] * m,  # one group takes all
                          np.r_[rng.multinomial(m - m // 3, np.ones(g) / g)[:-1], 0]):  # tail
                _gpu_case(m, k, n, g, sizes)
        m, k, n, g = BENCH_SHAPES["A"]
        _gpu_case(m, k, n, g, rng.multinomial(m, rng.dirichlet(np.full(g, 2.0))))
    elif check == "candidates":  # every autotune candidate is a correct kernel
        m, k, n, g = 2000, 512, 768, 16
        sizes = rng.multinomial(m - 37, rng.dirichlet(np.full(g, 2.0)))
        for cfg in gt.candidates("fwd", k, n):
            if all(gt.config_ok(op, kk, nn, cfg) for op, kk, nn in
                   (("dlhs", n, k), ("drhs", k, n))):
                _gpu_case(m, k, n, g, sizes, cfg)
    elif check == "swiglu_and_seam":
        m, k, n, g = 3000, 512, 384, 16
        sizes = rng.multinomial(m - 5, rng.dirichlet(np.full(g, 2.0)))
        lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
        w = jnp.asarray(rng.normal(size=(g, k, 2 * n)) / np.sqrt(k), jnp.bfloat16)
        gs = jnp.asarray(sizes, jnp.int32)
        ct = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)

        def unfused(a, b):
            h = kernels.gmm(a, b, gs, impl="pallas", preferred_element_type=jnp.float32)
            return jax.nn.silu(h[:, :n]) * h[:, n:]

        fused = lambda a, b: gg.gmm_swiglu(a, b, gs, preferred_element_type=jnp.float32)
        (o1, g1), (o2, g2) = (jax.value_and_grad(lambda a, b: jnp.sum(f(a, b) * ct),
                                                 argnums=(0, 1))(lhs, w) for f in (fused, unfused))
        assert rel(o1, np.asarray(o2)) < 1e-2
        for x, y in zip(g1, g2):
            assert rel(np.asarray(x, np.float32), np.asarray(y, np.float64)) < 2e-2
    elif check == "autotune":
        m, k, n, g = 4096, 1024, 512, 16
        sizes = rng.multinomial(m, rng.dirichlet(np.full(g, 2.0)))
        os.environ["MOEJAX_GMM_AUTOTUNE"] = "1"
        _gpu_case(m, k, n, g, sizes)
        cache = pathlib.Path(os.environ["MOEJAX_CACHE_DIR"]) / "gmm_gpu_tiles.json"
        ops = {key.split("|")[2] for key in json.loads(cache.read_text())}
        assert ops == {"fwd", "dlhs", "drhs"}, ops
    print(f"gpu check {check}: ok")


if __name__ == "__main__":  # pragma: no cover
    _gpu_main(sys.argv[1])
