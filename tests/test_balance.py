"""Balance losses against by-hand numpy formulas, incl. grad accumulation and 8-device sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax.layers import balance as BL
from moejax.layers.router import topk_route
from moejax.testing import documents_np

B, T, E, K = 16, 8, 8, 2
TOL = dict(rtol=1e-5, atol=1e-6)


def lbl_np(c, ps, tok):
    c = np.asarray(c, np.float64)
    return E * np.sum(c / c.sum() * np.asarray(ps, np.float64) / tok) if tok > 0 else 0.0


def pooled_np(c, ps, tok, G):
    vals = [lbl_np(c[i:i + G].sum(0), ps[i:i + G].sum(0), tok[i:i + G].sum())
            for i in range(0, len(tok), G) if tok[i:i + G].sum() > 0]
    return np.mean(vals)


def seq_stats(seed, Bn=B, empty=()):
    """Per-sequence stats from a real top-k routing with padding (the MoE layer's aux fields)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(Bn * T, E)) + rng.normal(size=(Bn, 1, E)).repeat(T, 1).reshape(-1, E)
    r = topk_route(jnp.asarray(z, jnp.float32), K)
    valid = rng.uniform(size=(Bn, T)) > 0.2
    valid[list(empty)] = False
    v = valid.reshape(-1, 1).astype(np.float32)
    counts = (np.asarray(r.selected) * v).reshape(Bn, T, E).sum(1)
    ps = (np.asarray(r.probs) * v).reshape(Bn, T, E).sum(1)
    return counts.astype(np.float32), ps.astype(np.float32), valid.sum(1).astype(np.float32)


@pytest.fixture(scope="module")
def stats():
    return seq_stats(0, empty=(3,))


def reference(scope, c, ps, tok, group_size=4, micro_groups=2, micro_ratio=0.1):
    micro = pooled_np(c, ps, tok, len(tok) // micro_groups)
    glob = lbl_np(c.sum(0), ps.sum(0), tok.sum())
    return {"sequence": pooled_np(c, ps, tok, 1), "group": pooled_np(c, ps, tok, group_size),
            "micro": micro, "global": glob, "global+micro": glob + micro_ratio * micro}[scope]


SCOPES = ["sequence", "group", "micro", "global", "global+micro"]


@pytest.mark.parametrize("scope", SCOPES)
def test_scope_matches_formula(stats, scope):
    c, ps, tok = stats
    loss, _ = BL.balance_loss(jnp.asarray(c), jnp.asarray(ps), jnp.asarray(tok), scope=scope,
                              group_size=4, micro_groups=2, micro_ratio=0.1)
    np.testing.assert_allclose(loss, reference(scope, c, ps, tok), **TOL)


def test_perfect_balance_is_one():
    c = np.full((B, E), 3.0, np.float32)
    ps = np.full((B, E), T / E, np.float32)
    tok = np.full((B,), T, np.float32)
    for scope in ["sequence", "group", "micro", "global"]:
        loss, _ = BL.balance_loss(jnp.asarray(c), jnp.asarray(ps), jnp.asarray(tok), scope=scope,
                                  group_size=4, micro_groups=4)
        assert abs(float(loss) - 1.0) < 1e-6, (scope, loss)
    assert float(BL.lbl(jnp.ones(E), jnp.full(E, 0.25), 2.0)) == 1.0
    assert abs(float(BL.device_balance_loss(jnp.ones(E), jnp.full(E, 0.25), 2.0, 4)) - 1) < 1e-6
    assert float(BL.balance_loss(jnp.asarray(c), jnp.asarray(ps), jnp.asarray(tok), scope="none")[0]) == 0


def test_layer_axis_is_averaged(stats):
    c, ps, tok = stats
    c2, ps2, tok2 = seq_stats(1)
    stk = lambda a, b: jnp.stack([jnp.asarray(a), jnp.asarray(b)])  # noqa: E731
    loss, buf = BL.balance_loss(stk(c, c2), stk(ps, ps2), stk(tok, tok2), scope="global",
                                count_buffer=jnp.zeros((2, E)))
    ref = (reference("global", c, ps, tok) + reference("global", c2, ps2, tok2)) / 2
    np.testing.assert_allclose(loss, ref, **TOL)
    np.testing.assert_allclose(buf, np.stack([c.sum(0), c2.sum(0)]), **TOL)


def test_global_with_accumulation_buffer():
    steps = [seq_stats(10 + a, Bn=4) for a in range(4)]
    buf = jnp.zeros(E)
    cum = np.zeros(E)
    step = jax.jit(jax.value_and_grad(
        lambda ps_, c, tok, buf: BL.balance_loss(c, ps_, tok, scope="global", count_buffer=buf),
        has_aux=True))
    for c, ps, tok in steps:
        (loss, new_buf), g = step(jnp.asarray(ps), jnp.asarray(c), jnp.asarray(tok), buf)
        cum += c.sum(0)
        # §1.1 reconstruction: f~ = cumulative counts / their total, p local -> dL/dps_b = E f~ / tokens
        np.testing.assert_allclose(g, np.broadcast_to(E * cum / cum.sum() / tok.sum(), (4, E)), **TOL)
        np.testing.assert_allclose(loss, lbl_np(cum, ps.sum(0), tok.sum()), **TOL)
        buf = new_buf
    c_all, ps_all, tok_all = (np.concatenate(x) for x in zip(*steps))
    np.testing.assert_allclose(buf, c_all.sum(0), **TOL)
    # the last micro-step's f is the f of global LBL on the concatenated batch
    f_all = c_all.sum(0) / c_all.sum()
    last_c, last_ps, last_tok = steps[-1]
    np.testing.assert_allclose(
        loss, E * np.sum(f_all * last_ps.sum(0) / last_tok.sum()), **TOL)
    glob, _ = BL.balance_loss(jnp.asarray(c_all), jnp.asarray(ps_all), jnp.asarray(tok_all),
                              scope="global")
    np.testing.assert_allclose(glob, E * np.sum(f_all * ps_all.sum(0) / tok_all.sum()), **TOL)


def test_sharded_8_devices_equals_single(stats):
    c, ps, tok = stats
    mesh = jax.make_mesh((8,), ("data",))
    sh = NamedSharding(mesh, P("data"))
    args = [jax.device_put(jnp.asarray(a), sh) for a in (c, ps, tok)]
    assert len(args[0].sharding.device_set) == 8

    @jax.jit
    def all_scopes(c, ps, tok):
        return {s: BL.balance_loss(c, ps, tok, scope=s, group_size=4, micro_groups=8,
                                   micro_ratio=0.1)[0] for s in SCOPES}

    sharded = all_scopes(*args)
    single = {s: BL.balance_loss(jnp.asarray(c), jnp.asarray(ps), jnp.asarray(tok), scope=s,
                                 group_size=4, micro_groups=8, micro_ratio=0.1)[0] for s in SCOPES}
    for s in SCOPES:
        np.testing.assert_allclose(sharded[s], single[s], rtol=2e-5, atol=2e-6, err_msg=s)
        np.testing.assert_allclose(single[s], reference(s, c, ps, tok, 4, 8, 0.1), **TOL)


def test_zero_token_sequences_finite():
    c, ps, tok = seq_stats(2, empty=(0, 1, 2, 3, 9))  # the first group of 4 is entirely empty
    assert tok[:4].sum() == 0 and c[:4].sum() == 0
    @jax.jit
    def all_scopes(p):
        return {s: jax.value_and_grad(lambda p_, s=s: BL.balance_loss(
            jnp.asarray(c), p_, jnp.asarray(tok), scope=s, group_size=4, micro_groups=4)[0])(p)
            for s in SCOPES}

    for scope, (loss, g) in all_scopes(jnp.asarray(ps)).items():
        assert np.isfinite(loss) and np.isfinite(g).all(), scope
        np.testing.assert_allclose(loss, reference(scope, c, ps, tok, 4, 4, 0.01), **TOL)
    empty = BL.balance_loss(jnp.zeros((B, E)), jnp.zeros((B, E)), jnp.zeros(B), scope="global")[0]
    assert float(empty) == 0.0


def test_device_balance_loss(stats):
    c, ps, tok = stats
    D = 4
    cc, pp, tt = c.sum(0).astype(np.float64), ps.sum(0), tok.sum()
    f = E * cc / cc.sum()
    ref = np.sum(f.reshape(D, -1).mean(-1) * (pp / tt).reshape(D, -1).sum(-1))
    np.testing.assert_allclose(BL.device_balance_loss(jnp.asarray(c.sum(0)), jnp.asarray(pp), tt, D),
                               ref, **TOL)


def test_z_entropy_and_imbalance(stats):
    c, _, _ = stats
    np.testing.assert_allclose(BL.z_loss(jnp.array([1.0, 3.0])), 2.0)
    np.testing.assert_allclose(BL.entropy_loss(jnp.array([0.5, 1.5, 1.0])), 1.0)
    np.testing.assert_allclose(BL.imbalance(jnp.asarray(c.sum(0))), c.sum(0).max() / c.sum(0).mean(),
                               **TOL)
    per = [r.max() / r.mean() for r in c if r.sum() > 0]
    np.testing.assert_allclose(BL.sequence_imbalance(jnp.asarray(c)), np.mean(per), **TOL)
    assert float(BL.sequence_imbalance(jnp.asarray(c))) > float(BL.imbalance(jnp.asarray(c.sum(0))))


def test_moe_aux_loss_combines_terms(stats):
    from moejax.config import BalanceConfig, MoEConfig, RouterConfig
    c, ps, tok = stats
    L = 2
    aux = {"router/seq_counts": jnp.stack([jnp.asarray(c)] * L),
           "router/seq_prob_sum": jnp.stack([jnp.asarray(ps)] * L),
           "router/seq_tokens": jnp.stack([jnp.asarray(tok)] * L),
           "router/z": jnp.array([2.0, 4.0]), "router/entropy": jnp.array([1.0, 1.0]),
           "router/topk_score_sum": jnp.array([0.5, 0.7]), "router/active_experts": jnp.array([2.0, 2.0]),
           "router/dropped": jnp.array([0, 3]),
           "router/doc_balance": jnp.array([1.5, 2.5]), "router/doc_imbalance": jnp.array([3.0, 4.0])}
    moe = MoEConfig(num_experts=E, top_k=K, router=RouterConfig(kind="topp", num_groups=4),
                    balance=BalanceConfig(scope="micro", coef=0.1, z_loss_coef=0.01, device_coef=0.2,
                                          entropy_coef=0.5))
    buf0 = jnp.zeros((L, E))
    loss, buf, st = BL.moe_aux_loss(aux, moe, micro_groups=2, count_buffer=buf0)
    dev = float(BL.device_balance_loss(jnp.asarray(c.sum(0)), jnp.asarray(ps.sum(0)), tok.sum(), 4))
    ref = 0.1 * reference("micro", c, ps, tok) + 0.01 * 3.0 + 0.2 * dev + 0.5 * 1.0
    np.testing.assert_allclose(loss, ref, **TOL)
    assert buf is buf0
    assert jax.tree.structure(st) == jax.tree.structure(BL.zero_stats(L, E))
    np.testing.assert_allclose(st["counts"], np.stack([c.sum(0)] * L), **TOL)
    np.testing.assert_allclose(st["aux_loss"], ref, **TOL)
    np.testing.assert_allclose(st["dropped"], [0, 3])
    np.testing.assert_allclose(st["seq_imbalance"], [3.0, 4.0], **TOL)  # per document (default)
    by_row = dataclasses.replace(moe, balance=dataclasses.replace(moe.balance, sequence_unit="row"))
    per = [r.max() / r.mean() for r in c if r.sum() > 0]
    np.testing.assert_allclose(BL.moe_aux_loss(aux, by_row, micro_groups=2)[2]["seq_imbalance"],
                               [np.mean(per)] * L, **TOL)


# -- per-document ('sequence' scope over packed rows) ----------------------------------------------

PACKED_SEG = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0, 0],  # 3 documents, trailing padding
                       [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4],  # one document filling the row
                       [7, 7, 9, 9, 9, 9, 9, 9, 9, 0, 0, 0]], np.int32)  # 2 documents, any ids


