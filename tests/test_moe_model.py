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
from moejax.layers.router import TokenMask, maskmoe_mask
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
    """The tiny run with an MoE model; no warmup, so the first step already moves the params."""
    return tiny_config(mesh=mesh, train={"warmup_steps": 0, **(train or {})},
                       model={"moe": moe(**moe_kw), **(model or {})})


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
    """Forward at the initial params and ``steps`` train steps on a mesh of ``ndev`` devices.
    ``host_state``: a TrainState (host copy) or a pure state dict (unrolled layout)."""
    cfg = dataclasses.replace(cfg, mesh=mesh_cfg)
    mesh = make_mesh(mesh_cfg, jax.devices()[:ndev])
    s = T.setup(cfg, mesh)
    state = (make_state(s, host_state) if isinstance(host_state, dict)
             else jax.device_put(host_state, s.state_shardings))
    init = jax.device_get(state)
    n_ep = len(EP_CALLS)
    logits, aux = fwd((s.graphdef, state.params, state.rest), batch, mesh, mesh_cfg)
    fwd_ep = len(EP_CALLS) > n_ep
    step = T.make_train_step(s, 1)
    gb = T.global_batch(mesh, batch)
    n_ep = len(EP_CALLS)
    rests, metrics, params = [], [], []
    for _ in range(steps):
        rests.append(pure(state.rest))
        state, m = step(state, gb)
        metrics.append(jax.device_get(m))
        params.append(pure(state.params))
    rests.append(pure(state.rest))
    return dict(logits=logits, aux=aux, metrics=metrics, rests=rests, step=step, setup=s,
                params=params, init=init, fwd_ep=fwd_ep, step_ep=len(EP_CALLS) > n_ep)


# -- 1. sharded MoE model == single device ---------------------------------------------------------

@pytest.fixture(scope="module")
def base_cfg():
    return run_config()


@pytest.fixture(scope="module")
def base_pure(base_cfg):
    """Initial parameters (pure dict, unrolled) of the 2-layer MoE model."""
    return fill(base_cfg.model)


@pytest.fixture(scope="module")
def single(base_cfg, base_pure, batch):
    """Single device, 3 steps (the aux-free bias test reads steps 2 and 3)."""
    return train_run(base_cfg, base_pure, batch, MeshConfig(data=1), 1, steps=3)


SHARDED = {"expert4_data2": MeshConfig(data=2, expert=4), "expert8": MeshConfig(data=1, expert=8),
           "data8": MeshConfig(data=8),
           # EP with fsdp > 1 and with tensor > 1 (expert FFN split over F inside the shard_map)
           "expert2_fsdp2_data2": MeshConfig(data=2, fsdp=2, expert=2),
           "expert4_tensor2": MeshConfig(data=1, expert=4, tensor=2)}


@pytest.fixture(scope="module")
def sharded(base_cfg, single, batch):
    host = single["init"]
    runs = {name: train_run(base_cfg, host, batch, m, 8) for name, m in SHARDED.items()}
    cap = dataclasses.replace(base_cfg, model=dataclasses.replace(
        base_cfg.model, moe=moe(dispatch="capacity", capacity_factor=float(E))))  # C >= T_local*K
    # forward only: the capacity layer's gradients under EP are covered by tests/test_moe_dispatch.py
    runs["capacity_expert4_data2"] = train_run(cap, host, batch, SHARDED["expert4_data2"], 8,
                                               steps=0)
    return runs


def assert_aux_equal(got, ref, tol=TOL_SHARDED_FP32):
    assert set(got) == set(ref)
    for k in ref:
        if k.endswith("counts") or k.endswith("tokens") or k.endswith("dropped"):
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
        else:
            np.testing.assert_allclose(got[k], ref[k], *tol, err_msg=k)


