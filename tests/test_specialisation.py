"""Specialisation metrics (moejax.analysis.specialisation) against loops over planted counts."""

import math

import numpy as np

from moejax.analysis.specialisation import domain_expert_mi, mean_domain_kl


def mi_loop(c):
    n = c.sum()
    out = 0.0
    for d in range(c.shape[0]):
        for e in range(c.shape[1]):
            if c[d, e] > 0:
                pde = c[d, e] / n
                out += pde * math.log(pde / (c[d].sum() / n * c[:, e].sum() / n))
    return out


def kl_loop(c):
    m = c.sum(0) / c.sum()
    vals = []
    for row in c:
        if row.sum() == 0:
            continue
        q = row / row.sum()
        vals.append(sum(qi * math.log(qi / mi) for qi, mi in zip(q, m) if qi > 0))
    return np.mean(vals)


def test_mi_and_kl_match_loops_on_planted_counts():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=(3, 4, 8)).astype(float)
    counts[1, 2] = 0  # a domain with no selections in layer 1
    counts[2, :, 5] = 0  # an expert nobody picks in layer 2
    np.testing.assert_allclose(domain_expert_mi(counts), [mi_loop(c) for c in counts], rtol=1e-12)
    np.testing.assert_allclose(mean_domain_kl(counts), [kl_loop(c) for c in counts], rtol=1e-12)


def test_edge_cases_flat_imbalanced_and_disjoint():
    """Same proportions in every domain (even with one hot expert): 0; domains on disjoint
    experts with equal token counts: I = log D and each KL = log D."""
    hot = np.tile([40.0, 5, 5, 5, 5, 5, 5, 10], (3, 1))[None] * np.array([1, 2, 3])[None, :, None]
    np.testing.assert_allclose(domain_expert_mi(hot), [0.0], atol=1e-12)
    np.testing.assert_allclose(mean_domain_kl(hot), [0.0], atol=1e-12)
    disjoint = np.kron(np.eye(3), np.ones((1, 2)))[None] * 7  # domain d only on experts 2d, 2d+1
    np.testing.assert_allclose(domain_expert_mi(disjoint), [math.log(3)], rtol=1e-12)
    np.testing.assert_allclose(mean_domain_kl(disjoint), [math.log(3)], rtol=1e-12)
    np.testing.assert_allclose(domain_expert_mi(np.zeros((1, 3, 4))), [0.0])