@pytest.fixture(scope="module")
def packed():
    """Routing of 3 packed rows (6 columns: 5 real experts + 1 null) and its document stats."""
    Bn, Tn = PACKED_SEG.shape
    rng = np.random.default_rng(21)
    z = jnp.asarray(rng.normal(size=(Bn * Tn, 6)) * 1.5, jnp.float32)
    r = topk_route(z, 2, num_null=1)
    return r, BL.document_stats(r.selected, r.probs, jnp.asarray(PACKED_SEG), num_real=5)


def test_document_stats_match_hand_on_packed_rows(packed):
    r, got = packed
    Tn = PACKED_SEG.shape[1]
    sel = np.asarray(r.selected, np.float64).reshape(-1, Tn, 6)
    probs = np.asarray(r.probs, np.float64).reshape(-1, Tn, 6)
    docs = documents_np(PACKED_SEG)
    assert len(docs) == 6
    lbls, imbs = [], []
    for b, pos in docs:
        c, p = sel[b, pos].sum(0), probs[b, pos].sum(0)
        lbls.append(6 * np.sum(c / c.sum() * p / len(pos)))
        if c[:5].sum() > 0:
            imbs.append(c[:5].max() / c[:5].mean())
    np.testing.assert_allclose(got["doc_balance"], np.mean(lbls), **TOL)
    np.testing.assert_allclose(got["doc_imbalance"], np.mean(imbs), **TOL)
    rows = [6 * np.sum(sel[b][v].sum(0) / sel[b][v].sum() * probs[b][v].sum(0) / v.sum())
            for b, v in enumerate(PACKED_SEG != 0)]
    assert abs(np.mean(rows) - np.mean(lbls)) > 1e-3  # per row would be a different number