@pytest.mark.parametrize("name", list(SHARDED) + ["capacity_expert4_data2"])
def test_sharded_moe_equals_single_device(single, sharded, name):
    ref, got = single, sharded[name]
    assert got["fwd_ep"] and not ref["fwd_ep"]  # the shard_map (EP) path really ran
    np.testing.assert_allclose(got["logits"], ref["logits"], *TOL_SHARDED_FP32)
    assert_aux_equal(got["aux"], ref["aux"])
    assert ref["aux"]["router/counts"].shape == (2, E)
    np.testing.assert_array_equal(ref["aux"]["router/counts"].sum(1), [VALID * K] * 2)
    assert float(np.max(got["aux"]["router/dropped"])) == 0
    if name.startswith("capacity"):
        return
    assert got["step_ep"] and not ref["step_ep"]  # also inside the jitted train step
    m, mr = got["metrics"][0], ref["metrics"][0]
    for k in ("train/loss", "train/grad_norm", "moe/aux_loss", "moe/balance_loss"):
        np.testing.assert_allclose(m[k], mr[k], *TOL_SHARDED_FP32, err_msg=k)
    np.testing.assert_array_equal(m["moe/counts"], mr["moe/counts"])
    np.testing.assert_array_equal(m["moe/counts"], ref["aux"]["router/counts"])
    assert float(np.max(m["moe/dropped"])) == 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **ADAM_TOL), got["params"][0],
                 ref["params"][0])
    assert np.abs(ref["params"][0]["layers"][0]["mlp"]["w_gate"]
                  - base_w(ref, 0, "w_gate")).max() > 1e-4  # the experts were updated
    jax.tree.map(np.testing.assert_array_equal, got["rests"][1], ref["rests"][1])  # router bias


def base_w(run, layer, name):
    return np.asarray(pure(run["init"].params)["layers"][layer]["mlp"][name])


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


def test_global_balance_with_accumulation_uses_count_buffer(mixed_run):
    aux, m = mixed_run["aux"], mixed_run["metrics"][0]  # grad_accum=2, scope 'global'
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
    np.testing.assert_array_equal(m["moe/counts"], aux["router/counts"])  # both micro-steps


# -- 2./3./6./10. scan == unrolled, mixed stacks, aux-free bias, no recompiles --------------------

@pytest.fixture(scope="module")
def scan_run(base_pure, batch):
    """The base parameters stacked into a scanned model; balance scope 'sequence', 3 steps."""
    cfg = run_config(model={"scan_layers": True}, balance={"scope": "sequence"})
    return train_run(cfg, base_pure, batch, MeshConfig(data=1), 1, steps=3)


def test_scan_equals_unrolled(scan_run, single):
    assert pure(scan_run["init"].params)["layers"]["mlp"]["w_gate"].shape == (2, E, 64, 32)
    np.testing.assert_allclose(scan_run["logits"], single["logits"], *TOL_FP32)
    assert_aux_equal(scan_run["aux"], single["aux"], TOL_FP32)


def test_sequence_balance_loss_in_step_matches_hand(scan_run, single):
    aux, m = scan_run["aux"], scan_run["metrics"][0]
    sc, ps, tok = aux["router/seq_counts"], aux["router/seq_prob_sum"], aux["router/seq_tokens"]
    want = np.mean(lbl_np(sc, ps, tok).mean(1))  # mean over sequences, then layers
    np.testing.assert_allclose(m["moe/balance_loss"], want, rtol=1e-5)
    np.testing.assert_allclose(m["moe/aux_loss"], MOE.balance.coef * want, rtol=1e-5)
    assert abs(want - float(single["metrics"][0]["moe/balance_loss"])) > 1e-3


MIXED = dict(first_dense_layers=1, moe_every=2)


@pytest.fixture(scope="module")
def mixed_run(base_pure, batch):
    """4 layers, MoE in layers 1 and 3; 2 accumulation micro-steps, global balance with the
    count buffer, aux-free bias; 3 steps."""
    cfg = run_config(model={"num_layers": 4}, train={"grad_accum": 2}, **MIXED)
    src = {**base_pure, "layers": {i: base_pure["layers"][i % 2] for i in range(4)}}
    return train_run(cfg, fill(cfg.model, src), batch, MeshConfig(data=1), 1, steps=3)


