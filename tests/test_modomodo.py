"""MoDoMoDo's surrogates and simplex argmax (moejax.mixing.modomodo), the RL prompt stream's
family weights and prompt pool (rl.family_weights, rl.prompt_pool) and rollout_budget's
matched-token rule, against hand references (numpy only; no JAX program is built)."""

from __future__ import annotations

import itertools
import types

import numpy as np
import pytest

from experiments import rollout_budget
from moejax.config import ConfigError
from moejax.mixing import modomodo
from moejax.rl import tasks
from moejax.rl.config import BudgetConfig, RLConfig
from moejax.rl.collect import RolloutCollector


def _dirichlet(k: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(k), size=n)


def test_quadratic_fit_recovers_a_planted_quadratic_and_linear_does_not():
    """y = a + b.w + w'Cw (general a, b and C with a diagonal) is exactly a Scheffé quadratic on
    the simplex: the fit predicts held-out mixtures to 1e-9 and its coefficients are the
    closed-form ones (b_i + a + C_ii, 2C_ij - C_ii - C_jj); the linear fit cannot (R² < 0.99)."""
    k = 4
    rng = np.random.default_rng(0)
    a, b = 0.3, rng.normal(size=k)
    C = rng.normal(size=(k, k))
    C = (C + C.T) / 2

    def f(W):
        return a + W @ b + np.einsum("ni,ij,nj->n", W, C, W)
    W, Wt = _dirichlet(k, 30, 1), _dirichlet(k, 20, 2)
    quad = modomodo.fit_surrogate(W, f(W), "quadratic")
    np.testing.assert_allclose(quad(Wt), f(Wt), atol=1e-9)
    np.testing.assert_allclose(quad.b, a + b + np.diag(C), atol=1e-9)
    for i, j in itertools.combinations(range(k), 2):
        assert 2 * quad.C[i, j] == pytest.approx(2 * C[i, j] - C[i, i] - C[j, j], abs=1e-9)
    assert np.all(np.diag(quad.C) == 0)
    assert modomodo.evaluate(quad, Wt, f(Wt))["r2"] == pytest.approx(1.0, abs=1e-12)
    lin = modomodo.fit_surrogate(W, f(W), "linear")
    assert modomodo.evaluate(lin, Wt, f(Wt))["r2"] < 0.99


def test_linear_fit_recovers_a_planted_linear_function_with_noise():
    """y = a + b.w + noise(1e-3): the linear Scheffé coefficients are a + b_i within the noise;
    held-out Spearman is high; with too few pilots for the quadratic's 10 terms the fit refuses
    (naming the fix) unless ridge > 0."""
    k = 4
    rng = np.random.default_rng(3)
    a, b = -0.2, np.array([0.1, 0.5, -0.3, 0.9])
    W, Wt = _dirichlet(k, 40, 4), _dirichlet(k, 20, 5)
    y = a + W @ b + 1e-3 * rng.normal(size=40)
    lin = modomodo.fit_surrogate(W, y, "linear")
    np.testing.assert_allclose(lin.b, a + b, atol=5e-3)
    assert np.all(lin.C == 0)
    assert modomodo.evaluate(lin, Wt, a + Wt @ b)["spearman"] > 0.99
    with pytest.raises(ValueError, match="modomodo.num_pilots"):
        modomodo.fit_surrogate(W[:9], y[:9], "quadratic")
    assert modomodo.fit_surrogate(W[:9], y[:9], "quadratic", ridge=1e-3).b.shape == (k,)


def _grid(k: int, n: int) -> np.ndarray:
    """Every point of the simplex with coordinates in multiples of 1/n."""
    pts = [c for c in itertools.product(range(n + 1), repeat=k - 1) if sum(c) <= n]
    return np.array([[*c, n - sum(c)] for c in pts], np.float64) / n


