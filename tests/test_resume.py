"""Nothing is lost: exact resume after SIGTERM, restore onto another mesh, and two processes.

Runs are as short as their checks allow (each Trainer traces its own train and eval steps, the
dominant cost here; the programs themselves come from the persistent compilation cache after the
first run): STEPS = 8 with checkpoints every 2 steps where a run is interrupted."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from moejax import train as T
from moejax.ckpt import Checkpointer, CheckpointMismatchError
from moejax.config import MeshConfig
from moejax.data import prepare_data
from moejax.mesh import make_mesh
from moejax.metrics import read_metrics
from moejax.testing import tiny_config
from moejax.trainer import Trainer

STEPS = 8


def _losses(workdir):
    return {r["step"]: r["train/loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if "train/loss" in r}


def _cfg(data_cache, **train):
    return tiny_config(data={"cache_dir": data_cache},
                       train={"steps": STEPS, "ckpt_every": 100, "eval_every": 4, **train})


@pytest.fixture(scope="module")
def straight_run(data_cache, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("straight"))
    summary = Trainer(_cfg(data_cache), wd, progress=False).run()
    return wd, summary


def test_resume_after_sigterm_is_exact(straight_run, data_cache, tmp_path):
    """8 steps straight == 4 steps, SIGTERM (saves and returns), resume, 4 more steps."""
    wd_ref, ref_summary = straight_run
    wd = str(tmp_path / "run")

    def kill_at_4(trainer, step, metrics):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    # ckpt_every=2: the signal lands on a checkpoint step, which must not be saved twice
    first = Trainer(_cfg(data_cache, ckpt_every=2), wd, on_step=kill_at_4, progress=False).run()
    assert first["preempted"] and first["step"] == 4
    second = Trainer(_cfg(data_cache), wd, progress=False).run()
    assert not second["preempted"] and second["step"] == STEPS
    ref, got = _losses(wd_ref), _losses(wd)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))  # one continuous file
    np.testing.assert_array_equal([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)])
    assert second["val/loss"] == ref_summary["val/loss"]
    for f in ("config.json", "metrics.jsonl"):
        assert os.path.exists(os.path.join(wd, f))
    assert os.listdir(os.path.join(wd, "tb")), "tensorboard events written"


def test_restore_onto_a_different_mesh(data_cache, tmp_path):
    """A checkpoint written on (data=2, fsdp=4) restores onto (data=8) and training continues."""
    wd = str(tmp_path / "run")
    cfg_a = tiny_config(mesh=MeshConfig(data=2, fsdp=4), data={"cache_dir": data_cache},
                        train={"steps": 4, "ckpt_every": 4})
    trainer_a = Trainer(cfg_a, wd, progress=False)
    trainer_a.run()
    saved = trainer_a.state  # in memory on (data=2, fsdp=4): what was saved at its final step 4

    data = prepare_data(cfg_a.data, vocab_size=cfg_a.model.vocab_size)

    cfg_b = tiny_config(mesh=MeshConfig(data=8), data={"cache_dir": data_cache},
                        train={"steps": 6, "ckpt_every": 4})
    setup_b = T.setup(cfg_b, make_mesh(cfg_b.mesh))
    it_b = data.train_iterator(global_batch=8, process_index=0, process_count=1)
    moved, meta = Checkpointer(os.path.join(wd, "ckpt")).restore(4, setup_b.abstract_state, it_b)
    assert meta["step"] == 4
    targets = jax.tree.leaves(setup_b.state_shardings)
    for a, b, target in zip(jax.tree.leaves(saved), jax.tree.leaves(moved), targets, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding.is_equivalent_to(target, b.ndim)  # laid out for the new mesh
        assert dict(b.sharding.mesh.shape)["data"] == 8
    summary = Trainer(cfg_b, wd, progress=False).run()  # continues from step 4 on data=8
    assert summary["step"] == 6 and np.isfinite(summary["train/loss"])
    assert sorted(_losses(wd)) == list(range(1, 7))


def _corrupt_data_files(step_dir):
    """Overwrite every array data file of a checkpoint step (its metadata stays readable)."""
    files = [os.path.join(root, f) for root, _, fs in os.walk(step_dir) for f in fs
             if os.sep + "d" + os.sep in os.path.join(root, f) + os.sep]
    assert files, f"no data files under {step_dir}"
    for f in files:
        with open(f, "r+b") as fh:
            size = fh.seek(0, 2)
            fh.seek(0)
            fh.write(np.random.RandomState(0).bytes(size))


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_continues(straight_run, data_cache,
                                                                        tmp_path):
    """Checkpoints at 4 and 6 (2 kept), the data files of 6 destroyed: the rerun warns naming
    step 6, moves it aside (kept, no longer a step), resumes from 4 and matches the straight
    run."""
    wd = str(tmp_path / "run")

    def kill_at_6(trainer, step, metrics):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)

    Trainer(_cfg(data_cache, ckpt_every=2), wd, on_step=kill_at_6, progress=False).run()
    ckpt = os.path.join(wd, "ckpt")
    assert sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) == [4, 6]
    _corrupt_data_files(os.path.join(ckpt, "6"))
    with pytest.warns(RuntimeWarning, match=r"checkpoint step 6 .* is damaged.*damaged-6"):
        summary = Trainer(_cfg(data_cache), wd, progress=False).run()
    assert summary["step"] == STEPS and not summary["preempted"]
    assert os.path.isdir(os.path.join(ckpt, "damaged-6"))  # kept aside, not deleted
    reader = Checkpointer(ckpt)
    assert list(reader.manager.all_steps()) == [4, STEPS]
    reader.close()
    ref, got = _losses(straight_run[0]), _losses(wd)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_array_equal([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)])


def test_a_checkpoint_of_another_model_is_a_config_mismatch(data_cache, tmp_path):
    """Shapes that differ from the model are named as a mismatch; nothing is moved aside."""
    wd = str(tmp_path / "run")
    Trainer(_cfg(data_cache, steps=2, ckpt_every=2), wd, progress=False).run()
    os.remove(os.path.join(wd, "config.json"))  # bypass the config check: a real mismatch
    other = tiny_config(model={"d_ff": 256}, data={"cache_dir": data_cache},
                        train={"steps": 4, "ckpt_every": 2})
    with pytest.raises(CheckpointMismatchError, match=r"step 2 .* of another shape"):
        Trainer(other, wd, progress=False).run()
    assert sorted(os.listdir(os.path.join(wd, "ckpt"))) == ["2"]


WORKER = r"""
import json, os, sys
import jax
pid, port, workdir, cache, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
from moejax.mesh import initialize_distributed
initialize_distributed(f"127.0.0.1:{port}", 2, pid, local_device_count=4, timeout_s=120)
assert jax.device_count() == 8 and jax.local_device_count() == 4
from moejax.testing import tiny_config
from moejax.trainer import Trainer
cfg = lambda steps: tiny_config(data={"cache_dir": cache},
                                train={"steps": steps, "ckpt_every": 4, "eval_every": 4})
