"""moejax.mixing against plain references: RegMix's Dirichlet statistics (mean, per-component
variance by the Dirichlet formula, within sampling error), its regressors on planted laws, the
top-k choice, the resumable sweep; Aioli's pieces by hand and on a planted linear law; DGA's update
on hand-made gradients and its one jitted alignment program (8 devices == 1 device == a float64
numpy reference); every mixer's state() / load_state() resuming bit-identically mid-round."""

import dataclasses
import json
import os
import signal

import jax
import numpy as np
import pytest

from moejax import train as T
from moejax.config import ConfigError, MeshConfig
from moejax.mesh import make_mesh
from moejax.metrics import read_metrics
from moejax.mixing import aioli, dga, regmix
from moejax.testing import setup_for, tiny_config, tiny_model
from moejax.trainer import Trainer

NATURAL = np.array([0.5, 0.3, 0.15, 0.05])


# -- RegMix: sampling ----------------------------------------------------------------------------
def _within_sampling_error(X: np.ndarray, mean: np.ndarray, var: np.ndarray, sigmas=5.0):
    """Sample mean and variance per column against the expected ones, each within ``sigmas``
    standard errors (the variance's from the sample's 4th central moment)."""
    n = X.shape[0]
    np.testing.assert_array_less(np.abs(X.mean(0) - mean), sigmas * np.sqrt(var / n))
    centred = X - X.mean(0)
    m4 = (centred ** 4).mean(0)
    s2 = X.var(0, ddof=1)
    np.testing.assert_array_less(np.abs(s2 - var), sigmas * np.sqrt((m4 - s2 ** 2) / n))


def test_dirichlet_mean_and_variance_one_concentration():
    c = 2.0
    X = regmix.sample_mixtures(NATURAL, 20_000, concentrations=[c], seed=0)
    np.testing.assert_allclose(X.sum(1), 1.0, rtol=1e-12)
    assert np.all(X >= 0)
    _within_sampling_error(X, NATURAL, NATURAL * (1 - NATURAL) / (c + 1))


def test_dirichlet_statistics_over_the_concentration_range():
    """Every concentration has mean ``natural``, so the mixture's variance is the mean over the
    concentrations of n(1-n)/(c+1); small concentrations give near-one-hot mixtures."""
    conc = np.asarray(regmix.DEFAULT_CONCENTRATIONS)
    np.testing.assert_allclose([conc[0], conc[-1]], [0.1, 5.0])
    X = regmix.sample_mixtures(NATURAL, 30_000, seed=1)
    var = (NATURAL * (1 - NATURAL))[None] / (conc[:, None] + 1)
    _within_sampling_error(X, NATURAL, var.mean(0))
    assert (X.max(1) > 0.99).mean() > 0.05  # extremes appear
    np.testing.assert_array_equal(X, regmix.sample_mixtures(NATURAL, 30_000, seed=1))
    assert not np.array_equal(X, regmix.sample_mixtures(NATURAL, 30_000, seed=2))


@pytest.mark.parametrize("natural, match", [([0.5, 0.0, 0.5], r"natural\[1\]"),
                                            ([0.5, -0.1, 0.6], r"natural\[1\]"),
                                            ([1.0], "at least 2")])
def test_bad_natural_distribution_names_the_entry(natural, match):
    with pytest.raises(ValueError, match=match):
        regmix.sample_mixtures(natural, 4)


def test_proxy_mixtures_are_named_and_sum_to_one():
    mixes = regmix.proxy_mixtures(["a", "b", "c"], [1, 2, 1], 3, seed=0)
    assert list(mixes) == ["proxy000", "proxy001", "proxy002"]
    for m in mixes.values():
        assert list(m) == ["a", "b", "c"] and abs(sum(m.values()) - 1) < 1e-12


# -- RegMix: regression and choice ---------------------------------------------------------------
W_TRUE = np.array([2.0, 3.5, 1.0, 5.0])  # loss per unit of each domain's share


def _linear_law(X, seed):
    return X @ W_TRUE + 0.7 + 0.01 * np.random.default_rng(seed).standard_normal(len(X))


