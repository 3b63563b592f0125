"""Post-hoc reward calibration against a response characteristic (length), methods/rl-and-data.md
B.3: r̃ = r̂ - α·b̂(c), b̂ fitted on a pool of scored responses. Fit and apply are separate; the
fitted state is a JSON-able dict (checkpointed with the run, bit-identical through json).

- ``local_average`` (the paper's "uniform averaging", R1 ``calibrate_score_mean_reward``):
  b̂(c) = mean{r̂_j : |c_j - c| <= d}, only with >= ``min_neighbours`` points (else the score is
  left unchanged); d = mean over preference pairs |c_chosen - c_rejected| / ``window_ratio``, or
  ``half_width`` when there are no pairs (RL rollouts).
- ``lowess`` (recommended, R1 ``calibrate_score_LWR``): statsmodels' LOWESS of r̂ on c with span
  ``frac`` (tricube, local linear, 3 robustifying iterations, delta 0); b̂(c) = the fitted value
  at the first fitted point at or above c (the last point beyond the range); at a length tied
  by a whole neighbourhood (zero width, where statsmodels gives 0) the tied rewards' mean.
A rolling buffer of (c, r̂) over recent rollout batches feeds the RL use (``buffer_append``).
Also ``bradley_terry_loss`` for a reward head trained on preference pairs (JAX).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config_checks import _check_choice, _fail

METHODS = ("local_average", "lowess")


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """How rewards are calibrated against length (defaults: R1's CLI, α = 1, frac 0.5)."""

    method: str = "lowess"
    alpha: float = 1.0
    frac: float = 0.5  # LOWESS span (RewardBench 1.0, AlpacaEval 0.3)
    lowess_iters: int = 3
    window_ratio: float = 4.0  # local average: d = mean pair gap / ratio (RewardBench 4, Alpaca 8)
    half_width: float | None = None  # local average without pairs: the window half-width d
    min_neighbours: int = 20

    def __post_init__(self):
        _check_choice("calibration.method", self.method, METHODS)
        if not 0.0 < self.frac <= 1.0:
            _fail("calibration.frac", self.frac, "must be in (0, 1]")
        if self.lowess_iters < 0:
            _fail("calibration.lowess_iters", self.lowess_iters, "must be >= 0")
        if not self.window_ratio > 0:
            _fail("calibration.window_ratio", self.window_ratio, "must be > 0")
        if self.half_width is not None and not self.half_width > 0:
            _fail("calibration.half_width", self.half_width, "must be > 0, or None (from pairs)")
        if self.min_neighbours < 1:
            _fail("calibration.min_neighbours", self.min_neighbours, "must be >= 1")


def _as_float_list(x) -> list[float]:
    return [float(v) for v in np.asarray(x, np.float64).reshape(-1)]


def _lowess_curve(c: np.ndarray, r: np.ndarray, cfg: CalibrationConfig):
    """statsmodels' LOWESS curve (x sorted, y), except at a length tied by at least the span's
    k = int(frac·n) points (common: rollouts at the length cap): its neighbourhood has zero width,
    where statsmodels returns 0, and the local fit is the tied points' mean (Cleveland's rule:
    points at distance 0 get weight 1)."""
    import warnings

    from statsmodels.nonparametric.smoothers_lowess import lowess

    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        curve = lowess(r, c, frac=cfg.frac, it=cfg.lowess_iters, delta=0.0, return_sorted=True)
    x, y = curve[:, 0], curve[:, 1].copy()
    values, inv, counts = np.unique(c, return_inverse=True, return_counts=True)
    means = np.bincount(inv.reshape(-1), weights=r) / counts
    k = max(int(cfg.frac * len(c) + 1e-10), 1)  # statsmodels' neighbourhood size
    for v, mean, n in zip(values, means, counts):
        if n >= k:
            y[x == v] = mean
    return x, y


def fit(lengths, rewards, cfg: CalibrationConfig = CalibrationConfig(), pairs=None) -> dict:
    """The fitted state from a pool of (c_j, r̂_j); ``pairs`` = (c_chosen, c_rejected) arrays set
    the local-average window (else ``cfg.half_width``)."""
    c, r = np.asarray(lengths, np.float64).reshape(-1), np.asarray(rewards, np.float64).reshape(-1)
    if c.shape != r.shape or c.size == 0:
        raise ValueError(f"lengths {c.shape} and rewards {r.shape} must be equal, non-empty")
    if cfg.method == "lowess":
        x, y = _lowess_curve(c, r, cfg)
        return {"method": "lowess", "alpha": cfg.alpha, "x": _as_float_list(x),
                "y": _as_float_list(y)}
    if pairs is not None:
        gap = np.abs(np.asarray(pairs[0], np.float64) - np.asarray(pairs[1], np.float64))
        d = float(gap.mean() / cfg.window_ratio)
    elif cfg.half_width is not None:
        d = float(cfg.half_width)
    else:
        raise ValueError("calibration.half_width: the local average needs preference pairs or a "
                         "half_width for its window")
    order = np.argsort(c, kind="stable")
    return {"method": "local_average", "alpha": cfg.alpha, "half_width": d,
            "min_neighbours": cfg.min_neighbours, "x": _as_float_list(c[order]),
            "r": _as_float_list(r[order])}


def bias(state: dict, lengths) -> np.ndarray:
    """b̂(c) of each length [n] (NaN where the local average has too few neighbours)."""
    c = np.asarray(lengths, np.float64).reshape(-1)
    x = np.asarray(state["x"], np.float64)
    if state["method"] == "lowess":
        idx = np.minimum(np.searchsorted(x, c, side="left"), len(x) - 1)
        return np.asarray(state["y"], np.float64)[idx]
    d = state["half_width"]
    lo, hi = np.searchsorted(x, c - d, "left"), np.searchsorted(x, c + d, "right")
    csum = np.concatenate([[0.0], np.cumsum(state["r"])])
    count = hi - lo
    mean = (csum[hi] - csum[lo]) / np.maximum(count, 1)
    return np.where(count >= state["min_neighbours"], mean, np.nan)


def apply(state: dict, lengths, rewards) -> np.ndarray:
    """r̃ = r̂ - α·b̂(c) (r̂ unchanged where b̂ is undefined) -> float64 [n]."""
    r = np.asarray(rewards, np.float64).reshape(-1)
    b = bias(state, lengths)
    return np.where(np.isnan(b), r, r - state["alpha"] * np.nan_to_num(b))


def apply_pairs(state: dict, c_chosen, r_chosen, c_rejected, r_rejected):
    """Calibrated (chosen, rejected) scores of preference pairs; under the local average a pair
    is calibrated only when both sides have enough neighbours (R1's pair rule), else both stay."""
    b_c, b_r = bias(state, c_chosen), bias(state, c_rejected)
    r_c = np.asarray(r_chosen, np.float64).reshape(-1)
    r_r = np.asarray(r_rejected, np.float64).reshape(-1)
    both = ~np.isnan(b_c) & ~np.isnan(b_r)
    a = state["alpha"]
    return (np.where(both, r_c - a * np.nan_to_num(b_c), r_c),
            np.where(both, r_r - a * np.nan_to_num(b_r), r_r))


def buffer_append(buffer: dict | None, lengths, rewards, capacity: int) -> dict:
    """The rolling pool of the last ``capacity`` (c, r̂) points, JSON-able (checkpoint it)."""
    if capacity < 1:
        _fail("calibration.buffer_capacity", capacity, "must be >= 1")
    old = buffer or {"lengths": [], "rewards": []}
    c = old["lengths"] + _as_float_list(lengths)
    r = old["rewards"] + _as_float_list(rewards)
    return {"lengths": c[-capacity:], "rewards": r[-capacity:]}


def bradley_terry_loss(r_chosen, r_rejected, margin: float = 0.0):
    """-mean log σ(r_c - r_r - margin) and the pair accuracy (r_c > r_r) -> (loss, metrics)."""
    diff = jnp.asarray(r_chosen, jnp.float32) - jnp.asarray(r_rejected, jnp.float32)
    loss = -jnp.mean(jax.nn.log_sigmoid(diff - margin))
    acc = jnp.mean((diff > 0).astype(jnp.float32))
    return loss, {"bt_loss": jax.lax.stop_gradient(loss), "bt_accuracy": acc}
