"""Domain specialisation of routing (spec section 1.5): how much the expert choice tells about the
domain, separate from global imbalance (a hot expert shared by every domain scores 0 here).

Inputs are the eval step's selection counts per (layer, domain, expert) ``[L, D, E]`` (the
``moe/domain_counts`` record). The joint P(d, e) is the share of all selections; values are in
nats. Both metrics are 0 when every domain uses the experts in the same proportions.
"""

from __future__ import annotations

import numpy as np


def _xlogy_ratio(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """p * log(p / q) with 0 where p == 0 (elementwise)."""
    safe = np.where(p > 0, p, 1.0) / np.where(q > 0, q, 1.0)
    return np.where(p > 0, p * np.log(safe), 0.0)


def domain_expert_mi(counts) -> np.ndarray:
    """Per-layer mutual information I(domain; expert) of the selection joint: [L, D, E] -> [L]."""
    c = np.asarray(counts, np.float64)
    joint = c / np.maximum(c.sum((-2, -1), keepdims=True), 1e-300)  # [L,D,E]
    pd = joint.sum(-1, keepdims=True)
    pe = joint.sum(-2, keepdims=True)
    return _xlogy_ratio(joint, pd * pe).sum((-2, -1))


def mean_domain_kl(counts) -> np.ndarray:
    """Per-layer mean over domains (unweighted; domains without selections skipped) of
    KL(domain's expert frequencies || all domains' marginal): [L, D, E] -> [L]."""
    c = np.asarray(counts, np.float64)
    per_domain = c.sum(-1, keepdims=True)  # [L,D,1]
    q = c / np.maximum(per_domain, 1e-300)
    marginal = c.sum(-2, keepdims=True) / np.maximum(c.sum((-2, -1), keepdims=True), 1e-300)
    kl = _xlogy_ratio(q, marginal).sum(-1)  # [L,D]
    used = per_domain[..., 0] > 0
    return np.where(used, kl, 0.0).sum(-1) / np.maximum(used.sum(-1), 1)