@pytest.mark.parametrize("kind, n_train, min_rho", [("linear", 64, 0.95), ("lgbm", 256, 0.95)])
def test_regressor_recovers_a_planted_linear_law(kind, n_train, min_rho):
    X = regmix.sample_mixtures(NATURAL, n_train, seed=3)
    X_test = regmix.sample_mixtures(NATURAL, 64, seed=4)
    model = regmix.fit_regressor(X, _linear_law(X, 0), kind=kind)
    rho = regmix.spearman(regmix.predict(model, X_test), _linear_law(X_test, 1))
    assert rho >= min_rho, rho
    if kind == "linear":  # shares sum to 1: coefficients are identified up to a constant
        coef = model.coef_
        np.testing.assert_allclose(coef - coef.mean(), W_TRUE - W_TRUE.mean(), atol=0.05)


def test_lgbm_is_deterministic():
    X = regmix.sample_mixtures(NATURAL, 64, seed=3)
    y = _linear_law(X, 0)
    a = regmix.predict(regmix.fit_regressor(X, y, "lgbm", seed=5), X)
    np.testing.assert_array_equal(a, regmix.predict(regmix.fit_regressor(X, y, "lgbm", seed=5), X))


def test_spearman_by_hand():
    assert regmix.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert regmix.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1,2,3,4) vs (1,3,2,4): 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    assert regmix.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)


OPTIMUM = np.array([0.3, 0.3, 0.25, 0.15])


class _Oracle:
    """A 'regressor' that knows the planted law: loss = |x - OPTIMUM|^2."""

    def predict(self, X):
        return ((np.asarray(X) - OPTIMUM) ** 2).sum(1)


def test_choose_mixture_averages_the_top_k_candidates():
    chosen = regmix.choose_mixture(_Oracle(), NATURAL, n_candidates=50_000, top_k=100, seed=0)
    cand = regmix.sample_mixtures(NATURAL, 50_000, seed=0)  # the same candidates, by hand
    best = np.argsort(_Oracle().predict(cand))[:100]
    np.testing.assert_allclose(chosen, cand[best].mean(0) / cand[best].mean(0).sum(), rtol=1e-12)
    assert np.abs(chosen - OPTIMUM).sum() < 0.05, chosen


def test_choose_mixture_from_a_fitted_regressor_finds_the_planted_optimum():
    X = regmix.sample_mixtures(NATURAL, 256, seed=6)
    model = regmix.fit_regressor(X, _Oracle().predict(X), kind="lgbm")
    chosen = regmix.choose_mixture(model, NATURAL, n_candidates=20_000, top_k=100, seed=1)
    natural_distance = np.abs(NATURAL - OPTIMUM).sum()  # 0.4
    assert np.abs(chosen - OPTIMUM).sum() < 0.5 * natural_distance, chosen


# -- RegMix: the resumable sweep -----------------------------------------------------------------
class _Interrupted(RuntimeError):
    """A proxy run that dies (preemption, crash)."""


def test_sweep_resumes_after_an_interruption(tmp_path):
    configs = regmix.proxy_mixtures(["a", "b"], [1, 1], 5, seed=0)
    calls: list[str] = []
    fail_at = ["proxy002"]  # the machine goes away in the middle of proxy002, once

    def run_one(name, cfg):
        calls.append(name)
        if name in fail_at:
            fail_at.clear()
            raise _Interrupted
        return {"val/loss": cfg["a"] * 2 + 1}

    path = tmp_path / "sweep" / "state.json"
    with pytest.raises(_Interrupted):
        regmix.run_sweep(configs, run_one, path)
    saved = json.loads(path.read_text())
    assert sorted(saved["results"]) == ["proxy000", "proxy001"]
    calls.clear()
    results = regmix.run_sweep(configs, run_one, path)
    assert calls == ["proxy002", "proxy003", "proxy004"]  # finished proxies are not rerun
    assert list(results) == list(configs)
    for name, cfg in configs.items():
        assert results[name] == {"val/loss": cfg["a"] * 2 + 1}
    calls.clear()
    assert regmix.run_sweep(configs, run_one, path) == results and calls == []


