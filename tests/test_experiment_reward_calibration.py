"""experiments.reward_calibration end to end at cpu-smoke (grpo's shapes and SFT stage): SFT -> the
Bradley-Terry reward model -> RL on its scores, raw / local-average / LOWESS calibrated, with the
report's RM and RL tables; the RL stage restores the RM exactly and trains on its scores."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from experiments import reward_calibration as rc
from moejax.rl import reward_model as R


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("reward_calibration")
    out = rc.main(["--preset", "cpu-smoke", "--workdir", os.fspath(wd)])
    return wd, out


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_smoke_report_and_rewards(run):
    wd, out = run
    steps = rc.PRESETS["cpu-smoke"].train.steps
    assert set(out) == {"raw", "local_average", "lowess"}
    assert all(s["step"] == steps and not s["preempted"] for s in out.values())
    text = (wd / "report.md").read_text()
    for name in ("raw", "local_average", "lowess"):
        assert f"| {name} | " in text  # an RM-table row and an RL-table row each
        assert text.count(f"| {name} | ") >= 3  # + the budget table
    assert "against-bias accuracy" in text and "pass@1 % OOD" in text and "## Data budget" in text
    assert (wd / "plots" / "reward_calibration_curves.png").exists()
    for arm in out:
        recs = [r for r in _metrics(wd / arm / "metrics.jsonl") if "rl/reward" in r]
        assert len(recs) == steps
        for r in recs:  # the trained reward is the RM's score (no shaping in these arms) ...
            assert "rm/score" in r and "rm/length_corr" in r
            if arm == "raw":
                assert r["rl/reward_shaped"] == pytest.approx(r["rm/score"], abs=1e-5)
            else:  # ... calibrated: the length trend fitted on the buffer is taken out
                assert abs(r["calib/length_corr"]) <= abs(r["calib/length_corr_raw"]) + 1e-9
        evals = [r for r in _metrics(wd / arm / "metrics.jsonl") if "rl/eval_items" in r]
        assert any(k.startswith("rl/pass@1/") for k in evals[-1])  # the verifier's pass@1
    cal = json.loads((wd / "lowess" / "config.json").read_text())["rl"]
    assert cal["reward_source"] == "reward_model"
    assert cal["reward_calibration"]["method"] == "lowess"


def test_rl_stage_restores_the_reward_model(run):
    """The scorer the RL loop builds restores the RM's checkpoint: it scores the held-out pairs
    exactly as the RM stage did when it wrote rm_eval.json."""
    from moejax.mesh import make_mesh
    from moejax.rl.trainer import rl_tokenizer

    wd, _ = run
    cfg = rc.PRESETS["cpu-smoke"]
    rm_dir = json.loads((wd / "raw" / "config.json").read_text())["rl"]["reward_model_dir"]
    saved = json.loads((wd / os.path.basename(rm_dir) / R.RM_EVAL).read_text())
    scorer = R.RewardModelScorer(cfg, make_mesh(cfg.mesh), rm_dir)
    pairs = R.eval_pairs(cfg, rc.rm_preset(cfg), rl_tokenizer(cfg))
    np.testing.assert_allclose(scorer.score(pairs.chosen, pairs.chosen_lengths),
                               saved["chosen_score"], rtol=1e-6, atol=1e-6)
    assert saved["chosen_len"] == pairs.chosen_completion.tolist()


def test_arms_and_presets_cover_every_scale():
    assert {"cpu-smoke", "cpu", "gpu", "tpu-v5p-8"} <= set(rc.PRESETS) == set(rc.RM_PRESETS)
    presets, arms = rc.aot_experiment()
    from moejax import experiment
    for arm in arms:
        cfg = experiment.build_config(presets, arms, "tpu-v5p-8", arm, [])
        assert cfg.rl.reward_source == "reward_model"
    assert rc.rm_preset(presets["gpu"]) == rc.RM_PRESETS["gpu"]
