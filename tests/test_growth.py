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


def assert_adam_close(got, want, lr: float, atol: float, rtol: float):
    """Parameters after Adam steps agree: every element within 2 lr, and at most 1% of each
    tensor beyond ``atol + rtol |want|``. Adam turns rounding noise in a near-zero gradient into
    up to ~lr per element (seen: 1-5 of 4096 elements, on an AVX2-only host, at XLA's backend
    optimization level 0 and with XLA:CPU's element-wise emitters, where sums round differently);
    a wrong mask, ramp clock or gradient scale moves whole layers (the wrong ramp factor: 57% of
    a tensor beyond), far beyond that share."""
    for x, y in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(jax.device_get(want)),
                    strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        diff = np.abs(x - y)
        beyond = diff > atol + rtol * np.abs(y)
        assert diff.max() <= 2 * lr and beyond.mean() <= 1e-2, (diff.max(), beyond.sum(), x.shape)


# -- G_random + MSG: one grown model per layer layout serves every fade-in test below -------------
RAMP = 3  # every fade-in test's ramp: the tests share one grown state and one train step


class _Msg:
    """G_random + MSG from ``dense`` (2 -> 4 layers, new layers 2 and 3 on top, ``RAMP``-step
    ramp), built once per layer layout: the grown state (a fresh device copy per use: train steps
    donate it), the unmasked weights W, the jitted train step, and the reference programs: the
    gradient wrt W of L(P) at P = mult W on the new layers' output projections (``mult`` a traced
    scalar, so every t shares one program) and the plain optimizer's update of W."""

    def __init__(self, dense, scan: bool):
        s, state = dense
        self.m = m = tiny_model(num_layers=4, scan_layers=scan)
        self.plain = plain = _setup(m)
        self.opts = G.Options(new_layers="top", fade_in_steps=RAMP)
        self.new = new = G.new_layers_of("random_depth", s.cfg.model, m, self.opts)
        self.d = d = G.with_fade_in(plain, new, RAMP)
        self._grown = jax.device_get(G.grow(state, s, d, "random_depth", options=self.opts))
        self.fresh = G.grow(state, s, plain, "random_depth", options=G.Options(new_layers="top"))
        self.w = self.fresh.params  # the unmasked weights W (fresh init of the new layers)
        self.batch = batch = _batch(d.mesh)
        self.step = T.make_train_step(d, 1)
        rest = self.fresh.rest

        def loss(w, mult):
            model = nnx.merge(plain.graphdef, self.scaled(w, mult), jax.tree.map(lambda x: x, rest))
            ce, _ = T.token_losses(model, batch, train=True)
            return (ce * batch["loss_mask"]).sum() / batch["loss_mask"].sum()

        def adam(g, opt, w, mult_next):  # the plain optimizer on W; the model then holds m W'
            u, opt = plain.tx.update(g, opt, w)
            w = optax.apply_updates(w, u)
            return w, opt, self.scaled(w, mult_next)

        self.grad_w = jax.jit(jax.grad(loss))
        self.adam = jax.jit(adam)
        self.adam_init = jax.jit(plain.tx.init)

    def scaled(self, w, mult):
        return G._replace(w, G.scale_new_out_proj(w.to_pure_dict(), self.m, self.new, mult))

    def grown(self):
        return jax.device_put(self._grown, self.d.state_shardings)


@pytest.fixture(scope="module")
def msg(dense):
    """``msg(scan)``: the ``_Msg`` of that layer layout (built on first use)."""
    built = {}

    def get(scan: bool) -> _Msg:
        if scan not in built:
            built[scan] = _Msg(dense, scan)
        return built[scan]
    return get


def _ramp(t):
    """m(t) by hand (test_fade_in_ramp_by_hand checks the library's), as a float32 scalar."""
    return np.float32(min(1.0, t / RAMP))


def test_msg_fade_in_sgd_step_by_hand(msg):
    """With SGD inside, one fade-in step at t = 1 of the 3-step ramp is, by hand: W' = W - lr g_W
    with g_W = m(1) dL/dP (the reparameterisation's gradient, here by autodiff of L(m(1) W)), and
    the model gets P' = m(2) W'. A missing or wrong mask factor changes the update (SGD shows the
    gradient's scale, Adam would hide it)."""
    f = msg(False)
    m, new, w = f.m, f.new, f.w
    lr = 0.5
    tx = G.fade_in_optimizer(optax.sgd(lr), m, new, RAMP)
    st = tx.init(w)._replace(count=jnp.ones((), jnp.int32))
    p1 = f.scaled(w, _ramp(1))
    # dL/dP at P = p1: the gradient wrt W at mult 1 (P = W), one program with g_W's below
    u, st = jax.jit(tx.update)(f.grad_w(p1, np.float32(1)), st, p1)
    got = optax.apply_updates(p1, u).to_pure_dict()
    g_w = f.grad_w(w, _ramp(1))
    want = f.scaled(jax.tree.map(lambda a, b: np.asarray(a) - lr * np.asarray(b), w, g_w),
                    _ramp(2)).to_pure_dict()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)
    assert int(st.count) == 2
    o_new = G.split_layers(jax.device_get(got), m)[1][2]["attn"]["o"]
    o_old = G.split_layers(jax.device_get(w.to_pure_dict()), m)[1][2]["attn"]["o"]
    assert np.abs(o_new - o_old * 2 / 3).max() > 1e-6  # the step moved the faded weights