def test_sweep_with_workers_and_a_stale_state(tmp_path):
    configs = {f"p{i}": {"w": [i, 1]} for i in range(6)}
    path = tmp_path / "state.json"
    results = regmix.run_sweep(configs, lambda n, c: c["w"][0] ** 2, path, max_workers=3)
    assert results == {f"p{i}": i * i for i in range(6)}
    stale = {**configs, "p2": {"w": [9, 1]}}
    with pytest.raises(ValueError, match="proxy 'p2'"):
        regmix.run_sweep(stale, lambda n, c: 0, path)


# -- Aioli: the math by hand ---------------------------------------------------------------------
def test_perturbation_matrix_by_hand():
    np.testing.assert_allclose(aioli.perturbation_matrix(3, 0.75),
                               [[0.75, 0.125, 0.125], [0.125, 0.75, 0.125],
                                [0.125, 0.125, 0.75]])
    np.testing.assert_array_equal(aioli.perturbation_matrix(2, 1.0), np.eye(2))


def test_unmix_by_hand():
    W = np.array([[0.75, 0.25], [0.25, 0.75]])
    A = np.array([[1.0, 2.0], [3.0, 4.0]])
    tilde = np.array([[1.25, 1.75], [3.25, 3.75]])  # tilde[i, j] = sum_m A[i, m] W[j, m]
    np.testing.assert_allclose(aioli.unmix(tilde, W), A, rtol=1e-12)
    rng = np.random.default_rng(0)
    A = rng.standard_normal((4, 4))
    W = aioli.perturbation_matrix(4, 0.6)
    tilde = np.array([[sum(A[i, m] * W[j, m] for m in range(4)) for j in range(4)]
                      for i in range(4)])
    np.testing.assert_allclose(aioli.unmix(tilde, W), A, rtol=1e-10, atol=1e-12)
    W = rng.dirichlet(np.ones(4), size=4) + 2 * np.eye(4)  # not symmetric: W^T vs W matters
    tilde = np.array([[sum(A[i, m] * W[j, m] for m in range(4)) for j in range(4)]
                      for i in range(4)])
    np.testing.assert_allclose(aioli.unmix(tilde, W), A, rtol=1e-10, atol=1e-12)


def test_normalise_ema_and_exponentiated_update_by_hand():
    np.testing.assert_allclose(aioli.normalise([[-1.0, 2.0], [0.0, 1.0]]),
                               np.array([[0.0, 3.0], [1.0, 2.0]]) / 6)
    np.testing.assert_allclose(aioli.normalise([[1.0, 1.0], [0.0, 2.0]]),
                               [[0.25, 0.25], [0.0, 0.5]])
    np.testing.assert_array_equal(aioli.normalise(np.zeros((2, 2))), np.zeros((2, 2)))
    prev, new = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    np.testing.assert_allclose(aioli.ema_update(prev, new, 0.1), [[0.1, 0.9]])
    np.testing.assert_array_equal(aioli.ema_update(None, new, 0.1), new)
    p = aioli.exp_update(np.array([[0.1, 0.2], [0.3, 0.0]]), eta=2.0)  # column sums 0.4, 0.2
    e = np.exp([0.8, 0.4])
    np.testing.assert_allclose(p, e / e.sum(), rtol=1e-12)


def test_learn_order_is_permutations_from_seed_and_round():
    order = aioli.learn_order(4, 3, seed=7, round_index=2)
    assert order.shape == (12,)
    for r in range(3):
        assert sorted(order[4 * r:4 * r + 4]) == [0, 1, 2, 3]
    np.testing.assert_array_equal(order, aioli.learn_order(4, 3, seed=7, round_index=2))
    assert not np.array_equal(order, aioli.learn_order(4, 3, seed=7, round_index=3))


@pytest.mark.parametrize("kw, field", [({"lp_steps": 0}, "aioli.lp_steps"),
                                       ({"one_hot_factor": 1.5}, "aioli.one_hot_factor"),
                                       ({"ema": 1.0}, "aioli.ema"),
                                       ({"eta": 0.0}, "aioli.eta")])
