"""The run loop through ``Trainer.run``: evaluation cadence, Ctrl-C, which config changes a resume
accepts, and the non-finite policy end to end."""

import os
import shutil
import signal

import numpy as np
import pytest

from moejax.config import ConfigError
from moejax.metrics import read_metrics
from moejax.testing import tiny_config
from moejax.trainer import Trainer

STEPS = 6


def _cfg(data_cache, model=None, data=None, **train):
    return tiny_config(model=model or {}, data={"cache_dir": data_cache, **(data or {})},
                       train={"steps": STEPS, "ckpt_every": 100, "eval_every": 100, **train})


def _records(workdir, key):
    return {r["step"]: r[key] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if key in r}


def test_eval_runs_on_its_own_cadence(data_cache, tmp_path):
    """log_every=4, eval_every=6: evaluations at 0, 6 and 12, not only every lcm(4, 6)=12 (the
    issue's log 10 / eval 25 at a fifth of the steps)."""
    wd = str(tmp_path / "run")
    Trainer(_cfg(data_cache, steps=12, log_every=4, eval_every=6), wd, progress=False).run()
    assert sorted(_records(wd, "val/loss")) == [0, 6, 12]
    assert sorted(_records(wd, "train/loss")) == [4, 6, 8, 12]


@pytest.fixture(scope="module")
def straight(data_cache, tmp_path_factory):
    """STEPS steps without interruption: the reference for the resumed runs."""
    wd = str(tmp_path_factory.mktemp("straight"))
    return wd, Trainer(_cfg(data_cache), wd, progress=False).run()


def _ctrl_c_at(step):
    def hook(trainer, s, metrics):
        if s == step:
            os.kill(os.getpid(), signal.SIGINT)
    return hook


@pytest.fixture(scope="module")
def interrupted(data_cache, tmp_path_factory):
    """A run interrupted by Ctrl-C (SIGINT) after step 3 of STEPS; no regular checkpoint before."""
    wd = str(tmp_path_factory.mktemp("interrupted") / "run")
    handler_before = signal.getsignal(signal.SIGINT)  # pytest's own, or SIG_IGN in an xdist worker
    try:
        summary = Trainer(_cfg(data_cache), wd, on_step=_ctrl_c_at(3), progress=False).run()
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the run loop without a checkpoint")
    assert signal.getsignal(signal.SIGINT) is handler_before  # the run loop restored it
    return wd, summary


def test_ctrl_c_saves_and_resumes_exactly(interrupted, straight, data_cache, tmp_path):
    wd0, summary = interrupted
    assert summary["preempted"] and summary["step"] == 3
    assert sorted(int(d) for d in os.listdir(os.path.join(wd0, "ckpt")) if d.isdigit()) == [3]
    wd = str(tmp_path / "run")
    shutil.copytree(wd0, wd)
    resumed = Trainer(_cfg(data_cache), wd, progress=False).run()
    assert resumed["step"] == STEPS and not resumed["preempted"]
    ref, got = _records(straight[0], "train/loss"), _records(wd, "train/loss")
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_array_equal([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)])


@pytest.mark.parametrize("change, field", [
    (dict(batch_size=16), "train.batch_size"),
    (dict(model={"d_ff": 256}), "model.d_ff"),
    (dict(data={"seq_len": 32}), "data.seq_len"),
    (dict(data={"mixture": (2.0, 1.0, 1.0)}), "data.mixture"),
    (dict(lr=1e-3), "train.lr"),
])
def test_resume_refuses_changes_to_the_data_stream_or_the_math(interrupted, data_cache, change,
                                                               field):
    wd = interrupted[0]
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        Trainer(_cfg(data_cache, **change), wd, progress=False).run()


def test_resume_accepts_execution_only_changes(interrupted, straight, data_cache, tmp_path):
    """remat, prefetch threads, eval/ckpt cadence and a longer budget may change on resume."""
    wd = str(tmp_path / "run")
    shutil.copytree(interrupted[0], wd)
    cfg = _cfg(data_cache, model={"remat": "full"}, data={"prefetch_threads": 1}, eval_every=3,
               ckpt_every=2)
    resumed = Trainer(cfg, wd, progress=False).run()
    assert resumed["step"] == STEPS
    ref, got = _records(straight[0], "train/loss"), _records(wd, "train/loss")
    np.testing.assert_allclose([got[s] for s in range(4, STEPS + 1)],
                               [ref[s] for s in range(4, STEPS + 1)], rtol=1e-5)


def test_a_budget_below_the_checkpoint_is_refused(interrupted, data_cache):
    with pytest.raises(ConfigError, match=r"train\.steps=2.*step 3"):
        Trainer(_cfg(data_cache, steps=2), interrupted[0], progress=False).run()


def test_a_saved_config_without_a_tuple_field_resumes():
    """A field the saved run predates counts with its default, compared after the same JSON round
    trip as the saved file (a tuple default is a list there): no false conflict."""
    import json

    from moejax.trainer import resume_conflicts

    cfg = tiny_config()
    saved = json.loads(cfg.to_json())
    del saved["data"]["domains"], saved["data"]["mixture"]
    assert resume_conflicts(saved, cfg) == {}
