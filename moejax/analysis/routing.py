"""Routing specialisation from the eval step's ``moe/domain_counts`` record (spec section 10)."""

from __future__ import annotations

import numpy as np


def domain_frequencies(record: dict, top_k: int) -> np.ndarray:
    """Expert selection frequency per (layer, domain, expert) relative to uniform routing
    (1 = the uniform rate k/E; 'hot experts' are cells far above 1). -> [L, D, E] float64."""
    counts = np.asarray(record["moe/domain_counts"], np.float64)  # [L, D, E]
    per_domain = counts.sum(-1, keepdims=True) / top_k  # tokens per domain
    return counts / np.maximum(per_domain, 1) / (top_k / counts.shape[-1])


def specialisation(freq: np.ndarray) -> float:
    """Mean over layers and domains of the hottest expert's relative selection rate."""
    return float(np.mean(freq.max(-1)))