first = Trainer(cfg(4), workdir, progress=False).run()
second = Trainer(cfg(6), workdir, progress=False).run()  # restores step 4, trains 2 more
with open(f"{out}.{pid}.json", "w") as f:
    json.dump({"first": first, "second": second}, f)
"""


@pytest.mark.slow
def test_two_processes_train_save_restore_and_match(data_cache, tmp_path):
    single = str(tmp_path / "single")
    cfg = lambda steps: tiny_config(data={"cache_dir": data_cache},  # noqa: E731
                                    train={"steps": steps, "ckpt_every": 4, "eval_every": 4})
    Trainer(cfg(4), single, progress=False).run()
    ref = Trainer(cfg(6), single, progress=False).run()

    wd, results = _run_two_processes(WORKER, tmp_path, data_cache)
    for r in results:
        assert r["first"]["step"] == 4 and r["second"]["step"] == 6
        np.testing.assert_allclose(r["second"]["train/loss"], ref["train/loss"], rtol=1e-5)
        np.testing.assert_allclose(r["second"]["val/loss"], ref["val/loss"], rtol=1e-5)
    np.testing.assert_allclose([_losses(wd)[s] for s in range(1, 7)],
                               [_losses(single)[s] for s in range(1, 7)], rtol=1e-5)


PREEMPT_WORKER = r"""
import json, os, signal, sys
import jax
pid, port, workdir, cache, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
from moejax.mesh import initialize_distributed
initialize_distributed(f"127.0.0.1:{port}", 2, pid, local_device_count=4, timeout_s=120)
from moejax.testing import tiny_config
from moejax.trainer import Trainer

