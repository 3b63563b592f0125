"""The data-mixture experiment end to end on its cpu-smoke preset (one arm per runner path, one
tiny model shape so the programs are shared): the report's contents, each arm's weights against a by-hand
reference, config errors naming the field and domain, and resume (issue #13 item 6): an Aioli arm
interrupted in the middle of LearnParams and a RegMix sweep interrupted in the middle of a proxy
continue bit-identically (losses, weights, tokens per domain, the sweep's results and choice)."""

import dataclasses
import json
import os
import signal

import numpy as np
import pytest

from experiments import mixture as mx
from moejax.config import ConfigError
from moejax.data import prepare_data
from moejax.experiment import build_config
from moejax.metrics import read_metrics
from moejax.mixing import aioli
from moejax.mixing.config import MixRunConfig
from moejax.mixing.run import (FIT_FILE, SWEEP_FILE, HeldOutLosses, regmix_dir,
                               run_mixing_arm)
from moejax.paths import as_path, read_json as _read_json


def read_json(path):
    """``moejax.paths.read_json`` of a local path given as a string."""
    return _read_json(as_path(path))


# The smoke run's arms: one per runner path (static, RegMix, Aioli, DGA). uniform is natural's
# static runner with 1/k weights: test_static_arms_train_on_their_weights checks its weights.
ARMS = ("natural", "regmix", "aioli", "dga")


def _cfg(arm: str, data_cache: str, *extra: str) -> MixRunConfig:
    return build_config(mx.PRESETS, mx.ARMS, "cpu-smoke", arm,
                        [f"data.cache_dir={data_cache}", *extra])


@pytest.fixture(scope="module")
def smoke(data_cache, tmp_path_factory):
    """One arm per runner path (``ARMS``) of cpu-smoke through the command line, once."""
    wd = str(tmp_path_factory.mktemp("mixture"))
    out = mx.main(["--preset", "cpu-smoke", "--workdir", wd, "--arms", ",".join(ARMS),
                   "--set", f"data.cache_dir={data_cache}"])
    return wd, out


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if "train/loss" in r}


def _weights(workdir, domains) -> dict[int, tuple]:
    return {r["step"]: tuple(r[f"train/mixture/{d}"] for d in domains)
            for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if f"train/mixture/{domains[0]}" in r}


# -- the smoke run ---------------------------------------------------------------------------------
def test_every_arm_runs_and_the_report_has_each_section(smoke):
    wd, out = smoke
    assert set(out) == set(ARMS)
    for arm in ARMS:
        assert out[arm]["step"] == mx.PRESETS["cpu-smoke"].train.steps and not out[arm]["preempted"]
        assert out[arm][f"train/tokens/{mx.TARGET}"] == 0  # the target is never trained on
    text = open(os.path.join(wd, "report.md")).read()
    for needle in ("| natural |", "| dga |", "## RegMix", "Spearman on 3 held-out proxies",
                   "## Aioli", "Tilt toward the planted helper `math-add`", "## DGA",
                   "Weight on the planted helper `math-mul`", "Target-domain val loss by arm",
                   "## Data budget", "plots/weights.png", "plots/aioli_A.png"):
        assert needle in text, needle
    for png in ("weights.png", "aioli_A.png"):
        assert os.path.getsize(os.path.join(wd, "plots", png)) > 1000


def test_finished_arms_are_reused_after_the_config_hash_changes(smoke, data_cache):
    """A finished experiment rerun after the config's JSON changed (a new Config field, an
    execution-only setting) reuses every arm: each run's config.json must be the arm's config,
    not one with the method's weights written into data.mixture."""
    wd, out = smoke
    for arm in ARMS:
        path = os.path.join(wd, arm, "summary.json")
        summary = read_json(path)
        summary["config_hash"] = "from-an-older-moejax"
        with open(path, "w") as f:
            json.dump(summary, f)
    again = mx.main(["--preset", "cpu-smoke", "--workdir", wd, "--arms", ",".join(ARMS),
                     "--set", f"data.cache_dir={data_cache}"])
    for arm in ARMS:
        assert again[arm]["config_hash"] == "from-an-older-moejax"  # reused, not rerun