def test_aioli_config_is_validated(kw, field):
    with pytest.raises(ConfigError, match=field):
        aioli.AioliConfig(**kw)


def test_aioli_config_checks_against_the_domain_count():
    with pytest.raises(ConfigError, match="aioli.one_hot_factor"):
        aioli.AioliMixer(["a", "b", "c", "d"], dict, aioli.AioliConfig(one_hot_factor=0.25))
    with pytest.raises(ConfigError, match="aioli.update_steps"):  # LearnParams: 2 * 10 * 3 = 60
        aioli.AioliMixer(["a", "b", "c"], dict, aioli.AioliConfig(update_steps=60))


# -- Aioli on a planted linear law ---------------------------------------------------------------
DOMAINS3 = ("helper", "helped", "other")
# A[i, j]: the per-step drop of domain i's loss from training on domain j. 'helper' lowers its own
# loss and much more 'helped''s, so its column sum is the largest.
A_PLANTED = np.array([[0.020, 0.000, 0.001],
                      [0.030, 0.010, 0.000],
                      [0.000, 0.002, 0.012]])
SMALL = aioli.AioliConfig(update_steps=40, lp_rounds=2, lp_steps=3, seed=3)


class LinearLawRun:
    """Stands in for a trainer under the law L_{t+1} = L_t - A p_t: each step trains on the
    mixture the mixer last chose (uniform before it chooses one)."""

    def __init__(self, A=A_PLANTED, domains=DOMAINS3):
        self.A, self.domains = A, domains
        self.losses = np.full(len(domains), 5.0)
        self.p = np.full(len(domains), 1.0 / len(domains))
        self.used: list[np.ndarray] = []

    def eval_losses(self) -> dict[str, float]:
        return {d: float(x) for d, x in zip(self.domains, self.losses)}

    def run(self, mixer, start: int, stop: int) -> list:
        """Steps ``start..stop-1``; returns what ``before_step`` returned at each."""
        returned = []
        for step in range(start, stop):
            w = None if mixer is None else mixer.before_step(self, step)
            returned.append(w)
            if w is not None:
                self.p = np.array([w[d] for d in self.domains])
            self.used.append(self.p)
            self.losses = self.losses - self.A @ self.p
        return returned


def _aioli(cfg=SMALL):
    return aioli.AioliMixer(DOMAINS3, lambda trainer: trainer.eval_losses(), cfg)


def test_aioli_schedule_recovers_planted_A_and_tilts_to_the_helper():
    run, mixer = LinearLawRun(), _aioli()
    run.run(mixer, 0, SMALL.update_steps)
    learn = SMALL.learn_steps(3)  # 18 steps of LearnParams
    W = aioli.perturbation_matrix(3, SMALL.one_hot_factor)
    order = aioli.learn_order(3, SMALL.lp_rounds, SMALL.seed, 0)
    expected = np.repeat(W[order], SMALL.lp_steps, axis=0)  # [18, 3]: each W row for lp_steps
    np.testing.assert_allclose(np.array(run.used[:learn]), expected)
    np.testing.assert_allclose(mixer.A, A_PLANTED, rtol=1e-9, atol=1e-12)  # exact under the law
    p = run.used[learn]
    assert np.all(np.array(run.used[learn:]) == p)  # the rest of the round trains on p
    np.testing.assert_allclose(p, aioli.exp_update(aioli.normalise(A_PLANTED), SMALL.eta))
    assert np.argmax(p) == 0 and p[0] > 1 / 3, p


def test_aioli_ends_below_uniform_under_the_law():
    """LearnParams' mixtures average to uniform, then p favours the helper: the average loss
    ends below a uniform run's (the tiny signal of the methods note)."""
    run, uniform = LinearLawRun(), LinearLawRun()
    run.run(_aioli(), 0, 3 * SMALL.update_steps)
    uniform.run(None, 0, 3 * SMALL.update_steps)
    assert run.losses.mean() < uniform.losses.mean() - 0.05, (run.losses, uniform.losses)


