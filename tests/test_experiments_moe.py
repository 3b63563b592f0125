"""The MoE experiments end to end on their cpu-smoke presets, each with the fewest arms that cover
its report's distinct paths (train, evaluate, checkpoint, routing pass, probe, report, plots; CI
runs these, marked slow); every arm of every preset builds and initialises abstractly here, and
the per-arm mechanisms are unit-tested (tests/test_balance.py, tests/test_router.py,
tests/test_routers_experiment.py)."""

import json
import math
import os

import numpy as np
import pytest

from experiments import lbl_scope, routers
from moejax.config import ConfigError
from moejax.experiment import build_config
from moejax.metrics import read_metrics
from moejax.overrides import apply_overrides

# 8 test devices; the smoke micro-batch holds 4 sequences: shard the batch 4 ways, heads 2 ways.
# Two of the preset's 4 steps: one evaluation and one checkpoint (at step 2, eval_every =
# ckpt_every = 2) instead of two each; the checks read the last evaluation, the logged balance
# losses and the post-training routing pass, which a 2-step run has as well
SMOKE_SET = ["--set", "mesh.data=4", "--set", "mesh.tensor=2", "--set", "train.steps=2"]
# an LBL arm and the aux-free (sigmoid, bias-only) arm: the two balance paths of the report;
# the scopes themselves (micro, sequence, shuffled, bsz groups, switch) are tests/test_balance.py's
LBL_SMOKE_ARMS = ("global", "aux_free")
# top-k (drop-top-1 probe, layer MI) and expert choice (non-causal marker, capacity counts, no
# probe or MI, the token-adaptive table); each router's fixed-k routing is
# test_routers_experiment.py::test_smoke_arm_routes_each_token_its_fixed_k
ROUTER_SMOKE_ARMS = ("topk", "expert_choice")


@pytest.mark.slow
def test_lbl_scope_smoke(data_cache, tmp_path):
    wd = str(tmp_path / "lbl")
    out = lbl_scope.main(["--preset", "cpu-smoke", "--workdir", wd, *SMOKE_SET,
                          "--arms", ",".join(LBL_SMOKE_ARMS),
                          "--set", f"data.cache_dir={data_cache}"])
    assert set(out) == set(LBL_SMOKE_ARMS)
    report = open(os.path.join(wd, "report.md")).read()
    for arm in LBL_SMOKE_ARMS:
        assert f"| {arm} |" in report
        assert os.path.getsize(os.path.join(wd, "plots", f"heatmap_{arm}.png")) > 1000
        recs = read_metrics(os.path.join(wd, arm, "metrics.jsonl"))
        last = [r for r in recs if "moe/domain_counts" in r][-1]
        assert len(last["moe/domain_counts"]) == 2  # [L_moe, domains, experts]
    assert "I(domain; expert) per MoE layer" in report and "passes" in report

    def balance(arm):
        recs = read_metrics(os.path.join(wd, arm, "metrics.jsonl"))
        return [r["train/balance_loss"] for r in recs if "train/balance_loss" in r]
    # the aux-free arm has no LBL; the LBL arm reports a balance loss near 1
    assert balance("aux_free") and all(v == 0.0 for v in balance("aux_free"))
    assert balance("global") and all(0.9 < v < 3.0 for v in balance("global"))


def test_lbl_scope_every_arm_of_every_preset_builds():
    """Each arm (seed replicas included) of each preset builds, validates and passes run_arm's
    micro/global contrast check (the arms change the balance loss and router score, not the
    model's shapes: the smoke initialises global's and aux_free's)."""
    for preset in lbl_scope.PRESETS:
        arms = lbl_scope.arms_for(preset)
        assert set(lbl_scope.DEFAULT_ARMS[preset]) <= set(arms), preset
        for arm in arms:
            cfg = build_config(lbl_scope.PRESETS, arms, preset, arm, [])
            lbl_scope.check_contrast(cfg)


