"""The gated-attention experiment end to end on its cpu-smoke preset (a few arms): trains,
evaluates, probes without a second pass, evaluates under W4A4, resumes a finished arm, writes the
report and plots; the parameter-matched baseline of every preset."""

import json
import os

import numpy as np
import pytest

from experiments import gated_attention as ga
from moejax.experiment import build_config
from moejax.metrics import read_metrics


def test_loss_spikes_counts_steps_above_the_running_median():
    losses = [3.0] * 25 + [3.5] + [3.0] * 5 + [float("nan")] + [3.05]
    assert ga.loss_spikes(losses) == 2  # the 3.5 (> +10 %) and the NaN; 3.05 is within 10 %


def test_arms_build_valid_configs():
    arms = ga.arms_for(ga.PRESETS["gpu"])
    assert set(arms) == {*ga.ARMS, "baseline_matched"}
    for arm in arms:  # the gpu preset: cudnn + every arm's switches validate together
        cfg = build_config(ga.PRESETS, arms, "gpu", arm, [])
        assert cfg.train.lr == (ga.HIGH_LR if arm.endswith("lr5x") else ga.BASE_LR)
    assert build_config(ga.PRESETS, arms, "gpu", "sink", []).model.attention.impl == "auto"


@pytest.mark.parametrize("preset", sorted(set(ga.PRESETS) - {"gpu"}))  # gpu: the test above
def test_every_arm_builds_and_smoke_arms_initialise(preset):
    """Every arm of the preset validates; on cpu-smoke (the shape the end-to-end test trains) each
    arm's model initialises abstractly, with exactly its parameter count."""
    import jax
    from flax import nnx
    from moejax.model import Model
    arms = ga.arms_for(ga.PRESETS[preset])
    assert set(arms) == {*ga.ARMS, "baseline_matched"}
    for arm in arms:
        model = build_config(ga.PRESETS, arms, preset, arm, []).model
        if preset == "cpu-smoke":
            m = nnx.eval_shape(lambda: Model(model, rngs=nnx.Rngs(0)))
            n = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
            assert n == model.num_params(), arm


@pytest.mark.parametrize("preset", sorted(ga.PRESETS))
def test_matched_baseline_has_the_gated_arms_parameters(preset):
    """The G1 elementwise gate adds D*H*hd per layer; baseline_matched carries them as extra query
    heads or FFN channels: within 1 % of the gated arm, while the plain baseline is > 5 % off."""
    arms = ga.arms_for(ga.PRESETS[preset])
    n = {arm: build_config(ga.PRESETS, arms, preset, arm, []).model.num_params(
        include_embeddings=False) for arm in ("baseline", "baseline_matched", "g1_elementwise")}
    assert abs(n["baseline_matched"] / n["g1_elementwise"] - 1) < 0.01, n
    assert n["g1_elementwise"] / n["baseline"] - 1 > 0.05, n
    matched = build_config(ga.PRESETS, arms, preset, "baseline_matched", []).model
    assert matched.attention.gate == "none"
    how = arms["baseline_matched"][0].split("=")[0]
    assert how == {"cpu-smoke": "model.attention.num_heads", "cpu": "model.attention.num_heads",
                   "tpu-v5e-16": "model.attention.num_heads", "gpu": "model.d_ff"}[preset]


def test_matching_follows_the_command_line_model():
    """``--set`` changes the model before matching: 8 heads over 4 KV heads -> 12 heads."""
    cfg = ga._command_line_model(["--preset", "cpu", "--set", "model.attention.num_heads=8",
                                  "--set", "model.attention.num_kv_heads=4"])
    assert ga.param_matched_overrides(cfg) == ("model.attention.num_heads=12",)
    assert ga._command_line_model(["--preset", "cpu", "--set", "model.nope=1"]) == ga.PRESETS["cpu"]


@pytest.mark.slow
def test_cpu_smoke_runs_probes_and_reports(data_cache, tmp_path):
    wd = str(tmp_path / "ga")
    # baseline: no gate (no gate probe, 7 quantised linears per layer); g1_headwise: a gate (its
    # probe and linear). The other arms switch layers that tests/test_gated_attention.py,
    # test_sinks.py and test_quant.py check; test_every_smoke_arm_initialises builds each of them
    arms = "baseline,g1_headwise"
    common = ["--preset", "cpu-smoke", "--workdir", wd, "--arms", arms,
              "--set", f"data.cache_dir={data_cache}"]
    out = ga.main(common)
    assert set(out) == set(arms.split(","))
    for arm in out:
        probes = np.load(os.path.join(wd, arm, "probes.npz"))
        assert probes["attn/first_token_share"].shape == (2,)
        assert probes["resid/max_abs"].shape == (2,)
        assert ("attn/gate_mean" in probes.files) == (arm == "g1_headwise")
        summary = json.load(open(os.path.join(wd, arm, "summary.json")))
        assert 0.0 <= summary["probes"]["first_token_share_mean"] <= 1.0
        q = summary["quant"]  # W4A4: the plain loss is the trainer's final validation loss
        evals = [r for r in read_metrics(os.path.join(wd, arm, "metrics.jsonl")) if "val/loss" in r]
        assert q["val_loss"] == pytest.approx(evals[-1]["val/loss"], rel=1e-5)
        assert q["ppl"] == pytest.approx(np.exp(q["val_loss"]))
        assert q["delta_ppl"] == pytest.approx(q["ppl_quant"] - q["ppl"])
        assert q["val_loss_quant"] != q["val_loss"] and np.isfinite(q["val_loss_quant"])
        assert q["quantised_linears"] == 2 * (8 if arm == "g1_headwise" else 7)  # 2 layers
    report = open(os.path.join(wd, "report.md")).read()
    assert "| arm | params | val loss | PPL | W4A4 PPL | ΔPPL |" in report
    for arm in out:
        assert f"| {arm} |" in report
        q = json.load(open(os.path.join(wd, arm, "summary.json")))["quant"]
        assert f"| {q['ppl']:.3f} | {q['ppl_quant']:.3f} | {q['delta_ppl']:+.3f} |" in report
        assert os.path.getsize(os.path.join(wd, "plots", f"attn_map_{arm}.png")) > 1000
        assert os.path.getsize(os.path.join(wd, "plots", f"resid_{arm}.png")) > 1000
    assert os.path.getsize(os.path.join(wd, "plots", "probes_by_layer.png")) > 1000
    # a finished arm is not rerun; the report is rebuilt from the saved probes
    again = ga.main(common)
    assert again["baseline"]["step"] == ga.PRESETS["cpu-smoke"].train.steps