def test_aioli_ema_smooths_across_rounds():
    run, mixer = LinearLawRun(), _aioli()
    run.run(mixer, 0, SMALL.update_steps)
    first = mixer.A_ema.copy()
    run.A = A_PLANTED[:, ::-1].copy()  # the law changes: the second round measures another A
    run.run(mixer, SMALL.update_steps, 2 * SMALL.update_steps)
    np.testing.assert_allclose(mixer.A, run.A, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mixer.A_ema, 0.9 * aioli.normalise(run.A) + 0.1 * first,
                               rtol=1e-9, atol=1e-12)
    assert mixer.rounds_done == 2


@pytest.mark.parametrize("stop_at", [47, 70])  # in round 1's LearnParams; in its training phase
def test_aioli_state_round_trip_mid_round(stop_at):
    total = 3 * SMALL.update_steps
    straight_run, straight = LinearLawRun(), _aioli()
    want = straight_run.run(straight, 0, total)

    first_run, first = LinearLawRun(), _aioli()
    got = first_run.run(first, 0, stop_at)
    saved = json.loads(json.dumps(first.state()))  # through JSON, as in the checkpoint
    resumed_run, resumed = LinearLawRun(), _aioli()  # a fresh process: model and mixer restored
    resumed_run.losses, resumed_run.p = first_run.losses.copy(), first_run.p.copy()
    resumed.load_state(saved)
    got += resumed_run.run(resumed, stop_at, total)
    assert got == want  # every returned weight dict bit-identical
    np.testing.assert_array_equal(resumed_run.losses, straight_run.losses)
    assert json.dumps(resumed.state()) == json.dumps(straight.state())


# -- DGA: the update on hand-made gradients ------------------------------------------------------
def test_dga_update_on_hand_made_gradients():
    g = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # one gradient per domain
    g_s = np.array([2.0, 1.0])  # the target's
    ips = np.array([2.0, 1.0, -2.0])  # <g_k, g_s> by hand
    np.testing.assert_array_equal(g @ g_s, ips)
    alpha = np.array([0.5, 0.25, 0.25])
    raw = np.array([0.5 * np.exp(0.5 * 2), 0.25 * np.exp(0.5 * 1), 0.25 * np.exp(-0.5 * 2)])
    np.testing.assert_allclose(dga.dga_update(alpha, ips, eta=0.5), raw / raw.sum(), rtol=1e-12)
    np.testing.assert_allclose(dga.dga_update(alpha, ips, eta=0.5, ema=0.3),
                               0.7 * raw / raw.sum() + 0.3 * alpha, rtol=1e-12)


def test_dga_update_edge_cases():
    np.testing.assert_allclose(dga.dga_update([0.5, 0.5], [1e4, 0.0], eta=1.0), [1.0, 0.0])
    np.testing.assert_array_equal(dga.dga_update([0.0, 1.0], [5.0, 0.0], eta=1.0), [0.0, 1.0])
    with pytest.raises(ConfigError, match="dga.every"):
        dga.DGAConfig(every=0)


def test_last_layers_selects_unrolled_and_scanned_layers():
    leaf = np.arange(6.0).reshape(2, 3)
    unrolled = {"embed": {"embedding": leaf}, "layers": [{"mlp": {"up": leaf}},
                                                         {"mlp": {"up": leaf + 10}}]}
    got = dga.selected(unrolled, dga.last_layers(tiny_model(), 1))
    assert len(got) == 1 and np.array_equal(got[0], leaf + 10)
    scanned = {"embed": {"embedding": leaf}, "layers": {"mlp": {"up": leaf}}}
    got = dga.selected(scanned, dga.last_layers(tiny_model(scan_layers=True), 1))
    assert len(got) == 1 and np.array_equal(got[0], leaf[1:])
    assert len(dga.selected(unrolled, dga.all_params)) == 3
    with pytest.raises(ValueError, match="n=3"):
        dga.last_layers(tiny_model(), 3)


# -- DGA: the jitted alignment, sharded == single == float64 reference ---------------------------
DGA_DOMAINS = ("add", "sub", "mul")
ROWS, LEN = 8, 32