def test_mixed_stack_layout_and_aux(mixed_run):
    r = mixed_run
    params = pure(r["init"].params)["layers"]
    kinds = ["moe" if "router" in params[i]["mlp"] else "dense" for i in range(4)]
    assert kinds == ["dense", "moe", "dense", "moe"]
    assert set(params[0]["mlp"]) == {"gate", "up", "down"}
    assert params[3]["mlp"]["w_down"].shape == (E, 32, 64)
    aux = r["aux"]
    assert aux["router/counts"].shape == (2, E) and aux["router/seq_counts"].shape == (2, B, E)
    np.testing.assert_array_equal(aux["router/counts"].sum(1), [VALID * K] * 2)
    np.testing.assert_array_equal(r["metrics"][0]["moe/counts"], aux["router/counts"])
    assert r["metrics"][0]["moe/dropped"].shape == (2,)


def bias_of(rest, name):
    if name == "scan":
        return rest["layers"]["mlp"]["router"]["bias"]  # [L, E]
    layers = (1, 3) if name == "mixed" else (0, 1)
    return np.stack([rest["layers"][i]["mlp"]["router"]["bias"] for i in layers])


@pytest.mark.parametrize("name", ["mixed", "scan", "single"])
def test_aux_free_bias_moves_by_sign_rule(mixed_run, scan_run, single, name):
    r = {"mixed": mixed_run, "scan": scan_run, "single": single}[name]
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


def test_moe_train_step_compiles_once(mixed_run, scan_run, single, sharded):
    runs = dict(mixed=mixed_run, scan=scan_run, single=single, **sharded)
    for name, r in runs.items():
        if not r["metrics"]:
            continue
        assert r["step"]._cache_size() == 1, name
    assert len(single["metrics"]) == len(scan_run["metrics"]) == len(mixed_run["metrics"]) == 3


# -- 2b. RMoE: the recurrent router state through the scan carry ----------------------------------

RMOE = dict(router={"recurrent": "gru", "recurrent_dim": 16, "aux_free_bias": False})


@pytest.fixture(scope="module")
def rmoe(base_pure, batch):
    cfg = run_config(**RMOE).model
    src = fill(cfg, base_pure, seed=3)
    rng = np.random.default_rng(3)
    for i in range(2):  # routers with visible effects: O(1) gate, GRU like PyTorch's init
        r = src["layers"][i]["mlp"]["router"]
        r["proj"] = (rng.normal(size=r["proj"].shape) * 0.3).astype(np.float32)
        r["gate"] = (rng.normal(size=r["gate"].shape) * 0.5).astype(np.float32)
    for k, v in src["router_cell"].items():
        src["router_cell"][k] = rng.uniform(-0.25, 0.25, v.shape).astype(np.float32)
    model = like(cfg, src)
    return model, src, fwd(model, batch)


def test_rmoe_scan_carry_equals_unrolled(rmoe, batch):
    model, src, (logits, aux) = rmoe
    assert set(src["router_cell"]) == {"w_i", "w_h", "b_i", "b_h"}  # one cell, shared by layers
    assert "router_cell" not in src["layers"][0]["mlp"]["router"]
    scan = like(dataclasses.replace(model.cfg, scan_layers=True), src)
    got, got_aux = fwd(scan, batch)
    np.testing.assert_allclose(got, logits, *TOL_FP32)
    assert_aux_equal(got_aux, aux, TOL_FP32)


@jax.jit(static_argnums=0)
def _layer1_probs(graphdef, state, tokens, segment_ids, positions):
    """Layer 1's mean routing probs given layer 0's router state, and given a reset (zero) state."""
    model = nnx.merge(graphdef, state)
    kw = dict(tokens=tokens, cell=model.router_cell)
    x0, _, _, h0 = model.layers[0](model.embed(tokens), positions, segment_ids, state=None, **kw)
    _, a1, _, _ = model.layers[1](x0, positions, segment_ids, state=h0, **kw)
    _, a1_reset, _, _ = model.layers[1](x0, positions, segment_ids, state=None, **kw)
    return h0, a1["router/prob_mean"], a1_reset["router/prob_mean"]


