"""The pretrain experiment end to end on its cpu-smoke preset: runs, checkpoints, resumes, reports."""

import json
import os

import pytest

from experiments import pretrain
from moejax.metrics import read_metrics


@pytest.mark.slow
def test_cpu_smoke_runs_resumes_and_reports(data_cache, tmp_path, monkeypatch, capsys):
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
    # every report states tokens seen, passes per domain, eval tokens and the corpus provenance
    from moejax.analysis.budget import domain_budget
    from moejax.data import corpus_provenance, prepare_data
    cfg = pretrain.experiment.build_config(pretrain.PRESETS, pretrain.ARMS, "cpu-smoke", "baseline",
                                           [f"data.cache_dir={data_cache}", "train.steps=6"])
    budget = domain_budget(prepare_data(cfg.data), 6, cfg.train.batch_size)
    budget_text = report.split("## Data budget")[1]
    for r in budget:
        assert f"| baseline | {r['domain']} | {r['tokens_seen']:,.0f} |" in budget_text
    assert sum(r["tokens_seen"] for r in budget) == 6 * cfg.train.batch_size * cfg.data.seq_len
    prov = json.load(open(os.path.join(arm, "summary.json")))["corpus"]
    assert prov == corpus_provenance(cfg.data) and prov["sha256"][:16] in budget_text
    assert "Validation tokens per domain" in budget_text
    assert os.path.getsize(os.path.join(wd, "plots", "loss.png")) > 1000
    # rerunning a finished arm with the same config (or an execution-only change) does not train
    metrics_before = open(os.path.join(arm, "metrics.jsonl")).read()

    def must_not_train(cfg, workdir):
        raise AssertionError(f"{workdir} was trained again")

    monkeypatch.setattr(pretrain, "run_arm", must_not_train)
    third = pretrain.main(common + ["--set", "train.steps=6"])
    assert third["baseline"] == json.load(open(os.path.join(arm, "summary.json")))
    assert pretrain.main(common + ["--set", "train.steps=6", "--set", "model.remat=full"])
    assert open(os.path.join(arm, "metrics.jsonl")).read() == metrics_before
    # another model/data/loss setting is refused, naming it: the old run is not reported as new
    capsys.readouterr()
    for change in ("train.lr=1e-4", "model.d_ff=256", "data.mixture=2,1,1"):
        with pytest.raises(SystemExit) as exit_info:
            pretrain.main(common + ["--set", "train.steps=6", "--set", change])
        assert exit_info.value.code == 2
        assert change.split("=")[0] in capsys.readouterr().err
    assert open(os.path.join(arm, "metrics.jsonl")).read() == metrics_before