def _batch(seed: int, low: int = 0, high: int = 288) -> dict:
    """A packed-row batch of random tokens (two documents per row)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(low, high, (ROWS, LEN + 1))
    seg = np.where(np.arange(LEN) < LEN // 2, 1, 2)[None].repeat(ROWS, 0).astype(np.int32)
    pos = np.concatenate([np.arange(LEN // 2)] * 2)[None].repeat(ROWS, 0).astype(np.int32)
    return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
            "segment_ids": seg, "positions": pos, "loss_mask": np.ones((ROWS, LEN), np.float32),
            "domain": np.zeros(ROWS, np.int32)}


def _domain_batches(step: int) -> dict:
    """Per-domain batches that differ by domain and by step (token ranges overlap the target's
    partly, so the inner products differ)."""
    return {d: _batch(100 * step + i, 40 * i, 40 * i + 120) for i, d in enumerate(DGA_DOMAINS)}


def _target_batch(step: int) -> dict:
    return _batch(7 + 100 * step, 0, 120)


@pytest.fixture(scope="module")
def dga_one_device():
    s = setup_for(tiny_model())
    state = T.init_state(s)
    select = dga.last_layers(s.cfg.model, 1)
    return s, state, select, dga.make_alignment_fn(s, select)


def _reference_inner_products(s, state, batches: dict, target: dict) -> np.ndarray:
    """<g_k, g_s> over layer 1's parameters: each gradient by its own ``make_grad_fn`` call,
    then float64 numpy products of the leaves picked by their path names."""
    grad_fn = jax.jit(T.make_grad_fn(s, 1))

    def layer1_grads(batch):
        grads = jax.device_get(grad_fn(state, T.global_batch(s.mesh, batch))[1])
        return [np.asarray(g, np.float64) for p, g in jax.tree_util.tree_leaves_with_path(grads)
                if jax.tree_util.keystr(p).startswith("['layers'][1]")]

    g_s = layer1_grads(target)
    assert len(g_s) == 11  # q, k, v, o, q_norm, k_norm, attn_norm, mlp_norm, up, gate, down
    return np.array([sum(np.sum(a * b) for a, b in zip(layer1_grads(batches[d]), g_s))
                     for d in DGA_DOMAINS])


def test_alignment_equals_float64_reference_and_is_sharded_exactly(dga_one_device):
    s1, state1, select, fn1 = dga_one_device
    batches, target = _domain_batches(0), _target_batch(0)
    stacked1 = dga.stack_batches(s1.mesh, [batches[d] for d in DGA_DOMAINS])
    got1 = np.asarray(fn1(state1, stacked1, dga.target_global(s1.mesh, target)), np.float64)
    ref = _reference_inner_products(s1, state1, batches, target)
    assert len(set(np.sign(ref))) > 1 or np.ptp(ref) > 0.1 * np.abs(ref).max(), ref  # they differ
    np.testing.assert_allclose(got1, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())

    cfg8 = dataclasses.replace(s1.cfg, mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    s8 = T.setup(cfg8, make_mesh(cfg8.mesh, jax.devices()[:8]))
    state8 = jax.device_put(jax.device_get(state1), s8.state_shardings)
    assert any(len(set(x.sharding.spec) - {None}) for x in jax.tree.leaves(state8.params))
    got8 = dga.domain_gradient_alignment(s8, state8, batches, target, select)
    np.testing.assert_allclose([got8[d] for d in DGA_DOMAINS], got1, rtol=2e-5,
                               atol=2e-6 * np.abs(ref).max())


class _Trainer:
    """What DGAMixer reads from a trainer: its setup and current state."""

    def __init__(self, setup, state):
        self.setup, self.state = setup, state


@pytest.mark.parametrize("stop_at", [3, 4])  # right after an update; right before one
def test_dga_mixer_state_round_trip(dga_one_device, stop_at):
    s, state, select, fn = dga_one_device
    trainer = _Trainer(s, state)
    cfg = dga.DGAConfig(every=2, eta=50.0, ema=0.2)

    def mixer(alignment_fn):
        return dga.DGAMixer(DGA_DOMAINS, _domain_batches, _target_batch, cfg, param_filter=select,
                            initial=[0.2, 0.3, 0.5], alignment_fn=alignment_fn)

    straight = mixer(fn)
    want = [straight.before_step(trainer, step) for step in range(7)]
    assert [w is None for w in want] == [False, True, False, True, False, True, False]
    assert straight.updates == 4 and len({tuple(w.values()) for w in want if w}) == 4
    first = mixer(fn)
    got = [first.before_step(trainer, step) for step in range(stop_at)]
    resumed = mixer(None)  # a fresh process builds its alignment program from trainer.setup
    resumed.load_state(json.loads(json.dumps(first.state())))
    got += [resumed.before_step(trainer, step) for step in range(stop_at, 7)]
    assert got == want
    # the first update by hand: alpha0 * exp(eta * <g_k, g_s>), normalised, then the EMA
    ref = _reference_inner_products(s, state, _domain_batches(0), _target_batch(0))
    alpha0 = np.array([0.2, 0.3, 0.5])
    np.testing.assert_allclose(list(want[0].values()),
                               dga.dga_update(alpha0, ref, cfg.eta, cfg.ema), rtol=1e-5)


def test_dga_mixer_names_a_missing_domain_batch(dga_one_device):
    s, state, select, fn = dga_one_device
    m = dga.DGAMixer(DGA_DOMAINS + ("div",), _domain_batches, _target_batch, alignment_fn=fn)
    with pytest.raises(KeyError, match="div"):
        m.before_step(_Trainer(s, state), 0)


# -- inside the Trainer: interrupted + resumed == straight ---------------------------------------
def _val_losses(trainer) -> dict[str, float]:
    """Aioli's per-domain validation loss: the trainer's held-out set at its current state."""
    ev = trainer.evaluate(trainer.state)
    return {d: ev[f"val/loss/{d}"] for d in trainer.domains}


def _trainer_aioli(domains):
    """Round 0's LearnParams are steps 0..2k-1; round 1 starts at step 2k + 3."""
    cfg = aioli.AioliConfig(update_steps=2 * len(domains) + 3, lp_rounds=1, lp_steps=2, seed=1)
    return aioli.AioliMixer(domains, _val_losses, cfg)