@pytest.mark.parametrize("scan", [False, True])
def test_msg_fade_in_matches_reparameterised_reference(dense, msg, scan):
    """G_random + MSG: at growth the model is the source's function (m(0) = 0) and the optimizer
    holds the fresh weights; each train step equals a reference that differentiates the loss of
    W through P = m(t) W by autodiff and applies the plain optimizer to W (ramp over 3 steps,
    4 steps: the ramp ends inside the run and one step runs past it)."""
    s, state = dense
    f = msg(scan)
    steps = RAMP + 1
    assert f.new == [2, 3]
    grown = f.grown()
    np.testing.assert_allclose(_logits(f.d, grown), _logits(s, state), rtol=1e-5, atol=1e-5)
    assert len(grown.opt_state.latent) == (2 if scan else 4)  # o, down of each (scanned: stacked)
    w, ref_opt, got = f.w, f.adam_init(f.w), grown
    for t in range(steps):
        w, ref_opt, want = f.adam(f.grad_w(w, _ramp(t)), ref_opt, w, _ramp(t + 1))
        got, metrics = f.step(got, f.batch)
        assert_adam_close(got.params, want, f.d.cfg.train.lr, atol=2e-6, rtol=2e-5)
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
    """G_random + MSG (new layers on top, a 3-step ramp) grown 2 -> 4 layers after 3 source
    steps, 4 grown steps: the MSG run is the demanding case of growth in a run (its ramp's clock
    and latent weights live in the optimizer state and must survive a restart); the other ops
    take the same run path (``grow_run.apply_op``), their function at growth is checked above."""
    cfg = tiny_config(model={"num_layers": 4}, data={"cache_dir": data_cache},
                      train={"steps": 4, "ckpt_every": 2, "eval_every": 2})
    return Config(model=cfg.model, mesh=cfg.mesh, data=cfg.data, train=cfg.train,
                  growth=GrowthConfig(op="random_depth", factor=2, source_steps=3,
                                      new_layers="top", fade_in_steps=3))


def test_growth_in_a_run_survives_restarts(data_cache, tmp_path, monkeypatch):
    """Straight run == (crash between the source's save and the grow, rerun, SIGTERM at grown
    step 1, mid-ramp, rerun): one continuous metrics file, the same losses (a ramp restarted at 0
    would zero the new layers again), the event marked, and the grown model starts as the
    source's function (m(0) = 0)."""
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
    ckpts = os.listdir(os.path.join(wd, "grown", "ckpt"))
    assert [d for d in ckpts if d.isdigit()] == ["1"]  # stopped mid-ramp (m(1) = 1/3)
    done = grow_run.run(cfg, wd, source_workdir=src_wd, progress=False)
    assert not done["preempted"] and done["step"] == 4 and done["total_steps"] == 7

    recs, ref_recs = (read_metrics(os.path.join(w, "metrics.jsonl")) for w in (wd, ref_wd))
    steps = [r["step"] for r in recs if "train/loss" in r]
    assert steps == list(range(1, 8))  # nothing lost or repeated
    events = [r for r in recs if r.get("event") == "grow"]
    assert len(events) == 1 and events[0]["step"] == 3 and events[0]["op"] == "random_depth"
    src_final = [r for r in recs if r["step"] == 3 and "val/loss" in r and "event" not in r][0]
    np.testing.assert_allclose(events[0]["val/loss"], src_final["val/loss"], rtol=1e-5)  # m(0)
    loss = lambda rs: [r["train/loss"] for r in rs if "train/loss" in r]  # noqa: E731
    np.testing.assert_array_equal(loss(recs), loss(ref_recs))
    assert recs[-1]["tokens"] == 7 * 8 * 64 and ref["val/loss"] == done["val/loss"]
    assert recs[-1]["flops"] > events[0]["flops"] > 0
    with open(os.path.join(wd, "config.json")) as f:
        assert json.load(f)["growth"]["op"] == "random_depth"


def test_msg_fade_in_sharded_matches_unsharded(dense, msg):
    """The fade-in optimizer on 8 devices (data=2, fsdp=2, tensor=2): latent weights sharded like
    their parameters, and two train steps give the single-device parameters (the single-device
    side: the shared grown state and train step of ``msg``)."""
    s, state = dense
    f = msg(False)
    mesh8 = MeshConfig(data=2, fsdp=2, tensor=2)
    s8 = _setup(s.cfg.model, mesh8, devices=8)
    d1, d8 = f.d, G.with_fade_in(_setup(f.m, mesh8, devices=8), f.new, RAMP)
    a = f.grown()
    b = G.grow(jax.device_put(state, s8.state_shardings), s8, d8, "random_depth", options=f.opts)
    lat = b.opt_state.latent["layers.2.attn.o"]
    assert lat.sharding.is_equivalent_to(
        b.params.to_pure_dict()["layers"][2]["attn"]["o"].sharding, lat.ndim)
    step1, step8 = f.step, T.make_train_step(d8, 1)
    for _ in range(2):
        a, ma = step1(a, _batch(d1.mesh))
        b, mb = step8(b, _batch(d8.mesh))
        np.testing.assert_allclose(float(mb["train/grad_norm"]), float(ma["train/grad_norm"]),
                                   rtol=1e-5)
    assert_adam_close(a.params, b.params, d1.cfg.train.lr, atol=5e-5, rtol=1e-3)
    assert np.any(np.asarray(b.params.to_pure_dict()["layers"][2]["attn"]["o"]))  # m(2) = 2/3
