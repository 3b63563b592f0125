"""RegMix (Liu et al., ICLR 2025; sail-sg/regmix): choose a static mixture offline.

1. ``sample_mixtures``: mixtures from a Dirichlet centred on the natural token distribution, its
   concentration drawn per sample from a log-spaced range (0.1-5.0, as sail-sg/regmix's
   ``synthesize_mixture.py``), so near-one-hot extremes appear next to near-natural ones.
2. ``run_sweep``: train one tiny proxy per mixture (the ordinary pretraining loop, launched by the
   experiment through ``run_one``); finished proxies are recorded atomically in a JSON state file,
   so an interrupted sweep resumes where it stopped.
3. ``fit_regressor`` (scikit-learn linear or LightGBM) maps mixture -> target loss; ``spearman``
   scores its ranking on held-out proxies.
4. ``choose_mixture``: simulate many candidates through the regressor and average the top-k
   (lowest predicted loss): the mixture handed to the target run.

scikit-learn and LightGBM are the ``fit`` extra; they are imported only by ``fit_regressor``.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import threading
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from moejax.mixing import check_domains, weights_by_name
from moejax.paths import as_path, read_json, write_text_atomic

# sail-sg/regmix synthesize_mixture.py: 15 strengths log-spaced in [0.1, 5.0], one drawn per sample
DEFAULT_CONCENTRATIONS = tuple(float(c) for c in np.logspace(math.log10(0.1), math.log10(5.0), 15))


def check_distribution(natural: Sequence[float]) -> np.ndarray:
    """``natural`` as a float64 probability vector; every entry must be > 0 (a Dirichlet's
    centre), else ValueError naming the entry."""
    p = np.asarray(natural, np.float64)
    if p.ndim != 1 or p.size < 2:
        raise ValueError(f"natural={natural!r}: give one weight per domain (at least 2)")
    bad = np.flatnonzero(~(p > 0) | ~np.isfinite(p))
    if bad.size:
        raise ValueError(f"natural[{bad[0]}]={p[bad[0]]!r}: every domain's natural share must "
                         "be a finite number > 0")
    return p / p.sum()


def sample_mixtures(natural: Sequence[float], n: int,
                    concentrations: Sequence[float] = DEFAULT_CONCENTRATIONS,
                    seed: int = 0) -> np.ndarray:
    """[n, k] mixtures: row i ~ Dirichlet(c_i * natural), c_i drawn uniformly from
    ``concentrations`` (so every row has mean ``natural``; small c gives extremes). Deterministic
    in ``seed``."""
    p = check_distribution(natural)
    conc = np.asarray(concentrations, np.float64)
    if conc.ndim != 1 or conc.size == 0 or not np.all(conc > 0):
        raise ValueError(f"concentrations={concentrations!r}: give one or more values > 0")
    if n < 1:
        raise ValueError(f"n={n}: sample at least one mixture")
    rng = np.random.default_rng(seed)
    which = rng.integers(conc.size, size=n)  # [n] index of each row's concentration
    out = np.empty((n, p.size))
    for i, c in enumerate(conc):
        rows = np.flatnonzero(which == i)
        if rows.size:
            out[rows] = rng.dirichlet(p * c, size=rows.size)
    return out


def proxy_mixtures(domains: Sequence[str], natural: Sequence[float], n: int, *,
                   concentrations: Sequence[float] = DEFAULT_CONCENTRATIONS,
                   seed: int = 0) -> dict[str, dict[str, float]]:
    """``{"proxy000": {domain: weight}, ...}``: ``n`` sampled mixtures named for a sweep."""
    domains = check_domains(domains, minimum=2)
    mixes = sample_mixtures(natural, n, concentrations, seed)
    return {f"proxy{i:03d}": weights_by_name(domains, m) for i, m in enumerate(mixes)}


def lgbm_params(num_samples: int, seed: int) -> dict:
    """LightGBM settings for tens to hundreds of proxies: shallow trees, leaves of a few samples
    (the default 20 would leave 64 proxies nearly unsplit), single-threaded and deterministic."""
    return dict(n_estimators=400, learning_rate=0.05, num_leaves=8,
                min_child_samples=max(2, min(20, num_samples // 8)), subsample=1.0,
                colsample_bytree=1.0, random_state=seed, deterministic=True,
                force_row_wise=True, n_jobs=1, verbose=-1)


def fit_regressor(X: np.ndarray, y: np.ndarray, kind: Literal["linear", "lgbm"] = "linear",
                  seed: int = 0):
    """A fitted regressor of target loss ``y`` [n] on mixtures ``X`` [n, k]: scikit-learn's
    LinearRegression or LightGBM's LGBMRegressor (``lgbm_params``)."""
    X, y = np.asarray(X, np.float64), np.asarray(y, np.float64)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"X {X.shape} and y {y.shape}: give X [n, k] and y [n]")
    if kind == "linear":
        from sklearn.linear_model import LinearRegression
        model = LinearRegression()
    elif kind == "lgbm":
        from lightgbm import LGBMRegressor
        model = LGBMRegressor(**lgbm_params(len(y), seed))
    else:
        raise ValueError(f"kind={kind!r}: choose 'linear' or 'lgbm'")
    return model.fit(X, y)


