"""Grouped-matmul benchmark: moejax Pallas vs jax.lax.ragged_dot vs tokamax vs torch vs dense.

One run prints, per shape and group-size case, forward and forward+backward TFLOP/s of
  moejax      ``kernels.gmm(impl='pallas')`` (the Mosaic GPU kernels of ``gmm_gpu`` on a GPU)
  ragged_dot  ``jax.lax.ragged_dot`` (XLA)
  tokamax     ``tokamax.ragged_dot`` (if importable)
  torch       ``torch._grouped_mm`` (if torch with CUDA is importable; autograd for the backward)
  dense       one [M,K] @ [K,N] matmul with the same FLOPs (the ceiling a grouped matmul chases)
with the moejax/torch ratio, each implementation's relative error against a float32 reference
(Frobenius, forward and both gradients) and the count of output rows left unwritten: before the
checked run the allocator's memory is poisoned with NaN (arrays of the output's size filled with
NaN and freed, so the output buffer most likely reuses them). Shapes (tokens, top-k, experts, d,
ff), M = tokens*top-k rows, K = d, N = ff: A (8192, 8, 128, 2048, 768), B (16384, 2, 8, 4096,
14336), C (8192, 8, 64, 1024, 512). Cases: ``uneven`` (Dirichlet alpha=2 over experts),
``skewed`` (expert 0 gets half the rows, Dirichlet over the rest), ``empty`` (half the experts
get no rows). FLOPs: forward 2*M*K*N, forward+backward 3x that. bf16 in, bf16 out, fp32 accumulate.

    python -m benchmarks.gmm --out benchmarks/gmm_h100.json        # GPU
    python -m benchmarks.gmm --autotune ...                        # let moejax tune its tiles
    python -m benchmarks.gmm --smoke                               # CPU: tiny shape, xla/reference
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {"A": (8192, 8, 128, 2048, 768), "B": (16384, 2, 8, 4096, 14336),
          "C": (8192, 8, 64, 1024, 512)}
SMOKE_SHAPES = {"S": (64, 2, 4, 32, 16)}
# CPU-sized MoE layers of the cpu presets (tokens, top-k, experts, d, ff): kernels.gmm's 'auto'
# picks 'blocked' there because ragged_dot is a G x masked dense dot on XLA:CPU
CPU_SHAPES = {"cpu-E8": (4096, 4, 8, 256, 96), "cpu-E64": (4096, 8, 64, 128, 64)}
CASES = ("uneven", "skewed", "empty")
HIGHEST = jax.lax.Precision.HIGHEST


def group_sizes(case: str, m: int, g: int, seed: int = 0) -> np.ndarray:
    """[G] int sizes summing to m for a named case (see the module docstring)."""
    rng = np.random.default_rng(seed)
    if case == "uneven":
        return rng.multinomial(m, rng.dirichlet(np.full(g, 2.0)))
    if case == "skewed":
        rest = rng.multinomial(m - m // 2, rng.dirichlet(np.full(g - 1, 2.0)))
        return np.concatenate([[m // 2], rest])
    if case == "empty":
        live = rng.permutation(g)[: max(1, g // 2)]
        sizes = np.zeros(g, np.int64)
        sizes[live] = rng.multinomial(m, rng.dirichlet(np.full(len(live), 2.0)))
        return sizes
    raise ValueError(f"unknown case {case!r}; choose from {CASES}")


def reference(lhs, rhs, ct, sizes):
    """float32 out, dlhs, drhs from a loop over groups with static sizes (exact FLOPs); on CPU
    in numpy (every group size would otherwise compile its own XLA dot)."""
    if jax.default_backend() == "cpu":
        lhs, rhs, ct = (np.asarray(x, np.float32) for x in (lhs, rhs, ct))
        out, dl, dr, s = np.zeros((lhs.shape[0], rhs.shape[2]), np.float32), 0 * lhs, 0 * rhs, 0
        for g, n in enumerate(sizes.tolist()):
            out[s:s + n], dl[s:s + n] = lhs[s:s + n] @ rhs[g], ct[s:s + n] @ rhs[g].T
            dr[g] = lhs[s:s + n].T @ ct[s:s + n]
            s += n
        return jnp.asarray(out), jnp.asarray(dl), jnp.asarray(dr)
    lhs, rhs, ct = (x.astype(jnp.float32) for x in (lhs, rhs, ct))
    outs, dls, drs, s = [], [], [], 0
    for g, n in enumerate(sizes.tolist()):
        a, c = lhs[s:s + n], ct[s:s + n]
        outs.append(jnp.dot(a, rhs[g], precision=HIGHEST))
        dls.append(jnp.dot(c, rhs[g].T, precision=HIGHEST))
        drs.append(jnp.dot(a.T, c, precision=HIGHEST))
        s += n
    return jnp.concatenate(outs), jnp.concatenate(dls), jnp.stack(drs)


@jax.jit
def _rel_dev(x, ref):
    x = x.astype(jnp.float32)
    return jnp.linalg.norm(x - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30)


def _rel(x, ref) -> float:
    return float(_rel_dev(jnp.asarray(x), ref))


def _poison(shape):
    """Fill then free a few output-sized NaN buffers so a fresh output most likely reuses them."""
    bufs = [jnp.full(shape, jnp.nan, jnp.bfloat16) for _ in range(3)]
    jax.block_until_ready(bufs)
    del bufs


@jax.jit
def _nan_rows_dev(x):
    return jnp.sum(jnp.any(jnp.isnan(x.astype(jnp.float32)), axis=-1))


def _nan_rows(x) -> int:
    return int(_nan_rows_dev(jnp.asarray(x)))


def _time(fn, args, iters: int) -> float:
    """Mean seconds per call over ``iters`` back-to-back calls after two warm-up calls."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def jax_impls(smoke: bool):
    """name -> (f(lhs, rhs, gs) -> out) or a string saying why it is unavailable."""
    from moejax import kernels
    impls = {}
    if jax.default_backend() in ("gpu", "tpu"):
        impls["moejax"] = lambda a, b, g: kernels.gmm(a, b, g, impl="pallas")
    else:
        impls["moejax"] = (f"n/a: gmm_impl='pallas' needs a GPU/TPU (backend "
                           f"{jax.default_backend()})")
    impls["ragged_dot"] = lambda a, b, g: jax.lax.ragged_dot(a, b, g)
    try:
        import tokamax
        impls["tokamax"] = lambda a, b, g: tokamax.ragged_dot(a, b, g)
    except ImportError:
        impls["tokamax"] = "n/a: tokamax not importable"
    if jax.default_backend() == "cpu":
        impls["blocked"] = lambda a, b, g: kernels.gmm(a, b, g, impl="blocked")
    if smoke:
        impls["reference"] = lambda a, b, g: kernels.gmm(a, b, g, impl="reference")
    return impls