def test_rmoe_routing_depends_on_previous_layers(rmoe, batch):
    model, src, (_, aux) = rmoe
    # (a) the model threads layer 0's router state into layer 1: by hand, block by block
    h0, a1, a1_reset = _layer1_probs(*nnx.split(like(model.cfg, src)), batch["inputs"],
                                     batch["segment_ids"], batch["positions"])
    assert h0.shape == (B * S, 16) and float(jnp.abs(h0).max()) > 0.1
    np.testing.assert_allclose(aux["router/prob_mean"][1], a1, *TOL_FP32)
    assert np.abs(np.asarray(a1_reset) - aux["router/prob_mean"][1]).max() > 1e-3
    # (b) perturbing layer 0's router projection changes layer 1's routing probabilities
    g, p, r = nnx.split(like(model.cfg, src), nnx.Param, ...)
    pp = nnx.to_pure_dict(p)
    pp["layers"][0]["mlp"]["router"]["proj"] = pp["layers"][0]["mlp"]["router"]["proj"] * -3.0
    nnx.replace_by_pure_dict(p, pp)
    _, aux2 = fwd((g, p, r), batch)
    assert np.abs(aux2["router/prob_mean"][1] - aux["router/prob_mean"][1]).max() > 1e-3


# -- 4. shared experts; 5. GW-MoE (the MoE block against by-hand references) -------------------

