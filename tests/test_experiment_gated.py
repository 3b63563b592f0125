"""The gated-attention experiment end to end on its cpu-smoke preset (a few arms): trains,
evaluates, probes without a second pass, evaluates under W4A4, resumes a finished arm, writes the
report and plots; the parameter-matched baseline of every preset."""

import dataclasses
import json
import os
import re

import numpy as np
import pytest

from experiments import gated_attention as ga
from moejax.config import ConfigError
from moejax.experiment import build_config
from moejax.metrics import read_metrics


def test_loss_spikes_counts_steps_above_the_running_median():
    losses = [3.0] * 25 + [3.5] + [3.0] * 5 + [float("nan")] + [3.05]
    assert ga.loss_spikes(losses) == 2  # the 3.5 (> +10 %) and the NaN; 3.05 is within 10 %


def expected_arms(preset: str) -> set[str]:
    """ARMS, the matched baseline and, at a multiple of 4 layers, the 3:1 hybrid."""
    hybrid = ga.PRESETS[preset].model.num_layers % 4 == 0
    return {*ga.ARMS, "baseline_matched", *([ga.HYBRID_ARM] if hybrid else [])}


def test_arms_build_valid_configs():
    arms = ga.arms_for(ga.PRESETS["gpu"])
    assert set(arms) == expected_arms("gpu") and ga.HYBRID_ARM in arms
    for arm in arms:  # the gpu preset: cudnn + every arm's switches validate together
        cfg = build_config(ga.PRESETS, arms, "gpu", arm, [])
        assert cfg.train.lr == (ga.HIGH_LR if arm.endswith("lr5x") else ga.BASE_LR)
    assert build_config(ga.PRESETS, arms, "gpu", "sink", []).model.attention.impl == "auto"


# gpu: the test above; hybrid is the cpu preset itself (other default arms only)
@pytest.mark.parametrize("preset", sorted(set(ga.PRESETS) - {"gpu", "hybrid"}))
def test_every_arm_builds_and_smoke_arms_initialise(preset):
    """Every arm of the preset validates; on cpu-smoke (the shape the end-to-end test trains) each
    arm's model initialises abstractly, with exactly its parameter count, as does hybrid_g1 on
    hybrid-smoke (its other arms are cpu-smoke's at 4 layers: only the default ones are built)."""
    assert ga.PRESETS["hybrid"] is ga.PRESETS["cpu"]
    import jax
    from flax import nnx
    from moejax.model import Model
    arms = ga.arms_for(ga.PRESETS[preset])
    assert set(arms) == expected_arms(preset)
    for arm in (ga.HYBRID_ARMS if preset == "hybrid-smoke" else arms):  # the rest: cpu-smoke's
        model = build_config(ga.PRESETS, arms, preset, arm, []).model
        if preset == "cpu-smoke" or (preset, arm) == ("hybrid-smoke", ga.HYBRID_ARM):
            m = nnx.eval_shape(lambda: Model(model, rngs=nnx.Rngs(0)))
            n = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
            assert n == model.num_params(), arm


@pytest.mark.parametrize("preset", sorted(set(ga.PRESETS) - {"hybrid"}))  # hybrid is cpu
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
    assert how == ("model.d_ff" if preset == "gpu" else "model.attention.num_heads")


