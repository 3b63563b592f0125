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


# -- pooled balance groups ('shuffled', 'group' across micro-steps) and the micro->global switch ---

def test_shuffled_group_membership():
    """Each token of the global batch lies in exactly one of G groups of n/G tokens that mix
    rows; the draw is a pure function of the step key: fresh per step, equal on a rerun."""
    rows, seq, G = 16, 32, 4
    base = jax.random.key(3)
    ids = [np.asarray(BL.balance_group_ids("shuffled", jax.random.fold_in(base, step), rows, seq,
                                           G)) for step in (0, 1)]
    for a in ids:
        assert a.shape == (rows, seq) and a.min() >= 0 and a.max() < G
        np.testing.assert_array_equal(np.bincount(a.ravel(), minlength=G), [rows * seq // G] * G)
        assert all(len(np.unique(np.nonzero(a == g)[0])) == rows for g in range(G))  # mixes rows
    assert np.mean(ids[0] != ids[1]) > 0.5  # another step, another partition
    again = BL.balance_group_ids("shuffled", jax.random.fold_in(base, 0), rows, seq, G)
    np.testing.assert_array_equal(again, ids[0])
    rows_ids = np.asarray(BL.balance_group_ids("group", base, rows, seq, 2))
    np.testing.assert_array_equal(rows_ids, np.repeat(np.arange(rows) // 8, seq).reshape(rows, seq))


def test_num_pooled_groups():
    assert BL.num_pooled_groups("shuffled", 1, rows=64, micro_steps=16, batch_shards=2) == 32
    assert BL.num_pooled_groups("group", 4, rows=64, micro_steps=16, batch_shards=1) == 0  # fits
    assert BL.num_pooled_groups("group", 16, rows=64, micro_steps=16, batch_shards=1) == 4
    assert BL.num_pooled_groups("micro", 1, rows=64, micro_steps=16, batch_shards=1) == 0
    with pytest.raises(ValueError, match="must divide"):
        BL.num_pooled_groups("group", 24, rows=64, micro_steps=16, batch_shards=1)


def token_groups_np(sel, probs, valid, ids, G):
    """mean over layers and non-empty groups of E sum_i f_i p_i (token loops, float64)."""
    L, E_ = sel.shape[0], sel.shape[-1]
    out = []
    for l in range(L):
        vals = []
        for g in range(G):
            m = (ids == g) & valid
            if m.sum() == 0:
                continue
            c, p = sel[l][m].sum(0), probs[l][m].sum(0)
            vals.append(E_ * np.sum(c / c.sum() * p / m.sum()))
        out.append(np.mean(vals))
    return np.mean(out)


def test_pooled_balance_matches_numpy_on_planted_tokens():
    """Micro-step shares (rows a::accum, as the loop splits them) with the global group counts
    sum to the numpy loss on planted selections/probabilities, padding and an empty group."""
    L, rows, seq, G, accum = 2, 8, 12, 4, 4
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.ones(E), size=(L, rows, seq))
    sel = np.zeros_like(probs)
    top = np.argsort(-probs + rng.normal(size=probs.shape) * 0.3, -1)[..., :K]  # planted picks
    np.put_along_axis(sel, top, 1.0, -1)
    valid = rng.uniform(size=(rows, seq)) > 0.25
    ids = np.asarray(BL.balance_group_ids("shuffled", jax.random.key(9), rows, seq, G))
    ids = np.where(ids == 3, 2, ids)  # group 3 empty: skipped, not NaN
    v = valid[None, ..., None]
    sel_v, probs_v = (sel * v).astype(np.float32), (probs * v).astype(np.float32)
    counts = BL.group_token_pool(jnp.asarray(sel_v), jnp.asarray(ids), G)
    tokens = BL.group_token_pool(jnp.asarray(valid[..., None], jnp.float32), jnp.asarray(ids),
                                 G)[:, 0]
    shares = [BL.pooled_balance(jnp.asarray(probs_v[:, a::accum]), BL.PooledGroups(
        jnp.asarray(ids[a::accum]), counts, tokens, accum)) for a in range(accum)]
    ref = token_groups_np(sel, probs, valid, ids, G)
    np.testing.assert_allclose(sum(float(x) for x in shares), ref, **TOL)
    assert abs(ref - token_groups_np(sel, probs, valid, np.zeros_like(ids), 1)) > 1e-3  # not global


def _aux_for(c, ps, tok, L=1):
    return {"router/seq_counts": jnp.stack([jnp.asarray(c)] * L),
            "router/seq_prob_sum": jnp.stack([jnp.asarray(ps)] * L),
            "router/seq_tokens": jnp.stack([jnp.asarray(tok)] * L),
            "router/z": jnp.zeros(L), "router/entropy": jnp.zeros(L),
            **{f"router/{k}": jnp.zeros(L) for k in ("topk_score_sum", "active_experts", "dropped",
                                                      "doc_balance", "doc_imbalance")}}


def test_switch_step_micro_then_global(stats):
    from moejax.config import BalanceConfig, ConfigError, MoEConfig
    c, ps, tok = stats
    moe = MoEConfig(num_experts=E, top_k=K, balance=BalanceConfig(scope="global", coef=1.0,
                                                                  switch_step=5))
    got = {s: float(BL.moe_aux_loss(_aux_for(c, ps, tok), moe, micro_groups=2,
                                    step=jnp.asarray(s))[2]["balance_loss"]) for s in (0, 4, 5, 9)}
    micro, glob = reference("micro", c, ps, tok), reference("global", c, ps, tok)
    np.testing.assert_allclose([got[0], got[4], got[5], got[9]], [micro, micro, glob, glob], **TOL)
    assert abs(micro - glob) > 1e-3
    with pytest.raises(ValueError, match="step"):
        BL.moe_aux_loss(_aux_for(c, ps, tok), moe, micro_groups=2)
    with pytest.raises(ConfigError, match="switch_step"):
        BalanceConfig(scope="micro", switch_step=5)


def _synthetic_batch(rows, seq, vocab, seed=0):
    rng = np.random.default_rng(seed)
    seg = np.ones((rows, seq), np.int32)
    seg[:, seq // 2:] = 2
    seg[::3, -3:] = 0  # padding
    return {"inputs": rng.integers(0, vocab, (rows, seq)).astype(np.int32),
            "targets": rng.integers(0, vocab, (rows, seq)).astype(np.int32),
            "segment_ids": seg, "positions": np.tile(np.arange(seq, dtype=np.int32), (rows, 1)),
            "loss_mask": (seg != 0).astype(np.float32), "domain": np.arange(rows) % 3}


POOLED_RUNS = {  # name: (balance overrides, mesh data, devices, grad_accum, groups)
    "shuffled_data2_accum2": (dict(scope="shuffled"), 2, 2, 2, 4),
    "group8_accum2": (dict(scope="group", group_size=8), 1, 1, 2, 1),
}


@pytest.mark.parametrize("name", list(POOLED_RUNS))
def test_pooled_scope_gradient_equals_whole_batch_formula(name):
    """make_grad_fn with a pooled scope (f per group over the whole global batch, across
    micro-steps and shards) gives the loss and raw gradient of the whole-batch formula: LM mean
    + coef * mean_{layers, groups} E sum_i sg(f^g_i) p^g_i, with the step's group draw."""
    from flax import nnx

    from moejax import train as T
    from moejax.config import BalanceConfig, MeshConfig, MoEConfig
    from moejax.mesh import make_mesh
    from moejax.testing import tiny_config
    bal, data, ndev, accum, G = POOLED_RUNS[name]
    moe = MoEConfig(num_experts=4, top_k=2, d_expert=32,
                    balance=BalanceConfig(coef=0.5, **bal))
    cfg = tiny_config(model={"moe": moe}, train={"grad_accum": accum, "batch_size": 8})
    s = T.setup(cfg, make_mesh(MeshConfig(data=data), jax.devices()[:ndev]))
    state = T.init_state(s)
    batch = _synthetic_batch(8, 16, cfg.model.vocab_size)
    loss, grads, sums = jax.jit(T.make_grad_fn(s, 3))(state, T.global_batch(s.mesh, batch))
    ids = BL.balance_group_ids(bal["scope"], jax.random.fold_in(T.step_key(state),
                                                                BL.GROUP_KEY_SALT), 8, 16, G)

    def whole(params):
        model = nnx.merge(s.graphdef, params, state.rest)
        ce, aux = T.token_losses(model, jax.tree.map(jnp.asarray, batch))
        lm = (ce * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
        counts = jax.lax.stop_gradient(BL.group_token_pool(aux["router/token_selected"], ids, G))
        ps = BL.group_token_pool(aux["router/token_probs"], ids, G)
        tok = BL.group_token_pool(jnp.asarray(batch["loss_mask"])[..., None], ids, G)[:, 0]
        per = BL.lbl(counts, ps, tok)  # [L,G]
        return lm + 0.5 * jnp.mean(jnp.sum(per, -1) / G), (lm, jnp.mean(per))

    host = jax.device_get(state)  # the reference runs unsharded, without a mesh
    (_, (lm, bal_ref)), ref = jax.jit(jax.value_and_grad(whole, has_aux=True))(host.params)
    np.testing.assert_allclose(loss, lm, rtol=1e-5)
    np.testing.assert_allclose(sums["stats"]["balance_loss"] / accum, bal_ref, rtol=1e-5)
    for (path, r), g in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(ref)),
                            jax.tree.leaves(jax.device_get(grads)), strict=True):
        scale = float(np.abs(r).max())
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * scale + 1e-12,
                                   err_msg=jax.tree_util.keystr(path))
