"""The MoE experiments end to end on their cpu-smoke presets: every arm trains, evaluates,
checkpoints and lands in the report (CI runs these; they are marked slow)."""

import json
import math
import os

import numpy as np
import pytest

from experiments import lbl_scope, routers
from moejax.config import ConfigError
from moejax.metrics import read_metrics
from moejax.overrides import apply_overrides

# 8 test devices; the smoke micro-batch holds 4 sequences: shard the batch 4 ways, heads 2 ways
MESH = ["--set", "mesh.data=4", "--set", "mesh.tensor=2"]


@pytest.mark.slow
def test_lbl_scope_smoke_all_arms(data_cache, tmp_path):
    wd = str(tmp_path / "lbl")
    out = lbl_scope.main(["--preset", "cpu-smoke", "--workdir", wd, *MESH,
                          "--set", f"data.cache_dir={data_cache}"])
    arms = lbl_scope.DEFAULT_ARMS["cpu-smoke"]
    assert set(out) == set(arms)
    report = open(os.path.join(wd, "report.md")).read()
    for arm in arms:
        assert f"| {arm} |" in report
        assert os.path.getsize(os.path.join(wd, "plots", f"heatmap_{arm}.png")) > 1000
        recs = read_metrics(os.path.join(wd, arm, "metrics.jsonl"))
        last = [r for r in recs if "moe/domain_counts" in r][-1]
        assert len(last["moe/domain_counts"]) == 2  # [L_moe, domains, experts]
    assert "I(domain; expert) per MoE layer" in report and "passes" in report

    def balance(arm):
        recs = read_metrics(os.path.join(wd, arm, "metrics.jsonl"))
        return [r["train/balance_loss"] for r in recs if "train/balance_loss" in r]
    # the aux-free arms have no LBL; LBL arms (incl. the pooled shuffled and bsz8 groups and the
    # switch arm on both sides of its switch) report a balance loss near 1
    assert all(v == 0.0 for v in balance("aux_free"))
    for arm in ("global", "shuffled", "bsz8", "switch", "micro"):
        assert all(0.9 < v < 3.0 for v in balance(arm)), arm


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
def test_routers_smoke_all_arms(data_cache, tmp_path):
    wd = str(tmp_path / "routers")
    out = routers.main(["--preset", "cpu-smoke", "--workdir", wd, *MESH,
                        "--set", f"data.cache_dir={data_cache}"])
    arms = routers.DEFAULT_ARMS["cpu-smoke"]
    assert set(out) == set(arms) == set(routers.BASE_ARMS)
    report = open(os.path.join(wd, "report.md")).read()
    for arm in arms:
        assert f"| {routers._label(arm)} |" in report
    assert "expert_choice (non-causal†)" in report and "passes" in report
    # every token-choice arm with a fixed k routes each non-padding eval token exactly k times:
    # the selections per layer (eval domain_counts, null columns included) over k give the same
    # router token count in every such arm and layer (same eval batches); null experts take some
    # of the null arm's 3 slots, so its real experts per token fall strictly below 3. CoE counts
    # both iterations' picks (2 + 2 of 16 half-width experts), CartesianMoE both sub-layers'
    # (2 + 2), HyperMoE top-1.
    fixed_k = {"topk": 2, "rmoe": 2, "rmoe_reset": 2, "rmoe_normal": 2, "moge": 2,
               "null_experts": 3, "coe": 4, "cartesian": 4, "hyper": 1}
    counts = {arm: np.asarray([r for r in read_metrics(os.path.join(wd, arm, "metrics.jsonl"))
                               if "moe/domain_counts" in r][-1]["moe/domain_counts"])
              for arm in [*fixed_k, "expert_choice"]}  # [L, domains, E_all]
    tokens = counts["topk"].sum(axis=(1, 2)) / 2
    smoke = routers.PRESETS["cpu-smoke"]
    rows = smoke.train.batch_size * smoke.data.seq_len  # router tokens of one full eval batch
    batches = 3 * smoke.train.eval_batches  # code, prose, math
    assert tokens[0] == batches * rows  # the smoke eval batches hold no padding
    for arm, k in fixed_k.items():
        np.testing.assert_array_equal(counts[arm].sum(axis=(1, 2)) / k, [tokens[0]] * len(tokens),
                                      err_msg=arm)
    real_per_token = counts["null_experts"][..., :8].sum() / (tokens[0] * len(tokens))
    assert 0 < real_per_token < 3.0
    # expert choice: each of the 8 experts takes C = ceil(capacity * n * k / E) tokens per batch
    np.testing.assert_array_equal(counts["expert_choice"].sum(axis=(1, 2)),
                                  [batches * 8 * math.ceil(1.0 * rows * 2 / 8)] * len(tokens))
    # the routing pass after training sees the same validation set: its active real experts per
    # token are k for the fixed-k arms (null experts: the eval's real share), and the report's
    # column shows them
    for arm in arms:
        summary = json.load(open(os.path.join(wd, arm, "summary.json")))
        active = summary["routing"]["active_experts"]
        if arm in fixed_k and arm != "null_experts":
            assert active == fixed_k[arm], arm
        row = [line for line in report.splitlines()
               if line.startswith(f"| {routers._label(arm)} |")][0]
        assert row.split("|")[7].strip() == f"{active:.3f}", (arm, row)
        # the drop-top-1 probe ran exactly for the ranked top-k routers
        assert ("drop_top1_loss" in summary) == (arm not in ("topp", "expert_choice", "moge")), arm
        assert np.isfinite(summary.get("drop_top1_loss", 0.0)), arm
        # consecutive-layer MI for the arms reporting per-token choices (2 MoE layers: 1 pair)
        mi = summary["routing"]["layer_mi"]
        assert (mi is None) == (arm in ("cartesian", "expert_choice", "topp")), arm
        assert mi is None or (len(mi) == 1 and 0 <= mi[0] <= np.log(8) + 1e-9), arm
    assert "| topp | code |" in report
