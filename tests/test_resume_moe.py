"""Exact resume of an MoE run whose non-trainable state matters: the aux-loss-free router bias
(updated every step outside the optimizer) and MaskMoE's token masks (built once from corpus
frequencies). N steps, SIGTERM, resume, M more == N + M straight, bit for bit."""

import os
import signal

import jax
import numpy as np
import pytest

from moejax.config_moe import MoEConfig, RouterConfig
from moejax.metrics import read_metrics
from moejax.testing import tiny_config
from moejax.trainer import Trainer

N, M = 3, 3


def _cfg(data_cache):
    router = RouterConfig(aux_free_bias=True, bias_update_rate=0.05, token_mask="maskmoe",
                          maskmoe_frequent_visible=2)
    return tiny_config(data={"cache_dir": data_cache},
                       model={"moe": MoEConfig(num_experts=4, top_k=2, d_expert=32, router=router)},
                       train={"steps": N + M, "warmup_steps": 0, "eval_every": 100,
                              "ckpt_every": 100})


def _losses(workdir) -> list[float]:
    recs = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return [r["train/loss"] for r in sorted(recs, key=lambda r: r["step"]) if "train/loss" in r]


def _router_state(trainer) -> dict[str, np.ndarray]:
    """{'<path>/bias' | '<path>/token_mask': value} of the final state's non-trainable variables."""
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(trainer.state.rest))
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


@pytest.fixture(scope="module")
def straight(data_cache, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("straight"))
    tr = Trainer(_cfg(data_cache), wd, progress=False)
    return wd, tr.run(), tr


def test_moe_resume_is_exact(straight, data_cache, tmp_path):
    wd_ref, ref_summary, ref_trainer = straight
    wd = str(tmp_path / "run")

    def kill_after_n(trainer, step, metrics):
        if step == N:
            os.kill(os.getpid(), signal.SIGTERM)

    first = Trainer(_cfg(data_cache), wd, on_step=kill_after_n, progress=False)
    summary = first.run()
    assert summary["preempted"] and summary["step"] == N
    second = Trainer(_cfg(data_cache), wd, progress=False)
    assert second.run()["step"] == N + M

    got, ref = _losses(wd), _losses(wd_ref)
    assert len(got) == len(ref) == N + M
    np.testing.assert_array_equal(got, ref)
    ref_state, got_state = _router_state(ref_trainer), _router_state(second)
    assert sorted(got_state) == sorted(ref_state)
    biases = [k for k in ref_state if "bias" in k]
    masks = [k for k in ref_state if "token_mask" in k]
    assert biases and masks, sorted(ref_state)
    for k in ref_state:
        np.testing.assert_array_equal(got_state[k], ref_state[k], err_msg=k)
    # not vacuous: the biases moved, and the masks are the corpus-frequency ones, not the init's
    assert all(np.abs(ref_state[k]).max() > 0 for k in biases)
    init_rest = jax.device_get(
        jax.tree_util.tree_leaves_with_path(_init_rest(ref_trainer)))
    init = {jax.tree_util.keystr(p): np.asarray(x) for p, x in init_rest}
    assert any(not np.array_equal(init[k], ref_state[k]) for k in masks)


def _init_rest(trainer):
    """The non-trainable state of a fresh init (token masks built without corpus frequencies)."""
    from moejax import train as T
    return T.init_state(trainer.setup).rest
