"""Rollout budget and curriculum rules (methods/rl-and-data.md B.4), host-side numpy with JSON-able
state dicts (checkpointed with the run) and explicit ``np.random.Generator`` draws (the trainer
keys them ``np.random.default_rng([seed, step, BUDGET_SALT])``).

- Success buffer: per-prompt recent outcomes (window 16, estimate from >= 8) -> p̂ (Knapsack's
  estimate, offline difficulty filtering).
- Difficulty filtering: keep prompts whose p̂ lies in a band ([lo, hi], ODF) or strictly inside
  (0, 1) (DAPO); online (ODF) from the step's own G rollouts, offline from the buffer.
- Self-evolving curriculum (SEC): Q(c) <- α·r(c) + (1-α)·Q(c) with r(c) = mean |Â| of the arm's
  rollouts this step; arms drawn with P(c) ∝ exp(Q(c)/τ).
- Knapsack RL: N_i maximising Σ v(N_i, p_i), v(N, p) = (1 - p^N - (1-p)^N)·p(1-p)², with
  Σ N_i = budget and min_n <= N_i <= max_n, by an exact DP over the extra units; p = 0 / p = 1
  prompts get negative_n / positive_n, prompts without an estimate the mean n̄; surplus over the
  estimated cost goes to p = 0 prompts ("fallback") as in the released code [K1].
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from moejax.config_checks import _check_choice, _fail

BUDGET_SALT = 0xB0D6
FILTER_RULES = ("band", "open", "none")
BASE_VALUES = ("counted", "released")


# -- success buffer ----------------------------------------------------------------------------


def success_buffer(window: int = 16, min_count: int = 8) -> dict:
    """An empty per-prompt outcome buffer (JSON-able): the last ``window`` outcomes per key."""
    if window < 1 or not 1 <= min_count <= window:
        _fail("budget.min_count", min_count, f"must be in [1, window={window}] with window >= 1")
    return {"window": window, "min_count": min_count, "history": {}}


def record_outcomes(buffer: dict, keys, outcomes) -> dict:
    """A new buffer with each (key, outcome in [0, 1]) appended in order, windows trimmed."""
    history = {k: list(v) for k, v in buffer["history"].items()}
    for key, o in zip(keys, np.asarray(outcomes, np.float64).reshape(-1)):
        h = history.setdefault(str(key), [])
        h.append(float(o))
        del h[:-buffer["window"]]
    return {**buffer, "history": history}


def success_rates(buffer: dict, keys) -> tuple[np.ndarray, np.ndarray]:
    """(p̂ [n], valid [n]): mean buffered outcome per key; valid with >= min_count outcomes."""
    hist = [buffer["history"].get(str(k), []) for k in keys]
    valid = np.array([len(h) >= buffer["min_count"] for h in hist])
    p = np.array([float(np.mean(h)) if h else 0.0 for h in hist])
    return p, valid


# -- difficulty filtering ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DifficultyFilterConfig:
    """Which prompts train: p̂ in [low, hi] (band, ODF), 0 < p̂ < 1 (open, DAPO), or all."""

    rule: str = "band"
    low: float = 0.25  # OURS (ODF's values were not retrieved)
    high: float = 0.75

    def __post_init__(self):
        _check_choice("budget.filter.rule", self.rule, FILTER_RULES)
        if not 0.0 <= self.low <= self.high <= 1.0:
            _fail("budget.filter.low", (self.low, self.high), "need 0 <= low <= high <= 1")


def difficulty_keep(rates, cfg: DifficultyFilterConfig) -> np.ndarray:
    """Keep mask [n] for success rates [n] under the rule."""
    p = np.asarray(rates, np.float64)
    if cfg.rule == "none":
        return np.ones(p.shape, bool)
    if cfg.rule == "open":
        return (p > 0.0) & (p < 1.0)
    return (p >= cfg.low) & (p <= cfg.high)


def group_success_rates(outcomes, group, num_groups: int) -> np.ndarray:
    """p̂ of each group from this step's rollouts (online filtering) -> [num_groups]."""
    group = np.asarray(group).reshape(-1)
    size = np.bincount(group, minlength=num_groups)
    hits = np.bincount(group, weights=np.asarray(outcomes, np.float64), minlength=num_groups)
    return hits / np.maximum(size, 1)


def offline_keep(buffer: dict, keys, cfg: DifficultyFilterConfig) -> np.ndarray:
    """Keep mask for candidate prompts from their buffered p̂; prompts without an estimate stay."""
    p, valid = success_rates(buffer, keys)
    return ~valid | difficulty_keep(p, cfg)