def bench_jax(name, f, lhs, rhs, gs, ct, refs, iters):
    """Times forward and forward+backward of one JAX implementation and checks its numbers."""
    fwd = jax.jit(f)

    @jax.jit
    def fwd_bwd(a, b, g, c):
        out, vjp = jax.vjp(lambda a, b: f(a, b, g), a, b)
        return out, vjp(c)

    _poison((lhs.shape[0], rhs.shape[2]))
    out, (dl, dr) = fwd_bwd(lhs, rhs, gs, ct)
    _poison((lhs.shape[0], rhs.shape[2]))
    out_f = fwd(lhs, rhs, gs)
    row = dict(impl=name, status="ok", nan_rows=_nan_rows(out_f) + _nan_rows(out),
               rel_fwd=_rel(out_f, refs[0]), rel_dlhs=_rel(dl, refs[1]), rel_drhs=_rel(dr, refs[2]))
    del out, dl, dr, out_f
    row["fwd_s"] = _time(fwd, (lhs, rhs, gs), iters)
    row["fwd_bwd_s"] = _time(fwd_bwd, (lhs, rhs, gs, ct), iters)
    return row


def bench_dense(lhs, rhs, ct, iters):
    """Same-FLOP dense matmul [M,K] @ [K,N] (expert 0's weights), forward and forward+backward."""
    w = rhs[0]
    fwd = jax.jit(lambda a, b: a @ b)

    @jax.jit
    def fwd_bwd(a, b, c):
        out, vjp = jax.vjp(lambda a, b: a @ b, a, b)
        return out, vjp(c)

    return dict(impl="dense", status="ok", fwd_s=_time(fwd, (lhs, w), iters),
                fwd_bwd_s=_time(fwd_bwd, (lhs, w, ct), iters))


