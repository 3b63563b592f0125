"""experiments.rollout_budget (fixed G, Knapsack, SEC curriculum, online filtering at matched
rollout tokens) and experiments.rl_mixture (MoDoMoDo pilots -> surrogates -> chosen mixture vs
uniform) end to end at their cpu-smoke presets: grpo's shapes, both experiments in one workdir so
they share one SFT stage. Rewards are test_rl_wire's planted scores (a pseudo-random bit of the
completion), so success rates sit inside (0, 1) from the first step: Knapsack has estimates to
allocate by, groups have signal, pilots differ in score."""

from __future__ import annotations

import importlib.util
import json
import os
import zlib

import numpy as np
import pytest

from experiments import rl_mixture, rollout_budget
from moejax.rl import rewards

P, G = 4, 4  # the cpu-smoke batch geometry (grpo's)
# the arms with their own code paths: fixed_g is grpo's runner (tests/test_rl_trainer.py) and
# rl_mixture's uniform arm is its modomodo arm's path on other weights
BUDGET_SMOKE_ARMS = ("knapsack", "curriculum", "online_filter")
MIXTURE_SMOKE_ARMS = ("modomodo",)
_REAL_SCORE = rewards.score_batch
# rl_mixture's arm trains 1 step (its checks: its config's weights and its step logs' per-family
# prompts against the report; the pilots are 1-step runs by the preset either way). The
# checkpoint / evaluation cadences stay the preset's: the SFT stage's config derives its cadences
# from them, and the pilots set their own, so overriding them splits the shared SFT stage in two
MIXTURE_SET = ["--set", "train.steps=1"]