@pytest.mark.parametrize("seed", range(6))
def test_simplex_argmax_matches_brute_force_on_a_grid(seed):
    """The face-enumeration argmax of random (indefinite) quadratics and of linear surrogates on
    3 and 4 families: on the simplex, at least the best grid value, and within the grid's
    resolution of it."""
    rng = np.random.default_rng(seed)
    k = 3 + seed % 2
    n = 60 if k == 3 else 24
    grid = _grid(k, n)
    C = rng.normal(size=(k, k))
    for s in (modomodo.Surrogate("quadratic", rng.normal(size=k), (C + C.T) / 2 * (seed < 4)),
              modomodo.Surrogate("linear", rng.normal(size=k), np.zeros((k, k)))):
        w, val = modomodo.argmax_simplex(s)
        assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
        assert val == pytest.approx(float(s(w)[0]))
        best = s(grid).max()
        assert val >= best - 1e-12
        # |f(x) - f(y)| <= max|grad f| * |x - y|_1 and the nearest grid point is within k/n
        assert val - best <= (np.abs(s.b).max() + 2 * np.abs(s.C).sum()) * k / n
    # f = w0 + w1 w2 - 2 w0 w1 (C's off-diagonal halves): its maximiser by a fine grid
    s = modomodo.Surrogate("quadratic", np.array([1.0, 0.0, 0.0]),
                           np.array([[0, -1, 0], [-1, 0, 0.5], [0, 0.5, 0.0]]))
    w, _ = modomodo.argmax_simplex(s)
    g = _grid(3, 300)
    np.testing.assert_allclose(w, g[np.argmax(s(g))], atol=2 / 300)
    # f = -|w|^2 + 0.1 w0: an interior maximiser, w = (1/3 + 0.1/3, 1/3 - 0.05/3, same)
    w, _ = modomodo.argmax_simplex(modomodo.Surrogate("quadratic", np.array([0.1, 0, 0]),
                                                      -np.eye(3)))
    np.testing.assert_allclose(w, [1 / 3 + 0.1 / 3, 1 / 3 - 0.05 / 3, 1 / 3 - 0.05 / 3])


def test_pilot_mixtures_are_seeded_dirichlet_draws_on_the_simplex():
    cfg = modomodo.ModoConfig(num_pilots=5, held_out=2, seed=7)
    mixes = modomodo.pilot_mixtures(("add", "sub", "sort"), cfg)
    assert list(mixes) == [f"pilot{i:03d}" for i in range(7)]
    W = np.array([list(m.values()) for m in mixes.values()])
    np.testing.assert_allclose(W.sum(1), 1.0)
    assert W.min() >= 0 and len({tuple(r) for r in W}) == 7
    assert mixes == modomodo.pilot_mixtures(("add", "sub", "sort"), cfg)
    with pytest.raises(ConfigError, match="modomodo.surrogate"):
        modomodo.ModoConfig(surrogate="cubic")


def _drawer(**rl) -> types.SimpleNamespace:
    """What RolloutCollector.items reads (its prompt-drawing region, without an engine or model)."""
    return types.SimpleNamespace(cfg=types.SimpleNamespace(rl=RLConfig(**rl)), file_items=None,
                                 methods={})


