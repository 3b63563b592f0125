"""The growth experiments end to end on their cpu-smoke presets (slow: CI runs them)."""

import os

import pytest

from experiments import gstack, upcycle
from moejax.metrics import read_metrics


@pytest.mark.slow
def test_gstack_smoke_all_arms(data_cache, tmp_path):
    wd = str(tmp_path / "gstack")
    out = gstack.main(["--preset", "cpu-smoke", "--workdir", wd,
                       "--set", f"data.cache_dir={data_cache}"])
    assert set(out) == set(gstack.ARMS)
    report = open(os.path.join(wd, "report.md")).read()
    for arm in gstack.ARMS:
        assert f"| {arm} |" in report
    assert os.path.getsize(os.path.join(wd, "plots", "val_loss_vs_flops.png")) > 1000
    recs = read_metrics(os.path.join(wd, "gzero", "metrics.jsonl"))
    event = [r for r in recs if r.get("event") == "grow"][0]
    before = [r for r in recs if r["step"] == event["step"] and "val/loss" in r][0]
    assert event["val/loss"] == pytest.approx(before["val/loss"], rel=1e-5)  # G_zero preserves
    # matched FLOPs: every growth arm ends within one step's FLOPs of scratch
    scratch = gstack.curve(os.path.join(wd, "scratch"))[0][-1]
    for arm in ("gstack", "gzero", "grandom"):
        x = gstack.curve(os.path.join(wd, arm))[0][-1]
        assert abs(x - scratch) / scratch < 0.15
    again = gstack.main(["--preset", "cpu-smoke", "--workdir", wd,  # finished arms are not rerun
                         "--set", f"data.cache_dir={data_cache}"])
    assert set(again) == set(gstack.ARMS)


@pytest.mark.slow
def test_upcycle_smoke_all_arms(data_cache, tmp_path):
    wd = str(tmp_path / "upcycle")
    out = upcycle.main(["--preset", "cpu-smoke", "--workdir", wd,
                        "--set", f"data.cache_dir={data_cache}"])
    assert set(out) == set(upcycle.ARMS)
    report = open(os.path.join(wd, "report.md")).read()
    for arm in upcycle.ARMS:
        assert f"| {arm} |" in report
    for arm in ("copy", "fine", "emoe"):
        assert os.path.getsize(os.path.join(wd, "plots", f"heatmap_{arm}.png")) > 1000
    sources = [d for d in os.listdir(wd) if d.startswith("_source-")]
    assert len(sources) == 1  # one dense run shared by every arm
    recs = read_metrics(os.path.join(wd, "dense", "metrics.jsonl"))
    event = [r for r in recs if r.get("event") == "grow"][0]
    before = [r for r in recs if r["step"] == event["step"] and "val/loss" in r][0]
    assert event["val/loss"] == pytest.approx(before["val/loss"], rel=1e-5)
