"""MoDoMoDo (Liang et al., arXiv 2505.24871; methods/rl-and-data.md C.1): choose a static RL data
mixture over task families from pilot RL runs.

1. ``pilot_mixtures``: Dirichlet draws on the simplex centred on the uniform mixture, with
   RegMix's per-sample concentration (``regmix.sample_mixtures``), so near-one-family pilots
   appear next to near-uniform ones.
2. The pilots are short RL runs on those mixtures (the experiment runs them through
   ``regmix.run_sweep``: resumable, a finished pilot reused only when its config matches); each
   gives a final score y (higher is better).
3. ``fit_surrogate``: the score as a linear or quadratic function of the weights. On the simplex
   (Σ w = 1) the intercept and the squares are not identifiable, so both are fitted in Scheffé's
   canonical mixture form: linear f(w) = Σ b_i w_i (= a + bᵀw), quadratic
   f(w) = Σ b_i w_i + Σ_{i<j} c_ij w_i w_j (= a + bᵀw + wᵀCw for any a, b, C), by least squares
   (scikit-learn; optional ridge).
4. ``evaluate``: R² and Spearman of a surrogate on held-out pilots.
5. ``argmax_simplex``: the exact maximiser of a (linear or quadratic) surrogate over the simplex:
   the maximum lies in the relative interior of some face, where it is a stationary point of the
   surrogate restricted to that face (a KKT linear system); every face is tried.

numpy/scikit-learn only (the ``fit`` extra); no JAX.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np

from moejax.config_checks import _check_choice, _fail
from moejax.mixing import check_domains, regmix, weights_by_name

SURROGATES = ("linear", "quadratic")
MAX_FACES_FAMILIES = 16  # argmax_simplex enumerates 2^k - 1 faces


@dataclasses.dataclass(frozen=True)
class ModoConfig:
    """The pilot sweep and the surrogate: ``num_pilots`` fitted + ``held_out`` scored pilots of
    ``pilot_steps`` RL steps each; the mixture is the argmax of ``surrogate`` refitted on all
    pilots (``ridge`` > 0: an L2 penalty on the coefficients)."""

    num_pilots: int = 12
    held_out: int = 4
    pilot_steps: int = 20
    concentrations: tuple[float, ...] = regmix.DEFAULT_CONCENTRATIONS
    seed: int = 0
    surrogate: str = "quadratic"
    ridge: float = 0.0

    def __post_init__(self):
        if self.num_pilots < 2:
            _fail("modomodo.num_pilots", self.num_pilots, "must be >= 2")
        if self.held_out < 0:
            _fail("modomodo.held_out", self.held_out, "must be >= 0")
        if self.pilot_steps < 1:
            _fail("modomodo.pilot_steps", self.pilot_steps, "must be >= 1")
        if not self.concentrations or not all(c > 0 for c in self.concentrations):
            _fail("modomodo.concentrations", self.concentrations, "give one or more values > 0")
        _check_choice("modomodo.surrogate", self.surrogate, SURROGATES)
        if not self.ridge >= 0:
            _fail("modomodo.ridge", self.ridge, "must be >= 0")

    @property
    def sweep_fields(self) -> dict:
        """The fields that decide which pilots run (the rest only change the fit)."""
        return {k: getattr(self, k) for k in ("num_pilots", "held_out", "pilot_steps",
                                               "concentrations", "seed")}


def pilot_mixtures(families: Sequence[str], cfg: ModoConfig) -> dict[str, dict[str, float]]:
    """``{"pilot000": {family: weight}, ...}``: num_pilots + held_out Dirichlet draws around the
    uniform mixture (the first num_pilots are fitted, the rest held out)."""
    families = check_domains(families, minimum=2)
    k = len(families)
    mixes = regmix.sample_mixtures(np.full(k, 1.0 / k), cfg.num_pilots + cfg.held_out,
                                   cfg.concentrations, cfg.seed)
    return {f"pilot{i:03d}": weights_by_name(families, m) for i, m in enumerate(mixes)}


# -- surrogates ---------------------------------------------------------------------------------


def num_terms(k: int, kind: str) -> int:
    """Coefficients of the Scheffé form over k weights: k (linear), k + k(k-1)/2 (quadratic)."""
    return k if kind == "linear" else k + k * (k - 1) // 2


def scheffe_features(W: np.ndarray, kind: str) -> np.ndarray:
    """[n, k] weights -> [n, num_terms]: w_i, then (quadratic) w_i w_j for i < j."""
    W = np.asarray(W, np.float64)
    if kind == "linear":
        return W
    pairs = [W[:, i] * W[:, j] for i, j in itertools.combinations(range(W.shape[1]), 2)]
    return np.column_stack([W, *pairs]) if pairs else W


@dataclasses.dataclass(frozen=True)
class Surrogate:
    """f(w) = bᵀw + wᵀCw on the simplex (C symmetric, zero diagonal; 0 for the linear one)."""

    kind: str
    b: np.ndarray  # [k]
    C: np.ndarray  # [k, k]

    def __call__(self, W) -> np.ndarray:
        """Predicted scores [n] of weights [n, k] (or one [k] -> [1])."""
        W = np.atleast_2d(np.asarray(W, np.float64))
        return W @ self.b + np.einsum("ni,ij,nj->n", W, self.C, W)

    def to_json(self) -> dict:
        return {"kind": self.kind, "b": self.b.tolist(), "C": self.C.tolist()}


def fit_surrogate(W, y, kind: str = "quadratic", ridge: float = 0.0) -> Surrogate:
    """Least-squares (ridge > 0: L2-penalised) Scheffé fit of scores ``y`` [n] on mixtures
    ``W`` [n, k] (rows on the simplex)."""
    from sklearn.linear_model import LinearRegression, Ridge

    _check_choice("modomodo.surrogate", kind, SURROGATES)
    W, y = np.asarray(W, np.float64), np.asarray(y, np.float64)
    if W.ndim != 2 or y.shape != (W.shape[0],):
        raise ValueError(f"W {W.shape} and y {y.shape}: give W [n, k] and y [n]")
    k, n = W.shape[1], W.shape[0]
    if ridge == 0 and n < num_terms(k, kind):
        raise ValueError(f"a {kind} surrogate over {k} families has {num_terms(k, kind)} "
                         f"coefficients; {n} pilots cannot determine them: add pilots "
                         "(modomodo.num_pilots) or set modomodo.ridge > 0")
    model = (LinearRegression(fit_intercept=False) if ridge == 0
             else Ridge(alpha=ridge, fit_intercept=False))
    coef = model.fit(scheffe_features(W, kind), y).coef_
    C = np.zeros((k, k))
    for c, (i, j) in zip(coef[k:], itertools.combinations(range(k), 2)):
        C[i, j] = C[j, i] = c / 2.0
    return Surrogate(kind, np.asarray(coef[:k], np.float64), C)


def evaluate(s: Surrogate, W, y) -> dict[str, float]:
    """R² and Spearman of the surrogate's predictions on (held-out) pilots; nan when undefined
    (fewer than 2 pilots, or constant scores)."""
    y = np.asarray(y, np.float64)
    if len(y) < 2 or np.ptp(y) == 0:
        return {"r2": float("nan"), "spearman": float("nan")}
    pred = s(W)
    r2 = 1.0 - float(np.sum((y - pred) ** 2)) / float(np.sum((y - y.mean()) ** 2))
    rho = regmix.spearman(pred, y) if np.ptp(pred) > 0 else float("nan")
    return {"r2": r2, "spearman": rho}


# -- the mixture --------------------------------------------------------------------------------


def _face_stationary_point(s: Surrogate, face: tuple[int, ...]) -> np.ndarray | None:
    """The stationary point of f on the affine hull of ``face`` (b_F + 2 C_FF w_F = λ 1,
    Σ w_F = 1) as a full [k] vector, or None when the system is singular or the point leaves the
    face (some w_F < 0)."""
    m = len(face)
    A = np.zeros((m + 1, m + 1))
    A[:m, :m] = 2.0 * s.C[np.ix_(face, face)]
    A[:m, m] = -1.0
    A[m, :m] = 1.0
    rhs = np.concatenate([-s.b[list(face)], [1.0]])
    if np.linalg.matrix_rank(A) < m + 1:
        return None  # a flat direction: the face's maximum is also on a smaller face
    sol = np.linalg.solve(A, rhs)
    if np.any(sol[:m] < -1e-12):
        return None
    w = np.zeros(len(s.b))
    w[list(face)] = np.clip(sol[:m], 0.0, None)
    return w / w.sum()


def argmax_simplex(s: Surrogate) -> tuple[np.ndarray, float]:
    """(w* [k], f(w*)): the exact maximiser of the surrogate over the simplex, by the stationary
    points of every face (2^k - 1 small linear systems; vertices always qualify)."""
    k = len(s.b)
    if k > MAX_FACES_FAMILIES:
        raise ValueError(f"{k} families: face enumeration is for <= {MAX_FACES_FAMILIES}")
    best, best_val = None, -np.inf
    for m in range(1, k + 1):
        for face in itertools.combinations(range(k), m):
            w = _face_stationary_point(s, face)
            if w is not None:
                val = float(s(w)[0])
                if val > best_val:
                    best, best_val = w, val
    return best, best_val


def fit_report(families: Sequence[str], W_fit, y_fit, W_held, y_held,
               cfg: ModoConfig) -> dict:
    """Both surrogates fitted on the fit pilots and scored on the held-out ones, then refitted on
    every pilot; the mixture = argmax of ``cfg.surrogate`` (JSON-able, weights by family)."""
    W_all = np.concatenate([np.asarray(W_fit), np.asarray(W_held).reshape(-1, len(families))])
    y_all = np.concatenate([np.asarray(y_fit), np.asarray(y_held)])
    out = {"families": list(families), "surrogates": {}}
    for kind in SURROGATES:
        held = fit_surrogate(W_fit, y_fit, kind, cfg.ridge)
        full = fit_surrogate(W_all, y_all, kind, cfg.ridge)
        w, val = argmax_simplex(full)
        out["surrogates"][kind] = {
            "held_out": evaluate(held, W_held, y_held) if len(y_held) else
            {"r2": float("nan"), "spearman": float("nan")},
            "train_r2": evaluate(held, W_fit, y_fit)["r2"],
            "fit": full.to_json(), "argmax": weights_by_name(families, w),
            "predicted": val,
            "predicted_uniform": float(full(np.full(len(families), 1 / len(families)))[0])}
    out["chosen"] = out["surrogates"][cfg.surrogate]["argmax"]
    return out
