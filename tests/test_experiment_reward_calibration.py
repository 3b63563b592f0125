"""experiments.reward_calibration end to end at cpu-smoke (grpo's shapes and SFT stage): SFT -> the
Bradley-Terry reward model -> RL on its scores, raw / local-average / LOWESS calibrated, with the
report's RM and RL tables; the RL stage restores the RM exactly and trains on its scores."""

from __future__ import annotations

import dataclasses
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
    from moejax.rl.run_inputs import rl_tokenizer

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


def test_interrupted_reward_model_training_resumes_bit_identically(run, tmp_path, monkeypatch):
    """The RM stage stopped after step 2 (as SIGTERM / Ctrl-C would: save, return preempted) and
    rerun ends with the same parameters, optimizer state, held-out scores and per-step metrics
    as an uninterrupted run (the pair stream is a function of the step; the state is restored)."""
    import jax

    from moejax import trainer as trainer_lib
    from moejax.ckpt import Checkpointer
    from moejax.mesh import make_mesh
    from moejax.rl.reward_model import rm_setup

    wd, _ = run
    cfg = rc.PRESETS["cpu-smoke"]
    rm = dataclasses.replace(rc.rm_preset(cfg), steps=4, ckpt_every=4)  # no save at step 2 unless stopped
    (start,) = wd.glob("_sft-*")
    straight = R.train_reward_model(cfg, rm, tmp_path / "straight", start)

    class StopAfter2(trainer_lib.StopSignals):
        def agreed(self, step):
            return step == 2

    monkeypatch.setattr(trainer_lib, "StopSignals", StopAfter2)
    first = R.train_reward_model(cfg, rm, tmp_path / "resumed", start)
    assert first == {"step": 2, "preempted": True}
    assert not (tmp_path / "resumed" / R.RM_EVAL).exists()
    monkeypatch.undo()
    resumed = R.train_reward_model(cfg, rm, tmp_path / "resumed", start)
    assert resumed == straight and not resumed["preempted"]

    def final_state(d):
        rs = rm_setup(cfg, make_mesh(cfg.mesh), rm)
        ckpt = Checkpointer(d / "ckpt", async_save=False)
        try:
            state, meta = ckpt.restore_latest(rs.abstract_state, None)
        finally:
            ckpt.close()
        assert meta["step"] == 4
        return jax.device_get(state)

    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert (json.loads((tmp_path / "straight" / R.RM_EVAL).read_text())
            == json.loads((tmp_path / "resumed" / R.RM_EVAL).read_text()))
    ma = [{k: v for k, v in r.items() if not k.startswith("perf/")}
          for r in _metrics(tmp_path / "straight" / "metrics.jsonl")]
    mb = [{k: v for k, v in r.items() if not k.startswith("perf/")}
          for r in _metrics(tmp_path / "resumed" / "metrics.jsonl")]
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [1, 2, 3, 4]
    assert ma == mb


def test_the_command_line_preset_picks_its_arm_table():
    """``experiment.preset_arms``: the arms of the --preset on the command line (the local
    average's neighbour floor follows that preset's batch), the module table for an unknown one."""
    from moejax import experiment
    smoke = experiment.preset_arms(["--workdir", "w", "--preset", "cpu-smoke"], rc.PRESETS,
                                   rc.arms_for, rc.ARMS)
    assert smoke == rc.arms_for(rc.PRESETS["cpu-smoke"]) != rc.ARMS
    assert "rl.reward_calibration.min_neighbours=4" in smoke["local_average"]
    assert experiment.preset_arms(["--workdir", "w"], rc.PRESETS, rc.arms_for, rc.ARMS) == rc.ARMS
    assert experiment.preset_arms(["--preset", "nope"], rc.PRESETS, rc.arms_for, rc.ARMS) is rc.ARMS
