"""Routers against by-hand numpy references on random inputs (moejax.layers.router)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import MoEConfig, RouterConfig
from moejax.layers import router as R
from moejax.layers.balance import imbalance
from moejax.testing import tiny_model

T, E = 64, 16
TOL = dict(rtol=1e-5, atol=1e-6)


def softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def sigmoid(z):
    return np.exp(-np.logaddexp(0.0, -z))  # no overflow at the -1e9 mask


def topk_np(score, k):
    return np.argsort(-score, axis=-1, kind="stable")[:, :k]


def as_sets(experts, weights):
    """Per-token {expert: weight} dicts for order-free comparison (empty slots dropped)."""
    return [{int(e): float(w) for e, w in zip(er, wr) if e >= 0} for er, wr in
            zip(np.asarray(experts), np.asarray(weights))]


def assert_same_routing(experts, weights, ref_e, ref_w):
    got, ref = as_sets(experts, weights), as_sets(ref_e, ref_w)
    for g, r in zip(got, ref):
        assert g.keys() == r.keys()
        np.testing.assert_allclose([g[e] for e in r], [r[e] for e in r], **TOL)


@pytest.fixture(scope="module")
def logits():
    return np.random.default_rng(0).normal(size=(T, E)).astype(np.float32) * 2


@pytest.mark.parametrize("norm", [True, False])
def test_softmax_topk(logits, norm):
    k = 4
    r = R.topk_route(jnp.asarray(logits), k, norm_topk_prob=norm)
    p = softmax(logits.astype(np.float64))
    idx = topk_np(p, k)
    w = np.take_along_axis(p, idx, 1)
    if norm:
        w = w / w.sum(-1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(r.experts), idx)
    np.testing.assert_allclose(r.weights, w, **TOL)
    np.testing.assert_allclose(r.probs, p, **TOL)
    sel = np.zeros((T, E)); np.put_along_axis(sel, idx, 1.0, 1)
    np.testing.assert_array_equal(r.selected, sel)
    np.testing.assert_array_equal(r.logits, logits)


def test_sigmoid_routed_scaling(logits):
    k = 4
    r = R.topk_route(jnp.asarray(logits), k, score="sigmoid", norm_topk_prob=True, routed_scaling=2.5)
    s = sigmoid(logits.astype(np.float64))
    idx = topk_np(s, k)
    w = np.take_along_axis(s, idx, 1)
    np.testing.assert_array_equal(r.experts, idx)
    np.testing.assert_allclose(r.weights, 2.5 * w / w.sum(-1, keepdims=True), **TOL)
    np.testing.assert_allclose(r.probs, s / s.sum(-1, keepdims=True), **TOL)


def test_bias_changes_selection_not_weights(logits):
    k = 4
    bias = np.random.default_rng(1).normal(size=E).astype(np.float32)
    r = R.topk_route(jnp.asarray(logits), k, score="sigmoid", bias=jnp.asarray(bias))
    s = sigmoid(logits.astype(np.float64))
    idx = topk_np(s + bias, k)
    assert (np.sort(idx, 1) != np.sort(topk_np(s, k), 1)).any()  # the bias did change selection
    w = np.take_along_axis(s, idx, 1)  # weights from the unbiased scores
    np.testing.assert_array_equal(r.experts, idx)
    np.testing.assert_allclose(r.weights, w / w.sum(-1, keepdims=True), **TOL)
    np.testing.assert_allclose(r.probs, s / s.sum(-1, keepdims=True), **TOL)


def limited_np(sel, k, G, topk_groups, m=None):
    """Brute force: group score = sum of its top-m scores (default max(1, k//topk_groups); m=1 is
    the group's max); keep best groups."""
    Tn, En = sel.shape
    ng, m = En // G, m or min(max(1, k // topk_groups), En // G)
    out = np.zeros((Tn, k), np.int64)
    for t in range(Tn):
        gs = [np.sort(sel[t, g * ng:(g + 1) * ng])[::-1][:m].sum() for g in range(G)]
        keep = np.argsort(-np.array(gs), kind="stable")[:topk_groups]
        cand = [e for e in range(En) if e // ng in keep]
        out[t] = sorted(cand, key=lambda e: -sel[t, e])[:k]
    return out


@pytest.mark.parametrize("score,k,groups", [("softmax", 4, 2), ("sigmoid", 6, 3)])
def test_group_limited(logits, score, k, groups):
    G = 4
    bias = np.random.default_rng(2).normal(size=E).astype(np.float32) * 0.1
    r = R.topk_route(jnp.asarray(logits), k, score=score, bias=jnp.asarray(bias),
                     group_mode="limited", num_groups=G, topk_groups=groups)
    s = softmax(logits.astype(np.float64)) if score == "softmax" else sigmoid(logits.astype(np.float64))
    idx = limited_np(s + bias, k, G, groups)
    np.testing.assert_array_equal(r.experts, idx)
    w = np.take_along_axis(s, idx, 1)
    np.testing.assert_allclose(r.weights, w / w.sum(-1, keepdims=True), **TOL)
    used_groups = [len(set((np.asarray(row) // (E // G)).tolist())) for row in r.experts]
    assert max(used_groups) <= groups


@pytest.mark.parametrize("norm,renorm", [(True, False), (False, False), (True, True)])
def test_moge_exactly_k_per_group(logits, norm, renorm):
    """MoGE keeps the global-softmax weights (spec 8.11) whatever norm_topk_prob says; it
    renormalises only under moge_renormalize."""
    G, k = 4, 8
    r = R.topk_route(jnp.asarray(logits), k, group_mode="moge", num_groups=G, norm_topk_prob=norm,
                     moge_renormalize=renorm)
    per_group = np.asarray(r.selected).reshape(T, G, E // G).sum(-1)
    np.testing.assert_array_equal(per_group, k // G)
    p = softmax(logits.astype(np.float64))
    idx = np.concatenate([g * (E // G) + topk_np(p[:, g * (E // G):(g + 1) * (E // G)], k // G)
                          for g in range(G)], 1)
    w = np.take_along_axis(p, idx, 1)
    w = w / w.sum(-1, keepdims=True) if renorm else w
    assert_same_routing(r.experts, r.weights, idx, w)


@pytest.mark.parametrize("renorm", [False, True])
def test_router_module_moge_weights_and_replay(renorm):
    """The Router (default norm_topk_prob=True) gives MoGE's global-softmax weights unless
    moge_renormalize; replaying its own picks reproduces them."""
    rt = R.Router(_cfg(group_mode="moge", num_groups=2, moge_renormalize=renorm), rngs=nnx.Rngs(4))
    x = jnp.asarray(np.random.default_rng(21).normal(size=(T, 64)), jnp.float32)
    out, _ = rt(x)
    p = softmax(np.asarray(x, np.float64) @ np.asarray(rt.w[...], np.float64))
    w = np.take_along_axis(p, np.asarray(out.experts), 1)
    w = w / w.sum(-1, keepdims=True) if renorm else w
    np.testing.assert_allclose(out.weights, w, **TOL)
    replay, _ = rt(x, forced=out.experts)
    np.testing.assert_allclose(replay.weights, out.weights, **TOL)


def test_group_score_max_is_deepseek_v2_device_limited(logits):
    """group_score='max' keeps the topk_groups groups with the highest single affinity (V2);
    k=4 over 2 kept groups makes 'topsum' a top-2 sum, which picks other groups here."""
    G, groups, k = 4, 2, 4
    r = R.topk_route(jnp.asarray(logits), k, group_mode="limited", num_groups=G,
                     topk_groups=groups, group_score="max")
    s = softmax(logits.astype(np.float64))
    np.testing.assert_array_equal(r.experts, limited_np(s, k, G, groups, m=1))
    topsum = R.topk_route(jnp.asarray(logits), k, group_mode="limited", num_groups=G,
                          topk_groups=groups)
    assert np.any(np.asarray(topsum.experts) != np.asarray(r.experts))
    rt = R.Router(_cfg(group_mode="limited", num_groups=4, topk_groups=2, group_score="max"),
                  rngs=nnx.Rngs(5))
    x = jnp.asarray(np.random.default_rng(22).normal(size=(T, 64)), jnp.float32)
    z = np.asarray(x, np.float64) @ np.asarray(rt.w[...], np.float64)
    np.testing.assert_array_equal(rt(x)[0].experts, limited_np(softmax(z), 2, 4, 2, m=1))


def topp_np(p, thr, max_slots):
    out_e, out_w, dropped = [], [], []
    for row in p:
        order = np.argsort(-row, kind="stable")
        chosen, mass = [], 0.0
        for e in order:
            if mass >= thr:
                break
            chosen.append(e)
            mass += row[e]
        dropped.append(max(0, len(chosen) - max_slots))
        chosen = chosen[:max_slots]
        out_e.append(chosen + [-1] * (max_slots - len(chosen)))
        out_w.append([row[e] for e in chosen] + [0.0] * (max_slots - len(chosen)))
    return np.array(out_e), np.array(out_w), np.array(dropped)


@pytest.mark.parametrize("thr,expect", [(0.4, {0}), (0.6, {0, 1}), (0.85, {0, 1, 2}),
                                        (0.96, {0, 1, 2, 3})])
def test_topp_hand_built_includes_crossing_expert(thr, expect):
    probs = np.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]], np.float32)
    r = R.topp_route(jnp.log(jnp.asarray(probs)), thr, 4)
    got = [set(int(e) for e in row if e >= 0) for row in np.asarray(r.experts)]
    assert got == [expect, {3 - e for e in expect}]
    w = np.asarray(r.weights)
    np.testing.assert_allclose(w.sum(-1), [sum(probs[0, e] for e in expect)] * 2, rtol=1e-5)


def test_topp_random_with_slot_cap(logits):
    thr, S = 0.7, 3
    r = R.topp_route(jnp.asarray(logits), thr, S)
    p = softmax(logits.astype(np.float64))
    e, w, dropped = topp_np(p, thr, S)
    assert dropped.sum() > 0 and (e[:, 1] == -1).any()  # both the cap and short sets occur
    np.testing.assert_array_equal(r.experts, e)
    np.testing.assert_allclose(r.weights, w, **TOL)  # raw, not renormalised
    np.testing.assert_array_equal(r.dropped, dropped)
    np.testing.assert_array_equal(np.asarray(r.selected).sum(-1), (e >= 0).sum(-1))


def test_null_experts_renormalise_over_real():
    N, En, k = 4, 8, 4
    z = np.random.default_rng(3).normal(size=(T, En + N)).astype(np.float32)
    z[:5, En:] += 20.0  # these tokens pick only null experts
    r = R.topk_route(jnp.asarray(z), k, norm_topk_prob=False, num_null=N)
    p = softmax(z.astype(np.float64))
    idx = topk_np(p, k)
    w = np.where(idx < En, np.take_along_axis(p, idx, 1), 0.0)
    tot = w.sum(-1, keepdims=True)
    w = np.where(tot > 0, w / np.where(tot > 0, tot, 1), 0.0)
    e = np.where(idx < En, idx, -1)
    np.testing.assert_array_equal(r.experts, e)
    np.testing.assert_allclose(r.weights, w, **TOL)
    np.testing.assert_array_equal(r.weights[:5], 0.0)
    np.testing.assert_array_equal(r.experts[:5], -1)
    real = (e >= 0).any(-1)
    np.testing.assert_allclose(np.asarray(r.weights).sum(-1)[real], 1.0, rtol=1e-5)
    sel = np.zeros((T, En + N)); np.put_along_axis(sel, idx, 1.0, 1)
    np.testing.assert_array_equal(r.selected, sel)  # null picks count for the LBL over E + N


@pytest.mark.parametrize("kw", [dict(), dict(norm_topk_prob=False),
                                dict(score="sigmoid", routed_scaling=2.5), dict(num_null=4)],
                         ids=["softmax_norm", "softmax_raw", "sigmoid_scaled", "null"])
def test_forced_route_replays_topk_route_and_ignores_the_bias(logits, kw):
    """Routing replay: forcing top-k's own (bias-chosen) picks gives its weights bit for bit, live
    probs/logits; a bias never changes what is forced. Softmax + renormalisation = the softmax
    over the forced experts' logits (B.5.1)."""
    z = jnp.asarray(logits)
    bias = jnp.linspace(0.0, 0.5, E - kw.get("num_null", 0))
    r = R.topk_route(z, 4, bias=bias, **kw)
    f = R.forced_route(z, r.experts, **kw)
    for name in ("experts", "weights", "probs", "logits", "log_probs"):
        np.testing.assert_array_equal(getattr(f, name), getattr(r, name), err_msg=name)
    np.testing.assert_array_equal(f.selected, R._selected_mask(r.experts, E))
    other = np.asarray(R.topk_route(z, 4, **kw).experts)  # the unbiased choice, forced
    g = R.forced_route(z, jnp.asarray(other), **kw)
    np.testing.assert_array_equal(g.experts, other)
    if not kw:
        ref = softmax(np.take_along_axis(logits.astype(np.float64), other, 1))
        np.testing.assert_allclose(g.weights, ref, **TOL)


def test_expert_choice(logits):
    cap, k = 1.0, 2
    C = math.ceil(cap * T * k / E)
    valid = np.ones(T, bool); valid[-6:] = False
    ec = R.expert_choice_route(jnp.asarray(logits), cap, k, valid=jnp.asarray(valid))
    p = softmax(logits.astype(np.float64))
    assert ec.tokens.shape == (E, C)
    rank = np.where(valid[:, None], p, -1.0)
    for e in range(E):
        ref = np.argsort(-rank[:, e], kind="stable")[:C]
        assert set(np.asarray(ec.tokens[e]).tolist()) == set(ref.tolist())
        np.testing.assert_allclose(np.sort(ec.weights[e]), np.sort(p[ref, e]), **TOL)
    assert np.asarray(ec.selected)[~valid].sum() == 0
    np.testing.assert_array_equal(np.asarray(ec.selected).sum(0), C)


@pytest.fixture(scope="module")
def mask_setup():
    V, En = 100, 8
    freq = np.random.default_rng(4).integers(0, 1000, size=V)
    m = R.maskmoe_mask(freq, En, frequent_fraction=0.1, frequent_visible=3, seed=7)
    return V, En, freq, np.asarray(m)


def test_maskmoe_mask_counts(mask_setup):
    V, En, freq, m = mask_setup
    frequent = np.argsort(-freq, kind="stable")[:10]
    vis = (m == 0).sum(-1)
    assert set(np.nonzero(vis == 3)[0].tolist()) == set(frequent.tolist())
    assert (vis[np.setdiff1d(np.arange(V), frequent)] == 1).all()
    assert set(np.unique(m).tolist()) == {0.0, R.MASK_VALUE}
    again = R.maskmoe_mask(freq, En, frequent_fraction=0.1, frequent_visible=3, seed=7)
    np.testing.assert_array_equal(again, m)  # deterministic
    other = R.maskmoe_mask(freq, En, frequent_fraction=0.1, frequent_visible=3, seed=8)
    assert (np.asarray(other) != m).any()
    assert len(set(np.argmax(m == 0, -1).tolist())) > 1  # visible experts vary across ids


def test_masked_router_never_selects_invisible(mask_setup):
    V, En, freq, m = mask_setup
    ids = np.random.default_rng(5).integers(0, V, size=T)
    z = np.random.default_rng(6).normal(size=(T, En)).astype(np.float32)
    big_bias = jnp.asarray(np.linspace(5.0, 0.0, En), jnp.float32)  # must not unmask anything
    for kw in (dict(), dict(score="sigmoid", bias=big_bias)):
        r = R.topk_route(jnp.asarray(z), 2, mask=jnp.asarray(m[ids]), **kw)
        e, w = np.asarray(r.experts), np.asarray(r.weights)
        for t in range(T):
            real = e[t][e[t] >= 0]
            assert (m[ids[t], real] == 0).all()
            assert len(real) == min(2, (m[ids[t]] == 0).sum())
            np.testing.assert_allclose(w[t].sum(), 1.0, rtol=1e-5)
        assert (np.asarray(r.selected) * (m[ids] < 0)).sum() == 0


def _cfg(**router):
    return tiny_model(moe=MoEConfig(num_experts=8, top_k=2, router=RouterConfig(**router)))


def test_router_module_maskmoe_and_bias():
    cfg = _cfg(token_mask="maskmoe", maskmoe_frequent_visible=3, aux_free_bias=True)
    abstract = nnx.eval_shape(lambda: R.Router(cfg, rngs=nnx.Rngs(0)))  # abstract init works
    assert abstract.token_mask.shape == (cfg.vocab_size, 8)
    router = R.Router(cfg, rngs=nnx.Rngs(0))
    assert isinstance(router.bias, R.RouterBias) and isinstance(router.token_mask, R.TokenMask)
    assert "bias" not in nnx.state(router, nnx.Param) and "token_mask" not in nnx.state(router, nnx.Param)
    x = jnp.asarray(np.random.default_rng(7).normal(size=(T, cfg.d_model)), jnp.bfloat16)
    ids = jnp.arange(T) * 3
    r, state = router(x, token_ids=ids)
    assert state is None and r.weights.dtype == jnp.float32
    ref = R.topk_route(x.astype(jnp.float32) @ router.w[...], 2, mask=router.token_mask[...][ids],
                       bias=router.bias[...])
    np.testing.assert_array_equal(r.experts, ref.experts)
    vis = np.asarray(router.token_mask[...])[np.asarray(ids)] == 0
    e = np.asarray(r.experts)
    assert all(vis[t, x_] for t in range(T) for x_ in e[t] if x_ >= 0)


def gru_np(prm, x, h):
    gi, gh = x @ prm["w_i"] + prm["b_i"], h @ prm["w_h"] + prm["b_h"]
    p = h.shape[-1]
    r = sigmoid(gi[:, :p] + gh[:, :p])
    z = sigmoid(gi[:, p:2 * p] + gh[:, p:2 * p])
    n = np.tanh(gi[:, 2 * p:] + r * gh[:, 2 * p:])
    return (1 - z) * n + z * h


def test_rmoe_gru_three_layers_vs_numpy():
    cfg = _cfg(recurrent="gru", recurrent_dim=16)
    rngs = nnx.Rngs(1)
    cell = R.RecurrentCell(cfg, rngs=rngs)
    routers = [R.Router(cfg, rngs=rngs) for _ in range(3)]
    x = np.random.default_rng(8).normal(size=(T, cfg.d_model)).astype(np.float32)
    prm = {k: np.asarray(v, np.float64) for k, v in cell.cell_params().items()}
    state, h = None, np.zeros((T, 16))
    for rt in routers:
        r, state = rt(jnp.asarray(x), state=state, cell=cell)
        h = gru_np(prm, x @ np.asarray(rt.proj[...], np.float64), h)
        np.testing.assert_allclose(state, h, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r.logits, h @ np.asarray(rt.gate[...], np.float64),
                                   rtol=1e-4, atol=1e-5)
    assert np.abs(h).max() > 0.05  # the state carries signal across layers


@pytest.mark.parametrize("kind", ["gru", "rnn"])
def test_recurrent_init_normal_vs_default(kind):
    """recurrent_init='normal' draws every cell weight and bias from N(0, init_std) (RMoE's
    reference init); 'default' stays PyTorch's U(+-1/sqrt(p))."""
    p, std = 64, 0.05
    normal = R.init_gru_params(jax.random.key(0), p, kind, "normal", std)
    default = R.init_gru_params(jax.random.key(0), p, kind)
    for name, v in normal.items():
        v = np.asarray(v, np.float64)
        assert abs(v.mean()) < 4 * std / math.sqrt(v.size), name
        np.testing.assert_allclose(v.std(), std, rtol=0.15 if v.ndim == 1 else 0.03, err_msg=name)
        bound = 1 / math.sqrt(p)
        d = np.asarray(default[name])
        assert np.abs(d).max() <= bound and np.abs(d).max() > 0.9 * bound, name
    cfg = _cfg(recurrent=kind, recurrent_dim=p, recurrent_init="normal")
    cell = R.RecurrentCell(cfg, rngs=nnx.Rngs(0))
    w = np.concatenate([np.ravel(v) for v in cell.cell_params().values()])
    np.testing.assert_allclose(w.std(), cfg.init_std, rtol=0.03)


def test_rnn_cell_vs_numpy():
    p = 8
    prm = R.init_gru_params(jax.random.key(0), p, "rnn")
    x, h = np.random.default_rng(9).normal(size=(2, T, p)).astype(np.float32)
    out = R.rnn_cell(prm, jnp.asarray(x), jnp.asarray(h))
    pn = {k: np.asarray(v, np.float64) for k, v in prm.items()}
    np.testing.assert_allclose(out, np.tanh(x @ pn["w_i"] + h @ pn["w_h"] + pn["b"]), **TOL)


def uncertain_np(probs, seg, thr, cap):
    H = -(probs * np.log(probs + 1e-5)).sum(-1)
    out = np.zeros(seg.shape, bool)
    for b in range(seg.shape[0]):
        used = {}
        for t in range(seg.shape[1]):
            s = seg[b, t]
            if s != 0 and H[b, t] >= thr and used.get(s, 0) < cap:
                out[b, t] = True
                used[s] = used.get(s, 0) + 1
    return out


def test_gw_uncertain_tokens():
    Bn, Tn, En = 4, 32, 8
    rng = np.random.default_rng(10)
    probs = softmax(rng.normal(size=(Bn, Tn, En)) * rng.uniform(0.1, 3, size=(Bn, Tn, 1)))
    thr = float(np.median(-(probs * np.log(probs + 1e-5)).sum(-1)))
    seg = np.ones((Bn, Tn), np.int32)
    seg[1, 20:] = 0  # padding
    seg[2, :10], seg[2, 10:25], seg[2, 25:] = 1, 2, 0  # packed documents
    for cap in (1, 3, Tn):
        got = R.uncertain_tokens(jnp.asarray(probs, jnp.float32), jnp.asarray(seg), thr, cap)
        np.testing.assert_array_equal(got, uncertain_np(probs, seg, thr, cap))
        as_valid = R.uncertain_tokens(jnp.asarray(probs, jnp.float32), jnp.asarray(seg != 0), thr, cap)
        np.testing.assert_array_equal(as_valid, uncertain_np(probs, (seg != 0).astype(int), thr, cap))
    assert not np.asarray(got)[seg == 0].any()


def test_jitter_bounds():
    x = jnp.asarray(np.random.default_rng(11).normal(size=(T, 32)), jnp.float32)
    y = R.jitter(x, jax.random.key(0), 0.1)
    ratio = np.asarray(y / x)
    assert ratio.min() >= 0.9 - 1e-6 and ratio.max() <= 1.1 + 1e-6 and ratio.std() > 0.03
    assert y.dtype == x.dtype


def test_router_stats_vs_numpy(logits):
    valid = np.ones(T, bool); valid[-10:] = False
    r = R.topp_route(jnp.asarray(logits), 0.7, 3)
    st = R.router_stats(r, jnp.asarray(valid))
    p = softmax(logits.astype(np.float64))[valid]
    sel = np.asarray(r.selected)[valid]
    _, _, dropped = topp_np(softmax(logits.astype(np.float64)), 0.7, 3)
    assert dropped[valid].sum() > 0
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))[valid]
    ref = dict(counts=sel.sum(0), prob_mean=p.mean(0), z=(lse ** 2).mean(),
               entropy=(-(p * np.log(p)).sum(-1)).mean(), topk_score_sum=(sel * p).sum(-1).mean(),
               active_experts=sel.sum(-1).mean(), dropped=dropped[valid].sum())
    assert set(st) == set(ref)
    for name, v in ref.items():
        np.testing.assert_allclose(st[name], v, rtol=1e-5, atol=1e-6, err_msg=name)
    ec = R.expert_choice_route(jnp.asarray(logits), 0.5, 1)
    est = R.router_stats(ec, jnp.asarray(valid))
    np.testing.assert_allclose(est["dropped"], ((np.asarray(ec.selected).sum(-1) == 0) & valid).sum())


def test_bias_updates_balance_skewed_router():
    rng = np.random.default_rng(12)
    En, k, Tn = 16, 2, 512
    z = jnp.asarray(rng.normal(size=(Tn, En)) + np.linspace(2.0, -2.0, En), jnp.float32)

    @jax.jit
    def run(bias):
        def step(b, _):
            c = R.router_stats(R.topk_route(z, k, score="sigmoid", bias=b))["counts"]
            return R.update_bias(b, c, 0.01, "sign_centered"), imbalance(c)
        return jax.lax.scan(step, bias, None, length=200)

    bias, load = run(jnp.zeros(En))
    assert float(load[0]) > 2.0, load[0]
    assert float(load[-1]) < 1.3, load[-1]
    assert abs(float(jnp.mean(bias))) < 1e-5  # centred
    np.testing.assert_allclose(R.update_bias(jnp.zeros(4), jnp.array([4., 0, 2, 2]), 0.5),
                               [-0.5, 0.5, 0, 0])


def test_router_module_dispatch():
    x = jnp.asarray(np.random.default_rng(13).normal(size=(T, 64)), jnp.float32)
    valid = jnp.arange(T) < T - 4
    cases = [(dict(kind="topp", top_p=0.6), lambda z: R.topp_route(z, 0.6, 8)),
             (dict(kind="expert_choice", expert_choice_capacity=1.5),
              lambda z: R.expert_choice_route(z, 1.5, 2, valid)),
             (dict(num_null_experts=2), lambda z: R.topk_route(z, 2, num_null=2)),
             (dict(score="sigmoid", routed_scaling=2.5, group_mode="limited", num_groups=4,
                   topk_groups=2), lambda z: R.topk_route(z, 2, score="sigmoid", routed_scaling=2.5,
                                                         group_mode="limited", num_groups=4,
                                                         topk_groups=2))]
    for router_kw, ref_fn in cases:
        rt = R.Router(_cfg(**router_kw), rngs=nnx.Rngs(3))
        out, state = rt(x, valid=valid)
        z = x @ rt.w[...]
        if rt.w_null is not None:
            z = jnp.concatenate([z, x @ rt.w_null[...]], -1)
        ref = ref_fn(z)
        assert state is None and type(out) is type(ref)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=str(router_kw))
    noisy, _ = R.Router(_cfg(jitter=0.1), rngs=nnx.Rngs(3))(x, rng=jax.random.key(1), train=True)
    clean, _ = R.Router(_cfg(jitter=0.1), rngs=nnx.Rngs(3))(x, rng=jax.random.key(1), train=False)
    assert not np.allclose(noisy.logits, clean.logits)


def test_routers_sharded_8_devices_equal_single(logits):
    from jax.sharding import NamedSharding, PartitionSpec as P
    sh = NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))
    valid = np.arange(T) < T - 5
    fns = {"topk": lambda z, v: R.topk_route(z, 4, score="sigmoid", bias=jnp.linspace(0, .1, E)),
           "limited": lambda z, v: R.topk_route(z, 4, group_mode="limited", num_groups=4,
                                                topk_groups=2),
           "moge": lambda z, v: R.topk_route(z, 8, group_mode="moge", num_groups=4),
           "topp": lambda z, v: R.topp_route(z, 0.7, 3),
           "ec": lambda z, v: R.expert_choice_route(z, 1.0, 2, valid=v)}

    @jax.jit
    def all_routers(z, v):
        return {n: (f(z, v), R.router_stats(f(z, v), v)) for n, f in fns.items()}

    sharded = all_routers(jax.device_put(jnp.asarray(logits), sh), jax.device_put(jnp.asarray(valid), sh))
    for n, f in fns.items():
        single = (f(jnp.asarray(logits), jnp.asarray(valid)),
                  R.router_stats(f(jnp.asarray(logits), jnp.asarray(valid)), jnp.asarray(valid)))
        for a, b in zip(jax.tree.leaves(sharded[n]), jax.tree.leaves(single)):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=n)


@pytest.mark.parametrize("kind", ["topk_softmax", "topk_sigmoid", "topp", "expert_choice"])
def test_entropy_gradient_finite_where_a_probability_is_zero(logits, kind):
    """A MaskMoE-masked column (and a confident router) gives probabilities exactly 0: the entropy
    and its gradient must stay finite (xlogy(p, p) had a NaN gradient there)."""
    z = np.array(logits[:8], np.float64)
    z[:, 3] += R.MASK_VALUE  # masked expert: p == 0 exactly
    z[1, 0] += 200.0  # a confident token: every other softmax probability underflows to 0
    route = {"topk_softmax": lambda a: R.topk_route(a, 2),
             "topk_sigmoid": lambda a: R.topk_route(a, 2, score="sigmoid"),
             "topp": lambda a: R.topp_route(a, 0.6, 4),
             "expert_choice": lambda a: R.expert_choice_route(a, 1.0, 2)}[kind]
    ent, g = jax.value_and_grad(lambda a: R.router_stats(route(a))["entropy"])(jnp.asarray(z, jnp.float32))
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0
    if kind == "topk_sigmoid":
        s = sigmoid(z)
        p = s / s.sum(-1, keepdims=True)
    else:
        p = softmax(z)
    ref = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1).mean()
    np.testing.assert_allclose(ent, ref, rtol=1e-5, atol=1e-6)
