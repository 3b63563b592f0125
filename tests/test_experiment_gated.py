"""The gated-attention experiment end to end on its cpu-smoke preset (a few arms): trains,
evaluates, probes without a second pass, resumes a finished arm, writes the report and plots."""

import json
import os

import numpy as np
import pytest

from experiments import gated_attention as ga


def test_loss_spikes_counts_steps_above_the_running_median():
    losses = [3.0] * 25 + [3.5] + [3.0] * 5 + [float("nan")] + [3.05]
    assert ga.loss_spikes(losses) == 2  # the 3.5 (> +10 %) and the NaN; 3.05 is within 10 %


def test_arms_build_valid_configs():
    from moejax.experiment import build_config
    for arm in ga.ARMS:  # the gpu preset: cudnn + every arm's switches validate together
        cfg = build_config(ga.PRESETS, ga.ARMS, "gpu", arm, [])
        assert cfg.train.lr == (ga.HIGH_LR if arm.endswith("lr5x") else ga.BASE_LR)


@pytest.mark.slow
def test_cpu_smoke_runs_probes_and_reports(data_cache, tmp_path):
    wd = str(tmp_path / "ga")
    arms = "baseline,g1_headwise,gatednorm"
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
    report = open(os.path.join(wd, "report.md")).read()
    for arm in out:
        assert f"| {arm} |" in report
        assert os.path.getsize(os.path.join(wd, "plots", f"attn_map_{arm}.png")) > 1000
        assert os.path.getsize(os.path.join(wd, "plots", f"resid_{arm}.png")) > 1000
    assert os.path.getsize(os.path.join(wd, "plots", "probes_by_layer.png")) > 1000
    # a finished arm is not rerun; the report is rebuilt from the saved probes
    again = ga.main(common)
    assert again["baseline"]["step"] == ga.PRESETS["cpu-smoke"].train.steps
