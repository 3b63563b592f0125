"""The MoE experiments end to end on their cpu-smoke presets: every arm trains, evaluates,
checkpoints and lands in the report (CI runs these; they are marked slow)."""

import os

import pytest

from experiments import lbl_scope, routers
from moejax.metrics import read_metrics

# 8 test devices; the smoke micro-batch holds 4 sequences: shard the batch 4 ways, heads 2 ways
MESH = ["--set", "mesh.data=4", "--set", "mesh.tensor=2"]


@pytest.mark.slow
def test_lbl_scope_smoke_all_arms(data_cache, tmp_path):
    wd = str(tmp_path / "lbl")
    out = lbl_scope.main(["--preset", "cpu-smoke", "--workdir", wd, *MESH,
                          "--set", f"data.cache_dir={data_cache}"])
    assert set(out) == set(lbl_scope.ARMS)
    report = open(os.path.join(wd, "report.md")).read()
    for arm in lbl_scope.ARMS:
        assert f"| {arm} |" in report
        assert os.path.getsize(os.path.join(wd, "plots", f"heatmap_{arm}.png")) > 1000
        recs = read_metrics(os.path.join(wd, arm, "metrics.jsonl"))
        last = [r for r in recs if "moe/domain_counts" in r][-1]
        assert len(last["moe/domain_counts"]) == 2  # [L_moe, domains, experts]
    # the aux-free arm moved its router biases; LBL arms report a balance loss near 1
    aux_free = [r for r in read_metrics(os.path.join(wd, "aux_free", "metrics.jsonl"))
                if "train/balance_loss" in r]
    assert all(r["train/balance_loss"] == 0.0 for r in aux_free)
    glob = [r for r in read_metrics(os.path.join(wd, "global", "metrics.jsonl"))
            if "train/balance_loss" in r]
    assert all(0.9 < r["train/balance_loss"] < 3.0 for r in glob)


@pytest.mark.slow
def test_routers_smoke_all_arms(data_cache, tmp_path):
    wd = str(tmp_path / "routers")
    out = routers.main(["--preset", "cpu-smoke", "--workdir", wd, *MESH,
                        "--set", f"data.cache_dir={data_cache}"])
    assert set(out) == set(routers.ARMS)
    report = open(os.path.join(wd, "report.md")).read()
    for arm in routers.ARMS:
        assert f"| {arm} |" in report
    active = {}
    for arm in routers.ARMS:
        last = [r for r in read_metrics(os.path.join(wd, arm, "metrics.jsonl"))
                if "train/loss" in r][-1]
        active[arm] = last["moe/active_experts/layer0"]
    assert active["topk"] == pytest.approx(2.0)
    assert active["null_experts"] <= 3.0
    assert 1.0 <= active["topp"] <= 4.0
