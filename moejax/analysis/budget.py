"""Data budget of a run: tokens seen and passes over each domain's training stream.

Loss comparisons on data repeated many times measure memorisation, not learning, so every report
states how often each domain was seen. Row ``i`` of the training stream is a pure function of
(seed, i) (``Data._row_choice``), so the rows per domain are counted exactly by replaying the
choices; past ``EXACT_ROWS`` rows the mixture's expectation is used (and labelled as such).
"""

from __future__ import annotations

import numpy as np

EXACT_ROWS = 1_000_000  # ~14 us per replayed row: at most ~15 s of report time
WARN_PASSES = 4.0


def rows_per_domain(data, num_rows: int) -> tuple[np.ndarray, bool]:
    """Training rows drawn from each domain among global rows [0, num_rows) -> (counts [D], exact)."""
    D = len(data.domains)
    if num_rows <= EXACT_ROWS:
        counts = np.zeros(D, np.int64)
        for i in range(num_rows):
            counts[data._row_choice(i)[0]] += 1
        return counts.astype(np.float64), True
    w = np.asarray(data.cfg.mixture, np.float64)
    return num_rows * w / w.sum(), False


def domain_budget(data, steps: int, batch_size: int) -> list[dict]:
    """Per domain: rows, tokens seen (rows x seq_len), training-stream tokens and passes over it."""
    counts, exact = rows_per_domain(data, steps * batch_size)
    out = []
    for d, n_rows in zip(data.domains, counts):
        stream = data.num_tokens(d, "train")
        seen = float(n_rows) * data.cfg.seq_len
        out.append({"domain": d, "rows": float(n_rows), "tokens_seen": seen,
                    "stream_tokens": int(stream), "passes": seen / max(stream, 1), "exact": exact})
    return out


def budget_markdown(budgets: dict[str, list[dict]]) -> str:
    """A table of tokens seen and passes per (arm, domain), with a warning line for any arm that
    repeats a domain more than ``WARN_PASSES`` times."""
    lines = ["| arm | domain | tokens seen | training-stream tokens | passes |",
             "|---|---|---|---|---|"]
    warn = []
    for arm, rows in budgets.items():
        for r in rows:
            approx = "" if r["exact"] else " (expected)"
            lines.append(f"| {arm} | {r['domain']} | {r['tokens_seen']:,.0f}{approx} | "
                         f"{r['stream_tokens']:,} | {r['passes']:.2f} |")
            if r["passes"] > WARN_PASSES:
                warn.append(f"{arm}/{r['domain']} ({r['passes']:.1f})")
    if warn:
        lines += ["", f"**Warning:** more than {WARN_PASSES:g} passes over a domain: "
                  + ", ".join(warn) + ". Loss differences there measure memorisation as much as "
                  "learning; use a larger corpus (`data.corpus=...`)."]
    return "\n".join(lines)