# -- self-evolving curriculum ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CurriculumConfig:
    """SEC's bandit: EMA step α, Boltzmann temperature τ, initial Q (OURS: 0.5, 1.0, 0)."""

    alpha: float = 0.5
    tau: float = 1.0
    q0: float = 0.0

    def __post_init__(self):
        if not 0.0 < self.alpha <= 1.0:
            _fail("budget.curriculum.alpha", self.alpha, "must be in (0, 1]")
        if not self.tau > 0:
            _fail("budget.curriculum.tau", self.tau, "must be > 0")


def curriculum_init(arms, cfg: CurriculumConfig = CurriculumConfig()) -> dict:
    """The Q-table {arm: Q0} (JSON-able; arms are task families or tiers)."""
    if not arms:
        raise ValueError("budget.curriculum: needs at least one arm")
    return {"q": {str(a): float(cfg.q0) for a in arms}}


def arm_rewards(arms_of_rows, advantages) -> dict[str, float]:
    """r(c) = mean |Â| over the rollouts drawn from each arm this step."""
    adv = np.abs(np.asarray(advantages, np.float64).reshape(-1))
    arms = np.asarray([str(a) for a in arms_of_rows])
    return {a: float(adv[arms == a].mean()) for a in sorted(set(arms.tolist()))}


def curriculum_update(state: dict, rewards: dict[str, float], cfg: CurriculumConfig) -> dict:
    """Q(c) <- α r(c) + (1 - α) Q(c) for the arms with a reward this step (others unchanged)."""
    q = dict(state["q"])
    for a, r in rewards.items():
        if a not in q:
            raise KeyError(f"arm {a!r} is not in the curriculum's arms {sorted(q)}")
        q[a] = cfg.alpha * float(r) + (1.0 - cfg.alpha) * q[a]
    return {**state, "q": q}


def curriculum_probs(state: dict, cfg: CurriculumConfig) -> dict[str, float]:
    """P(c) ∝ exp(Q(c)/τ) (stable softmax), arms in the table's order."""
    arms = list(state["q"])
    z = np.array([state["q"][a] for a in arms]) / cfg.tau
    w = np.exp(z - z.max())
    return dict(zip(arms, (w / w.sum()).tolist()))


def curriculum_sample(state: dict, n: int, cfg: CurriculumConfig,
                      rng: np.random.Generator) -> list[str]:
    """The arm of each of ``n`` batch slots (draw an arm, then the trainer draws a problem)."""
    probs = curriculum_probs(state, cfg)
    arms = list(probs)
    return [arms[i] for i in rng.choice(len(arms), size=n, p=np.array(list(probs.values())))]


# -- Knapsack RL -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KnapsackConfig:
    """Knapsack RL budget allocation (K-script defaults)."""

    mean_n: int = 8  # n̄: budget = prompts · n̄, and prompts without an estimate get n̄
    min_n: int = 2
    max_n: int = 128
    negative_n: int | None = None  # p = 0 prompts (None: min_n)
    positive_n: int | None = None  # p = 1 prompts (None: min_n)
    alpha: float = 0.9  # confidence of seeing both outcomes, for the cost estimate
    fallback: bool = True  # budget beyond the estimated cost goes to p = 0 prompts
    # counted: Σ v(N_i, p_i) as the spec; released: an item left at min_n scores 0 in the DP
    base_value: str = "counted"

    def __post_init__(self):
        if not 1 <= self.min_n <= self.mean_n <= self.max_n:
            _fail("budget.knapsack.min_n", (self.min_n, self.mean_n, self.max_n),
                  "need 1 <= min_n <= mean_n <= max_n")
        for name in ("negative_n", "positive_n"):
            v = getattr(self, name)
            if v is not None and v < 1:
                _fail(f"budget.knapsack.{name}", v, "must be >= 1, or None for min_n")
        if not 0.0 < self.alpha < 1.0:
            _fail("budget.knapsack.alpha", self.alpha, "must be in (0, 1)")
        _check_choice("budget.knapsack.base_value", self.base_value, BASE_VALUES)


def knapsack_value(n, p):
    """v(N, p) = (1 - p^N - (1-p)^N) · p(1-p)²: the chance of a signal times a gradient proxy."""
    n, p = np.asarray(n, np.float64), np.asarray(p, np.float64)
    return (1.0 - p ** n - (1.0 - p) ** n) * p * (1.0 - p) ** 2


