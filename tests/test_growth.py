"""Growth operators (moejax.growth) and growth inside a run (moejax.grow_run)."""

import dataclasses
import json
import os
import signal

import jax
import numpy as np
import pytest

from moejax import growth as G
from moejax import grow_run
from moejax import train as T
from moejax.config import Config, GrowthConfig, MeshConfig, MoEConfig, RouterConfig
from moejax.metrics import read_metrics
from moejax.testing import logits_of as _logits
from moejax.testing import setup_for as _setup
from moejax.testing import tiny_config, tiny_model

MOE = MoEConfig(num_experts=4, top_k=2, d_expert=32, num_shared_experts=1,
                router=RouterConfig(aux_free_bias=True))


def _layers(state, m):
    return G.split_layers(jax.device_get(state.params.to_pure_dict()), m)[1]


@pytest.fixture(scope="module")
def dense():
    s = _setup(tiny_model())
    return s, T.init_state(s)


@pytest.fixture(scope="module")
def moe():
    """A 2-layer MoE source (shared expert, aux-free bias set to distinct values)."""
    s = _setup(tiny_model(moe=MOE))
    state = T.init_state(s)
    rest = state.rest.to_pure_dict()
    for l in range(2):
        rest["layers"][l]["mlp"]["router"]["bias"] = np.arange(4, dtype=np.float32) + 10 * l
    return s, dataclasses.replace(state, rest=G._replace(state.rest, rest))


def test_stack_maps_target_layer_to_source_layer_mod(moe):
    s, state = moe
    d = _setup(tiny_model(moe=MOE, num_layers=8))
    grown = G.grow(state, s, d, "stack", optimizer="transform")
    src, dst = _layers(state, s.cfg.model), _layers(grown, d.cfg.model)
    assert G.stack_plan(2, 8) == [l % 2 for l in range(8)]
    assert G.stack_plan(2, 8, "interleave") == [l // 4 for l in range(8)]
    for l in range(8):
        jax.tree.map(np.testing.assert_array_equal, dst[l], src[l % 2])
    bias = G.split_layers(jax.device_get(grown.rest.to_pure_dict()), d.cfg.model)[1]
    assert [float(b["mlp"]["router"]["bias"][0]) for b in bias] == [0, 10] * 4  # router state follows
    emb = jax.device_get(grown.params.to_pure_dict())["embed"]["embedding"]
    np.testing.assert_array_equal(emb, jax.device_get(state.params.to_pure_dict())["embed"]["embedding"])
    # transformed optimizer: Adam moments follow the same map, the count is kept
    mu_s = G._adam_states(state.opt_state)[0].mu.to_pure_dict()
    mu_d = G._adam_states(grown.opt_state)[0].mu.to_pure_dict()
    np.testing.assert_array_equal(mu_d["layers"][5]["attn"]["q"], mu_s["layers"][1]["attn"]["q"])
    assert int(grown.step) == 0


@pytest.mark.parametrize("position", ["interleave", "top"])
def test_zero_depth_preserves_function(moe, dense, position):
    s, state = moe if position == "interleave" else dense
    d = _setup(tiny_model(moe=MOE if position == "interleave" else MoEConfig(), num_layers=4))
    grown = G.grow(state, s, d, "zero_depth", options=G.Options(new_layers=position))
    np.testing.assert_allclose(_logits(d, grown), _logits(s, state), rtol=1e-5, atol=1e-5)
    new = 1 if position == "interleave" else 2
    lay = _layers(grown, d.cfg.model)[new]
    assert not np.any(lay["attn"]["o"]) and not np.any(lay["mlp"].get("w_down", lay["mlp"].get("down")))
    assert np.any(lay["attn"]["q"])  # new layers' inputs are random, so they can learn


def test_random_depth_fade_in_and_scanned_layers(dense):
    s, state = dense
    d = _setup(tiny_model(num_layers=4, scan_layers=True))
    full = G.grow(state, s, d, "random_depth")
    off = G.grow(state, s, d, "random_depth", options=G.Options(fade_in=0.0))
    assert np.abs(_logits(d, full) - _logits(s, state)).max() > 1e-4  # random layers change it
    np.testing.assert_allclose(_logits(d, off), _logits(s, state), rtol=1e-5, atol=1e-5)
    o = jax.device_get(full.params.to_pure_dict())["layers"]["attn"]["o"]  # [L, H, hd, D]
    np.testing.assert_array_equal(o[2], jax.device_get(
        state.params.to_pure_dict())["layers"][1]["attn"]["o"])


@pytest.mark.parametrize("heads,kv", [(8, 2), (8, 4)])
def test_split_preserves_function(dense, heads, kv):
    s, state = dense
    d = _setup(tiny_model(d_ff=320, attention=dict(num_heads=heads, num_kv_heads=kv)))
    for how in ("even", "random"):
        grown = G.grow(state, s, d, "split", options=G.Options(split=how))
        np.testing.assert_allclose(_logits(d, grown), _logits(s, state), rtol=1e-5, atol=1e-5)


def test_width_growth_of_moe_and_zero_width(moe):
    s, state = moe
    m = tiny_model(moe=MoEConfig(**{**MOE.__dict__, "d_expert": 48, "d_shared": 64}), d_ff=256,
                   attention=dict(num_heads=8))
    d = _setup(m)
    ref = _logits(s, state)
    for op in ("split", "zero_width"):
        grown = G.grow(state, s, d, op, optimizer="transform")
        np.testing.assert_allclose(_logits(d, grown), ref, rtol=1e-5, atol=1e-5, err_msg=op)
    rnd = G.grow(state, s, d, "random_width")
    assert np.abs(_logits(d, rnd) - ref).max() > 1e-4


def test_sharded_growth_matches_unsharded(dense):
    """Grown on 8 devices (data=2, fsdp=2, tensor=2): target shardings, same values."""
    s, state = dense
    mesh8 = MeshConfig(data=2, fsdp=2, tensor=2)
    s8 = _setup(s.cfg.model, mesh8, devices=8)
    state8 = jax.device_put(state, s8.state_shardings)
    for op, m in (("stack", tiny_model(num_layers=4)),
                  ("split", tiny_model(d_ff=256, attention=dict(num_heads=8)))):
        d1, d8 = _setup(m), _setup(m, mesh8, devices=8)
        a = G.grow(state, s, d1, op, optimizer="transform")
        b = G.grow(state8, s8, d8, op, optimizer="transform")
        for x, y, sh in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                            jax.tree.leaves(d8.state_shardings), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
            assert y.sharding.is_equivalent_to(sh, y.ndim)
        q = b.params.to_pure_dict()["layers"][0]["attn"]["q"]
        assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)