def predict(model, X: np.ndarray) -> np.ndarray:
    """Predicted target loss [n] of mixtures ``X`` [n, k]."""
    return np.asarray(model.predict(np.asarray(X, np.float64)), np.float64)


def choose_mixture(model, natural: Sequence[float], n_candidates: int = 100_000,
                   top_k: int = 100, concentrations: Sequence[float] = DEFAULT_CONCENTRATIONS,
                   seed: int = 0) -> np.ndarray:
    """The mixture [k] for the target run: the mean of the ``top_k`` of ``n_candidates``
    Dirichlet candidates with the lowest predicted loss (averaging steadies the regressor's noise
    near the optimum)."""
    if not 1 <= top_k <= n_candidates:
        raise ValueError(f"top_k={top_k}: must lie in [1, n_candidates={n_candidates}]")
    candidates = sample_mixtures(natural, n_candidates, concentrations, seed)
    best = np.argsort(predict(model, candidates), kind="stable")[:top_k]
    mix = candidates[best].mean(axis=0)
    return mix / mix.sum()


def spearman(pred: Sequence[float], actual: Sequence[float]) -> float:
    """Spearman rank correlation of predicted and measured losses (scipy)."""
    from scipy.stats import spearmanr
    return float(spearmanr(np.asarray(pred), np.asarray(actual)).statistic)


# -- the proxy sweep ----------------------------------------------------------------------------
class SweepState:
    """Which proxies of a sweep are done and their results, in one JSON file
    ``{"configs": {name: config}, "results": {name: result}}`` rewritten whole (atomically) after
    every finished proxy, so a crash never leaves it half-written."""

    def __init__(self, path: str | os.PathLike):
        self.path = as_path(path)
        saved = read_json(self.path) or {}
        self.configs: dict[str, Any] = saved.get("configs", {})
        self.results: dict[str, Any] = saved.get("results", {})
        self._lock = threading.Lock()

    def check(self, configs: Mapping[str, Any]) -> None:
        """Refuse to resume a sweep whose finished proxy had another config (a stale state
        file), naming the proxy."""
        for name, cfg in configs.items():
            before = self.configs.get(name)
            if before is not None and before != _json_roundtrip(cfg):
                raise ValueError(f"{self.path}: proxy {name!r} was run with config {before!r}, "
                                 f"now {cfg!r}; use a new state path or restore the config")

    def done(self, name: str) -> bool:
        return name in self.results

    def record(self, name: str, config: Any, result: Any) -> None:
        """Add one finished proxy and rewrite the file (thread-safe)."""
        with self._lock:
            self.configs[name] = _json_roundtrip(config)
            self.results[name] = _json_roundtrip(result)
            text = json.dumps({"configs": self.configs, "results": self.results}, indent=1,
                              sort_keys=True)
            write_text_atomic(self.path, text)


def _json_roundtrip(x: Any) -> Any:
    """``x`` as it reads back from JSON (tuples -> lists), so saved and new configs compare."""
    return json.loads(json.dumps(x))


def run_sweep(configs: Mapping[str, Any], run_one: Callable[[str, Any], Any],
              state_path: str | os.PathLike, *, max_workers: int = 1) -> dict[str, Any]:
    """Run ``run_one(name, config)`` for every proxy not yet finished in ``state_path`` and
    record each JSON-able result as soon as it returns; ``max_workers`` > 1 runs proxies
    concurrently (threads: ``run_one`` may launch a subprocess). Returns ``{name: result}`` in
    ``configs`` order."""
    if max_workers < 1:
        raise ValueError(f"max_workers={max_workers}: must be >= 1")
    state = SweepState(state_path)
    state.check(configs)
    todo = [name for name in configs if not state.done(name)]

    def one(name: str) -> None:
        state.record(name, configs[name], run_one(name, configs[name]))

    if max_workers == 1:
        for name in todo:
            one(name)
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
            for f in [pool.submit(one, name) for name in todo]:
                f.result()  # re-raise the first failure (finished proxies stay recorded)
    return {name: state.results[name] for name in configs}