def _trainer_dga(domains):
    batches = lambda step: {d: _batch(100 * step + i, 40 * i, 40 * i + 120)  # noqa: E731
                            for i, d in enumerate(domains)}
    return dga.DGAMixer(domains, batches, _target_batch, dga.DGAConfig(every=3, eta=50.0),
                        param_filter=dga.last_layers(tiny_model(), 1))


@pytest.mark.parametrize("make", [_trainer_aioli, _trainer_dga], ids=["aioli", "dga"])
def test_mixer_in_trainer_resumes_exactly(make, data_cache, tmp_path):
    """12 steps straight == 5 steps, SIGTERM (mid-LearnParams for Aioli), resume, 7 more:
    losses, per-domain token counts and the mixer's state bit-identical."""
    cfg = tiny_config(data={"cache_dir": data_cache},
                      train={"steps": 12, "ckpt_every": 100, "eval_every": 100})
    domains = cfg.data.domains
    straight = make(domains)
    ref = Trainer(cfg, tmp_path / "straight", mixer=straight, progress=False).run()

    def kill_at_5(trainer, step, metrics):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    wd = tmp_path / "resumed"
    first = Trainer(cfg, wd, on_step=kill_at_5, mixer=make(domains), progress=False).run()
    assert first["preempted"] and first["step"] == 5
    resumed = make(domains)
    got = Trainer(cfg, wd, mixer=resumed, progress=False).run()
    assert got["step"] == 12
    want_losses, got_losses = _losses(tmp_path / "straight"), _losses(wd)
    assert sorted(got_losses) == list(range(1, 13))
    assert [got_losses[s] for s in range(1, 13)] == [want_losses[s] for s in range(1, 13)]
    for d in domains:
        assert got[f"train/tokens/{d}"] == ref[f"train/tokens/{d}"]
    assert json.dumps(resumed.state()) == json.dumps(straight.state())
    if isinstance(straight, aioli.AioliMixer):
        assert straight.rounds_done == 1 and resumed.A is not None
    else:
        assert straight.updates == 4  # steps 0, 3, 6, 9


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if "train/loss" in r}
