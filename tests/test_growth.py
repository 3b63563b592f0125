"""Growth operators (moejax.growth) and growth inside a run (moejax.grow_run)."""

import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moejax import growth as G
from moejax import growth_learn
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


def _out(lay):
    return lay["mlp"].get("w_down", lay["mlp"].get("down"))


@pytest.mark.parametrize("position,init", [("interleave", "copy"), ("top", "copy"),
                                           ("interleave", "fresh")])
def test_zero_depth_preserves_function(moe, dense, position, init):
    """The grown model's logits equal the source model's forward (G_zero: copies or fresh layers
    with zero output projections); copies equal their source layer but for o / down."""
    s, state = moe if position == "interleave" else dense
    d = _setup(tiny_model(moe=MOE if position == "interleave" else MoEConfig(), num_layers=4))
    grown = G.grow(state, s, d, "zero_depth",
                   options=G.Options(new_layers=position, new_layer_init=init))
    np.testing.assert_allclose(_logits(d, grown), _logits(s, state), rtol=1e-5, atol=1e-5)
    plan = G.new_layer_plan(2, 4, position, 0.0, init)
    new = 1 if position == "interleave" else 3
    src = _layers(state, s.cfg.model)[plan[new].copy_of if init == "copy" else 0]
    lay = _layers(grown, d.cfg.model)[new]
    assert not np.any(lay["attn"]["o"]) and not np.any(_out(lay))
    assert np.any(lay["attn"]["q"])  # new layers' inputs are non-zero, so they can learn
    if init == "copy":
        assert [p.copy_of if isinstance(p, G.NewLayer) else p for p in plan] == (
            [0, 0, 1, 1] if position == "interleave" else [0, 1, 0, 1])
        np.testing.assert_array_equal(lay["attn"]["q"], src["attn"]["q"])
        np.testing.assert_array_equal(lay["mlp_norm"]["scale"], src["mlp_norm"]["scale"])
        for k in ("w_gate", "w_up") if "w_gate" in lay["mlp"] else ("gate", "up"):
            np.testing.assert_array_equal(lay["mlp"][k], src["mlp"][k])
        np.testing.assert_array_equal(np.zeros_like(src["attn"]["o"]), lay["attn"]["o"])
    else:
        assert not np.array_equal(lay["attn"]["q"], src["attn"]["q"])
    if position == "interleave":  # MoE copies keep their source layer's router state
        bias = G.split_layers(jax.device_get(grown.rest.to_pure_dict()), d.cfg.model)[1]
        b3 = float(bias[3]["mlp"]["router"]["bias"][0])  # layer 3: new, after source layer 1
        assert b3 == (10.0 if init == "copy" else 0.0)  # source bias | the fresh (zero) init


def test_fade_in_ramp_by_hand():
    """m(t) = min(1, t / T): prts msg.py's curr_step / grow_step, then 1; T = 0: no mask."""
    got = [float(G.fade_in_ramp(t, 4)) for t in range(7)]
    assert got == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert float(G.fade_in_ramp(0, 0)) == 1.0 and float(G.fade_in_ramp(5, 0)) == 1.0
    assert float(G.fade_in_ramp(1, 3)) == pytest.approx(1 / 3)


def test_random_depth_without_mask_and_scanned_layers(dense):
    s, state = dense
    d = _setup(tiny_model(num_layers=4, scan_layers=True))
    full = G.grow(state, s, d, "random_depth")
    assert np.abs(_logits(d, full) - _logits(s, state)).max() > 1e-4  # random layers change it
    o = jax.device_get(full.params.to_pure_dict())["layers"]["attn"]["o"]  # [L, H, hd, D]
    np.testing.assert_array_equal(o[2], jax.device_get(
        state.params.to_pure_dict())["layers"][1]["attn"]["o"])
    assert np.any(o[1]) and np.any(o[3])


def _batch(mesh, seed=1, rows=8, length=16):
    toks = np.random.RandomState(seed).randint(0, 288, (rows, length + 1))
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
             "segment_ids": np.ones((rows, length), np.int32),
             "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
             "loss_mask": np.ones((rows, length), np.float32), "domain": np.zeros(rows, np.int32)}
    return T.global_batch(mesh, batch)