def test_lbl_scope_presets_contrast_micro_and_global():
    """Micro-batch <= 4 sequences vs a global batch >= 64 on cpu, >= 128 on gpu/tpu; every arm
    comes with a second-seed replica; the batch-size sweep doubles up to the global batch."""
    for preset, want in lbl_scope.MIN_GLOBAL_SEQS.items():
        cfg = lbl_scope.PRESETS[preset]
        assert cfg.train.batch_size >= want, preset
        assert lbl_scope.micro_seqs(cfg) < cfg.train.batch_size, preset
    for preset, most in lbl_scope.MAX_MICRO_SEQS.items():
        assert lbl_scope.micro_seqs(lbl_scope.PRESETS[preset]) <= most <= 4, preset
    arms = lbl_scope.arms_for("cpu")
    assert [a for a in arms if a.startswith("bsz") and not a.endswith("-s2")] == \
        [f"bsz{g}" for g in (1, 2, 4, 8, 16, 32, 64)]
    assert all(f"{a}-s2" in arms for a in lbl_scope.DEFAULT_ARMS["cpu-smoke"])
    assert set(lbl_scope.DEFAULT_ARMS["cpu"]) == {
        f"{a}{s}" for a in ("sequence", "micro", "shuffled", "global") for s in ("", "-s2")}
    no_accum = apply_overrides(lbl_scope.PRESETS["cpu"], ["train.grad_accum=1",
                                                          *lbl_scope.ARMS["micro"]])
    with pytest.raises(ConfigError, match="grad_accum"):
        lbl_scope.check_contrast(no_accum)


@pytest.mark.slow
def test_routers_smoke(data_cache, tmp_path):
    wd = str(tmp_path / "routers")
    out = routers.main(["--preset", "cpu-smoke", "--workdir", wd, *SMOKE_SET,
                        "--arms", ",".join(ROUTER_SMOKE_ARMS),
                        "--set", f"data.cache_dir={data_cache}"])
    assert set(out) == set(ROUTER_SMOKE_ARMS)
    report = open(os.path.join(wd, "report.md")).read()
    for arm in ROUTER_SMOKE_ARMS:
        assert f"| {routers._label(arm)} |" in report
    assert "expert_choice (non-causal†)" in report and "passes" in report
    # the trainer's eval counts: top-k routes each non-padding eval token exactly k = 2 times per
    # layer; expert choice fills each of its 8 experts to C = ceil(capacity * n * k / E) tokens
    counts = {arm: np.asarray([r for r in read_metrics(os.path.join(wd, arm, "metrics.jsonl"))
                               if "moe/domain_counts" in r][-1]["moe/domain_counts"])
              for arm in ROUTER_SMOKE_ARMS}  # [L, domains, E_all]
    tokens = counts["topk"].sum(axis=(1, 2)) / 2
    smoke = routers.PRESETS["cpu-smoke"]
    rows = smoke.train.batch_size * smoke.data.seq_len  # router tokens of one full eval batch
    batches = 3 * smoke.train.eval_batches  # code, prose, math
    np.testing.assert_array_equal(tokens, [batches * rows] * len(tokens))  # no eval padding
    np.testing.assert_array_equal(counts["expert_choice"].sum(axis=(1, 2)),
                                  [batches * 8 * math.ceil(1.0 * rows * 2 / 8)] * len(tokens))
    # the routing pass after training sees the same validation set: top-k's active experts per
    # token are k, and the report's column shows each arm's
    for arm in ROUTER_SMOKE_ARMS:
        summary = json.load(open(os.path.join(wd, arm, "summary.json")))
        active = summary["routing"]["active_experts"]
        if arm == "topk":
            assert active == 2
        row = [line for line in report.splitlines()
               if line.startswith(f"| {routers._label(arm)} |")][0]
        assert row.split("|")[7].strip() == f"{active:.3f}", (arm, row)
        # the drop-top-1 probe ran exactly for the ranked top-k router
        assert ("drop_top1_loss" in summary) == (arm == "topk"), arm
        assert np.isfinite(summary.get("drop_top1_loss", 0.0)), arm
        # consecutive-layer MI for the arm reporting per-token choices (2 MoE layers: 1 pair)
        mi = summary["routing"]["layer_mi"]
        assert (mi is None) == (arm == "expert_choice"), arm
        assert mi is None or (len(mi) == 1 and 0 <= mi[0] <= np.log(8) + 1e-9), arm
    assert "| expert_choice (non-causal†) | code |" in report  # the token-adaptive table