def block(cfg, seed=0):
    """An MoE block with O(1) weights (so tolerances are meaningful) and its input x [B,S,D]."""
    layer = MoE(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for name in ("w_gate", "w_up", "w_down"):
        v = getattr(layer, name)
        v[...] = jnp.asarray(rng.normal(size=v.shape) * 0.3, jnp.float32)
    layer.router.w[...] = jnp.asarray(rng.normal(size=layer.router.w.shape) * 0.3, jnp.float32)
    for v in ((layer.shared.gate, layer.shared.up, layer.shared.down, layer.shared_gate)
              if layer.shared is not None else ()):
        if v is not None:
            v[...] = jnp.asarray(rng.normal(size=v.shape) * 0.3, jnp.float32)
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


@jax.jit(static_argnums=(0, 4))
def _block_call(graphdef, state, x, segment_ids, train):
    layer = nnx.merge(graphdef, state)
    y, _, _ = layer(x, token_ids=jnp.zeros(segment_ids.shape, jnp.int32), segment_ids=segment_ids,
                    state=None, cell=None, rng=None, train=train)
    keys = None
    if layer.router.moe_cfg.router.gating == "avg_key":
        keys = jnp.mean(layer.w_gate[...], axis=-1).T
    routing, _ = layer.router(x.reshape(-1, x.shape[-1]), expert_keys=keys,
                              valid=segment_ids.reshape(-1) != 0)
    return y, routing


def call(layer, x, seg, train):
    """(y [B*S, D], routing of x) from the jitted block (one compile per config and mode)."""
    y, routing = _block_call(*nnx.split(layer), x, jnp.asarray(seg), train)
    return np.asarray(y).reshape(B * S, -1), jax.device_get(routing)


@pytest.mark.parametrize("gated", [False, True])
def test_shared_experts_match_hand(gated):
    cfg = tiny_model(moe=moe(num_shared_experts=2, d_shared=48, shared_gate=gated))
    layer, x = block(cfg, seed=1)
    assert layer.shared.gate.shape == (64, 48) and (layer.shared_gate is not None) == gated
    seg = np.ones((B, S), np.int32)
    y, routing = call(layer, x, seg, train=False)
    xf = np.asarray(x, np.float64).reshape(B * S, -1)
    ref = topk_np(layer, xf, routing)
    g, u, d = (np.asarray(getattr(layer.shared, n)[...], np.float64) for n in ("gate", "up", "down"))
    h = xf @ g
    shared = (h / (1 + np.exp(-h)) * (xf @ u)) @ d
    if gated:
        shared = shared / (1 + np.exp(-(xf @ np.asarray(layer.shared_gate[...], np.float64))))
    np.testing.assert_allclose(y, ref + shared, rtol=1e-5, atol=1e-5)
    assert np.abs(shared).mean() > 0.1 * np.abs(ref).mean()


GW_SLOTS = 3


def test_gw_moe_uncertain_tokens_get_dense_mixture():
    cfg = tiny_model(moe=moe(router={"aux_free_bias": False, "gw_max_slots": GW_SLOTS,
                                     "gw_entropy_threshold": 1e-3}))
    layer, x = block(cfg, seed=2)
    xf = np.asarray(x).reshape(B * S, -1)
    logits = xf.astype(np.float64) @ np.asarray(layer.router.w[...], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)  # the softmax router, by hand
    H = -(probs * np.log(probs + 1e-5)).sum(-1).reshape(B, S)
    seg = np.ones((B, S), np.int32)
    seg[2] = 0  # a padding row: no uncertain token
    seg[5, 2:] = 0  # 2 valid tokens < GW_SLOTS
    # about half the tokens uncertain, token (0, 0) among them; no entropy within 1e-5 of thr
    thr = float(min(np.median(H), H[0, 0])) - 1e-4
    assert np.abs(H - thr).min() > 1e-5
    layer.cfg = dataclasses.replace(cfg, moe=dataclasses.replace(
        cfg.moe, router=dataclasses.replace(cfg.moe.router, gw_entropy_threshold=thr)))
    unc = np.zeros((B, S), bool)
    for b in range(B):
        idx = np.nonzero((H[b] >= thr) & (seg[b] != 0))[0][:GW_SLOTS]
        unc[b, idx] = True
    unc = unc.reshape(-1)
    assert unc[0] and 0 < unc.sum() < B * GW_SLOTS and not unc[:S].all()
    y_eval, routing = call(layer, x, seg, train=False)
    np.testing.assert_allclose(routing.probs, probs, rtol=1e-5, atol=1e-6)
    y_train, _ = call(layer, x, seg, train=True)
    topk = topk_np(layer, xf, routing)
    dense = np.einsum("ned,ne->nd", experts_np(layer, xf), probs[:, :E])
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


def test_cached_decode_matches_full_forward(base_cfg, base_pure, batch, single):
    g, st = nnx.split(like(base_cfg.model, base_pure))
    model = nnx.merge(g, st)
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

def test_maskmoe_selects_only_visible_experts(base_pure, batch, monkeypatch):
    cfg = run_config(router={"token_mask": "maskmoe", "aux_free_bias": False}).model
    src = fill(cfg, base_pure)
    for i in range(2):
        src["layers"][i]["mlp"]["router"]["w"] *= 20.0  # confident routers: visibility must bind
        src["layers"][i]["mlp"]["router"]["token_mask"] = np.asarray(maskmoe_mask(
            None, E, frequent_fraction=0.1, frequent_visible=4, seed=10 + i, vocab_size=288))
    model = like(cfg, src)
    seen = []
    orig = moe_lib.moe_ffn

    def spy(x, experts, *a, **kw):  # hands every layer's routed experts to the host
        jax.debug.callback(lambda e: seen.append(np.asarray(e)), experts, ordered=True)
        return orig(x, experts, *a, **kw)
    monkeypatch.setattr(moe_lib, "moe_ffn", spy)
    tokens = batch["inputs"].reshape(-1)
    fwd(model, batch)  # this graphdef is traced here for the first time, with the spy
    jax.effects_barrier()
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


# -- issue 15: top-p + MaskMoE gradients, expert choice with padding, GW per document and scale ----

@jax.jit(static_argnums=(0, 5))
def _block_value_and_grad(graphdef, params, rest, x, segment_ids, train, token_ids):
    """Forward of one MoE block and the gradient of sum(y * ct) + entropy + z (the aux terms the
    top-p entropy loss and z-loss put in the step) w.r.t. its parameters and input."""
    def loss(params, x):
        layer = nnx.merge(graphdef, params, rest)
        y, aux, _ = layer(x, token_ids=token_ids, segment_ids=segment_ids, state=None, cell=None,
                          rng=None, train=train)
        ct = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        return jnp.sum(y * ct) + aux["router/entropy"] + aux["router/z"], (y, aux)
    (val, (y, aux)), g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return val, y, aux, g


def block_vg(layer, x, seg, train=True, token_ids=None):
    g, p, r = nnx.split(layer, nnx.Param, ...)
    tok = jnp.zeros(seg.shape, jnp.int32) if token_ids is None else jnp.asarray(token_ids)
    return jax.device_get(_block_value_and_grad(g, p, r, x, jnp.asarray(seg), train, tok))


def test_topp_with_maskmoe_block_gradient_is_finite():
    """kind=topp + token_mask=maskmoe: masked experts have probability exactly 0; the entropy term
    used to make every gradient NaN."""
    cfg = tiny_model(moe=moe(router={"aux_free_bias": False, "kind": "topp", "top_p": 0.6,
                                     "token_mask": "maskmoe"}))
    layer, x = block(cfg, seed=3)
    ids = np.random.default_rng(3).integers(0, 288, (B, S))
    seg = np.ones((B, S), np.int32)
    val, y, aux, (gp, gx) = block_vg(layer, x, seg, token_ids=ids)
    mask = np.asarray(layer.router.token_mask[...])[ids.reshape(-1)]
    assert (mask < 0).any()  # some probabilities are exactly 0
    assert np.isfinite(val) and np.isfinite(aux["router/entropy"])
    leaves = jax.tree.leaves(gp) + [gx]
    assert all(np.isfinite(np.asarray(a)).all() for a in leaves)
    assert np.abs(np.asarray(gp["router"]["w"])).max() > 0


def test_expert_choice_padding_takes_no_slot_and_real_tokens_match_unpadded():
    cfg = tiny_model(moe=moe(router={"aux_free_bias": False, "kind": "expert_choice",
                                     "expert_choice_capacity": 1.0}))
    layer, x = block(cfg, seed=4)
    seg = np.ones((B, S), np.int32)
    seg[1, 40:] = 0  # padding rows: trailing and a whole row
    seg[5, :] = 0
    valid = seg.reshape(-1) != 0
    _, y, aux, _ = block_vg(layer, x, seg, train=False)
    y = np.asarray(y).reshape(B * S, -1)
    xr = np.asarray(x).reshape(B * S, -1)[valid][None]  # the same real tokens, no padding
    _, y_ref, aux_ref, _ = block_vg(layer, jnp.asarray(xr), np.ones(xr.shape[:2], np.int32),
                                    train=False)
    np.testing.assert_array_equal(y[~valid], 0.0)  # no expert slot went to padding
    np.testing.assert_allclose(y[valid], np.asarray(y_ref)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(aux["router/counts"], aux_ref["router/counts"])
    assert aux["router/counts"].sum() == int(np.ceil(valid.sum() * K / E)) * E


def packed_segments():
    """[B,S] segment ids: rows with 1, 2 or 3 packed documents and some padding."""
    seg = np.ones((B, S), np.int32)
    seg[0, 20:], seg[0, 45:] = 2, 3
    seg[1, 30:] = 2
    seg[2, 10:], seg[2, 50:] = 5, 0
    seg[3, 5:], seg[3, 40:] = 2, 3
    return seg


def gw_reference(layer, x, seg, thr, slots, scale):
    """(uncertain mask [B*S], dense mixture [B*S,D], top-k output [B*S,D]) by hand: the first
    ``slots`` uncertain tokens of each document get scale * sum_e p_e E_e(x)."""
    from moejax.testing import documents_np
    xf = np.asarray(x, np.float64).reshape(B * S, -1)
    keys = (np.asarray(layer.w_gate[...], np.float64).mean(-1).T if layer.router.moe_cfg.router.gating
            == "avg_key" else np.asarray(layer.router.w[...], np.float64))
    logits = xf @ keys
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    H = -(probs * np.log(probs + 1e-5)).sum(-1).reshape(B, S)
    unc = np.zeros((B, S), bool)
    for b, pos in documents_np(seg):
        unc[b, pos[H[b, pos] >= thr][:slots]] = True
    dense = scale * np.einsum("ned,ne->nd", experts_np(layer, xf), probs)
    return unc.reshape(-1), dense, H


def test_gw_caps_uncertain_tokens_per_document():
    slots = 2
    cfg = tiny_model(moe=moe(router={"aux_free_bias": False, "gw_max_slots": slots,
                                     "gw_entropy_threshold": 1e-3}))
    layer, x = block(cfg, seed=5)
    seg = packed_segments()
    _, _, H = gw_reference(layer, x, seg, 0.0, slots, 1.0)
    thr = float(np.quantile(H, 0.3))
    layer.cfg = dataclasses.replace(cfg, moe=dataclasses.replace(
        cfg.moe, router=dataclasses.replace(cfg.moe.router, gw_entropy_threshold=thr)))
    unc, dense, _ = gw_reference(layer, x, seg, thr, slots, 1.0)
    per_row = np.zeros((B, S), bool)  # what a per-row cap would pick
    for b in range(B):
        per_row[b, np.nonzero((H[b] >= thr) & (seg[b] != 0))[0][:slots]] = True
    assert (unc != per_row.reshape(-1)).any() and unc.sum() > B * slots
    y_train, routing = call(layer, x, seg, train=True)
    y_eval, _ = call(layer, x, seg, train=False)
    tol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_train[unc], dense[unc], **tol)
    np.testing.assert_allclose(y_train[~unc], y_eval[~unc], **tol)


def emoe_block(cfg, seed):
    """An EMoE (avg_key) block: no router parameters; O(1) expert weights."""
    layer = MoE(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for name in ("w_gate", "w_up", "w_down"):
        v = getattr(layer, name)
        v[...] = jnp.asarray(rng.normal(size=v.shape) * 0.3, jnp.float32)
    return layer, jnp.asarray(rng.normal(size=(B, S, cfg.d_model)), jnp.float32)


@pytest.mark.parametrize("variant", ["emoe", "scaled_softmax"])
def test_gw_mixture_uses_the_inference_combine_scale(variant):
    """EMoE combines its top-k blocks with weight routed_scaling each (total K * scaling), a
    DeepSeek-style router with total routed_scaling: the GW mixture carries the same total."""
    router = {"aux_free_bias": False, "gw_max_slots": 4, "gw_entropy_threshold": 1e-3,
              "routed_scaling": 2.0}
    if variant == "emoe":
        router["gating"] = "avg_key"
    cfg = tiny_model(moe=moe(router=router))
    layer, x = emoe_block(cfg, 6) if variant == "emoe" else block(cfg, seed=6)
    seg = np.ones((B, S), np.int32)
    scale = 2.0 * (K if variant == "emoe" else 1)
    _, _, H = gw_reference(layer, x, seg, 0.0, 4, scale)
    thr = float(np.median(H))
    layer.cfg = dataclasses.replace(cfg, moe=dataclasses.replace(
        cfg.moe, router=dataclasses.replace(cfg.moe.router, gw_entropy_threshold=thr)))
    unc, dense, _ = gw_reference(layer, x, seg, thr, 4, scale)
    assert unc.sum() == B * 4
    y_train, routing = call(layer, x, seg, train=True)
    y_eval, _ = call(layer, x, seg, train=False)
    xf = np.asarray(x, np.float64).reshape(B * S, -1)  # outputs reach ~20 (x4 scale): atol 1e-4
    np.testing.assert_allclose(y_eval, topk_np(layer, xf, routing), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(routing.weights).sum(-1), scale, rtol=1e-6)
    np.testing.assert_allclose(y_train[unc], dense[unc], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(y_train[~unc], y_eval[~unc], rtol=1e-5, atol=1e-4)