def test_msg_fade_in_sgd_step_by_hand(dense):
    """With SGD inside, one fade-in step at t = 1 of a 3-step ramp is, by hand: W' = W - lr g_W
    with g_W = m(1) dL/dP (the reparameterisation's gradient, here by autodiff of L(m(1) W)), and
    the model gets P' = m(2) W'. A missing or wrong mask factor changes the update (SGD shows the
    gradient's scale, Adam would hide it)."""
    s, state = dense
    m = tiny_model(num_layers=4)
    d = _setup(m)
    opts = G.Options(new_layers="top")
    new = G.new_layers_of("random_depth", s.cfg.model, m, opts)
    w = G.grow(state, s, d, "random_depth", options=opts).params  # unmasked W
    batch = _batch(d.mesh)
    rest = T.init_state(d).rest

    def loss(params):
        model = nnx.merge(d.graphdef, params, jax.tree.map(lambda x: x, rest))
        ce, _ = T.token_losses(model, batch)
        return ce.mean()

    def scaled(w, t):
        return G._replace(w, G.scale_new_out_proj(w.to_pure_dict(), m, new,
                                                  G.fade_in_ramp(t, 3)))

    lr = 0.5
    tx = G.fade_in_optimizer(optax.sgd(lr), m, new, 3)
    st = tx.init(w)._replace(count=jnp.ones((), jnp.int32))
    p1 = scaled(w, 1)
    u, st = jax.jit(tx.update)(jax.grad(loss)(p1), st, p1)
    got = optax.apply_updates(p1, u).to_pure_dict()
    g_w = jax.grad(lambda w: loss(scaled(w, 1)))(w)
    want = scaled(jax.tree.map(lambda a, b: a - lr * b, w, g_w), 2).to_pure_dict()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)
    assert int(st.count) == 2
    o_new = G.split_layers(jax.device_get(got), m)[1][2]["attn"]["o"]
    o_old = G.split_layers(jax.device_get(w.to_pure_dict()), m)[1][2]["attn"]["o"]
    assert np.abs(o_new - o_old * 2 / 3).max() > 1e-6  # the step moved the faded weights


@pytest.mark.parametrize("scan", [False, True])
def test_msg_fade_in_matches_reparameterised_reference(dense, scan):
    """G_random + MSG: at growth the model is the source's function (m(0) = 0) and the optimizer
    holds the fresh weights; each train step equals a reference that differentiates the loss of
    W through P = m(t) W by autodiff and applies the plain optimizer to W (ramp over 2 steps,
    3 steps: the ramp ends inside the run and one step runs past it)."""
    s, state = dense
    ramp, steps = 2, 3
    m = tiny_model(num_layers=4, scan_layers=scan)
    plain = _setup(m)
    opts = G.Options(new_layers="top", fade_in_steps=ramp)
    new = G.new_layers_of("random_depth", s.cfg.model, m, opts)
    assert new == [2, 3]
    d = G.with_fade_in(plain, new, ramp)
    grown = G.grow(state, s, d, "random_depth", options=opts)
    np.testing.assert_allclose(_logits(d, grown), _logits(s, state), rtol=1e-5, atol=1e-5)
    fresh = G.grow(state, s, plain, "random_depth", options=G.Options(new_layers="top"))
    w = fresh.params  # the unmasked weights W (fresh init of the new layers)
    latent = grown.opt_state.latent
    assert len(latent) == (2 if scan else 4)  # o and down of each new layer (scanned: stacked)
    batch = _batch(d.mesh)
    graphdef = plain.graphdef

    def loss_of_w(w, t):
        params = G._replace(w, G.scale_new_out_proj(w.to_pure_dict(), m, new,
                                                    G.fade_in_ramp(t, ramp)))
        model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, fresh.rest))
        ce, _ = T.token_losses(model, batch, train=True)
        return (ce * batch["loss_mask"]).sum() / batch["loss_mask"].sum()

    ref_tx = plain.tx
    ref_opt = ref_tx.init(w)
    step = T.make_train_step(d, 1)
    grad = jax.jit(jax.grad(loss_of_w))
    got = grown
    for t in range(steps):
        g = grad(w, t)
        u, ref_opt = ref_tx.update(g, ref_opt, w)
        w = optax.apply_updates(w, u)
        got, metrics = step(got, batch)
        want = G.scale_new_out_proj(w.to_pure_dict(), m, new, G.fade_in_ramp(t + 1, ramp))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
                     jax.device_get(got.params.to_pure_dict()), jax.device_get(want))
    assert int(got.opt_state.count) == steps
    # the ramp is over: the model holds W itself
    for k, v in got.opt_state.latent.items():
        names = [int(n) if n.isdigit() else n for n in k.split(".")]
        p = got.params.to_pure_dict()
        for n in names:
            p = p[n]
        np.testing.assert_allclose(np.asarray(p), np.asarray(v), rtol=1e-6, atol=1e-7)


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
    _, losses = growth_learn.learn_depth(state, s, d, [batch] * 4, lr=3e-2)
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