def bench_torch(lhs, rhs, ct, sizes, refs, iters):
    """torch._grouped_mm (bf16, CUDA): [M,K] x [G,K,N] with row offsets; autograd backward."""
    try:
        import torch
    except ImportError:
        return dict(impl="torch", status="n/a: torch not importable")
    if not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"):
        return dict(impl="torch", status="n/a: needs torch with CUDA and torch._grouped_mm")
    dev = torch.device("cuda")
    to_t = lambda x: torch.from_dlpack(x)  # noqa: E731  (shares the GPU buffer)
    x, w_nk, c = to_t(lhs), to_t(jnp.swapaxes(rhs, 1, 2)).contiguous(), to_t(ct)
    offs = torch.tensor(np.cumsum(sizes), dtype=torch.int32, device=dev)
    x = x.detach().requires_grad_(True)
    w_nk = w_nk.detach().requires_grad_(True)

    def fwd():  # torchtitan's layout: weights stored [G,N,K], passed transposed
        return torch._grouped_mm(x, w_nk.transpose(-2, -1), offs=offs)

    def fwd_bwd():
        out = fwd()
        dx, dw = torch.autograd.grad(out, (x, w_nk), c)
        return out, dx, dw

    def timed(fn):
        fn(), fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / iters

    from_t = lambda t: jnp.asarray(jax.dlpack.from_dlpack(t.detach().contiguous()))  # noqa: E731
    try:
        torch.full((lhs.shape[0], rhs.shape[2]), float("nan"), dtype=torch.bfloat16, device=dev)
        with torch.no_grad():
            out_f = fwd()
        out, dx, dw = fwd_bwd()
        row = dict(impl="torch", status="ok", nan_rows=_nan_rows(from_t(out_f)),
                   rel_fwd=_rel(from_t(out_f), refs[0]), rel_dlhs=_rel(from_t(dx), refs[1]),
                   rel_drhs=_rel(jnp.swapaxes(from_t(dw), 1, 2), refs[2]))
        del out_f, out, dx, dw
        with torch.no_grad():
            row["fwd_s"] = timed(fwd)
        row["fwd_bwd_s"] = timed(fwd_bwd)
        return row
    except Exception as e:  # noqa: BLE001  (report, keep the other columns)
        return dict(impl="torch", status=f"error: {str(e).splitlines()[0][:160]}")


def run(shapes: dict, cases, iters: int, smoke: bool, dtype=jnp.bfloat16) -> list[dict]:
    rows = []
    for sname, (tokens, topk, experts, d, ff) in shapes.items():
        m, flops = tokens * topk, 2.0 * tokens * topk * d * ff
        rng = np.random.default_rng(0)  # host-side inputs: no XLA compiles in the harness
        lhs = jnp.asarray(rng.standard_normal((m, d), np.float32).astype(dtype))
        rhs = jnp.asarray((rng.standard_normal((experts, d, ff), np.float32)
                           / math.sqrt(d)).astype(dtype))
        ct = jnp.asarray(rng.standard_normal((m, ff), np.float32).astype(dtype))
        for case in cases:
            sizes = group_sizes(case, m, experts)
            gs = jnp.asarray(sizes, jnp.int32)
            refs = reference(lhs, rhs, ct, sizes)
            base = dict(shape=sname, case=case, m=m, k=d, n=ff, g=experts, flops_fwd=flops,
                        empty_groups=int((sizes == 0).sum()), max_group=int(sizes.max()))
            results = []
            for name, f in jax_impls(smoke).items():
                if isinstance(f, str):
                    results.append(dict(impl=name, status=f))
                    continue
                try:
                    results.append(bench_jax(name, f, lhs, rhs, gs, ct, refs, iters))
                except Exception as e:  # noqa: BLE001
                    results.append(dict(impl=name, status=f"error: {str(e).splitlines()[0][:160]}"))
            results.append(dict(impl="torch", status="n/a: smoke mode") if smoke
                           else bench_torch(lhs, rhs, ct, sizes, refs, iters))
            results.append(bench_dense(lhs, rhs, ct, iters))
            for r in results:
                if r.get("status") == "ok":
                    r["fwd_tflops"] = flops / r["fwd_s"] / 1e12
                    r["fwd_bwd_tflops"] = 3 * flops / r["fwd_bwd_s"] / 1e12
                rows.append({**base, **r})
            del refs
    return rows


