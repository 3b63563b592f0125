"""What a user of the experiment command line sees: one message for a configuration or data error
(the traceback only with --debug or MOEJAX_DEBUG=1), and the non-finite policy end to end."""

import json
import os
import subprocess
import sys

import pytest

from experiments import pretrain
from moejax.config import ConfigError
from moejax.metrics import read_metrics
from moejax.trainer import DataError, NonFiniteLossError

BAD_MESH = ["--set", "model.moe.num_experts=7", "--set", "mesh.expert=2"]


def _argv(tmp_path, data_cache, *extra):
    return ["--preset", "cpu-smoke", "--workdir", str(tmp_path / "exp"),
            "--set", f"data.cache_dir={data_cache}", *extra]


def test_config_error_prints_one_message_without_traceback(tmp_path, data_cache, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(_argv(tmp_path, data_cache, *BAD_MESH))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model.moe.num_experts=7" in err and "mesh.expert=2" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3


def test_data_error_prints_one_message(tmp_path, data_cache, capsys):
    missing = str(tmp_path / "nowhere" / "tokenizer.json")
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(_argv(tmp_path, data_cache, "--set", f"data.tokenizer={missing}"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "data.tokenizer" in err and "Traceback" not in err


def test_debug_flag_and_environment_show_the_traceback(tmp_path, data_cache, monkeypatch):
    with pytest.raises(ConfigError, match="num_experts=7"):
        pretrain.main(_argv(tmp_path, data_cache, "--debug", *BAD_MESH))
    monkeypatch.setenv("MOEJAX_DEBUG", "1")
    with pytest.raises(ConfigError, match="num_experts=7"):
        pretrain.main(_argv(tmp_path, data_cache, *BAD_MESH))
    missing = str(tmp_path / "tokenizer.json")
    with pytest.raises(DataError, match="data.tokenizer"):
        pretrain.main(_argv(tmp_path, data_cache, "--set", f"data.tokenizer={missing}"))


def test_the_real_command_line_prints_a_short_error(tmp_path, data_cache):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("MOEJAX_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "experiments.pretrain",
                           *_argv(tmp_path, data_cache, *BAD_MESH)],
                          capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(pretrain.__file__))))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "num_experts=7" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3, proc.stderr


# lr=1e30 without warmup: step 1 sends the weights to ~1e30, every later loss is not finite
NAN = ["--set", "train.lr=1e30", "--set", "train.warmup_steps=0", "--set", "train.steps=4",
       "--set", "train.ckpt_every=100"]


def test_nan_policy_stop_through_the_cli(tmp_path, data_cache):
    with pytest.raises(NonFiniteLossError, match=r"step 2: non-finite.*nan_policy='stop'"):
        pretrain.main(_argv(tmp_path, data_cache, *NAN, "--set", "train.nan_policy=stop"))
    assert not os.path.exists(tmp_path / "exp" / "baseline" / "summary.json")


def test_nan_policy_skip_through_the_cli(tmp_path, data_cache):
    out = pretrain.main(_argv(tmp_path, data_cache, *NAN, "--set", "train.nan_policy=skip"))
    summary = out["baseline"]
    assert summary["step"] == 4 and not summary["preempted"]
    assert summary["nonfinite_steps"] == 3  # steps 2, 3, 4: the skipped updates keep it broken
    recs = read_metrics(tmp_path / "exp" / "baseline" / "metrics.jsonl")
    assert [r["train/nonfinite_steps"] for r in recs if "train/loss" in r] == [0, 1, 2, 3]
    saved = json.load(open(tmp_path / "exp" / "baseline" / "summary.json"))
    assert saved["nonfinite_steps"] == 3
