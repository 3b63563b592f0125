"""MoE model and train-step acceptance tests on 8 CPU devices: sharded (EP / DP) == single device,
scan == unrolled (RMoE state through the carry), mixed dense/MoE stacks, shared experts, GW-MoE,
aux-free bias and balance losses in the step, cached decoding, MaskMoE, no recompiles.

Compiles dominate on 2 cores: models are initialised eagerly (no init compile), parameters are copied
between variants, and one jitted forward (static graphdef) is shared by every test of a structure."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import train as T
from moejax.config import BalanceConfig, MeshConfig, MoEConfig, RouterConfig
from moejax.layers import moe as moe_lib
from moejax.layers import moe_ep
from moejax.layers.moe import MoE
from moejax.layers.router import TokenMask
from moejax.mesh import make_mesh, rules_for, use_mesh
from moejax.model import Model
from moejax.testing import BATCH, SEQ, TOL_FP32, TOL_SHARDED_FP32, tiny_config, tiny_model

B, S = BATCH, SEQ
E, K = 8, 2
PAD_FROM = {6: 56, 7: 60}  # rows with trailing padding (segment 0, no loss) from this position
MOE = MoEConfig(num_experts=E, top_k=K, d_expert=32,
                router=RouterConfig(aux_free_bias=True, bias_update_rate=0.05),
                balance=BalanceConfig(scope="global", coef=1e-2))
ADAM_TOL = dict(rtol=1e-4, atol=1e-4)  # params after Adam steps (see tests/test_train.py)


def moe(**kw) -> MoEConfig:
    router = kw.pop("router", {})
    balance = kw.pop("balance", {})
    return dataclasses.replace(MOE, router=dataclasses.replace(MOE.router, **router),
                               balance=dataclasses.replace(MOE.balance, **balance), **kw)


def run_config(mesh=None, train=None, model=None, **moe_kw):
    return tiny_config(mesh=mesh, train=train or {}, model={"moe": moe(**moe_kw), **(model or {})})


# -- shared machinery -------------------------------------------------------------------------------

@jax.jit(static_argnums=0)
def forward(graphdef, params, rest, tokens, segment_ids, positions):
    return nnx.merge(graphdef, params, rest)(tokens, segment_ids, positions)


def fwd(model_or_split, batch, mesh=None, mesh_cfg=None):
    """(logits, aux) of the model (or a (graphdef, params, rest) triple), traced under ``mesh``."""
    g, p, r = (nnx.split(model_or_split, nnx.Param, ...) if isinstance(model_or_split, nnx.Module)
               else model_or_split)
    args = (g, p, r, batch["inputs"], batch["segment_ids"], batch["positions"])
    if mesh is None:
        return jax.device_get(forward(*args))
    with use_mesh(mesh, rules_for(mesh_cfg)):
        return jax.device_get(forward(*args))


def fill(cfg, src: dict | None = None, seed: int = 0) -> dict:
    """A pure state dict for a model of ``cfg`` (unrolled layout): leaves of ``src`` where the path
    and shape match, else norm scales 1, biases 0 and N(0, 0.02^2) weights. No init compile."""
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
        lambda: Model(dataclasses.replace(cfg, scan_layers=False), rngs=nnx.Rngs(0)))))
    rng = np.random.default_rng(seed)

    def go(a, b, path):
        if isinstance(a, dict):
            return {k: go(v, b.get(k) if isinstance(b, dict) else None, path + (k,))
                    for k, v in a.items()}
        if b is not None and np.shape(b) == a.shape:
            return np.asarray(b)
        if path[-1] in ("scale",):
            return np.ones(a.shape, a.dtype)
        if path[-1] in ("bias", "b_i", "b_h"):
            return np.zeros(a.shape, a.dtype)
        return (rng.normal(size=a.shape) * 0.02).astype(a.dtype)
    return go(abstract, src or {}, ())


def make_state(s: T.Setup, pure_state: dict) -> T.TrainState:
    """The train state holding ``pure_state`` (unrolled layout), sharded as ``s`` says."""
    model = like(s.cfg.model, pure_state)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = jax.tree.map(jnp.asarray, (params, rest))
    st = T.TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                      opt_state=s.tx.init(params),
                      rng=jax.random.key_data(jax.random.key(s.cfg.train.seed + 1)))
    return jax.device_put(st, s.state_shardings)


def stack_layers(pure: dict, L: int) -> dict:
    out = dict(pure)
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[pure["layers"][i] for i in range(L)])
    return out


def like(cfg, pure: dict):
    """A model of ``cfg`` (abstract, no init compile) holding the values of pure dict ``pure``
    (unrolled layout; stacked when ``cfg.scan_layers``)."""
    m = nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(m)
    nnx.replace_by_pure_dict(state, stack_layers(pure, cfg.num_layers) if cfg.scan_layers else pure)
    nnx.update(m, state)
    return m


def pure(tree) -> dict:
    return nnx.to_pure_dict(jax.device_get(tree))


def merged(*states) -> dict:
    out: dict = {}
    for st in states:
        _deep_update(out, pure(st))
    return out


def _deep_update(a: dict, b: dict):
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            _deep_update(a[k], v)
        else:
            a[k] = v


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 288, size=(B, S + 1)).astype(np.int32)
    seg = np.ones((B, S), np.int32)
    for row, start in PAD_FROM.items():
        seg[row, start:] = 0
    return dict(inputs=toks[:, :-1], targets=toks[:, 1:], segment_ids=seg,
                positions=np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)).copy(),
                loss_mask=(seg != 0).astype(np.float32), domain=np.zeros((B,), np.int32))


VALID = B * S - sum(S - v for v in PAD_FROM.values())


EP_CALLS: list = []


@pytest.fixture(scope="module", autouse=True)
def count_ep_traces():
    """Records every trace of the expert-parallel shard_map path (moe_ffn -> routed_experts_ep)."""
    orig = moe_ep.routed_experts_ep

    def wrapped(*a, **kw):
        EP_CALLS.append(dict(jax.sharding.get_abstract_mesh().shape))
        return orig(*a, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(moe_ep, "routed_experts_ep", wrapped)
        yield


def train_run(cfg, host_state, batch, mesh_cfg, ndev, steps=1):
    """Forward at the initial params and ``steps`` train steps on a mesh of ``ndev`` devices."""
    cfg = dataclasses.replace(cfg, mesh=mesh_cfg)
    mesh = make_mesh(mesh_cfg, jax.devices()[:ndev])
    s = T.setup(cfg, mesh)
    state = jax.device_put(host_state, s.state_shardings)
    logits, aux = fwd((s.graphdef, state.params, state.rest), batch, mesh, mesh_cfg)
    step = T.make_train_step(s, 1)
    gb = T.global_batch(mesh, batch)
    n_ep = len(EP_CALLS)
    rests, metrics = [], []
    for _ in range(steps):
        rests.append(pure(state.rest))
        state, m = step(state, gb)
        metrics.append(jax.device_get(m))
    rests.append(pure(state.rest))
    return dict(logits=logits, aux=aux, metrics=metrics, rests=rests, step=step, setup=s,
                params=pure(state.params), ep_traced=len(EP_CALLS) > n_ep)


# -- 1. sharded MoE model == single device ---------------------------------------------------------

@pytest.fixture(scope="module")
def base_cfg():
    return run_config()


@pytest.fixture(scope="module")
def base_host(base_cfg):
    """Initial train state (host copy) of the 2-layer MoE model."""
    s = T.setup(base_cfg, make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    return jax.device_get(eager_state(s))


@pytest.fixture(scope="module")
def single(base_cfg, base_host, batch):
    return train_run(base_cfg, base_host, batch, MeshConfig(data=1), 1)


SHARDED = {"expert4_data2": MeshConfig(data=2, expert=4), "expert8": MeshConfig(data=1, expert=8),
           "data8": MeshConfig(data=8)}


@pytest.fixture(scope="module")
def sharded(base_cfg, base_host, batch):
    runs = {name: train_run(base_cfg, base_host, batch, m, 8) for name, m in SHARDED.items()}
    cap = dataclasses.replace(base_cfg, model=dataclasses.replace(
        base_cfg.model, moe=moe(dispatch="capacity", capacity_factor=float(E))))  # C >= T_local*K
    runs["capacity_expert4_data2"] = train_run(cap, base_host, batch, SHARDED["expert4_data2"], 8)
    return runs


def assert_aux_equal(got, ref):
    assert set(got) == set(ref)
    for k in ref:
        if k.endswith("counts") or k.endswith("tokens") or k.endswith("dropped"):
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
        else:
            np.testing.assert_allclose(got[k], ref[k], *TOL_SHARDED_FP32, err_msg=k)


@pytest.mark.parametrize("name", list(SHARDED) + ["capacity_expert4_data2"])
def test_sharded_moe_equals_single_device(single, sharded, name):
    ref, got = single, sharded[name]
    assert got["ep_traced"] and not ref["ep_traced"]  # the step really ran the shard_map path
    np.testing.assert_allclose(got["logits"], ref["logits"], *TOL_SHARDED_FP32)
    assert_aux_equal(got["aux"], ref["aux"])
    assert ref["aux"]["router/counts"].shape == (2, E)
    np.testing.assert_array_equal(ref["aux"]["router/counts"].sum(1), [VALID * K] * 2)
    assert float(np.max(got["aux"]["router/dropped"])) == 0
    m, mr = got["metrics"][0], ref["metrics"][0]
    for k in ("train/loss", "train/grad_norm", "moe/aux_loss", "moe/balance_loss"):
        np.testing.assert_allclose(m[k], mr[k], *TOL_SHARDED_FP32, err_msg=k)
    np.testing.assert_array_equal(m["moe/counts"], mr["moe/counts"])
    np.testing.assert_array_equal(m["moe/counts"], ref["aux"]["router/counts"])
    assert float(np.max(m["moe/dropped"])) == 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **ADAM_TOL), got["params"],
                 ref["params"])
    jax.tree.map(np.testing.assert_array_equal, got["rests"][-1], ref["rests"][-1])  # router bias


# -- 7. balance loss in the step -------------------------------------------------------------------

def lbl_np(counts, prob_sum, tokens):
    """E * sum_i f_i p_i over the last axis (numpy, float64)."""
    counts, prob_sum = np.asarray(counts, np.float64), np.asarray(prob_sum, np.float64)
    f = counts / counts.sum(-1, keepdims=True)
    p = prob_sum / np.asarray(tokens, np.float64)[..., None]
    return counts.shape[-1] * (f * p).sum(-1)


def test_global_balance_loss_in_step_matches_hand(single):
    aux, m = single["aux"], single["metrics"][0]
    sc, ps, tok = aux["router/seq_counts"], aux["router/seq_prob_sum"], aux["router/seq_tokens"]
    np.testing.assert_array_equal(tok.sum(1), [VALID] * 2)
    want = np.mean(lbl_np(sc.sum(1), ps.sum(1), tok.sum(1)))
    assert abs(want - 1.0) > 1e-4  # not trivially balanced
    np.testing.assert_allclose(m["moe/balance_loss"], want, rtol=1e-5)
    np.testing.assert_allclose(m["moe/aux_loss"], MOE.balance.coef * want, rtol=1e-5)


@pytest.fixture(scope="module")
def accum2(base_cfg, base_host, batch):
    cfg = dataclasses.replace(base_cfg, train=dataclasses.replace(base_cfg.train, grad_accum=2))
    return train_run(cfg, base_host, batch, MeshConfig(data=1), 1)


def test_global_balance_with_accumulation_uses_count_buffer(single, accum2):
    aux, m = single["aux"], accum2["metrics"][0]
    sc, ps, tok = aux["router/seq_counts"], aux["router/seq_prob_sum"], aux["router/seq_tokens"]
    rows = [np.arange(B)[a::2] for a in range(2)]  # micro-step a takes rows a, a+2, ...
    c0 = sc[:, rows[0]].sum(1)
    c1 = sc[:, rows[1]].sum(1)
    lb0 = np.mean(lbl_np(c0, ps[:, rows[0]].sum(1), tok[:, rows[0]].sum(1)))
    p1, t1 = ps[:, rows[1]].sum(1), tok[:, rows[1]].sum(1)
    lb1 = np.mean(lbl_np(c0 + c1, p1, t1))  # f pooled over both micro-steps, p local
    lb1_local = np.mean(lbl_np(c1, p1, t1))
    assert abs(lb1 - lb1_local) > 1e-4  # the buffer makes a visible difference
    np.testing.assert_allclose(m["moe/balance_loss"], (lb0 + lb1) / 2, rtol=1e-5)
    np.testing.assert_allclose(m["moe/aux_loss"], MOE.balance.coef * (lb0 + lb1) / 2, rtol=1e-5)
    np.testing.assert_array_equal(m["moe/counts"], single["metrics"][0]["moe/counts"])
    np.testing.assert_allclose(m["train/loss"], single["metrics"][0]["train/loss"], *TOL_FP32)


# -- 2. scan == unrolled; RMoE state through the carry ---------------------------------------------

def test_scan_equals_unrolled(base_cfg, base_host, batch, single):
    scan = like(dataclasses.replace(base_cfg.model, scan_layers=True),
                merged(base_host.params, base_host.rest))
    assert scan.layers.mlp.w_gate.shape == (2, E, 64, 32)
    logits, aux = fwd(scan, batch)
    np.testing.assert_allclose(logits, single["logits"], *TOL_FP32)
    assert_aux_equal(aux, single["aux"])


RMOE = dict(router={"recurrent": "gru", "recurrent_dim": 16, "aux_free_bias": False})


@pytest.fixture(scope="module")
def rmoe(batch):
    cfg = run_config(**RMOE).model
    model = Model(cfg, rngs=nnx.Rngs(3))
    # make the cell's contribution visible: larger gate weights than the default init
    for blk in model.layers:
        blk.mlp.router.gate[...] = blk.mlp.router.gate[...] * 4.0
    return model, fwd(model, batch)


def test_rmoe_scan_carry_equals_unrolled(rmoe, batch):
    model, (logits, aux) = rmoe
    assert model.router_cell is not None and "router_cell" not in nnx.to_pure_dict(
        nnx.state(model.layers[0]))
    scan = like(dataclasses.replace(model.cfg, scan_layers=True), pure(nnx.state(model)))
    got, got_aux = fwd(scan, batch)
    np.testing.assert_allclose(got, logits, *TOL_FP32)
    assert_aux_equal(got_aux, aux)


def test_rmoe_routing_depends_on_previous_layers(rmoe, batch):
    model, (_, aux) = rmoe
    # (a) the model threads layer 0's router state into layer 1: by hand, block by block
    x = model.embed(jnp.asarray(batch["inputs"]))
    args = (jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"]))
    kw = dict(tokens=jnp.asarray(batch["inputs"]), cell=model.router_cell)
    x0, _, _, h0 = model.layers[0](x, *args, state=None, **kw)
    assert h0.shape == (B * S, 16) and float(jnp.abs(h0).max()) > 0
    _, a1, _, _ = model.layers[1](x0, *args, state=h0, **kw)
    _, a1_reset, _, _ = model.layers[1](x0, *args, state=None, **kw)
    np.testing.assert_allclose(aux["router/prob_mean"][1], a1["router/prob_mean"], *TOL_FP32)
    assert np.abs(np.asarray(a1_reset["router/prob_mean"]) - aux["router/prob_mean"][1]).max() > 1e-4
    # (b) perturbing layer 0's router projection changes layer 1's routing probabilities
    g, p, r = nnx.split(model, nnx.Param, ...)
    pp = nnx.to_pure_dict(p)
    pp["layers"][0]["mlp"]["router"]["proj"] = pp["layers"][0]["mlp"]["router"]["proj"] * -3.0
    nnx.replace_by_pure_dict(p, pp)
    _, aux2 = fwd((g, p, r), batch)
    assert np.abs(aux2["router/prob_mean"][1] - aux["router/prob_mean"][1]).max() > 1e-3


# -- 3. mixed stacks; 6. aux-free bias; 10. no recompiles -----------------------------------------

MIXED = dict(first_dense_layers=1, moe_every=2)


@pytest.fixture(scope="module")
def bias_runs(batch):
    """3 train steps with the aux-free bias and no balance loss: unrolled mixed 4-layer stack
    (MoE in layers 1 and 3) and a scanned 2-layer stack."""
    out = {}
    for name, model_kw, moe_kw in (("unrolled_mixed", {"num_layers": 4}, MIXED),
                                   ("scan", {"scan_layers": True}, {})):
        cfg = run_config(model=model_kw, balance={"scope": "none"}, **moe_kw)
        s = T.setup(cfg, make_mesh(MeshConfig(data=1), jax.devices()[:1]))
        host = jax.device_get(eager_state(s))
        out[name] = train_run(cfg, host, batch, MeshConfig(data=1), 1, steps=3)
        out[name]["host"] = host
    return out


def test_mixed_stack_layout_and_aux(bias_runs):
    r = bias_runs["unrolled_mixed"]
    params = pure(r["host"].params)["layers"]
    kinds = ["moe" if "router" in params[i]["mlp"] else "dense" for i in range(4)]
    assert kinds == ["dense", "moe", "dense", "moe"]
    assert set(params[0]["mlp"]) == {"gate", "up", "down"}
    assert params[3]["mlp"]["w_down"].shape == (E, 32, 64)
    aux = r["aux"]
    assert aux["router/counts"].shape == (2, E) and aux["router/seq_counts"].shape == (2, B, E)
    np.testing.assert_array_equal(aux["router/counts"].sum(1), [VALID * K] * 2)
    np.testing.assert_array_equal(r["metrics"][0]["moe/counts"], aux["router/counts"])
    assert r["metrics"][0]["moe/dropped"].shape == (2,)
    assert float(r["metrics"][0]["moe/aux_loss"]) == 0.0  # scope 'none'


def bias_of(rest, name):
    if name == "scan":
        return rest["layers"]["mlp"]["router"]["bias"]  # [L, E]
    return np.stack([rest["layers"][i]["mlp"]["router"]["bias"] for i in (1, 3)])


@pytest.mark.parametrize("name", ["unrolled_mixed", "scan"])
def test_aux_free_bias_moves_by_sign_rule(bias_runs, name):
    r = bias_runs[name]
    rate = MOE.router.bias_update_rate
    assert np.all(bias_of(r["rests"][0], name) == 0)
    for t, m in enumerate(r["metrics"]):
        c = np.asarray(m["moe/counts"])[:, :E]
        np.testing.assert_array_equal(c.sum(1), [VALID * K] * 2)  # global counts of the step
        before, after = bias_of(r["rests"][t], name), bias_of(r["rests"][t + 1], name)
        want = (before + np.float32(rate) * np.sign(c.mean(1, keepdims=True) - c)).astype(np.float32)
        np.testing.assert_allclose(after, want, rtol=0, atol=1e-7, err_msg=f"step {t}")
        assert np.abs(after - before).max() == pytest.approx(rate)
    assert len({m["moe/counts"].tobytes() for m in r["metrics"]}) > 1  # the bias moved routing


def test_moe_train_step_compiles_once(bias_runs, single, sharded):
    for name, r in [*bias_runs.items(), ("single", single), *sharded.items()]:
        assert r["step"]._cache_size() == 1, name
    assert len(bias_runs["scan"]["metrics"]) == 3


# -- 7b. sequence-scope balance loss ---------------------------------------------------------------

@pytest.fixture(scope="module")
def seq_run(base_cfg, base_host, batch):
    cfg = dataclasses.replace(base_cfg, model=dataclasses.replace(
        base_cfg.model, moe=moe(balance={"scope": "sequence"})))
    return train_run(cfg, base_host, batch, MeshConfig(data=1), 1)


def test_sequence_balance_loss_in_step_matches_hand(seq_run, single):
    aux, m = single["aux"], seq_run["metrics"][0]  # same params: the forward aux is shared
    sc, ps, tok = aux["router/seq_counts"], aux["router/seq_prob_sum"], aux["router/seq_tokens"]
    want = np.mean(lbl_np(sc, ps, tok).mean(1))  # mean over sequences, then layers
    np.testing.assert_allclose(m["moe/balance_loss"], want, rtol=1e-5)
    np.testing.assert_allclose(m["moe/aux_loss"], MOE.balance.coef * want, rtol=1e-5)
    assert abs(want - float(single["metrics"][0]["moe/balance_loss"])) > 1e-3


# -- 4. shared experts; 5. GW-MoE (the MoE block against by-hand references) -------------------

def block(cfg, seed=0):
    """An MoE block with O(1) weights (so tolerances are meaningful) and its input x [B,S,D]."""
    layer = MoE(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for name in ("w_gate", "w_up", "w_down"):
        v = getattr(layer, name)
        v[...] = jnp.asarray(rng.normal(size=v.shape) * 0.3, jnp.float32)
    layer.router.w[...] = jnp.asarray(rng.normal(size=layer.router.w.shape) * 0.3, jnp.float32)
    x = jnp.asarray(rng.normal(size=(B, S, cfg.d_model)), jnp.float32)
    return layer, x


def experts_np(layer, xf):
    """Every expert on every token: [N, E, D] (float64)."""
    wg, wu, wd = (np.asarray(getattr(layer, n)[...], np.float64) for n in ("w_gate", "w_up", "w_down"))
    xf = np.asarray(xf, np.float64)
    g, u = np.einsum("nd,edf->nef", xf, wg), np.einsum("nd,edf->nef", xf, wu)
    return np.einsum("nef,efd->ned", g / (1 + np.exp(-g)) * u, wd)


def topk_np(layer, xf, routing):
    """Routed part by hand: sum over slots of weight * expert output."""
    out = experts_np(layer, xf)
    ex, w = np.asarray(routing.experts), np.asarray(routing.weights, np.float64)
    rows = np.arange(xf.shape[0])
    return sum(np.where((ex[:, s] >= 0)[:, None], w[:, s, None] * out[rows, ex[:, s]], 0)
               for s in range(ex.shape[1]))


def call(layer, x, seg, train):
    tokens = jnp.zeros(seg.shape, jnp.int32)
    return layer(x, token_ids=tokens, segment_ids=jnp.asarray(seg), state=None, cell=None, rng=None,
                 train=train)


@pytest.mark.parametrize("gated", [False, True])
def test_shared_experts_match_hand(gated):
    cfg = tiny_model(moe=moe(num_shared_experts=2, d_shared=48, shared_gate=gated))
    layer, x = block(cfg, seed=1)
    assert layer.shared.gate.shape == (64, 48) and (layer.shared_gate is not None) == gated
    seg = np.ones((B, S), np.int32)
    y, _, _ = call(layer, x, seg, train=False)
    xf = np.asarray(x, np.float64).reshape(B * S, -1)
    routing, _ = layer.router(jnp.asarray(x).reshape(B * S, -1))
    ref = topk_np(layer, xf, routing)
    g, u, d = (np.asarray(getattr(layer.shared, n)[...], np.float64) for n in ("gate", "up", "down"))
    h = xf @ g
    shared = (h / (1 + np.exp(-h)) * (xf @ u)) @ d
    if gated:
        shared = shared / (1 + np.exp(-(xf @ np.asarray(layer.shared_gate[...], np.float64))))
    np.testing.assert_allclose(np.asarray(y).reshape(B * S, -1), ref + shared, rtol=1e-5, atol=1e-5)
    assert np.abs(shared).mean() > 0.1 * np.abs(ref).mean()


GW_SLOTS = 3


def test_gw_moe_uncertain_tokens_get_dense_mixture():
    cfg = tiny_model(moe=moe(router={"aux_free_bias": False, "gw_max_slots": GW_SLOTS,
                                     "gw_entropy_threshold": 1e-3}))
    layer, x = block(cfg, seed=2)
    xf = np.asarray(x).reshape(B * S, -1)
    routing, _ = layer.router(jnp.asarray(xf))
    probs = np.asarray(routing.probs, np.float64)
    H = -(probs * np.log(probs + 1e-5)).sum(-1).reshape(B, S)
    seg = np.ones((B, S), np.int32)
    seg[2] = 0  # a padding row: no uncertain token
    seg[5, 2:] = 0  # 2 valid tokens < GW_SLOTS
    thr = float(min(np.median(H), H[0, 0]))  # about half the tokens uncertain, token (0, 0) among them
    layer.cfg = dataclasses.replace(cfg, moe=dataclasses.replace(
        cfg.moe, router=dataclasses.replace(cfg.moe.router, gw_entropy_threshold=thr)))
    unc = np.zeros((B, S), bool)
    for b in range(B):
        idx = np.nonzero((H[b] >= thr) & (seg[b] != 0))[0][:GW_SLOTS]
        unc[b, idx] = True
    unc = unc.reshape(-1)
    assert unc[0] and 0 < unc.sum() < B * GW_SLOTS and not unc[:S].all()
    topk = topk_np(layer, xf, routing)
    dense = np.einsum("ned,ne->nd", experts_np(layer, xf), probs[:, :E])
    y_train = np.asarray(call(layer, x, seg, train=True)[0]).reshape(B * S, -1)
    y_eval = np.asarray(call(layer, x, seg, train=False)[0]).reshape(B * S, -1)
    tol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_train[unc], dense[unc], **tol)
    np.testing.assert_allclose(y_train[~unc], topk[~unc], **tol)
    np.testing.assert_allclose(y_eval, topk, **tol)
    assert np.abs(dense[unc] - topk[unc]).max() > 1e-2


# -- 8. cached decoding ----------------------------------------------------------------------------

PROMPT, STEPS = 40, 8
LENS = np.array([40, 1, 17, 33, 8, 25, 39, 12], np.int32)  # rows 6, 7 stay before their padding


@jax.jit(static_argnums=0)
def _prefill(graphdef, state, cache, tokens, segment_ids):
    return nnx.merge(graphdef, state)(tokens, segment_ids, cache=cache)


@jax.jit(static_argnums=0, donate_argnums=2)
def _decode(graphdef, state, cache, tokens):
    return nnx.merge(graphdef, state)(tokens, cache=cache)


def test_cached_decode_matches_full_forward(base_cfg, base_host, batch, single):
    model = like(base_cfg.model, merged(base_host.params, base_host.rest))
    g, st = nnx.split(model)
    tokens = batch["inputs"]
    seg = (np.arange(PROMPT)[None] < LENS[:, None]).astype(np.int32)
    logits, aux, cache = _prefill(g, st, model.init_cache(B, S), tokens[:, :PROMPT], seg)
    assert aux["router/counts"].shape == (2, E)
    np.testing.assert_array_equal(np.asarray(aux["router/counts"]).sum(1), [LENS.sum() * K] * 2)
    rows = np.arange(B)
    got = [np.asarray(logits)[rows, LENS - 1]]
    for i in range(STEPS):
        logits, _, cache = _decode(g, st, cache, tokens[rows, LENS + i][:, None])
        got.append(np.asarray(logits)[:, 0])
    want = np.stack([single["logits"][rows, LENS - 1 + i] for i in range(STEPS + 1)], 1)
    np.testing.assert_allclose(np.stack(got, 1), want, *TOL_FP32)
    np.testing.assert_array_equal(cache.lengths, LENS + STEPS)


# -- 9. MaskMoE in the model -------------------------------------------------------------------------

def test_maskmoe_selects_only_visible_experts(base_host, batch, monkeypatch):
    cfg = run_config(router={"token_mask": "maskmoe", "aux_free_bias": False}).model
    model = Model(cfg, rngs=nnx.Rngs(5))
    seen = []
    orig = moe_lib.moe_ffn

    def spy(x, experts, *a, **kw):
        seen.append(np.asarray(experts))
        return orig(x, experts, *a, **kw)
    monkeypatch.setattr(moe_lib, "moe_ffn", spy)
    tokens = batch["inputs"].reshape(-1)
    model(jnp.asarray(batch["inputs"]))  # eager: the spy sees concrete routing
    assert len(seen) == 2
    for i, ex in enumerate(seen):
        mask = np.asarray(model.layers[i].mlp.router.token_mask[...])
        assert isinstance(model.layers[i].mlp.router.token_mask, TokenMask)
        visible = mask[tokens] == 0  # [N, E]
        n_vis = visible.sum(1)
        assert set(np.unique(n_vis)) == {1, 4}  # frequent ids see 4 experts, the rest 1
        rows = np.arange(len(tokens))
        for s in range(K):
            ok = ex[:, s] >= 0
            assert visible[rows[ok], ex[ok, s]].all(), f"layer {i} slot {s}"
        np.testing.assert_array_equal((ex >= 0).sum(1), np.minimum(n_vis, K))