def test_family_weights_draw_families_at_their_frequencies():
    """rl.family_weights: each family's share of 4000 prompts is within 4 binomial sd of its
    normalised weight (a zero weight never drawn), tiers uniform within a family; a resumed
    cursor gives the same items; the default stream is unchanged."""
    fams = ("add", "sub", "multi", "sort")
    task_cfg = tasks.TaskConfig(families=fams, digits=(1, 2))
    w = (2.0, 1.0, 1.0, 0.0)
    t = _drawer(tasks=task_cfg, family_weights=w)
    items = RolloutCollector.items(t, 0, 4000)
    n = len(items)
    for f, wf in zip(fams, w):
        p = wf / sum(w)
        got = sum(it.family == f for it in items) / n
        assert abs(got - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-12, (f, got, p)
    adds = [it.tier for it in items if it.family == "add"]
    assert abs(adds.count("add-d1") / len(adds) - 0.5) < 4 * np.sqrt(0.25 / len(adds))
    assert RolloutCollector.items(t, 1234, 5) == items[1234:1239]
    plain = _drawer(tasks=task_cfg)
    assert RolloutCollector.items(plain, 0, 6) == [
        tasks.train_item(task_cfg, (1 << 40) + i) for i in range(6)]


def test_prompt_pool_cycles_the_first_items():
    t = _drawer(tasks=tasks.TaskConfig(families=("add", "sub")), prompt_pool=3)
    items = RolloutCollector.items(t, 0, 7)
    assert items[3:6] == items[:3] and items[6] == items[0]
    assert len({it.prompt for it in items}) == 3
    assert [tasks.pool_index(i, 0) for i in (0, 5)] == [0, 5]


def test_family_weights_and_prompt_pool_validate():
    fams = ("add", "sub")
    with pytest.raises(ConfigError, match="rl.family_weights"):
        RLConfig(tasks=tasks.TaskConfig(families=fams), family_weights=(1.0,))
    with pytest.raises(ConfigError, match="rl.family_weights"):
        RLConfig(tasks=tasks.TaskConfig(families=fams), family_weights=(1.0, -0.5))
    with pytest.raises(ConfigError, match="rl.family_weights"):
        RLConfig(tasks=tasks.TaskConfig(families=fams), family_weights=(0.0, 0.0))
    with pytest.raises(ConfigError, match="rl.family_weights"):
        RLConfig(tasks=tasks.TaskConfig(families=fams), family_weights=(1.0, 1.0),
                 budget=BudgetConfig(curriculum=True))
    with pytest.raises(ConfigError, match="rl.prompt_pool"):
        RLConfig(prompt_pool=-1)


def test_matched_token_rule_stops_each_arm_at_the_same_budget():
    """Cumulative tokens by hand; each arm is read at its last evaluation within the budget (the
    smallest total); a gap in the logged steps is refused."""
    long = rollout_budget.cumulative_tokens({1: 100, 2: 120, 3: 90, 4: 110})
    short = rollout_budget.cumulative_tokens({1: 50, 2: 60, 3: 70, 4: 80})
    assert long == {0: 0, 1: 100, 2: 220, 3: 310, 4: 420}
    assert short[4] == 260
    budget = min(long[4], short[4])  # 260
    assert rollout_budget.matched_eval_step([2, 4], long, budget) == 2  # 220 <= 260 < 420
    assert rollout_budget.matched_eval_step([2, 4], short, budget) == 4
    assert rollout_budget.matched_eval_step([3, 4], long, 200) == 0  # only the start fits
    # read at the budget: linear between the evaluations around it, the last one beyond them
    evals = [(0, 0.1), (220, 0.3), (420, 0.5)]
    assert rollout_budget.score_at_tokens(evals, 260) == pytest.approx(0.3 + 0.2 * 40 / 200)
    assert rollout_budget.score_at_tokens(evals, 220) == 0.3
    assert rollout_budget.score_at_tokens(evals, 500) == 0.5
    assert rollout_budget.first_reaching([(0, 0.1), (2, 0.3), (4, 0.5)], long, 0.3) == 220
    assert rollout_budget.first_reaching([(0, 0.1), (2, 0.3)], long, 0.6) is None
    with pytest.raises(ValueError, match="every step"):
        rollout_budget.cumulative_tokens({1: 5, 3: 5})


def test_step_stats_count_effective_rollouts_and_families():
    """A Knapsack-like step (groups of 3 and 2 rows): rows of the group with a non-zero advantage
    are effective; prompts are counted once per group, tokens per row."""
    it_a = tasks.TaskItem("add", "add-d1", "Q: 1+2=", "3", (1, 2), ("+",))
    it_s = tasks.TaskItem("sub", "sub-d1", "Q: 5-2=", "3", (5, 2), ("-",))
    r = types.SimpleNamespace(group=np.array([0, 0, 0, 1, 1]), items=[it_a] * 3 + [it_s] * 2,
                              completion_lengths=np.array([4, 5, 6, 7, 8]))
    out = rollout_budget.step_stats(r, np.array([0.5, -0.25, -0.25, 0.0, 0.0]))
    assert out["rollouts"] == 5 and out["effective_rollouts"] == 3
    assert out["families"] == {"add": {"prompts": [tasks.split_key(it_a)], "rollouts": 3,
                                       "tokens": 15},
                               "sub": {"prompts": [tasks.split_key(it_s)], "rollouts": 2,
                                       "tokens": 15}}
