"""The text forms of a ``moejax.aot`` report: the plain-text table printed per run and the markdown
rows of the results table (``benchmarks/RESULTS.md``)."""

from __future__ import annotations

import re

from moejax.tpu_specs import GiB


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def short_kernel(name: str) -> str:
    """'splash_mha_fwd_segmented_residuals' -> 'splash_fwd'."""
    return re.sub(r"_segmented|_(no_)?residuals", "", name).replace("splash_mha_", "splash_")


def format_table(title: str, rep: dict) -> str:
    """The report as a plain-text table (one column per program)."""
    progs = rep["programs"]
    g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    rows = [("HBM arguments", lambda p: g(p["memory"]["argument"])),
            ("HBM temporaries", lambda p: g(p["memory"]["temp"])),
            ("HBM outputs (not aliased)",
             lambda p: g(p["memory"]["output"] - p["memory"]["alias"])),
            ("HBM total / chip", lambda p: f"{g(p['memory']['total'])} of "
                                           f"{p['memory']['capacity'] / GiB:.0f} "
                                           f"({p['memory']['fraction']:.0%})"),
            ("FLOPs/step/chip compiled", lambda p: f"{p['flops']['compiled']:.3e}"),
            ("FLOPs/step/chip analytic", lambda p: f"{p['flops']['analytic']:.3e}"),
            ("compiled / analytic", lambda p: f"{p['flops']['ratio']:.2f} (remat "
                                              f"{p['flops']['expected_ratio']:.2f})"),
            ("matmul: compiled/(6N, remat)",
             lambda p: _fmt(p["flops"]["matmul_ratio_remat_adjusted"])),
            ("attention: splash/analytic", lambda p: _fmt(p["flops"]["attention_ratio"])),
            ("HBM traffic est./step", lambda p: g(p["hbm_bytes_est"]))]
    kinds = sorted({k for p in progs.values() for k in p["collectives"]})
    for k in kinds:
        rows.append((f"{k} n / payload", lambda p, k=k: (
            f"{p['collectives'].get(k, {}).get('count', 0):.0f} / "
            f"{g(p['collectives'].get(k, {}).get('payload_bytes', 0))}")))
    rows += [("ICI bytes sent/chip", lambda p: g(p["ici_wire_bytes"])),
             ("Pallas kernels", lambda p: ", ".join(f"{short_kernel(k)} x{v:.0f}" for k, v in
                                                    sorted(p["kernels"].items())) or "none"),
             ("roofline compute/HBM/ICI/DCN", lambda p: "/".join(
                 f"{p['roofline'][f'{t}_s'] * 1e3:.1f}" for t in ("compute", "hbm", "ici", "dcn"))
              + " ms"),
             ("step lower bound", lambda p: f"{p['roofline']['step_s'] * 1e3:.1f} ms "
                                            f"({p['roofline']['bound_by']})"),
             ("MFU bound", lambda p: f"{p['roofline']['mfu_bound']:.0%}"),
             ("lower / compile", lambda p: f"{p['lower_s']:.1f} s / {p['compile_s']:.1f} s")]
    slices = f" x {rep['slices']} slices" if rep["slices"] > 1 else ""
    head = (f"{title}: {rep['topology']}{slices}, "
            f"{rep['chips']} chips ({rep['chip']}), mesh {rep['mesh']}, "
            f"{rep['params'] / 1e9:.2f}B params ({rep['active_params'] / 1e9:.2f}B active), "
            f"{rep['tokens_per_step']:,} tokens/step")
    width = max(len(r[0]) for r in rows)
    cols = list(progs)
    lines = [head, f"{'':{width}}  " + "  ".join(f"{c:>28}" for c in cols)]
    for label, fn in rows:
        lines.append(f"{label:{width}}  " + "  ".join(f"{fn(progs[c]):>28}" for c in cols))
    return "\n".join(lines)


MD_HEADER = ("| run | topology (mesh) | params (active) | program | HBM/chip: args + temp + out "
             "= total (of cap) | FLOPs/step/chip compiled / analytic (matmul ratio, attention "
             "ratio) | collectives/step/chip (n, payload) | roofline compute/HBM/ICI/DCN ms | "
             "MFU bound (bound by) | compile s |\n|" + "---|" * 10)


def markdown_rows(key: str, rep: dict) -> list[str]:
    """One results-table row per program of a report (see ``MD_HEADER``)."""
    mesh = ",".join(f"{k[0]}{v}" for k, v in rep["mesh"].items() if v > 1)
    g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    slices = f" x{rep['slices']} slices" if rep["slices"] > 1 else ""
    rows = []
    for name, p in rep["programs"].items():
        m, f, r = p["memory"], p["flops"], p["roofline"]
        coll = "; ".join(f"{k} {v['count']:.0f}, {g(v['payload_bytes'])} GiB"
                         for k, v in sorted(p["collectives"].items()))
        terms = "/".join(f"{r[f'{t}_s'] * 1e3:.0f}" for t in ("compute", "hbm", "ici", "dcn"))
        rows.append(
            f"| {key} | {rep['topology']}{slices} ({mesh}) | "
            f"{rep['params'] / 1e9:.2f}B ({rep['active_params'] / 1e9:.2f}B) | {name} | "
            f"{g(m['argument'])} + {g(m['temp'])} + {g(m['output'] - m['alias'])} = "
            f"{g(m['total'])} GiB (of {m['capacity'] / GiB:.0f}, {m['fraction']:.0%}) | "
            f"{f['compiled']:.3g} / {f['analytic']:.3g} ({_fmt(f['matmul_ratio_remat_adjusted'])}, "
            f"{_fmt(f['attention_ratio'])}) | {coll} | {terms} | "
            f"{r['mfu_bound']:.0%} ({r['bound_by']}) | {p['compile_s']:.0f} |")
    return rows