def test_msg_fade_in_in_a_run_resumes_the_ramp(data_cache, tmp_path):
    """G_random + MSG inside a run: the grown model starts as the source's function (m(0) = 0),
    and a run stopped mid-ramp (SIGTERM at grown step 1 of a 3-step ramp) resumes it: the same
    losses as a straight run (a ramp restarted at 0 would zero the new layers again)."""
    cfg = _run_cfg(data_cache)
    cfg = dataclasses.replace(cfg, growth=GrowthConfig(op="random_depth", factor=2, source_steps=3,
                                                       new_layers="top", fade_in_steps=3))
    src_wd = str(tmp_path / "source")
    grow_run.run(cfg, str(tmp_path / "straight"), source_workdir=src_wd, progress=False)

    def kill_at_1(trainer, step, metrics):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    wd = str(tmp_path / "restarted")
    first = grow_run.run(cfg, wd, source_workdir=src_wd, progress=False, on_step=kill_at_1)
    assert first["preempted"] and first["step"] == 1
    done = grow_run.run(cfg, wd, source_workdir=src_wd, progress=False)
    assert done["step"] == 4
    recs, ref = (read_metrics(os.path.join(w, "metrics.jsonl"))
                 for w in (wd, str(tmp_path / "straight")))
    event = [r for r in recs if r.get("event") == "grow"][0]
    src_final = [r for r in recs if r["step"] == 3 and "val/loss" in r and "event" not in r][0]
    np.testing.assert_allclose(event["val/loss"], src_final["val/loss"], rtol=1e-5)
    loss = lambda rs: [r["train/loss"] for r in rs if "train/loss" in r]  # noqa: E731
    np.testing.assert_array_equal(loss(recs), loss(ref))
    assert len(loss(recs)) == 7


def test_msg_fade_in_sharded_matches_unsharded(dense):
    """The fade-in optimizer on 8 devices (data=2, fsdp=2, tensor=2): latent weights sharded like
    their parameters, and two train steps give the single-device parameters."""
    s, state = dense
    mesh8 = MeshConfig(data=2, fsdp=2, tensor=2)
    s8 = _setup(s.cfg.model, mesh8, devices=8)
    m = tiny_model(num_layers=4)
    opts = G.Options(new_layers="top", fade_in_steps=3)
    new = G.new_layers_of("random_depth", s.cfg.model, m, opts)
    d1 = G.with_fade_in(_setup(m), new, 3)
    d8 = G.with_fade_in(_setup(m, mesh8, devices=8), new, 3)
    a = G.grow(state, s, d1, "random_depth", options=opts)
    b = G.grow(jax.device_put(state, s8.state_shardings), s8, d8, "random_depth", options=opts)
    lat = b.opt_state.latent["layers.2.attn.o"]
    assert lat.sharding.is_equivalent_to(
        b.params.to_pure_dict()["layers"][2]["attn"]["o"].sharding, lat.ndim)
    step1, step8 = T.make_train_step(d1, 1), T.make_train_step(d8, 1)
    for _ in range(2):
        a, ma = step1(a, _batch(d1.mesh))
        b, mb = step8(b, _batch(d8.mesh))
        np.testing.assert_allclose(float(mb["train/grad_norm"]), float(ma["train/grad_norm"]),
                                   rtol=1e-5)
    # Adam turns reduction-order noise in near-zero gradients into up to ~lr per element (seen:
    # 1 of 4096 elements 1.2e-4 apart on an AVX2-only host, where the dots sum in another order).
    # So: every element within 2 lr, and at most 0.1% of each tensor beyond 5e-5 (lr / 60) + 1e-3
    # relative; a wrong mask or clock moves whole layers, far beyond that share
    lr = d1.cfg.train.lr
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        diff = np.abs(x - y)
        beyond = diff > 5e-5 + 1e-3 * np.abs(y)
        assert diff.max() <= 2 * lr and beyond.mean() <= 1e-3, (diff.max(), beyond.sum(), x.shape)
    assert np.any(np.asarray(b.params.to_pure_dict()["layers"][2]["attn"]["o"]))  # m(2) = 2/3
