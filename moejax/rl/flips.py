"""Token-flip measurement and the gradient-coupling diagnostic of the cancellation hypothesis
(methods/rl-and-data.md B.2, operational definitions OURS), as numpy functions of given arrays:
the experiment supplies teacher-forced logprobs before/after an update and per-token gradients.

Flips: Δ_{i,t} = log π_θ'(y_{i,t}) - log π_θ(y_{i,t}); a token is boosted if Δ > τ, suppressed
if Δ < -τ (unchanged otherwise). B⁺/S⁺ are the boosted/suppressed shares over tokens with Â > 0,
B⁻/S⁻ over Â < 0, and F the share of Â ≠ 0 tokens moved against their advantage
((Â > 0, suppressed) or (Â < 0, boosted)); unchanged tokens do not count as flipped.
Coupling: cosine between the gradients of two occurrences, over pairs of the same token id and of
different ids, bucketed by the pair's lower predicted probability min(p_a, p_b).
"""

from __future__ import annotations

import numpy as np

FLIP_TAU = 1e-4  # |Δ| threshold in fp32 (spec B.2)
CONFIDENCE_EDGES = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


def _share(hit: np.ndarray, of: np.ndarray) -> float:
    n = int(of.sum())
    return float((hit & of).sum() / n) if n else float("nan")


def token_flip_stats(logp_before, logp_after, advantages, mask, tau: float = FLIP_TAU) -> dict:
    """B⁺, S⁺, B⁻, S⁻, F and the token counts over ``mask`` [N,T]; ``advantages`` are token
    level [N,T] or per sequence [N]."""
    before, after = np.asarray(logp_before, np.float64), np.asarray(logp_after, np.float64)
    adv = np.asarray(advantages, np.float64)
    if adv.ndim == 1:
        adv = np.broadcast_to(adv[:, None], before.shape)
    mask = np.asarray(mask, bool)
    delta = after - before
    boosted, suppressed = delta > tau, delta < -tau
    pos, neg = mask & (adv > 0), mask & (adv < 0)
    flipped = (pos & suppressed) | (neg & boosted)
    return {"B+": _share(boosted, pos), "S+": _share(suppressed, pos),
            "B-": _share(boosted, neg), "S-": _share(suppressed, neg),
            "F": _share(flipped, pos | neg), "n+": int(pos.sum()), "n-": int(neg.sum())}


def flip_table_by_class(logp_before, logp_after, advantages, mask, classes,
                        names: dict[int, str], tau: float = FLIP_TAU) -> dict[str, dict]:
    """``token_flip_stats`` over all tokens ("all") and over each token class (e.g. names
    {0: "template", 1: "digits"}) of ``classes`` [N,T]."""
    mask = np.asarray(mask, bool)
    classes = np.asarray(classes)
    table = {"all": token_flip_stats(logp_before, logp_after, advantages, mask, tau)}
    for c, name in names.items():
        table[name] = token_flip_stats(logp_before, logp_after, advantages,
                                       mask & (classes == c), tau)
    return table


def update_share_by_class(logp_before, logp_after, mask, classes, num_classes: int) -> np.ndarray:
    """Share of the total |Δ| over ``mask`` landing on each token class (e.g. 0 = template/format,
    1 = answer digits) -> [num_classes], sums to 1 (zeros when nothing moved)."""
    delta = np.abs(np.asarray(logp_after, np.float64) - np.asarray(logp_before, np.float64))
    mask = np.asarray(mask, bool)
    mass = np.bincount(np.asarray(classes)[mask], weights=delta[mask], minlength=num_classes)
    total = mass.sum()
    return mass / total if total > 0 else mass


def _bucket_stats(cos: np.ndarray, bucket: np.ndarray, pair: np.ndarray, nb: int) -> dict:
    """Mean cos, mean |cos| and count of the selected pairs in each confidence bucket."""
    b, c = bucket[pair], cos[pair]
    count = np.bincount(b, minlength=nb)
    safe = np.maximum(count, 1)
    nan = np.where(count > 0, 1.0, np.nan)
    return {"mean_cos": np.bincount(b, weights=c, minlength=nb) / safe * nan,
            "mean_abs_cos": np.bincount(b, weights=np.abs(c), minlength=nb) / safe * nan,
            "count": count}


def coupling_by_confidence(token_ids, probs, grads, edges=CONFIDENCE_EDGES) -> dict:
    """Gradient cosine between occurrences, split into same-id and different-id pairs and
    bucketed by min(p) into ``edges`` (bucket k: edges[k] <= min p < edges[k+1], the last closed).
    ``token_ids`` [M], ``probs`` [M] (the model's p of the token), ``grads`` [M,D] -> {"same",
    "different"}: dicts of [len(edges)-1] arrays (mean_cos, mean_abs_cos, count); M² pairs."""
    ids, p = np.asarray(token_ids).reshape(-1), np.asarray(probs, np.float64).reshape(-1)
    g = np.asarray(grads, np.float64).reshape(len(ids), -1)
    norm = np.linalg.norm(g, axis=1, keepdims=True)
    unit = g / np.where(norm > 0, norm, 1.0)
    a, b = np.triu_indices(len(ids), k=1)
    cos = np.sum(unit[a] * unit[b], axis=1)
    nb = len(edges) - 1
    bucket = np.clip(np.searchsorted(np.asarray(edges), np.minimum(p[a], p[b]), "right") - 1,
                     0, nb - 1)
    same = ids[a] == ids[b]
    return {"same": _bucket_stats(cos, bucket, same, nb),
            "different": _bucket_stats(cos, bucket, ~same, nb)}
