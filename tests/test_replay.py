"""Routing replay (issue #11 item 5; rl-and-data.md B.5.1): every token-choice MoE layer records the
experts it used (aux['router/experts'] [L_moe,B,T,k]) and ``forced_experts`` replays them with
combine weights from the *live* router scores, so the router still gets gradients.

fp32 tiny models (conftest pins matmul precision to highest); one compile per program and config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import ConfigError, MeshConfig, MoEConfig, RouterConfig
from moejax.layers.moe import MoE
from moejax.mesh import make_mesh, rules_for, use_mesh
from moejax.model import Model
from moejax.testing import TOL_SHARDED_FP32, tiny_model

E, K = 8, 2
B, T = 4, 16
ROUTERS = {  # record -> replay configs (every scoring rule the replay reweights)
    "softmax_norm": dict(),
    "softmax_raw": dict(norm_topk_prob=False),
    "sigmoid_scaled": dict(score="sigmoid", routed_scaling=2.5),
    "null_experts": dict(num_null_experts=2),
}


def moe_model(scan=False, num_layers=2, moe=None, **router):
    return tiny_model(num_layers=num_layers, scan_layers=scan,
                      moe=MoEConfig(num_experts=E, top_k=K, d_expert=32,
                                    router=RouterConfig(**router), **(moe or {})))


@jax.jit(static_argnums=0)
def forward(graphdef, state, tokens, segment_ids, forced):
    return nnx.merge(graphdef, state)(tokens, segment_ids, forced_experts=forced)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 288, size=(B, T)).astype(np.int32)


@pytest.fixture(scope="module")
def segments():
    seg = np.ones((B, T), np.int32)
    seg[1, 11:] = 0  # trailing padding is recorded and replayed like any token
    return seg


# -- record -> replay is exact -----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ROUTERS))
def test_replaying_the_recorded_routing_is_bit_identical(name, tokens, segments):
    graphdef, state = nnx.split(Model(moe_model(**ROUTERS[name]), rngs=nnx.Rngs(0)))
    logits, aux = forward(graphdef, state, tokens, segments, None)
    rec = np.asarray(aux["router/experts"])
    assert rec.shape == (2, B, T, K) and rec.dtype == np.int32
    assert rec.min() >= -1 and rec.max() < E
    if name == "null_experts":  # some slots chose a null expert: recorded as empty
        assert (rec == -1).any() and (rec >= 0).any()
    else:
        assert (rec >= 0).all() and (rec[..., 0] != rec[..., 1]).all()
    got, aux2 = forward(graphdef, state, tokens, segments, rec)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(logits))
    np.testing.assert_array_equal(np.asarray(aux2["router/experts"]), rec)
    # balance statistics come from the live scores, the counts from the forced (= recorded) sets
    np.testing.assert_array_equal(aux2["router/prob_mean"], aux["router/prob_mean"])
    if name != "null_experts":  # a replayed null slot is just empty: not counted as a null pick
        np.testing.assert_array_equal(aux2["router/counts"], aux["router/counts"])


def test_replay_on_an_expert_parallel_mesh_equals_single_device(tokens, segments, monkeypatch):
    """A drifted routing (each token's live sets rotated to other experts) replayed on 8 devices
    (data 2 x expert 4, the EP shard_map path) equals the single-device replay."""
    from moejax.layers import moe_ep
    ep_calls = []
    orig = moe_ep.routed_experts_ep
    monkeypatch.setattr(moe_ep, "routed_experts_ep",
                        lambda *a, **kw: ep_calls.append(1) or orig(*a, **kw))
    graphdef, state = nnx.split(Model(moe_model(), rngs=nnx.Rngs(0)))
    _, aux = forward(graphdef, state, tokens, segments, None)
    forced = (np.asarray(aux["router/experts"]) + 3) % E
    want, want_aux = forward(graphdef, state, tokens, segments, forced)
    mcfg = MeshConfig(data=2, expert=4)
    with use_mesh(make_mesh(mcfg), rules_for(mcfg)):
        got, got_aux = jax.device_get(forward(graphdef, state, tokens, segments, forced))
    assert ep_calls, "the mesh forward did not take the expert-parallel path"
    np.testing.assert_array_equal(got_aux["router/experts"], forced)
    np.testing.assert_allclose(got, np.asarray(want), *TOL_SHARDED_FP32)


# -- a different routing equals a float64 reference; gradients reach the router ------------------------

D, F = 64, 32
LAYER_ROUTERS = {
    "softmax_norm": dict(),
    "softmax_raw": dict(norm_topk_prob=False),
    "sigmoid_scaled": dict(score="sigmoid", routed_scaling=2.5),
    "sigmoid_raw": dict(score="sigmoid", norm_topk_prob=False),
}


def reference_layer(xp, x, w_router, wg, wu, wd, forced, *, score, norm_topk_prob=True,
                    routed_scaling=1.0):
    """By hand: live scores of all experts gathered at the forced ids (-1 = empty), renormalised
    if asked, times routed_scaling, combining the forced experts' SwiGLU outputs. ``xp`` is numpy
    (float64 values) or jax.numpy (fp32, differentiable). x [N,D], forced [N,k] -> [N,D]."""
    logits = x @ w_router  # [N,E]
    if score == "softmax":
        e = xp.exp(logits - logits.max(-1, keepdims=True))
        s = e / e.sum(-1, keepdims=True)
    else:
        s = 1.0 / (1.0 + xp.exp(-logits))
    ids = xp.maximum(forced, 0)
    w = xp.where(forced >= 0, xp.take_along_axis(s, ids, axis=1), 0.0)  # [N,k]
    if norm_topk_prob:
        w = w / w.sum(-1, keepdims=True)
    w = w * routed_scaling
    g = xp.einsum("nd,nkdf->nkf", x, wg[ids])
    h = g / (1.0 + xp.exp(-g)) * xp.einsum("nd,nkdf->nkf", x, wu[ids])
    return xp.einsum("nkf,nkfd,nk->nd", h, wd[ids], w)


def layer_inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(B * T, D)).astype(np.float32),
            rng.normal(size=(B * T, D)).astype(np.float32))  # x, output cotangent


@jax.jit(static_argnums=0)
def layer_value_and_router_grad(graphdef, state, x, forced, ct):
    """(y [N,D], aux, d sum(y * ct) / d router.w) of one MoE layer under forced routing."""
    def loss(state):
        y, aux, _ = nnx.merge(graphdef, state)(
            x[None], token_ids=jnp.zeros((1, B * T), jnp.int32),
            segment_ids=jnp.ones((1, B * T), jnp.int32), state=None, cell=None, rng=None,
            train=False, forced=forced[None])
        return jnp.sum(y * ct), (y[0], aux)
    (_, (y, aux)), g = jax.value_and_grad(loss, has_aux=True)(state)
    return y, aux, g["router"]["w"][...]


def moe_layer(router):
    layer = MoE(moe_model(**router), rngs=nnx.Rngs(1))
    p = {n: np.asarray(getattr(layer, n)[...], np.float64) for n in ("w_gate", "w_up", "w_down")}
    p["w_router"] = np.asarray(layer.router.w[...], np.float64)
    return layer, p


def live_topk(x, w_router):
    """[N,k] ids of the k largest logits (softmax and sigmoid scores rank alike)."""
    logits = x.astype(np.float64) @ w_router
    return np.argsort(-logits, axis=1, kind="stable")[:, :K].astype(np.int32)


def check_against_reference(name, forced, x, ct):
    """Replay ``forced`` through the layer; compare output and router gradient to the reference."""
    router = LAYER_ROUTERS[name]
    layer, p = moe_layer(router)
    graphdef, state = nnx.split(layer)
    y, aux, g = layer_value_and_router_grad(graphdef, state, x, forced, ct)
    np.testing.assert_array_equal(aux["router/experts"][0], forced)
    kw = dict(score=router.get("score", "softmax"), norm_topk_prob=router.get("norm_topk_prob", True),
              routed_scaling=router.get("routed_scaling", 1.0))
    want = reference_layer(np, x.astype(np.float64), p["w_router"], p["w_gate"], p["w_up"],
                           p["w_down"], forced, **kw)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6)
    wj = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
    want_g = jax.grad(lambda w: jnp.sum(ct * reference_layer(
        jnp, jnp.asarray(x), w, wj["w_gate"], wj["w_up"], wj["w_down"], jnp.asarray(forced),
        **kw)))(wj["w_router"])
    g = np.asarray(g)
    assert np.isfinite(g).all() and np.abs(g).max() > 0
    np.testing.assert_allclose(g, np.asarray(want_g), rtol=1e-4, atol=1e-6 * np.abs(g).max())
    return g, p


@pytest.mark.parametrize("name", list(LAYER_ROUTERS))
def test_replay_of_another_routing_matches_reference_value_and_router_grad(name):
    """The forced sets come from perturbed router weights (a drifted policy): part of them differ
    from the live top-k; one slot per some tokens is left empty (-1)."""
    x, ct = layer_inputs()
    _, p = moe_layer(LAYER_ROUTERS[name])
    drift = np.random.default_rng(5).normal(size=p["w_router"].shape) * 0.05
    forced = live_topk(x, p["w_router"] + drift)
    live = live_topk(x, p["w_router"])
    assert 0 < np.mean(np.sort(forced, 1) != np.sort(live, 1)) < 1  # some, not all, drifted
    forced[::5, 1] = -1
    check_against_reference(name, forced, x, ct)


@pytest.mark.parametrize("name", ["softmax_norm", "sigmoid_raw"])
def test_forced_ids_outside_the_live_topk_get_router_gradient(name):
    """The pitfall (B.5.1): weights gathered from a scatter-zeroed score tensor would read 0 for ids
    the live router did not pick, so output and router gradient of those experts would vanish.
    Forcing every token onto its live *bottom*-k keeps both, for every forced expert's column."""
    x, ct = layer_inputs(1)
    _, p = moe_layer(LAYER_ROUTERS[name])
    bottom = np.argsort(x.astype(np.float64) @ p["w_router"], axis=1)[:, :K].astype(np.int32)
    g, _ = check_against_reference(name, bottom, x, ct)
    col = np.abs(g).sum(0)  # [E]
    for e in np.unique(bottom):
        assert col[e] > 1e-3 * col.max(), (e, col)


# -- decode: the cached path records what the full forward routes -------------------------------------

LENS = np.array([8, 3, 5, 1], np.int32)
PROMPT, STEPS = 8, 4


@jax.jit(static_argnums=0)
def prefill(graphdef, state, cache, prompt, seg):
    return nnx.merge(graphdef, state)(prompt, seg, cache=cache)


@jax.jit(static_argnums=0, donate_argnums=2)
def decode_step(graphdef, state, cache, tok):
    return nnx.merge(graphdef, state)(tok, cache=cache)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_cached_decode_records_the_full_forward_routing(scan, tokens):
    model = Model(moe_model(scan=scan), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rows = np.arange(B)
    seg = (np.arange(PROMPT)[None] < LENS[:, None]).astype(np.int32)
    prompt = np.where(seg > 0, tokens[:, :PROMPT], 0)
    logits, aux, cache = prefill(graphdef, state, model.init_cache(B, PROMPT + STEPS), prompt, seg)
    rec_prompt = np.asarray(aux["router/experts"])  # [L,B,P,k]
    seq = np.zeros((B, PROMPT + STEPS), np.int32)
    seq[:, :PROMPT] = prompt
    tok = np.asarray(jnp.argmax(logits[rows, LENS - 1], -1), np.int32)
    rec_steps = []
    for i in range(STEPS):  # greedy continuation
        seq[rows, LENS + i] = tok
        logits, aux, cache = decode_step(graphdef, state, cache, tok[:, None])
        rec_steps.append(np.asarray(aux["router/experts"])[:, :, 0])  # [L,B,k]
        tok = np.asarray(jnp.argmax(logits[:, 0], -1), np.int32)
    full_seg = (np.arange(PROMPT + STEPS)[None] < (LENS + STEPS)[:, None]).astype(np.int32)
    _, full_aux = forward(graphdef, state, seq, full_seg, None)
    full = np.asarray(full_aux["router/experts"])  # [L,B,P+STEPS,k]
    for b in range(B):
        np.testing.assert_array_equal(rec_prompt[:, b, :LENS[b]], full[:, b, :LENS[b]])
        for i in range(STEPS):
            np.testing.assert_array_equal(rec_steps[i][:, b], full[:, b, LENS[b] + i])


# -- shapes and errors (abstract models: no compile) ----------------------------------------------------

def abstract_aux(cfg, forced=None):
    model = nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    toks = jnp.zeros((B, T), jnp.int32)
    return jax.eval_shape(lambda s, f: nnx.merge(graphdef, s)(toks, forced_experts=f)[1], state,
                          forced)


def test_record_is_stacked_over_moe_layers_only():
    cfg = moe_model(num_layers=3, moe=dict(first_dense_layers=1))
    aux = abstract_aux(cfg)
    assert aux["router/experts"].shape == (2, B, T, K)
    assert aux["router/experts"].dtype == jnp.int32
    aux = abstract_aux(cfg, jax.ShapeDtypeStruct((2, B, T, K), jnp.int32))
    assert aux["router/experts"].shape == (2, B, T, K)


@pytest.mark.parametrize("kind", ["expert_choice", "topp"])
def test_unreplayable_routers_record_nothing_and_refuse_replay(kind):
    cfg = moe_model(kind=kind)
    assert "router/experts" not in abstract_aux(cfg)
    with pytest.raises(ConfigError, match="model.moe.router.kind"):
        abstract_aux(cfg, jnp.zeros((2, B, T, K), jnp.int32))


def test_replay_errors_name_the_problem():
    with pytest.raises(ConfigError, match="replay on a dense model"):
        abstract_aux(tiny_model(), jnp.zeros((2, B, T, K), jnp.int32))
    for shape in [(2, B, T, K + 1), (1, B, T, K), (2, B, T - 1, K)]:
        with pytest.raises(ConfigError, match=r"forced_experts.*\[L_moe, B, T, top_k\]"):
            abstract_aux(moe_model(), jnp.zeros(shape, jnp.int32))
    with pytest.raises(ConfigError, match="forced_experts"):
        abstract_aux(moe_model(), jnp.zeros((2, B, T, K), jnp.float32))