def test_learn_depth_starts_at_stack_and_fits(dense):
    s, state = dense
    d = _setup(tiny_model(num_layers=4))
    rng = np.random.RandomState(1)
    toks = rng.randint(0, 288, (8, 17))
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
             "segment_ids": np.ones((8, 16), np.int32),
             "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1)),
             "loss_mask": np.ones((8, 16), np.float32), "domain": np.zeros(8, np.int32)}
    batch = T.global_batch(d.mesh, batch)
    stack = G.grow(state, s, d, "stack")
    ce = jax.jit(lambda st, b: T.token_losses(d.model(st), b)[0].mean())(stack, batch)
    _, losses = G.learn_depth(state, s, d, [batch] * 4, lr=3e-2)
    np.testing.assert_allclose(losses[0], float(ce), rtol=1e-5)  # M starts at the G_stack map
    assert losses[-1] < losses[0]


# -- growth inside a run ----------------------------------------------------------------------
def _run_cfg(data_cache):
    cfg = tiny_config(model={"num_layers": 4}, data={"cache_dir": data_cache},
                      train={"steps": 4, "ckpt_every": 2, "eval_every": 2})
    return Config(model=cfg.model, mesh=cfg.mesh, data=cfg.data, train=cfg.train,
                  growth=GrowthConfig(op="zero_depth", factor=2, source_steps=3))


def test_growth_in_a_run_survives_restarts(data_cache, tmp_path, monkeypatch):
    """Straight run == (crash between the source's save and the grow, rerun, SIGTERM inside the
    grown phase, rerun): one continuous metrics file, the same losses, the event marked."""
    cfg = _run_cfg(data_cache)
    ref_wd, wd = str(tmp_path / "straight"), str(tmp_path / "restarted")
    src_wd = str(tmp_path / "source")  # shared: the source trains once
    ref = grow_run.run(cfg, ref_wd, source_workdir=src_wd, progress=False)

    real = G.grow
    monkeypatch.setattr(G, "grow", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError, match="crash"):
        grow_run.run(cfg, wd, source_workdir=src_wd, progress=False)
    assert os.path.isdir(os.path.join(src_wd, "ckpt", "3"))  # source saved, not grown
    assert not os.path.exists(os.path.join(wd, "grown", "ckpt")) or not os.listdir(
        os.path.join(wd, "grown", "ckpt"))
    monkeypatch.setattr(G, "grow", real)

    def kill_at_1(trainer, step, metrics):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    first = grow_run.run(cfg, wd, source_workdir=src_wd, progress=False, on_step=kill_at_1)
    assert first["preempted"] and first["step"] == 1
    done = grow_run.run(cfg, wd, source_workdir=src_wd, progress=False)
    assert not done["preempted"] and done["step"] == 4 and done["total_steps"] == 7

    recs, ref_recs = (read_metrics(os.path.join(w, "metrics.jsonl")) for w in (wd, ref_wd))
    steps = [r["step"] for r in recs if "train/loss" in r]
    assert steps == list(range(1, 8))  # nothing lost or repeated
    events = [r for r in recs if r.get("event") == "grow"]
    assert len(events) == 1 and events[0]["step"] == 3 and events[0]["op"] == "zero_depth"
    src_final = [r for r in recs if r["step"] == 3 and "val/loss" in r and "event" not in r][0]
    np.testing.assert_allclose(events[0]["val/loss"], src_final["val/loss"], rtol=1e-5)  # G_zero
    loss = lambda rs: [r["train/loss"] for r in rs if "train/loss" in r]  # noqa: E731
    np.testing.assert_array_equal(loss(recs), loss(ref_recs))
    assert recs[-1]["tokens"] == 7 * 8 * 64 and ref["val/loss"] == done["val/loss"]
    assert recs[-1]["flops"] > events[0]["flops"] > 0
    with open(os.path.join(wd, "config.json")) as f:
        assert json.load(f)["growth"]["op"] == "zero_depth"