def _cell(rows, shape, case, impl, key):
    for r in rows:
        if (r["shape"], r["case"], r["impl"]) == (shape, case, impl):
            if r.get("status") != "ok":
                return "n/a" if r["status"].startswith("n/a") else "err"
            v = r.get(key)
            return "-" if v is None else (f"{v:.3g}" if key.startswith("rel") or v < 10
                                          else f"{v:.0f}")
    return "-"


def table(rows) -> str:
    """Markdown: TFLOP/s forward | forward+backward per implementation, ratios vs torch, errors."""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    keys = list(dict.fromkeys((r["shape"], r["case"]) for r in rows))
    lines = ["| shape | case | " + " | ".join(impls) + " | moejax/torch |",
             "|---|---|" + "---|" * (len(impls) + 1)]
    for s, c in keys:
        cells = [f"{_cell(rows, s, c, i, 'fwd_tflops')} / {_cell(rows, s, c, i, 'fwd_bwd_tflops')}"
                 for i in impls]
        ratio = []
        for key in ("fwd_tflops", "fwd_bwd_tflops"):
            pick = lambda impl: [r.get(key) for r in rows  # noqa: E731
                                 if (r["shape"], r["case"], r["impl"]) == (s, c, impl)]
            mo, to = pick("moejax"), pick("torch")
            ratio.append(f"{mo[0] / to[0]:.2f}" if mo and to and mo[0] and to[0] else "n/a")
        lines.append(f"| {s} | {c} | " + " | ".join(cells) + f" | {' / '.join(ratio)} |")
    lines += ["", "TFLOP/s forward / forward+backward. Relative error vs float32 "
              "(fwd, dlhs, drhs) and NaN (unwritten) rows:", "",
              "| shape | case | impl | rel fwd | rel dlhs | rel drhs | NaN rows |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") == "ok" and "rel_fwd" in r:
            lines.append(f"| {r['shape']} | {r['case']} | {r['impl']} | {r['rel_fwd']:.2e} | "
                         f"{r['rel_dlhs']:.2e} | {r['rel_drhs']:.2e} | {r['nan_rows']} |")
    notes = sorted({f"{r['impl']}: {r['status']}" for r in rows if r.get("status") != "ok"})
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="A,B,C",
                    help="comma list of " + ",".join([*SHAPES, *CPU_SHAPES]))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU (xla/reference)")
    ap.add_argument("--dtype", default="bfloat16", help="operand dtype (float32 for CPU shapes)")
    ap.add_argument("--autotune", action="store_true", help="moejax times its tile candidates")
    ap.add_argument("--out", default=None, help="write the rows and the table as JSON here")
    args = ap.parse_args(argv)
    if args.autotune:
        import os
        os.environ["MOEJAX_GMM_AUTOTUNE"] = "1"
    known = {**SHAPES, **CPU_SHAPES}
    shapes = SMOKE_SHAPES if args.smoke else {s: known[s] for s in args.shapes.split(",")}
    iters = min(args.iters, 3) if args.smoke else args.iters
    rows = run(shapes, args.cases.split(","), iters, args.smoke, dtype=jnp.dtype(args.dtype))
    text = table(rows)
    dev = jax.devices()[0]
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=getattr(dev, "device_kind", str(dev)), backend=jax.default_backend(),
                jax=jax.__version__, python=platform.python_version(), iters=iters,
                smoke=args.smoke, autotune=args.autotune)
    print(f"# gmm benchmark — {meta['device']} ({meta['backend']}), jax {meta['jax']}, "
          f"{meta['date']}\n\n{text}")
    result = dict(meta=meta, rows=rows, table=text)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    from moejax.runtime import compile_without_cache
    compile_without_cache()  # compile for this process's CPU threads (see its docstring)
    main()
