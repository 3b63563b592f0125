"""Gated delta rule on CPU: the chunked form vs the recurrent form vs a naive per-token scan.

Three ways to compute the same outputs (``moejax.kernels.gated_delta``; tiny heads so that 32k
tokens fit a 2-core box in minutes):

  chunked    ``gated_delta.chunked`` (chunk 64): UT transform inside chunks, a scan over T/64 chunks
  recurrent  ``gated_delta.recurrent``: a ``lax.scan`` over tokens (the decode form)
  naive      a per-token ``lax.scan`` that emits every state S_t [H,dk,dv] and reads the outputs out
             of the stacked states afterwards: the first thing one writes, O(T*dk*dv) memory

Each is jitted on fixed shapes, warmed up, then timed ``--reps`` times (median wall seconds and
process CPU seconds per call; the box is shared, so wall and CPU are both recorded along with the
1-minute load average). Memory is XLA's own accounting of the compiled program
(``memory_analysis``: temporaries + outputs, bytes), not the process RSS, so it is repeatable.
``--grad`` also times forward+backward (the training cost: the per-token scans keep every state
for the backward pass). The summary prints time(32k)/time(2k) of the chunked form (linear in T
is 16x; the issue's bound is 20x) and the chunked speedup over both scans at each length.

    python -m benchmarks.deltanet --out /tmp/deltanet_cpu.json       # T = 2k, 8k, 32k
    python -m benchmarks.deltanet --quick                              # T = 256, 1024: seconds
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark; read when jax is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moejax.kernels import gated_delta  # noqa: E402
from moejax.runtime import tune_host_malloc  # noqa: E402

B, H, DK, DV = 1, 2, 32, 32
LENGTHS, QUICK_LENGTHS = (2048, 8192, 32768), (256, 1024)


def naive(q, k, v, g, beta):
    """Per-token scan emitting the whole state trajectory [T,B,H,dk,dv]; o = S_t^T q_t after."""
    q = q.astype(jnp.float32) * q.shape[-1] ** -0.5

    def step(s, xs):
        kt, vt, gt, bt = xs
        s = s * jnp.exp(gt)[..., None, None]
        delta = bt[..., None] * (vt - jnp.einsum("bhkv,bhk->bhv", s, kt))
        s = s + kt[..., :, None] * delta[..., None, :]
        return s, s

    s0 = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[-1]), jnp.float32)
    tm = lambda x: jnp.moveaxis(x.astype(jnp.float32), 1, 0)  # noqa: E731
    final, states = jax.lax.scan(step, s0, (tm(k), tm(v), tm(g), tm(beta)))
    return jnp.einsum("tbhkv,bthk->bthv", states, q), final


FORMS = {
    "chunked": functools.partial(gated_delta.chunked, chunk=64),
    "recurrent": gated_delta.recurrent,
    "naive": naive,
}


def inputs(T: int, seed: int = 0):
    """Unit-norm q, k, random v, decays g in [-1.5, -0.01] and rates beta in (0.05, 1)."""
    rng = np.random.default_rng(seed)
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa
    return (unit(rng.normal(size=(B, T, H, DK))), unit(rng.normal(size=(B, T, H, DK))),
            rng.normal(size=(B, T, H, DV)).astype(np.float32),
            -rng.uniform(0.01, 1.5, (B, T, H)).astype(np.float32),
            rng.uniform(0.05, 1.0, (B, T, H)).astype(np.float32))


def program(form: str, grad: bool):
    """The jitted function timed: o (forward) or the gradients of sum(o) w.r.t. q, k, v, g, beta."""
    fn = FORMS[form]
    if not grad:
        return jax.jit(lambda *a: fn(*a)[0])
    return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)[0]), argnums=(0, 1, 2, 3, 4)))


def measure(form: str, T: int, grad: bool, reps: int) -> dict:
    """Compile, check memory, warm up, then the median of ``reps`` timed calls."""
    args = inputs(T)
    f = program(form, grad)
    compiled = f.lower(*args).compile()
    mem = compiled.memory_analysis()
    peak = None if mem is None else int(mem.temp_size_in_bytes + mem.output_size_in_bytes)
    jax.block_until_ready(compiled(*args))
    walls, cpus = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled(*args))
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    wall = statistics.median(walls)
    return {"form": form, "T": T, "grad": grad, "wall_s": wall, "cpu_s": statistics.median(cpus),
            "tokens_per_s": B * T / wall, "peak_bytes": peak, "reps": reps}


def check_agreement(T: int) -> float:
    """Max |o_form - o_chunked| over the forms at length T (the three compute the same thing)."""
    args = inputs(T, seed=1)
    ref = np.asarray(program("chunked", False)(*args))
    return max(float(np.abs(np.asarray(program(f, False)(*args)) - ref).max())
               for f in ("recurrent", "naive"))


def summarise(rows: list[dict], lengths, forms) -> dict:
    """Per mode (fwd, fwd_bwd) and clock (wall, cpu): the chunked form's time(T_max)/time(T_min)
    (linear = T_max/T_min) and its speedup over each other form at every T."""
    out = {}
    lo, hi = lengths[0], lengths[-1]
    for grad in sorted({r["grad"] for r in rows}):
        mode = {}
        for clock in ("wall_s", "cpu_s"):
            t = {(r["form"], r["T"]): r[clock] for r in rows if r["grad"] == grad}
            mode[clock.removesuffix("_s")] = {
                "chunked_scaling": t[("chunked", hi)] / t[("chunked", lo)],
                "chunked_speedup": {f"{f}@{T}": t[(f, T)] / t[("chunked", T)]
                                    for f in forms if f != "chunked" for T in lengths}}
        out["fwd_bwd" if grad else "fwd"] = mode
    return out


def print_summary(summary: dict, lengths) -> None:
    for mode, clocks in summary.items():
        for clock, s in clocks.items():
            speed = ", ".join(f"{k} {v:.2f}x" for k, v in s["chunked_speedup"].items())
            print(f"{mode} ({clock}): chunked time({lengths[-1]})/time({lengths[0]}) = "
                  f"{s['chunked_scaling']:.2f} (linear {lengths[-1] / lengths[0]:.0f}); "
                  f"chunked speedup: {speed}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"T in {QUICK_LENGTHS}, 2 reps")
    ap.add_argument("--lengths", default=None, help="comma list of T (default 2048,8192,32768)")
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--grad", action="store_true", help="also time forward+backward")
    ap.add_argument("--out", default=None, help="write the rows and summary as JSON here")
    args = ap.parse_args(argv)
    host_malloc = tune_host_malloc()  # as every moejax entry point
    lengths = (tuple(int(t) for t in args.lengths.split(",")) if args.lengths
               else QUICK_LENGTHS if args.quick else LENGTHS)
    reps = 2 if args.quick else args.reps
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "machine": platform.node(), "jax": jax.__version__,
              "backend": jax.default_backend(), "cpus": len(os.sched_getaffinity(0)),
              "load_avg_1m_start": os.getloadavg()[0], "host_malloc_tuned": host_malloc,
              "shapes": dict(B=B, H=H, dk=DK, dv=DV, chunk=64), "lengths": list(lengths),
              "max_abs_diff_vs_chunked": check_agreement(min(lengths)), "rows": []}
    print("| form | T | mode | wall ms | cpu ms | tokens/s | peak MiB |\n" + "|---" * 7 + "|")
    for grad in (False, True) if args.grad else (False,):
        for T in lengths:
            for form in args.forms.split(","):
                r = measure(form, T, grad, reps)
                result["rows"].append(r)
                mib = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
                print(f"| {form} | {T} | {'fwd+bwd' if grad else 'fwd'} | {1e3 * r['wall_s']:.1f} "
                      f"| {1e3 * r['cpu_s']:.1f} | {r['tokens_per_s']:.0f} | {mib} |", flush=True)
    forms = args.forms.split(",")
    if "chunked" in forms:
        result["summary"] = summarise(result["rows"], lengths, forms)
        print_summary(result["summary"], lengths)
    result["load_avg_1m_end"] = os.getloadavg()[0]
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    from moejax.runtime import compile_without_cache
    compile_without_cache()  # compile for this process's CPU threads (see its docstring)
    main()