def test_static_arms_train_on_their_weights(smoke, data_cache):
    """natural = the corpus's training-token shares (by hand from the token stores), uniform =
    1/k (the weights its run trains on; the run is natural's static runner); the target 0 in
    both; the logged weights never change."""
    from moejax.mixing.run import full_weights, uniform
    wd, out = smoke
    cfg = _cfg("natural", data_cache)
    data = prepare_data(cfg.data)
    train = cfg.training_domains
    counts = np.array([data.num_tokens(d, "train") for d in train], np.float64)
    want = dict(zip(train, counts / counts.sum()))
    got_uniform = full_weights(cfg, uniform(_cfg("uniform", data_cache)))
    for got, ref in ((out["natural"]["mixture"], want),
                     (got_uniform, {d: 1 / len(train) for d in train})):
        assert got[mx.TARGET] == 0.0
        np.testing.assert_allclose([got[d] for d in train], [ref[d] for d in train], rtol=1e-12)
    logged = set(_weights(os.path.join(wd, "natural"), cfg.data.domains).values())
    assert len(logged) == 1
    np.testing.assert_allclose(next(iter(logged)),
                               [out["natural"]["mixture"][d] for d in cfg.data.domains],
                               rtol=1e-12)


def test_online_arms_state_is_consistent(smoke):
    """Aioli's last weights are the exponentiated update of its smoothed A (by hand); DGA's alpha
    is a distribution over the training domains, which the weights logged after its last update
    carry (target 0)."""
    wd, out = smoke
    a = out["aioli"]
    A_ema = np.asarray(a["aioli/A_ema"])
    k = len(a["mixer/domains"])
    assert A_ema.shape == (k, k) and a["aioli/rounds"] == 1
    eta = mx.PRESETS["cpu-smoke"].mixing.aioli.eta
    np.testing.assert_allclose(a["aioli/weights"], aioli.exp_update(A_ema, eta), rtol=1e-12)
    d = out["dga"]
    assert d["dga/updates"] == 3  # steps 0, 2, 4
    assert abs(sum(d["dga/alpha"]) - 1) < 1e-12 and len(d["dga/alpha"]) == k
    domains = mx.SMOKE_DOMAINS
    last = _weights(os.path.join(wd, "dga"), domains)[6]
    np.testing.assert_allclose(last, [*d["dga/alpha"], 0.0], rtol=1e-12)


def test_regmix_sweep_fit_and_choice(smoke):
    wd, out = smoke
    r = out["regmix"]
    sweep = read_json(os.path.join(r["regmix/sweep_dir"], SWEEP_FILE))
    assert sorted(sweep["results"]) == [f"proxy{i:03d}" for i in range(7)]
    fit = read_json(os.path.join(r["regmix/sweep_dir"], FIT_FILE))
    assert fit["regmix/chosen"] == r["regmix/chosen"]
    assert abs(sum(r["regmix/chosen"].values()) - 1) < 1e-9
    assert -1.0 <= r["regmix/spearman"] <= 1.0 and len(r["regmix/held_out"]) == 3
    assert r["regmix/spearman_by_regressor"]["linear"] == r["regmix/spearman"]  # the configured
    pred, meas = zip(*((v["predicted"], v["measured"]) for v in r["regmix/held_out"].values()))
    assert r["regmix/spearman"] == pytest.approx(_rank_correlation(pred, meas))
    for n, v in r["regmix/held_out"].items():  # measured = the mean val loss of that proxy
        res = sweep["results"][n]
        assert v["measured"] == pytest.approx(np.mean([res[f"val/loss/{d}"]
                                                       for d in mx.SMOKE_DOMAINS[:4]]))
    np.testing.assert_allclose(out["regmix"]["mixture"][mx.TARGET], 0.0)


def _rank_correlation(a, b) -> float:
    """Spearman by hand (no ties): Pearson correlation of the ranks."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


class _Probe:
    """A mixer that changes nothing and, before step 1, measures Aioli's held-out losses and the
    trainer's own evaluation on the current state."""

    def __init__(self, cfg):
        self.held_out, self.seen = HeldOutLosses(cfg), {}

    def before_step(self, trainer, step):
        if step == 1:
            self.seen = {"mine": self.held_out(trainer), "ref": trainer.evaluate(trainer.state)}

    def state(self):
        return {}

    def load_state(self, state):
        pass


def test_held_out_losses_equal_the_trainers_evaluation(smoke, data_cache, tmp_path):
    """Aioli's measurement (fixed held-out batches through the compiled eval step) equals the
    trainer's own evaluation on the same batches (mixing.eval_batches = train.eval_batches)."""
    from moejax.mixing.run import uniform, with_mixture
    from moejax.trainer import Trainer
    cfg = _cfg("aioli", data_cache, "train.steps=2")
    probe = _Probe(cfg)
    Trainer(with_mixture(cfg, uniform(cfg)), tmp_path / "a", mixer=probe, progress=False).run()
    for d in cfg.training_domains:
        assert probe.seen["mine"][d] == pytest.approx(probe.seen["ref"][f"val/loss/{d}"],
                                                      rel=1e-6)


