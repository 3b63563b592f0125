"""Mini-batch samplers over one rollout batch (methods/rl-and-data.md B.2): which rows each of the
M optimizer steps sees. Host-side numpy; every draw takes an explicit ``np.random.Generator`` (the
trainer's ``np.random.default_rng([seed, step, epoch])``), so a resumed run splits identically.

- ``shuffled``: a permutation of rows cut into M parts (today's trainer; groups get split).
- ``query_preserved`` (QPM): prompts are permuted, never rows; each mini-batch holds all rollouts
  of its ceil(B/M) (or floor) prompts, so no group is split across optimizer steps.
- ``reward_balanced`` (RBB, variant (a) prompt pairing): whole groups, composed so each
  mini-batch's positive and negative counts are as equal as possible (min Σ_m |#pos_m - #neg_m|:
  greedy by |imbalance|, then best pairwise swaps). Composes with QPM (groups stay intact).
- ``balanced_subsample`` (RBB variant (b)): within each group, subsample the majority class down to
  the minority's count before advantages are computed.
- ``positive_only_advantages``: the positive-only control (Â <= 0 rows carry no signal).
Positive/negative is the caller's label (correct vs not, or Â > 0 vs Â < 0).
"""

from __future__ import annotations

import numpy as np

from moejax.config_checks import _check_choice

SAMPLERS = ("shuffled", "query_preserved", "reward_balanced")


def _check_count(field: str, m: int, units: int, what: str) -> None:
    if not 1 <= m <= units:
        raise ValueError(f"{field}={m}: must be in [1, {units}] ({units} {what} to split)")


def shuffled_minibatches(num_rows: int, m: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of M mini-batches: one permutation of the rows cut into M equal parts (the
    trainer's current split: ``perm[j*n:(j+1)*n]``)."""
    _check_count("rl.mini_batches", m, num_rows, "rows")
    if num_rows % m:
        raise ValueError(f"rl.mini_batches={m} must divide the {num_rows} rows")
    perm = rng.permutation(num_rows)
    n = num_rows // m
    return [perm[j * n:(j + 1) * n] for j in range(m)]


def _group_rows(group) -> tuple[np.ndarray, list[np.ndarray]]:
    """Distinct group ids [B] and the rows of each (in row order)."""
    group = np.asarray(group).reshape(-1)
    ids = np.unique(group)
    return ids, [np.flatnonzero(group == g) for g in ids]


def _capacities(num_groups: int, m: int) -> np.ndarray:
    """Groups per mini-batch: B // M each, the first B % M one more."""
    return np.array([num_groups // m + (j < num_groups % m) for j in range(m)])


def query_preserved_minibatches(group, m: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of M mini-batches, each the whole groups of consecutive prompts of one prompt
    permutation (ceil/floor(B/M) prompts each)."""
    ids, rows = _group_rows(group)
    _check_count("rl.mini_batches", m, len(ids), "prompts")
    order = rng.permutation(len(ids))
    bounds = np.concatenate([[0], np.cumsum(_capacities(len(ids), m))])
    return [np.concatenate([rows[g] for g in order[bounds[j]:bounds[j + 1]]])
            for j in range(m)]


def group_imbalance(group, positive) -> np.ndarray:
    """#positive - #negative rollouts of each group (groups in sorted id order) -> [B] int."""
    ids, rows = _group_rows(group)
    positive = np.asarray(positive, bool).reshape(-1)
    return np.array([2 * int(positive[r].sum()) - len(r) for r in rows], np.int64)


def _greedy_assign(d: np.ndarray, caps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mini-batch of each group: largest |d| first, each to the open mini-batch whose imbalance
    it brings closest to 0 (random order among equal |d|)."""
    order = rng.permutation(len(d))
    order = order[np.argsort(-np.abs(d[order]), kind="stable")]
    assign, sums, fill = np.full(len(d), -1), np.zeros(len(caps), np.int64), np.zeros_like(caps)
    for g in order:
        open_ = np.flatnonzero(fill < caps)
        j = open_[np.argmin(np.abs(sums[open_] + d[g]))]
        assign[g], sums[j], fill[j] = j, sums[j] + d[g], fill[j] + 1
    return assign


def _improve_by_swaps(d: np.ndarray, assign: np.ndarray, m: int, max_passes: int = 10_000):
    """Apply the best group swap between two mini-batches while it lowers Σ_m |S_m|."""
    for _ in range(max_passes):
        sums = np.bincount(assign, weights=d, minlength=m)
        s = sums[assign]  # [B]: the imbalance of each group's mini-batch
        diff = d[:, None] - d[None, :]  # moving g out and h in
        gain = (np.abs(s[:, None] - diff) + np.abs(s[None, :] + diff)
                - np.abs(s[:, None]) - np.abs(s[None, :]))
        gain = np.where(assign[:, None] != assign[None, :], gain, 0.0)
        g, h = np.unravel_index(np.argmin(gain), gain.shape)
        if gain[g, h] >= 0:
            return assign
        assign[g], assign[h] = assign[h], assign[g]
    return assign


def reward_balanced_minibatches(group, positive, m: int,
                                rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of M mini-batches of whole groups with #pos - #neg per mini-batch as close to
    0 as the groups allow (objective Σ_m |#pos_m - #neg_m|; group counts as in QPM)."""
    ids, rows = _group_rows(group)
    _check_count("rl.mini_batches", m, len(ids), "prompts")
    d = group_imbalance(group, positive).astype(np.float64)
    assign = _improve_by_swaps(d, _greedy_assign(d, _capacities(len(ids), m), rng), m)
    return [np.concatenate([rows[g] for g in np.flatnonzero(assign == j)]) for j in range(m)]


def minibatch_imbalance(minibatches: list[np.ndarray], positive) -> list[int]:
    """#positive - #negative rows of each mini-batch (a metric of the split)."""
    positive = np.asarray(positive, bool).reshape(-1)
    return [2 * int(positive[mb].sum()) - len(mb) for mb in minibatches]


def make_minibatches(sampler: str, group, positive, m: int,
                     rng: np.random.Generator) -> list[np.ndarray]:
    """The configured sampler (``SAMPLERS``) -> M arrays of row indices."""
    _check_choice("rl.minibatch_sampler", sampler, SAMPLERS)
    if sampler == "shuffled":
        return shuffled_minibatches(len(np.asarray(group).reshape(-1)), m, rng)
    if sampler == "query_preserved":
        return query_preserved_minibatches(group, m, rng)
    return reward_balanced_minibatches(group, positive, m, rng)


def balanced_subsample(group, positive, rng: np.random.Generator,
                       drop_one_sided: bool = True) -> np.ndarray:
    """Sorted rows kept when each group's majority class is subsampled to its minority's count.
    A group with one class only is dropped (``drop_one_sided``) or kept whole."""
    positive = np.asarray(positive, bool).reshape(-1)
    keep = []
    for r in _group_rows(group)[1]:
        pos, neg = r[positive[r]], r[~positive[r]]
        if len(pos) == 0 or len(neg) == 0:
            if not drop_one_sided:
                keep.append(r)
            continue
        k = min(len(pos), len(neg))
        keep += [rng.choice(pos, k, replace=False), rng.choice(neg, k, replace=False)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def positive_only_advantages(advantages) -> np.ndarray:
    """The positive-only control: rows with Â <= 0 get advantage 0 (shapes stay fixed)."""
    adv = np.asarray(advantages)
    return np.where(adv > 0, adv, np.zeros_like(adv))
