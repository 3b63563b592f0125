"""pass@k: the unbiased estimator 1 - C(n-c, k)/C(n, k) (Chen et al. 2021) from n samples with c
correct, in the stable product form, and its per-tier means for evaluation metrics."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n is correct), c of n correct.

    1 - prod_{i=n-c+1..n} (1 - k/i): no large binomials, exact 1 when n - c < k.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k_groups(correct: np.ndarray, k: int) -> np.ndarray:
    """Per-prompt pass@k of a bool array correct [P, n] (n samples per prompt) -> f64 [P]."""
    correct = np.asarray(correct, bool)
    if correct.ndim != 2:
        raise ValueError(f"pass_at_k_groups: correct must be [prompts, samples], got {correct.shape}")
    n = correct.shape[1]
    return np.array([pass_at_k(n, int(c), k) for c in correct.sum(1)], np.float64)


def pass_at_k_by_tier(tiers: Sequence[str], correct: np.ndarray,
                      ks: Sequence[int] = (1,)) -> dict[str, float]:
    """Mean pass@k per tier: tiers [P] names, correct [P, n] -> {"rl/pass@k/<tier>": value}.

    k larger than n is skipped (it has no unbiased estimate)."""
    correct = np.asarray(correct, bool)
    if len(tiers) != correct.shape[0]:
        raise ValueError(f"pass_at_k_by_tier: {len(tiers)} tier names for {correct.shape[0]} prompts")
    tiers = np.asarray(tiers)
    out = {}
    for k in ks:
        if k > correct.shape[1]:
            continue
        per_prompt = pass_at_k_groups(correct, k)
        for t in sorted(set(tiers.tolist())):
            out[f"rl/pass@{k}/{t}"] = float(per_prompt[tiers == t].mean())
    return out