# -- resume ---------------------------------------------------------------------------------------
def _kill_at(name: str | None, at: int):
    def hook(trainer, step, metrics):
        if step == at and (name is None or trainer.workdir.name == name):
            os.kill(os.getpid(), signal.SIGTERM)
    return hook


def test_aioli_arm_interrupted_mid_learnparams_resumes_exactly(smoke, data_cache, tmp_path):
    """Stopped after step 2 (LearnParams is steps 0-3), resumed: losses, logged weights, tokens
    per domain and the mixer's A / weights equal the straight arm's."""
    wd, out = smoke
    cfg = _cfg("aioli", data_cache)
    run = str(tmp_path / "aioli")
    first = run_mixing_arm(cfg, run, on_step=_kill_at(None, 2), progress=False)
    assert first["preempted"] and first["step"] == 2
    got = run_mixing_arm(cfg, run, progress=False)
    straight = os.path.join(wd, "aioli")
    assert _losses(run) == _losses(straight)
    assert _weights(run, cfg.data.domains) == _weights(straight, cfg.data.domains)
    for key in ("aioli/A", "aioli/A_ema", "aioli/weights", "aioli/rounds",
                *(f"train/tokens/{d}" for d in cfg.data.domains)):
        assert got[key] == out["aioli"][key], key


def test_regmix_sweep_interrupted_mid_proxy_resumes_exactly(smoke, data_cache, tmp_path):
    """SIGTERM in proxy005's first step: the arm returns preempted with proxies 0-4 recorded;
    the rerun resumes proxy005 from its checkpoint, finishes the sweep, and the results, the
    fit, the choice and the target run equal the straight run's. The sweep starts from the
    straight sweep's proxies 0-3 (copied, their runs and records: rerunning them would repeat
    the straight run's programs and steps); proxy004 runs here, so its record is the
    interrupted invocation's own."""
    import shutil
    wd, out = smoke
    cfg = _cfg("regmix", data_cache)
    run = tmp_path / "exp" / "regmix"
    straight_dir = out["regmix"]["regmix/sweep_dir"]
    sweep_dir = regmix_dir(cfg, str(run.parent))
    shutil.copytree(straight_dir, sweep_dir)
    state = read_json(os.path.join(sweep_dir, SWEEP_FILE))
    for name in ("proxy004", "proxy005", "proxy006"):
        del state["results"][name], state["configs"][name]
        shutil.rmtree(os.path.join(sweep_dir, name))
    with open(os.path.join(sweep_dir, SWEEP_FILE), "w") as f:
        json.dump(state, f)
    os.remove(os.path.join(sweep_dir, FIT_FILE))  # the fit below is the resumed run's own
    first = run_mixing_arm(cfg, str(run), on_step=_kill_at("proxy005", 1), progress=False)
    assert first["preempted"]
    partial = read_json(os.path.join(sweep_dir, SWEEP_FILE))
    assert sorted(partial["results"]) == [f"proxy{i:03d}" for i in range(5)]
    assert not os.path.exists(os.path.join(sweep_dir, FIT_FILE))
    assert os.path.isdir(os.path.join(sweep_dir, "proxy005", "ckpt"))
    got = run_mixing_arm(cfg, str(run), progress=False)
    assert (read_json(os.path.join(sweep_dir, SWEEP_FILE))
            == read_json(os.path.join(straight_dir, SWEEP_FILE)))
    assert _losses(os.path.join(sweep_dir, "proxy005")) == _losses(
        os.path.join(straight_dir, "proxy005"))
    for key in ("regmix/chosen", "regmix/spearman", "regmix/held_out", "mixture"):
        assert got[key] == out["regmix"][key], key
    assert _losses(run) == _losses(os.path.join(wd, "regmix"))


def test_a_proxy_finished_but_not_recorded_is_read_back(smoke, data_cache, tmp_path):
    """A crash after a proxy's last checkpoint but before the sweep recorded it: the rerun finds
    the finished run (no step to train) and records its final evaluation from metrics.jsonl."""
    import shutil
    wd, out = smoke
    cfg = _cfg("regmix", data_cache)
    straight_dir = out["regmix"]["regmix/sweep_dir"]
    root = tmp_path / "exp"
    sweep_dir = root / os.path.basename(straight_dir)
    shutil.copytree(straight_dir, sweep_dir)
    state = read_json(sweep_dir / SWEEP_FILE)
    del state["results"]["proxy006"], state["configs"]["proxy006"]
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(state))
    got = run_mixing_arm(cfg, str(root / "regmix"), progress=False)
    assert read_json(sweep_dir / SWEEP_FILE) == read_json(os.path.join(straight_dir, SWEEP_FILE))
    assert got["regmix/chosen"] == out["regmix"]["regmix/chosen"]