def test_hybrid_arm_is_the_qwen3_next_pattern_with_matched_deltanet_heads():
    """hybrid_g1: linear x3 + full repeating, G1 elementwise in the full layers; DeltaNet qkvz and
    out_proj hold exactly the gated attention's q, k, v, gate and o weights (counted by hand),
    so only in_proj_ba, the conv and the decay differ: +3.1 % per mixer and < 1 % for the model
    on cpu (< 2 % on hybrid-smoke); no hybrid arm at 2 layers."""
    assert ga.hybrid_overrides(ga.PRESETS["cpu-smoke"]) is None
    arms = ga.arms_for(ga.PRESETS["hybrid"])
    hyb = build_config(ga.PRESETS, arms, "hybrid", ga.HYBRID_ARM, []).model
    full = build_config(ga.PRESETS, arms, "hybrid", "g1_elementwise", []).model
    assert hyb.layer_types == ("linear_attention",) * 3 + ("full_attention",)
    assert hyb.layer_pattern == hyb.layer_types and hyb.attention == full.attention
    assert dataclasses.replace(hyb, layer_types=(), deltanet=full.deltanet) == full  # one switch
    D, H, Hkv, hd, dn = 128, 4, 2, 32, hyb.deltanet
    assert (dn.num_k_heads, dn.num_v_heads, dn.head_k_dim, dn.head_v_dim) == (Hkv, H, hd, hd)
    qkvz_out = D * Hkv * (2 * hd + 2 * (H // Hkv) * hd) + H * hd * D
    assert qkvz_out == D * hd * (2 * H + 2 * Hkv) + D * H * hd  # q, k, v, o + the G1 gate
    ba, conv, decay_norm = 2 * D * H, 4 * (2 * Hkv * hd + H * hd), 2 * H + hd
    assert dn.num_params(D) == qkvz_out + ba + conv + decay_norm == 67_624
    attn_mixer = D * hd * (3 * H + 2 * Hkv) + 2 * hd  # with QK-norm: 65,600
    n = lambda m: m.num_params(include_embeddings=False)  # noqa: E731
    assert n(hyb) - n(full) == 3 * (67_624 - attn_mixer)
    assert abs(n(hyb) / n(full) - 1) < 0.01
    smoke = ga.arms_for(ga.PRESETS["hybrid-smoke"])
    hs, fs = (build_config(ga.PRESETS, smoke, "hybrid-smoke", a, []).model
              for a in (ga.HYBRID_ARM, "g1_elementwise"))
    assert hs.num_layers == 4 and abs(n(hs) / n(fs) - 1) < 0.02


def test_default_arms_per_preset(monkeypatch):
    """Without --arms: the hybrid presets run baseline, g1_elementwise, hybrid_g1; every other
    preset runs exactly its former arm list (all but hybrid_g1, in order); --arms wins."""
    seen = []
    monkeypatch.setattr(ga.experiment, "main", lambda **kw: seen.append((kw["argv"], kw["arms"])))
    for preset in ga.PRESETS:
        ga.main(["--preset", preset, "--workdir", "w"])
        argv, arms = seen.pop()
        chosen = argv[argv.index("--arms") + 1].split(",")
        if preset in ga.HYBRID_PRESETS:
            assert chosen == ["baseline", "g1_elementwise", ga.HYBRID_ARM]
        else:
            assert chosen == ["baseline", "baseline_matched", *[a for a in ga.ARMS
                                                                if a != "baseline"]]
        assert set(chosen) <= set(arms)
    ga.main(["--preset", "hybrid", "--workdir", "w", "--arms", "baseline"])
    assert seen.pop()[0].count("--arms") == 1
    odd = ["--preset", "hybrid", "--workdir", "w", "--set", "model.num_layers=6"]
    with pytest.raises(SystemExit, match="2"):  # the one-line error, no traceback
        ga.main(odd)
    with pytest.raises(ConfigError, match="multiple of 4"):
        ga.main([*odd, "--debug"])


def test_hybrid_probes_spread_to_layers_and_report_na():
    """A 3:1 hybrid's attention probes ([1]: its one full layer) go to layer 3 with NaN at the
    DeltaNet layers; the summary averages the full layer only; the per-layer table says n/a
    there; a probe with the wrong layer count is refused."""
    import numpy.testing as npt
    model = ga.PRESETS["hybrid"].model
    hyb = dataclasses.replace(model, layer_types=ga.HYBRID_PATTERN)
    raw = {"attn/first_token_share": np.array([0.25], np.float32),
           "attn/map": np.ones((1, 3, 3), np.float32),
           "resid/max_abs": np.array([1.0, 2.0, 3.0, 4.0], np.float32)}
    p = ga.spread_attention_probes(raw, hyb)
    npt.assert_array_equal(p[ga.FULL_KEY], [False, False, False, True])
    npt.assert_array_equal(p["attn/first_token_share"], [np.nan, np.nan, np.nan, 0.25])
    assert np.isnan(p["attn/map"][:3]).all() and (p["attn/map"][3] == 1).all()
    s = ga.summarize_probes(p)
    assert s["first_token_share_mean"] == 0.25 and s["max_abs_max"] == 4.0
    assert s["full_attention_layers"] == [3] and s["attn/first_token_share"] == [0.25]
    rows = ga.per_layer_table({"hybrid_g1": p, "old": {}}, "attn/first_token_share", "{:.3f}")
    na = ga.NA_LINEAR
    assert rows[2] == f"| hybrid_g1 | LLLF | {na} | {na} | {na} | 0.250 |"
    assert rows[3] == "| old | - | - | - | - | - |"
    rows = ga.per_layer_table({"h": p}, "resid/max_abs", "{:.1f}")
    assert rows[2] == "| h | LLLF | 1.0 | 2.0 | 3.0 | 4.0 |"
    full = ga.spread_attention_probes({"attn/first_token_share": np.zeros(4),
                                       "resid/max_abs": raw["resid/max_abs"]}, model)
    assert full[ga.FULL_KEY].all() and ga.summarize_probes(full)["first_token_share_mean"] == 0
    with pytest.raises(ValueError, match="1 full-attention layers of 4"):
        ga.spread_attention_probes({"attn/first_token_share": np.zeros(4)}, hyb)


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
    for arm in out:  # all-full arms: a number for every layer, no n/a, no hybrid lines
        assert re.search(rf"^\| {arm} \| FF \| \d\.\d{{3}} \| \d\.\d{{3}} \|$", report, re.M)
    assert f"| {ga.NA_LINEAR} |" not in report and "Parameter matching" not in report
    # a finished arm is not rerun; the report is rebuilt from the saved probes
    again = ga.main(common)
    assert again["baseline"]["step"] == ga.PRESETS["cpu-smoke"].train.steps


@pytest.mark.slow
def test_hybrid_smoke_runs_the_3to1_hybrid_and_reports_na(data_cache, tmp_path):
    """hybrid_g1 on hybrid-smoke through main and the report: the layer pattern in config.json,
    attention probes at the full layer only (NaN / n/a at the DeltaNet layers), max abs(h) at
    every layer, W4A4 over the DeltaNet projections too, finite numbers, parameter matching."""
    wd = str(tmp_path / "hybrid")
    out = ga.main(["--preset", "hybrid-smoke", "--workdir", wd, "--arms", ga.HYBRID_ARM,
                   "--set", f"data.cache_dir={data_cache}"])
    arm_dir = os.path.join(wd, ga.HYBRID_ARM)
    cfg = json.load(open(os.path.join(arm_dir, "config.json")))["model"]
    assert tuple(cfg["layer_types"]) == ga.HYBRID_PATTERN
    assert cfg["attention"]["gate"] == "g1"
    probes = np.load(os.path.join(arm_dir, "probes.npz"))
    np.testing.assert_array_equal(probes[ga.FULL_KEY], [False, False, False, True])
    for key in ("attn/first_token_share", "attn/gate_mean"):
        assert np.isnan(probes[key][:3]).all() and np.isfinite(probes[key][3]), key
    assert probes["resid/max_abs"].shape == (4,) and np.isfinite(probes["resid/max_abs"]).all()
    summary = out[ga.HYBRID_ARM]
    assert summary["probes"]["full_attention_layers"] == [3]
    assert 0.0 <= summary["probes"]["first_token_share_mean"] <= 1.0
    q = summary["quant"]  # per DeltaNet layer qkvz, ba, out + MLP 3; the full layer 8 (G1)
    assert q["quantised_linears"] == 3 * 6 + 8
    assert np.isfinite([q["ppl"], q["ppl_quant"], q["delta_ppl"]]).all()
    report = open(os.path.join(wd, "report.md")).read()
    na = ga.NA_LINEAR
    share = summary["probes"]["first_token_share_mean"]
    assert f"| {share:.3f} (layers [3]) |" in report
    assert re.search(rf"^\| {ga.HYBRID_ARM} \| LLLF \| {re.escape(na)} \| {re.escape(na)} \| "
                     rf"{re.escape(na)} \| \d\.\d{{3}} \|$", report, re.M)
    assert re.search(rf"^\| {ga.HYBRID_ARM} \| LLLF( \| \d+\.\d)" + "{4} \\|$", report, re.M)
    assert f"- {ga.HYBRID_ARM} (LLLF): Gated DeltaNet mixer 17,432 parameters" in report
    assert not re.search(r"\bnan\b", report, re.I)
    assert os.path.getsize(os.path.join(wd, "plots", f"attn_map_{ga.HYBRID_ARM}.png")) > 1000