def test_sequence_scope_per_document_or_per_row(packed):
    from moejax.config import BalanceConfig, MoEConfig
    r, doc = packed
    Bn, Tn = PACKED_SEG.shape
    v = (PACKED_SEG != 0).reshape(-1, 1).astype(np.float32)
    sc = (np.asarray(r.selected) * v).reshape(Bn, Tn, 6).sum(1)
    ps = (np.asarray(r.probs) * v).reshape(Bn, Tn, 6).sum(1)
    aux = {"router/seq_counts": jnp.asarray(sc)[None], "router/seq_prob_sum": jnp.asarray(ps)[None],
           "router/seq_tokens": jnp.asarray((PACKED_SEG != 0).sum(1), jnp.float32)[None],
           "router/z": jnp.zeros(1), "router/entropy": jnp.zeros(1),
           **{f"router/{k}": jnp.zeros(1) for k in ("topk_score_sum", "active_experts", "dropped")},
           **{f"router/{k}": jnp.asarray(v)[None] for k, v in doc.items()}}
    got = {}
    for unit in ("document", "row"):
        moe = MoEConfig(num_experts=5, top_k=2, balance=BalanceConfig(
            scope="sequence", coef=1.0, sequence_unit=unit))
        got[unit] = BL.moe_aux_loss(aux, moe, micro_groups=1)[2]
    np.testing.assert_allclose(got["document"]["balance_loss"], doc["doc_balance"], **TOL)
    np.testing.assert_allclose(got["document"]["seq_imbalance"], [doc["doc_imbalance"]], **TOL)
    row = np.mean([6 * np.sum(c / c.sum() * p / t) for c, p, t in
                   zip(sc.astype(np.float64), ps.astype(np.float64), (PACKED_SEG != 0).sum(1))])
    np.testing.assert_allclose(got["row"]["balance_loss"], row, **TOL)
    per_row = np.mean([c[:5].max() / c[:5].mean() for c in sc])
    np.testing.assert_allclose(got["row"]["seq_imbalance"], [per_row], **TOL)
    assert abs(float(got["row"]["balance_loss"]) - float(doc["doc_balance"])) > 1e-3
