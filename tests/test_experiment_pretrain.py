"""The pretrain experiment end to end on its cpu-smoke preset: runs, checkpoints, resumes, reports."""

import json
import os

import pytest

from experiments import pretrain
from moejax.metrics import read_metrics


@pytest.mark.slow
def test_cpu_smoke_runs_resumes_and_reports(data_cache, tmp_path):
    wd = str(tmp_path / "exp")
    common = ["--preset", "cpu-smoke", "--workdir", wd, "--set", f"data.cache_dir={data_cache}"]
    first = pretrain.main([*common, "--set", "train.steps=3"])
    assert first["baseline"]["step"] == 3
    # a longer budget resumes the finished 3-step run from its checkpoint instead of restarting
    second = pretrain.main([*common, "--set", "train.steps=6"])
    arm = os.path.join(wd, "baseline")
    steps = [r["step"] for r in read_metrics(os.path.join(arm, "metrics.jsonl")) if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6] and second["baseline"]["step"] == 6
    assert os.listdir(os.path.join(arm, "ckpt")) and os.listdir(os.path.join(arm, "tb"))
    assert json.load(open(os.path.join(arm, "summary.json")))["step"] == 6
    report = open(os.path.join(wd, "report.md")).read()
    for domain in ("code", "prose", "math"):
        assert f"| baseline | {domain} |" in report
    assert os.path.getsize(os.path.join(wd, "plots", "loss.png")) > 1000
    # rerunning a finished arm does not train again
    third = pretrain.main(common + ["--set", "train.steps=6"])
    assert third["baseline"]["step"] == 6
