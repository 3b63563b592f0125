"""The growth experiments end to end on their cpu-smoke presets (slow: CI runs them)."""

import json
import os

import pytest

from experiments import gstack, upcycle
from moejax.metrics import read_metrics


GSTACK_ARMS = ("scratch", "gstack", "gzero", "grandom", "glearn", "scratch-s2")


@pytest.mark.slow
def test_gstack_smoke_all_arms(data_cache, tmp_path):
    wd = str(tmp_path / "gstack")
    argv = ["--preset", "cpu-smoke", "--workdir", wd, "--arms", ",".join(GSTACK_ARMS),
            "--set", f"data.cache_dir={data_cache}"]
    out = gstack.main(argv)
    assert set(out) == set(GSTACK_ARMS) and set(gstack.BASE_ARMS) < set(gstack.ARMS)
    report = open(os.path.join(wd, "report.md")).read()
    for arm in gstack.BASE_ARMS:
        assert f"| {gstack.LABELS[arm]} |" in report
    assert "| scratch | 2 |" in report and " ± " in report  # two seeds of scratch aggregated
    assert os.path.getsize(os.path.join(wd, "plots", "val_loss_vs_flops.png")) > 1000
    for arm in ("gzero", "grandom"):  # G_zero copies and MSG at m(0) = 0 preserve the function
        recs = read_metrics(os.path.join(wd, arm, "metrics.jsonl"))
        event = [r for r in recs if r.get("event") == "grow"][0]
        before = [r for r in recs if r["step"] == event["step"] and "val/loss" in r
                  and "event" not in r][0]
        assert event["val/loss"] == pytest.approx(before["val/loss"], rel=1e-5), arm
    cfg = json.load(open(os.path.join(wd, "grandom", "config.json")))["growth"]
    assert (cfg["new_layers"], cfg["fade_in_steps"]) == ("top", 2)
    # matched FLOPs: every growth arm ends within one step's FLOPs of scratch
    scratch = gstack.curve(os.path.join(wd, "scratch"))[0][-1]
    for arm in ("gstack", "gzero", "grandom", "glearn"):
        x = gstack.curve(os.path.join(wd, arm))[0][-1]
        assert abs(x - scratch) / scratch < 0.15
    again = gstack.main(argv)  # finished arms are not rerun
    assert set(again) == set(GSTACK_ARMS)


def test_gstack_mean_spread_and_seed_rows():
    """Mean ± half-range by hand; each seed's speedup is against scratch of the same seed."""
    import numpy as np
    assert gstack.mean_spread([1.0, 3.0]) == "2 ± 1" and gstack.mean_spread([2.5]) == "2.5"
    assert gstack.mean_spread([None]) == "n/a"
    x = np.array([0.0, 10.0])
    curves = {"scratch": (x, np.array([5.0, 3.0]), None),
              "scratch-s2": (x, np.array([5.0, 4.0]), None),
              "gstack": (x, np.array([4.0, 2.0]), 1.0),  # reaches 3.0 at x=5: 50% saved
              "gstack-s2": (x, np.array([4.0, 2.0]), 1.0)}  # reaches 4.0 at x=0: 100% saved
    rows = gstack.seed_rows(curves)
    row = [r for r in rows if r.startswith("| G_stack |")][0]
    assert "| 2 | 2 ± 0 |" in row and "| 2.5 ± 2.5 |" in row and "| 75 ± 25 % |" in row


@pytest.mark.slow
def test_upcycle_smoke_all_arms(data_cache, tmp_path):
    wd = str(tmp_path / "upcycle")
    out = upcycle.main(["--preset", "cpu-smoke", "--workdir", wd,
                        "--set", f"data.cache_dir={data_cache}"])
    assert set(out) == set(upcycle.ARMS)
    report = open(os.path.join(wd, "report.md")).read()
    for arm in upcycle.ARMS:
        assert f"| {arm} |" in report
    for arm in ("copy", "fine", "emoe", "emoe64"):
        assert os.path.getsize(os.path.join(wd, "plots", f"heatmap_{arm}.png")) > 1000
    for png in ("id_loss_vs_flops.png", "ood_loss_vs_flops.png"):
        assert os.path.getsize(os.path.join(wd, "plots", png)) > 1000
    assert "| ID loss | OOD loss |" in report and "never see math" in report
    sources = [d for d in os.listdir(wd) if d.startswith("_source-")]
    assert len(sources) == 1  # one dense run shared by every arm
    src_cfg = json.load(open(os.path.join(wd, sources[0], "config.json")))
    assert src_cfg["data"]["mixture"] == [1.0, 1.0, 1.0]  # the source saw every domain
    emoe64 = json.load(open(os.path.join(wd, "emoe64", "config.json")))["model"]["moe"]
    assert (emoe64["num_experts"], emoe64["top_k"], emoe64["d_expert"]) == (64, 16, 4)
    assert (emoe64["first_dense_layers"], emoe64["moe_every"]) == (1, 4)  # 2 layers: layer 1
    assert emoe64["balance"]["scope"] == "none"
    dense = json.load(open(os.path.join(wd, "dense", "config.json")))
    assert dense["data"]["mixture"] == [1.0, 1.0, 0.0]
    table = report.split("## Data budget")[0].splitlines()
    gflops = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in table
              if line.startswith("| ") and line.split("|")[1].strip() in upcycle.ARMS}
    assert gflops["copy"] > gflops["dense"] > gflops["emoe64"] > gflops["emoe"]  # active FFN
    recs = read_metrics(os.path.join(wd, "dense", "metrics.jsonl"))
    event = [r for r in recs if r.get("event") == "grow"][0]
    before = [r for r in recs if r["step"] == event["step"] and "val/loss" in r][0]
    assert event["val/loss"] == pytest.approx(before["val/loss"], rel=1e-5)