def test_the_sweep_is_shared_across_fit_settings(data_cache):
    """The sweep's directory depends on what decides its runs, not on the regressor or choice."""
    cfg = _cfg("regmix", data_cache)
    root = "/runs/x"
    same = _cfg("regmix", data_cache, "mixing.regmix.regressor=lgbm", "mixing.regmix.top_k=5",
                "mixing.aioli.eta=3")
    assert regmix_dir(cfg, root) == regmix_dir(same, root)
    assert regmix_dir(cfg, root) == regmix_dir(_cfg("dga", data_cache), root)
    for other in ("mixing.regmix.num_proxies=5", "mixing.regmix.proxy_steps=1",
                  "mixing.regmix.seed=1", "train.lr=1e-3"):
        assert regmix_dir(_cfg("regmix", data_cache, other), root) != regmix_dir(cfg, root), other


# -- config errors --------------------------------------------------------------------------------
BASE = mx.PRESETS["cpu-smoke"]


def _mixing(**kw) -> MixRunConfig:
    return dataclasses.replace(BASE, mixing=dataclasses.replace(BASE.mixing, **kw))


@pytest.mark.parametrize("kw, match", [
    ({"target_domain": "math-nope"}, r"mixing.target_domain='math-nope'.*unknown domain"),
    ({"method": "dga", "target_domain": ""}, r"mixing.target_domain=''.*DGA needs a target"),
    ({"method": "sgd"}, r"mixing.method='sgd'"),
    ({"natural": (1.0, -0.5, 1.0, 1.0, 0.0)}, r"mixing.natural\[math-word\]=-0.5"),
    ({"natural": (0.0, 0.0, 0.0, 0.0, 1.0)}, r"mixing.natural=.*all zero on the training"),
    ({"natural": (1.0, 1.0)}, r"mixing.natural=.*one weight per data.domains"),
    ({"method": "regmix", "natural": (1.0, 0.0, 1.0, 1.0, 0.0)},
     r"mixing.natural\[math-word\]=0.0.*domain 'math-word' needs a weight > 0"),
    ({"method": "aioli", "aioli": aioli.AioliConfig(update_steps=4, lp_rounds=1, lp_steps=1)},
     r"aioli.update_steps=4"),
    ({"dga_layers": 3}, r"mixing.dga_layers=3"),
])
def test_config_errors_name_the_field_and_domain(kw, match):
    with pytest.raises(ConfigError, match=match):
        _mixing(**kw)


def test_regmix_config_errors():
    from moejax.mixing.config import RegMixConfig
    with pytest.raises(ConfigError, match="mixing.regmix.held_out=2"):
        RegMixConfig(held_out=2)
    with pytest.raises(ConfigError, match="mixing.regmix.regressor='gbm'"):
        RegMixConfig(regressor="gbm")
    with pytest.raises(ConfigError, match="mixing.regmix.metric='prose'.*unknown domain"):
        _mixing(regmix=RegMixConfig(metric="prose"))


def test_bad_target_on_the_command_line_is_one_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        mx.main(["--preset", "cpu-smoke", "--workdir", str(tmp_path), "--arms", "dga",
                 "--set", "mixing.target_domain=math-nope"])
    assert e.value.code == 2
    assert "mixing.target_domain='math-nope'" in capsys.readouterr().err


def test_presets_validate_and_the_tpu_preset_is_an_aot_target():
    """Every arm of every preset builds; each preset's model initialises abstractly."""
    import jax
    from flax import nnx

    from moejax.aot import experiment_tables
    from moejax.model import Model
    presets, arms = experiment_tables(mx)
    assert {"cpu-smoke", "cpu", "gpu", "tpu-v5p-64"} <= set(presets)
    for preset in presets:
        for arm in arms:
            cfg = build_config(presets, arms, preset, arm, [])
            assert cfg.mixing.target_domain in cfg.data.domains
            assert cfg.mixing.method == arm
        model = nnx.eval_shape(lambda: Model(cfg.model, rngs=nnx.Rngs(0)))  # no compile
        assert cfg.model.num_params() == sum(
            x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))), preset
    gpu = presets["gpu"].mixing.regmix
    assert gpu.num_larger >= 3  # rank invariance is checked where the preset allows it