def knapsack_cost(p: float, alpha: float, max_n: int) -> int:
    """Rollouts to see both outcomes with confidence α: int(min(max_n, log(1-α)/log max(p,1-p)))."""
    return int(min(max_n, math.log(1.0 - alpha) / math.log(max(p, 1.0 - p))))


def _spread(alloc: np.ndarray, rows: np.ndarray, amount: int) -> None:
    """Add ``amount`` units over ``rows`` evenly, the remainder to the first rows (in place)."""
    share, rem = divmod(amount, len(rows))
    alloc[rows] += share
    alloc[rows[:rem]] += 1


def _dp_extra(p: np.ndarray, budget: int, cfg: KnapsackConfig) -> tuple[np.ndarray, float]:
    """Exact DP: extra units e_i in [0, max_n - min_n] with Σ e_i = budget maximising
    Σ gain_i(e_i) -> (e [n], value)."""
    cap = cfg.max_n - cfg.min_n
    k = np.arange(cap + 1)
    dp = np.full(budget + 1, -np.inf)
    dp[0] = 0.0
    choices = []
    for pi in p:
        gain = knapsack_value(cfg.min_n + k, pi)
        if cfg.base_value == "released":
            gain[0] = 0.0
        cand = np.full((cap + 1, budget + 1), -np.inf)
        for kk in range(min(cap, budget) + 1):
            cand[kk, kk:] = dp[:budget + 1 - kk] + gain[kk]
        choice = np.argmax(cand, axis=0)
        choices.append(choice)
        dp = cand[choice, np.arange(budget + 1)]
    extra, w = np.zeros(len(p), np.int64), budget
    for i in range(len(p) - 1, -1, -1):
        extra[i] = choices[i][w]
        w -= extra[i]
    return extra, float(dp[budget])


def knapsack_allocate(p, valid, cfg: KnapsackConfig = KnapsackConfig(),
                      total: int | None = None) -> tuple[np.ndarray, dict]:
    """Rollouts per prompt N [n] (Σ = ``total``, default n·mean_n) and info {fallback, value,
    effective} from success estimates ``p`` [n] and their ``valid`` mask [n]."""
    p = np.asarray(p, np.float64).reshape(-1)
    valid = np.asarray(valid, bool).reshape(-1)
    if p.size == 0 or p.shape != valid.shape:
        raise ValueError(f"p {p.shape} and valid {valid.shape} must be equal and non-empty")
    total = len(p) * cfg.mean_n if total is None else int(total)
    neg = cfg.min_n if cfg.negative_n is None else cfg.negative_n
    pos = cfg.min_n if cfg.positive_n is None else cfg.positive_n
    effective = valid & (p > 0) & (p < 1)
    zero = valid & (p == 0)
    alloc = np.where(~valid, cfg.mean_n, np.where(effective, cfg.min_n, np.where(zero, neg, pos)))
    alloc = alloc.astype(np.int64)
    remaining = total - int(alloc.sum())
    if remaining < 0:
        raise ValueError(f"budget.knapsack: a budget of {total} rollouts is below the "
                         f"{int(alloc.sum())} the minimum allocations need; lower min_n/negative_n/"
                         "positive_n or raise mean_n")
    # surplus rollouts go to the p = 0 prompts, or without them to the other non-DP prompts [K1]
    others = np.flatnonzero(zero) if zero.any() else np.flatnonzero(~effective)
    info = {"fallback": False, "effective": int(effective.sum()), "value": 0.0}
    eff = np.flatnonzero(effective)
    if len(eff) == 0:
        _spread(alloc, others if len(others) else np.arange(len(p)), remaining)
        return alloc, info
    if cfg.fallback and len(others):
        estimated = sum(knapsack_cost(float(p[i]), cfg.alpha, cfg.max_n) for i in eff)
        if estimated < remaining:
            _spread(alloc, others, remaining - estimated)
            remaining, info["fallback"] = estimated, True
    usable = min(remaining, len(eff) * (cfg.max_n - cfg.min_n))
    if usable < remaining:
        if not len(others):
            raise ValueError(f"budget.knapsack.max_n={cfg.max_n}: {remaining} extra rollouts do "
                             f"not fit {len(eff)} prompts at max_n each; raise max_n")
        _spread(alloc, others, remaining - usable)
    extra, _ = _dp_extra(p[eff], usable, cfg)
    alloc[eff] += extra
    info["value"] = float(np.sum(knapsack_value(alloc[eff], p[eff])))
    return alloc, info