def planted_scores(items, completions, cfg=rewards.RewardConfig()):
    """test_rl_wire's planted task scores: 'correct' is a fixed pseudo-random bit of the
    completion text, the reward that bit."""
    out = _REAL_SCORE(items, completions, cfg)
    out["correct"] = np.array([zlib.crc32(c.encode()) % 2 == 0 for c in completions])
    out["reward"] = out["correct"].astype(np.float32)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both experiments in one workdir -> (workdir, rollout_budget report, rl_mixture report)."""
    wd = tmp_path_factory.mktemp("budget_mixture")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rewards, "score_batch", planted_scores)
        rollout_budget.main(["--preset", "cpu-smoke", "--workdir", os.fspath(wd),
                             "--arms", ",".join(BUDGET_SMOKE_ARMS)])
        budget_report = (wd / "report.md").read_text()
        rl_mixture.main(["--preset", "cpu-smoke", "--workdir", os.fspath(wd),
                         "--arms", ",".join(MIXTURE_SMOKE_ARMS), *MIXTURE_SET])
        mixture_report = (wd / "report.md").read_text()
    return wd, budget_report, mixture_report


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train(wd, arm):
    return [r for r in _metrics(wd / arm / "metrics.jsonl") if "rl/rollouts" in r]


def test_rollout_budget_arms_count_rollout_tokens_and_act(runs):
    """Every step logs its sampled rollouts and tokens; without refills they are P x G rows whose
    tokens the step log's trained tokens equal; Knapsack varied N per prompt once the buffer had
    estimates, SEC updated its Q-table, ODF drew refills; one shared SFT stage."""
    wd, text, _ = runs
    assert len(list(wd.glob("_sft-*"))) == 1
    for arm in BUDGET_SMOKE_ARMS:
        recs = _train(wd, arm)
        stats = rollout_budget.read_step_log(wd / arm)
        assert [r["step"] for r in recs] == [s["step"] for s in stats] == [1, 2, 3], arm
        for r, s in zip(recs, stats):
            trained = sum(f["tokens"] for f in s["families"].values())
            assert s["rollouts"] == P * G and 0 <= s["effective_rollouts"] <= P * G
            assert sum(len(f["prompts"]) for f in s["families"].values()) == P
            if arm == "online_filter":
                assert r["rl/rollouts"] == r["dapo/draws"] * P * G
                assert r["rl/rollout_tokens"] >= trained
            else:
                assert (r["rl/rollouts"], r["rl/rollout_tokens"]) == (P * G, trained), arm
    knap = _train(wd, "knapsack")
    assert any(r["budget/effective_prompts"] > 0 and r["budget/max_n"] > r["budget/min_n"]
               for r in knap), [(r["budget/min_n"], r["budget/max_n"]) for r in knap]
    assert all("budget/q/add" in r for r in _train(wd, "curriculum"))
    assert sum(s["effective_rollouts"] for s in rollout_budget.read_step_log(wd / "knapsack")) > 0


def test_rollout_budget_report_reads_each_arm_at_matched_tokens(runs):
    wd, text, _ = runs
    curves = {a: rollout_budget.arm_curve(wd / a) for a in BUDGET_SMOKE_ARMS}
    budget = min(max(c["cum"].values()) for c in curves.values())
    assert f"T* = {budget:,}" in text
    for arm, c in curves.items():
        step = rollout_budget.matched_eval_step([p["step"] for p in c["points"]], c["cum"],
                                                budget)
        assert c["cum"][step] <= budget
        assert f"| {arm} |" in text and f"| {step} ({c['cum'][step]:,}) |" in text
    assert (wd / "plots" / "pass_vs_tokens.png").exists()
    assert "## Data budget" in text and "rollout tokens sampled" in text


def test_rl_mixture_pilots_surrogates_and_chosen_mixture(runs):
    """5 pilots (3 fitted, 2 held out) on the simplex; both surrogates scored; the modomodo arm
    trained on the quadratic argmax (its config holds those weights; uniform's table entry has
    1/2 each); the per-family budget matches the step logs; a rerun reuses every pilot and arm."""
    wd, _, text = runs
    fit = json.loads((wd / rl_mixture.FIT_FILE).read_text())
    assert len(fit["pilots"]) == 5 and sum(p["held_out"] for p in fit["pilots"].values()) == 2
    assert set(fit["surrogates"]) == {"linear", "quadratic"}
    chosen = fit["chosen"]
    assert chosen == fit["surrogates"]["quadratic"]["argmax"]
    assert sum(chosen.values()) == pytest.approx(1.0) and min(chosen.values()) >= 0
    cfg = json.loads((wd / "modomodo" / "config.json").read_text())
    assert cfg["rl"]["family_weights"] == list(chosen.values())
    uniform = rl_mixture.arms_for(rl_mixture.PRESETS["cpu-smoke"])["uniform"]
    assert uniform[-1] == "rl.family_weights=0.5,0.5"
    for arm in MIXTURE_SMOKE_ARMS:
        stats = rollout_budget.read_step_log(wd / arm)
        for fam in ("add", "sub"):
            n = sum(len(s["families"].get(fam, {}).get("prompts", [])) for s in stats)
            assert f"| {arm} | {fam} |" in text and f" | {n:,} | " in text
    assert "## Surrogates (MoDoMoDo)" in text and "| quadratic |" in text
    pilot_mtimes = {p: p.stat().st_mtime for p in wd.glob("_modomodo-*/pilot*/metrics.jsonl")}
    assert len(pilot_mtimes) == 5
    rl_mixture.main(["--preset", "cpu-smoke", "--workdir", os.fspath(wd),
                     "--arms", ",".join(MIXTURE_SMOKE_ARMS), *MIXTURE_SET])
    assert {p: p.stat().st_mtime for p in pilot_mtimes} == pilot_mtimes
    assert json.loads((wd / rl_mixture.FIT_FILE).read_text())["chosen"] == chosen
    assert np.isfinite(fit["pilots"]["pilot000"]["score"])


@pytest.mark.optimized  # judged as the real TPU compile (tests/conftest.py)
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu: pip install -e '.[tpu]'")
def test_knapsack_rl_programs_compile_for_tpu():
    """moejax.aot compiles the Knapsack arm's step as the trainer runs it: one G=1 rollout over
    the prompts_per_step x num_generations repeated prompt rows (v5e:2x2, cpu-smoke shapes)."""
    from moejax import aot, experiment
    from moejax.mesh import make_mesh
    presets, arms = aot.experiment_tables(rollout_budget)
    cfg = experiment.build_config(presets, arms, "cpu-smoke", "knapsack", ["mesh.data=4"])
    mesh = make_mesh(cfg.mesh, aot.topology_devices("v5e:2x2"))
    progs = aot.build_rl_programs(cfg, mesh, eval_rollout=False)
    assert set(progs) == {"rollout", "logprobs", "update"}
    rows = cfg.rl.rows_per_step
    assert (progs["rollout"].work.rows, progs["rollout"].work.decode_rows) == (rows, rows)