def sigterm_process_0_at_step_3(trainer, step, metrics):
    if pid == 0 and step == 3:
        os.kill(os.getpid(), signal.SIGTERM)

cfg = tiny_config(data={"cache_dir": cache}, train={"steps": 40, "ckpt_every": 100})
summary = Trainer(cfg, workdir, on_step=sigterm_process_0_at_step_3, progress=False).run()
with open(f"{out}.{pid}.json", "w") as f:
    json.dump(summary, f)
"""


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_one_agreed_step(data_cache, tmp_path):
    """SIGTERM reaches process 0 only: both processes stop after the same step (JAX's
    preemption sync point), save it together and return preempted."""
    wd, results = _run_two_processes(PREEMPT_WORKER, tmp_path, data_cache)
    assert all(r["preempted"] for r in results)
    assert results[0]["step"] == results[1]["step"] and 3 <= results[0]["step"] < 40
    saved = sorted(int(d) for d in os.listdir(os.path.join(wd, "ckpt")) if d.isdigit())
    assert saved == [results[0]["step"]]


def _run_two_processes(worker: str, tmp_path, data_cache) -> tuple[str, list[dict]]:
    """Run ``worker`` as processes 0 and 1 of a 2 x 4-CPU-device jax.distributed job on localhost
    (argv: pid, port, workdir, cache, out); returns the shared workdir and each process's JSON."""
    import portpicker

    script = tmp_path / "worker.py"
    script.write_text(worker)
    port = portpicker.pick_unused_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    wd, out = str(tmp_path / "multi"), str(tmp_path / "out")
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), wd, data_cache, out],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n\n".join(x[-3000:] for x in logs)
    return wd, [json.load(open(f"{out}.{i}.json")) for i in range(2)]


def test_importing_ckpt_prints_no_orbax_override_warning_and_keeps_the_absl_level():
    """The jax.Array handler override is intended, so Orbax's warning about it is kept off the
    console, while the caller's absl logger level (INFO here) is left as it was."""
    code = ("import logging; logging.getLogger('absl').setLevel(logging.INFO); "
            "import moejax.ckpt; print(logging.getLogger('absl').level)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    assert "overriding" not in out.stderr.lower(), out.stderr
    assert out.stdout.split()[-1] == "20"  # logging.INFO, as the caller set it


def test_small_replicated_arrays_are_saved_whole_and_large_ones_replica_parallel(tmp_path):
    """moejax.ckpt sets Orbax's replica-parallel threshold: a replicated array under
    REPLICA_PARALLEL_MIN_BYTES per replica is written whole by one replica (no slice program per
    device: 64 compiles per save of a tiny model before), a larger one is still cut across the 8
    replicas (one slice program each), and both read back exactly."""
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from moejax import ckpt

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("replicas",))
    replicated = NamedSharding(mesh, P())
    rows = ckpt.REPLICA_PARALLEL_MIN_BYTES // 1024  # [rows, 256] fp32 = the threshold per replica
    small = jax.device_put(np.arange(rows * 256 // 8, dtype=np.float32).reshape(-1, 256), replicated)
    large = jax.device_put(np.arange(rows * 256 * 8, dtype=np.float32).reshape(-1, 256), replicated)
    slices = []

    def count_slices(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration" and kw.get("fun_name") == "jit(slice)":
            slices.append(duration)

    checkpointer = ocp.StandardCheckpointer()
    jax.monitoring.register_event_duration_secs_listener(count_slices)
    try:
        checkpointer.save(tmp_path / "small", {"x": small})
        checkpointer.wait_until_finished()
        assert len(slices) == 0
        checkpointer.save(tmp_path / "large", {"x": large})
        checkpointer.wait_until_finished()
        assert len(slices) == 8
    finally:
        jax.monitoring.unregister_event_duration_listener(count_slices)
    for name, x in (("small", small), ("large", large)):
        back = checkpointer.restore(tmp_path / name, {"x": jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                                sharding=replicated)})
        np.testing.assert_array_equal(np.asarray(back["x"]), np.asarray(x))
