"""Routed experts: dropless / capacity / expert choice against dense references, and expert
parallelism on 8 CPU devices against the single-device layer (values, gradients, drop counts)."""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from moejax.config import ConfigError, MoEConfig
from moejax.layers import moe_dispatch as md
from moejax.layers import moe_ep

T, D, F, E, S = 64, 32, 16, 8, 2
TOL = dict(rtol=2e-5, atol=2e-5)
BATCH = ("data", "fsdp", "expert")


# ---------------------------------------------------------------- inputs and references
def make_routing(kind: str, seed: int):
    """experts [T,S] int32 (-1 empty) and weights [T,S] (0 on empty slots)."""
    rng = np.random.default_rng(seed)
    if kind == "random":  # experts 6, 7 never chosen; ~20% empty slots; a few null-expert ids
        ex = np.stack([rng.choice(6, S, replace=False) for _ in range(T)])
        ex[rng.random((T, S)) < 0.2] = -1
        ex[rng.random((T, S)) < 0.05] = E  # id >= E (AdaMoE null expert): no compute, no output
    elif kind == "one_expert":  # every token to expert 3; second slot empty
        ex = np.stack([np.full(T, 3), np.full(T, -1)], axis=1)
    elif kind == "full":  # every slot used, all experts
        ex = np.stack([rng.choice(E, S, replace=False) for _ in range(T)])
    else:
        raise ValueError(kind)
    ex = ex.astype(np.int32)
    w = (rng.random((T, S)) * (ex != -1)).astype(np.float32)  # null experts keep their weight
    return ex, w


def routed(ex):
    """[T,S] bool: slots that name a real expert (not -1, not a null expert id >= E)."""
    return (ex >= 0) & (ex < E)


ROUTINGS = {k: make_routing(k, i) for i, k in enumerate(("random", "one_expert", "full"))}


@pytest.fixture(scope="module")
def params():
    rng = np.random.default_rng(42)
    x = rng.normal(size=(T, D)).astype(np.float32)
    wg, wu = (rng.normal(size=(E, D, F)).astype(np.float32) * 0.3 for _ in range(2))
    wd = rng.normal(size=(E, F, D)).astype(np.float32) * 0.3
    ct = rng.normal(size=(T, D)).astype(np.float32)  # output cotangent
    return x, wg, wu, wd, ct


def dense_reference(x, ex, w, wg, wu, wd):
    """Every expert on every token, masked by the routing: y = sum_e comb[t,e] E_e(x_t)."""
    g = jnp.einsum("td,edf->tef", x, wg)
    u = jnp.einsum("td,edf->tef", x, wu)
    o = jnp.einsum("tef,efd->ted", jax.nn.silu(g) * u, wd)
    comb = jnp.einsum("tse,ts->te", jax.nn.one_hot(ex, E), w)  # one_hot(-1 or E): a zero row
    return jnp.einsum("ted,te->td", o, comb)


def value_and_grads(layer):
    """jit(layer) -> (y, stats, grads wrt (x, weights, w_gate, w_up, w_down)) for loss sum(y*ct)."""
    def loss(x, w, wg, wu, wd, ex, ct):
        y, stats = layer(x, ex, w, wg, wu, wd)
        return jnp.sum(y * ct), (y, stats)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))

    def run(x, ex, w, wg, wu, wd, ct):
        (_, (y, stats)), grads = f(x, w, wg, wu, wd, ex, ct)
        return np.asarray(y), jax.tree.map(np.asarray, stats), [np.asarray(g) for g in grads]
    run.jitted = f
    return run


DENSE = value_and_grads(lambda x, ex, w, wg, wu, wd: (dense_reference(x, ex, w, wg, wu, wd), {}))


def assert_close(a, b, what=""):
    for i, (u, v) in enumerate(zip(a, b)):
        np.testing.assert_allclose(u, v, **TOL, err_msg=f"{what} #{i}")


def np_capacity(ex, C):
    """First come, first served per expert in flat (token, slot) order: kept mask, drops, counts."""
    kept, counts, dropped = np.zeros(ex.shape, bool), np.zeros(E, int), 0
    for t in range(ex.shape[0]):
        for s in range(S):
            e = ex[t, s]
            if not 0 <= e < E:
                continue
            if counts[e] < C:
                kept[t, s], counts[e] = True, counts[e] + 1
            else:
                dropped += 1
    return kept, dropped, counts


def np_ep_buffer(ex, ep, B, shards):
    """Dropless EP with B rows per destination: per device chunk, per owner, keep the first B
    assignments ordered by (expert, token, slot). Returns kept mask, drops, counts."""
    El = E // ep
    kept = np.zeros(ex.shape, bool)
    TL = T // shards
    for c in range(shards):
        rows = range(c * TL, (c + 1) * TL)
        asg = sorted((ex[t, s], t, s) for t in rows for s in range(S) if 0 <= ex[t, s] < E)
        for j in range(ep):
            for e, t, s in [a for a in asg if a[0] // El == j][:B]:
                kept[t, s] = True
    return kept, int((routed(ex) & ~kept).sum()), np.bincount(ex[kept], minlength=E)


# ---------------------------------------------------------------- single device
@pytest.fixture(scope="module")
def dropless():
    layers = {impl: value_and_grads(lambda *a, impl=impl: md.routed_experts(
        *a, dispatch="dropless", gmm_impl=impl)) for impl in ("xla", "reference")}

    def plain_vjp(x, ex, w, wg, wu, wd):  # the permutations without the custom VJPs
        y, counts = md.dropless_local(x, ex, w, wg, wu, wd, gmm_impl="xla", dtype=jnp.float32,
                                      custom_perm_vjp=False)
        return y, {"dropped": jnp.zeros((), jnp.int32), "expert_tokens": counts}
    layers["xla-plain-vjp"] = value_and_grads(plain_vjp)
    return layers


@pytest.mark.parametrize("impl", ["xla", "reference", "xla-plain-vjp"])
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_dropless_matches_dense(params, dropless, impl, routing):
    x, wg, wu, wd, ct = params
    ex, w = ROUTINGS[routing]
    y, stats, grads = dropless[impl](x, ex, w, wg, wu, wd, ct)
    y_ref, _, g_ref = DENSE(x, ex, w, wg, wu, wd, ct)
    assert_close([y, *grads], [y_ref, *g_ref], f"dropless/{impl}/{routing}")
    assert stats["dropped"] == 0
    np.testing.assert_array_equal(stats["expert_tokens"], np.bincount(ex[routed(ex)], minlength=E))
    assert np.abs(y).max() > 0.1  # not vacuous


def tight_blocks_routing(seed: int):
    """Expert sizes 17, 9 (x6), 57 with every slot used: at block 8 they fill 23 = A/8 + E - 1
    blocks, the most the block layout can need, and none is a multiple of the block."""
    rng = np.random.default_rng(seed)
    flat = np.repeat(np.arange(E), [17, 9, 9, 9, 9, 9, 9, 57])  # [A] sorted by expert
    ex = flat.reshape(S, T).T[rng.permutation(T)]  # slot s takes flat[s*T:(s+1)*T]
    assert (ex[:, 0] != ex[:, 1]).all()
    return ex.astype(np.int32), rng.random((T, S)).astype(np.float32)


# Edge cases for the block-padded path (the ROUTINGS above already have empty experts, -1 slots,
# null-expert ids, tokens routed nowhere and all tokens on one expert).
EDGE_ROUTINGS = {"tight_blocks": tight_blocks_routing(3),
                 "all_empty": (np.full((T, S), -1, np.int32), np.zeros((T, S), np.float32))}


@pytest.fixture(scope="module")
def blocked_layers():
    """The fused block-layout layer (routed_experts' path for 'blocked') and the unfused one
    (sorted rows, then expert_ffn_grouped padding once for its three matmuls)."""
    def grouped(x, ex, w, wg, wu, wd):
        y, counts = md.dropless_local(x, ex, w, wg, wu, wd, gmm_impl="blocked", dtype=jnp.float32)
        return y, {"dropped": jnp.zeros((), jnp.int32), "expert_tokens": counts}
    return {"fused": value_and_grads(lambda *a: md.routed_experts(*a, gmm_impl="blocked")),
            "grouped": value_and_grads(grouped)}


def test_edge_routings_hit_the_block_bound():
    """At T*S=128 rows and 8 experts the default block is 8 and 'tight_blocks' uses all but one of
    the layout's NB = A/8 + E blocks (so an off-by-one in the bound would drop rows)."""
    ex, _ = EDGE_ROUTINGS["tight_blocks"]
    bd = md.blocked_dispatch(md.sort_plan(jnp.asarray(ex), E), E, S)
    assert (bd.layout.block, bd.layout.num_blocks) == (8, T * S // 8 + E)
    used = np.asarray(bd.assignment).reshape(bd.layout.num_blocks, -1).min(axis=1) < T * S
    assert used.sum() == T * S // 8 + E - 1


@pytest.mark.parametrize("layer", ["fused", "grouped"])
@pytest.mark.parametrize("routing", list(ROUTINGS) + list(EDGE_ROUTINGS))
def test_blocked_dropless_matches_dense_and_ragged_dot(params, dropless, blocked_layers, layer,
                                                      routing):
    """Outputs and gradients (x, combine weights, w_gate, w_up, w_down) of the block-layout paths
    equal the dense reference and the ragged_dot layer."""
    x, wg, wu, wd, ct = params
    ex, w = {**ROUTINGS, **EDGE_ROUTINGS}[routing]
    y, stats, grads = blocked_layers[layer](x, ex, w, wg, wu, wd, ct)
    y_ref, _, g_ref = DENSE(x, ex, w, wg, wu, wd, ct)
    assert_close([y, *grads], [y_ref, *g_ref], f"blocked/{layer}/{routing}")
    y_rd, stats_rd, g_rd = dropless["xla"](x, ex, w, wg, wu, wd, ct)
    assert_close([y, *grads], [y_rd, *g_rd], f"blocked-vs-ragged_dot/{layer}/{routing}")
    np.testing.assert_array_equal(stats["expert_tokens"], np.bincount(ex[routed(ex)], minlength=E))
    if routing == "all_empty":
        assert not np.any(y) and all(not np.any(g) for g in grads)
    else:
        assert np.abs(y).max() > 0.1 and all(np.abs(g).max() > 1e-3 for g in grads)


def test_blocked_gmm_takes_the_fused_path(params, monkeypatch):
    """With gmm_impl resolving to 'blocked' (CPU 'auto'), routed_experts never builds the sorted
    rows of dropless_local, nor (on CPU: the live-block loop) the batched per-block weights."""
    x, wg, wu, wd, _ = params
    ex, w = ROUTINGS["random"]
    monkeypatch.setattr(md, "dropless_local", None)
    monkeypatch.setattr(md, "_expert_ffn_blocks_batched", None)
    y, _ = jax.jit(lambda *a: md.routed_experts(*a, gmm_impl="auto"))(x, ex, w, wg, wu, wd)
    np.testing.assert_allclose(np.asarray(y), np.asarray(dense_reference(x, ex, w, wg, wu, wd)),
                               **TOL)


def np_swiglu_blocks(xp, block_expert, used, wg, wu, wd, dy):
    """float64 loop over blocks n < used (the rest give zeros): y and the hand-derived gradients
    (dxp, dwg, dwu, dwd) for cotangent dy."""
    xp, wg, wu, wd, dy = (np.asarray(a, np.float64) for a in (xp, wg, wu, wd, dy))
    y, dx = np.zeros(xp.shape), np.zeros(xp.shape)
    dwg, dwu, dwd = np.zeros(wg.shape), np.zeros(wu.shape), np.zeros(wd.shape)
    for n in range(used):
        e, x, d = block_expert[n], xp[n], dy[n]
        g, u = x @ wg[e], x @ wu[e]
        sg = 1 / (1 + np.exp(-g))
        h = g * sg * u
        y[n] = h @ wd[e]
        dh = d @ wd[e].T
        dg, du = dh * u * sg * (1 + g * (1 - sg)), dh * g * sg
        dx[n] = dg @ wg[e].T + du @ wu[e].T
        dwg[e] += x.T @ dg
        dwu[e] += x.T @ du
        dwd[e] += h.T @ d
    return y, [dx, dwg, dwu, dwd]


# expert sizes of the layer's A = T*S rows: the worst case (all but one of the NB blocks used),
# one expert, none, and uneven with empty experts; the default block at A=128 rows is 8
LOOP_GROUPS = {"tight_blocks": [17, 9, 9, 9, 9, 9, 9, 57], "one_expert": [0, 0, 0, 64, 0, 0, 0, 0],
               "all_empty": [0] * E, "uneven": [5, 0, 31, 8, 0, 1, 40, 3]}


@pytest.fixture(scope="module")
def block_forms():
    """value_and_grads of the loop and batched block-layout experts: (xp, be, used, ws, dy) ->
    (y, [dxp, dwg, dwu, dwd])."""
    from moejax.kernels import expert_loop

    def vjp(ffn):
        def run(xp, be, used, wg, wu, wd, dy):
            y, pull = jax.vjp(lambda *a: ffn(a[0], be, used, *a[1:]), xp, wg, wu, wd)
            return y, list(pull(dy))
        return jax.jit(run)
    loops = {g: vjp(functools.partial(expert_loop.swiglu_blocks, dtype=jnp.float32, group=g))
             for g in LOOP_DOT_GROUPS}
    batched = vjp(lambda xp, be, used, *w: md._expert_ffn_blocks_batched(xp, be, *w,
                                                                         dtype=jnp.float32))
    return loops, batched


LOOP_DOT_GROUPS = (1, 3, 4)  # blocks of one expert per dot: at 8-row blocks, 24- and 32-row dots


@pytest.mark.parametrize("dot_group", LOOP_DOT_GROUPS)
@pytest.mark.parametrize("groups", list(LOOP_GROUPS))
def test_loop_experts_equal_float64_loop_and_batched_form(params, block_forms, groups, dot_group):
    """The live-block loop (CPU form) equals a float64 loop and the batched einsum form (GPU
    form) in outputs and all gradients, also when it runs ``dot_group`` consecutive blocks of one
    expert as one dot (then an expert's last nb_e mod g blocks one at a time: 'uneven' has
    experts of 4 and 5 blocks, 'tight_blocks' one of 8); blocks past ``used`` are neither
    computed nor given gradients even when they hold data."""
    _, wg, wu, wd, _ = params
    lay = md.block_layout(jnp.asarray(LOOP_GROUPS[groups], jnp.int32), T * S)
    NB, b, used = lay.num_blocks, lay.block, int(lay.used)
    be = np.asarray(lay.block_group)
    rng = np.random.default_rng(7)
    xp, dy = (rng.normal(size=(NB, b, D)).astype(np.float32) for _ in range(2))
    loops, batched = block_forms
    loop = loops[dot_group]
    y, grads = loop(xp, be, lay.used, wg, wu, wd, dy)
    y64, g64 = np_swiglu_blocks(xp, be, used, wg, wu, wd, dy)
    assert_close([y, *grads], [y64, *g64], f"loop-vs-float64/{groups}")
    xp[used:] = 0  # as in a real layout: the batched form computes (zero) tail blocks
    y, grads = loop(xp, be, lay.used, wg, wu, wd, dy)
    y_b, g_b = batched(xp, be, lay.used, wg, wu, wd, dy)
    assert_close([y, *grads], [y_b, *g_b], f"loop-vs-batched/{groups}")
    assert used == -(-np.asarray(LOOP_GROUPS[groups]) // b).sum()
    assert (np.abs(y).max() > 0.1) == (used > 0)


def test_layer_with_grouped_loop_dots_equals_dense_reference():
    """At 1024 rows over 4 experts the CPU layer runs 32-row blocks two to a dot
    (``kernels.blocked_ffn_blocking``); with skewed expert loads (remainder blocks, an empty
    expert) its output and all gradients equal the dense every-expert reference."""
    from moejax import kernels
    T2, E2 = 512, 4
    assert kernels.blocked_ffn_blocking(T2 * S, E2) == (32, 2)  # this backend's (CPU) form
    rng = np.random.default_rng(11)
    x, ct = (rng.normal(size=(T2, D)).astype(np.float32) for _ in range(2))
    wg, wu = (rng.normal(size=(E2, D, F)).astype(np.float32) * 0.3 for _ in range(2))
    wd = rng.normal(size=(E2, F, D)).astype(np.float32) * 0.3
    load = np.array([0.55, 0.3, 0.15, 0.0])  # expert 3 empty, the rest uneven (counts below)
    ex = np.stack([rng.choice(E2, S, replace=False, p=load / load.sum()) if rng.random() < 0.97
                   else rng.choice(3, S, replace=False) for _ in range(T2)]).astype(np.int32)
    w = rng.random((T2, S)).astype(np.float32)
    blocks = -(-np.bincount(ex.ravel(), minlength=E2) // 32)
    assert list(blocks) == [14, 12, 7, 0]  # two-block dots, one single block (expert 2), none

    def dense(x, ex, w, wg, wu, wd):
        o = jnp.einsum("tef,efd->ted", jax.nn.silu(jnp.einsum("td,edf->tef", x, wg))
                       * jnp.einsum("td,edf->tef", x, wu), wd)
        return jnp.einsum("ted,te->td", o, jnp.einsum("tse,ts->te", jax.nn.one_hot(ex, E2), w)), {}

    y, _, grads = value_and_grads(lambda *a: md.routed_experts(*a, gmm_impl="auto"))(
        x, ex, w, wg, wu, wd, ct)
    y_ref, _, g_ref = value_and_grads(dense)(x, ex, w, wg, wu, wd, ct)
    for i, (u, v) in enumerate(zip([y, *grads], [y_ref, *g_ref])):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4 * np.abs(v).max(), err_msg=str(i))


def test_loop_experts_in_bf16_match_the_float64_loop(params):
    """bf16 compute (f32 weights cast inside, f32 accumulation): outputs and all gradients within
    bf16 rounding of the float64 loop on the same bf16-rounded operands."""
    from moejax.kernels import expert_loop
    _, wg, wu, wd, _ = params
    lay = md.block_layout(jnp.asarray(LOOP_GROUPS["uneven"], jnp.int32), T * S)
    rng = np.random.default_rng(3)
    xp = jnp.asarray(rng.normal(size=(lay.num_blocks, lay.block, D)), jnp.bfloat16)
    dy = rng.normal(size=(lay.num_blocks, lay.block, D)).astype(np.float32)
    f = lambda xp, *w: expert_loop.swiglu_blocks(xp, lay.block_group, lay.used, *w,  # noqa: E731
                                                 dtype=jnp.bfloat16)
    y, pull = jax.vjp(f, xp, wg, wu, wd)
    grads = pull(jnp.asarray(dy))
    assert y.dtype == jnp.float32 and [g.dtype for g in grads] == [jnp.bfloat16] + [wg.dtype] * 3
    bf = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)  # noqa: E731
    y64, g64 = np_swiglu_blocks(bf(xp), np.asarray(lay.block_group), int(lay.used),
                                bf(wg), bf(wu), bf(wd), dy)
    for i, (u, v) in enumerate(zip([y, *grads], [y64, *g64])):
        u = np.asarray(u, np.float64)
        assert np.abs(u - v).max() <= 2e-2 * np.abs(v).max() + 1e-6, i


def grouped_blocking(monkeypatch) -> list:
    """Make the block-layout experts run 8-row blocks two to a dot at any size (the default
    groups only from ~1k rows); returns the list of (rows, experts) it was asked for."""
    from moejax import kernels
    calls = []

    def blocking(rows, groups, backend=None):
        calls.append((rows, groups))
        return 8, 2
    monkeypatch.setattr(kernels, "blocked_ffn_blocking", blocking)
    return calls


@pytest.mark.parametrize("blocking", ["default", "grouped"])
def test_loop_experts_under_scan_remat_and_vmap(params, blocking, monkeypatch):
    """As the model runs it: the layer over stacked layers in a ``lax.scan`` with full remat
    (the forward recomputed), and under ``jax.vmap``, equals plain per-layer calls in the loss
    and all gradients; 'grouped' runs the scanned and vmapped layers with two blocks per dot
    against the default per-layer reference."""
    x, wg, wu, wd, ct = params
    ex, w = ROUTINGS["random"]
    ws = tuple(jnp.stack([a, a[::-1] * 0.5]) for a in (wg, wu, wd))  # [2,E,...]: two layers

    def layer(x, lw):
        return md.routed_experts(x, ex, w, *lw, gmm_impl="blocked")[0]

    def scanned(x, ws):  # each layer on the same input; outputs stacked [2,T,D]
        step = jax.checkpoint(lambda h, lw: (h, layer(h, lw)),
                              policy=jax.checkpoint_policies.nothing_saveable)
        return jnp.sum(jax.lax.scan(step, x, ws)[1] * ct)

    def vmapped(x, ws):
        return jnp.sum(jax.vmap(layer, in_axes=(None, 0))(x, ws) * ct)

    def per_layer(x, ws):
        return sum(jnp.sum(layer(x, [a[i] for a in ws]) * ct) for i in range(2))

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))  # noqa: E731
    want = grad(per_layer)(x, ws)
    assert all(np.abs(g).max() > 1e-3 for g in jax.tree.leaves(want[1]))
    calls = grouped_blocking(monkeypatch) if blocking == "grouped" else [None]
    for name, f in (("scan+remat", scanned), ("vmap", vmapped)):
        assert_close(jax.tree.leaves(grad(f)(x, ws)), jax.tree.leaves(want), name)
    assert calls


@pytest.fixture(scope="module")
def capacity():
    return {cf: value_and_grads(lambda *a, cf=cf: md.routed_experts(
        *a, dispatch="capacity", capacity_factor=cf)) for cf in (8.0, 0.5)}


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_capacity_without_drops_equals_dense(params, capacity, routing):
    x, wg, wu, wd, ct = params
    ex, w = ROUTINGS[routing]
    y, stats, grads = capacity[8.0](x, ex, w, wg, wu, wd, ct)
    y_ref, _, g_ref = DENSE(x, ex, w, wg, wu, wd, ct)
    assert stats["dropped"] == 0
    assert_close([y, *grads], [y_ref, *g_ref], f"capacity/{routing}")


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_capacity_drops_exactly_first_come(params, capacity, routing):
    x, wg, wu, wd, ct = params
    ex, w = ROUTINGS[routing]
    C = md.capacity_of(0.5, T, S, E)
    assert C == 8
    kept, dropped, counts = np_capacity(ex, C)
    assert dropped > 0
    y, stats, grads = capacity[0.5](x, ex, w, wg, wu, wd, ct)
    assert int(stats["dropped"]) == dropped
    np.testing.assert_array_equal(stats["expert_tokens"], counts)
    y_ref, _, g_ref = DENSE(x, ex, (w * kept).astype(np.float32), wg, wu, wd, ct)
    g_ref[1] = g_ref[1] * kept  # dropped assignments get no weight gradient
    assert_close([y, *grads], [y_ref, *g_ref], f"capacity-drop/{routing}")


def test_expert_choice_matches_numpy(params):
    x, wg, wu, wd, _ = params
    rng = np.random.default_rng(7)
    C = 12
    tokens = np.stack([rng.choice(T, C, replace=False) for _ in range(E)]).astype(np.int32)
    tokens[2, -3:] = -1  # unused slots
    wts = rng.random((E, C)).astype(np.float32)
    y = np.asarray(jax.jit(md.expert_choice_experts)(x, tokens, wts, wg, wu, wd))
    x64 = x.astype(np.float64)
    ref = np.zeros((T, D))
    for e in range(E):
        for c in range(C):
            t = tokens[e, c]
            if t < 0:
                continue
            g, u = x64[t] @ wg[e], x64[t] @ wu[e]
            ref[t] += wts[e, c] * ((g / (1 + np.exp(-g)) * u) @ wd[e])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert np.abs(ref).max() > 0.1


# ---------------------------------------------------------------- expert parallelism
# (data, fsdp, expert, tensor): fsdp > 1 and tensor > 1 (expert FFN split over F) included
MESHES = {"e8": (1, 1, 8, 1), "d2e4": (2, 1, 4, 1), "d2f2e2": (2, 2, 2, 1), "e4t2": (1, 1, 4, 2)}


def mesh_of(name):
    return jax.make_mesh(MESHES[name], ("data", "fsdp", "expert", "tensor"),
                         axis_types=(AxisType.Auto,) * 4)


def shards_of(name) -> int:
    """Batch shards (data * fsdp * expert) of a mesh: the device-local token chunks."""
    d, f, e, _ = MESHES[name]
    return d * f * e


def shard(mesh, x, ex, w, wg, wu, wd, ct):
    tok = NamedSharding(mesh, P(BATCH, None))
    ws = NamedSharding(mesh, P("expert", None, None))
    return ([jax.device_put(v, tok) for v in (x, ex, w)]
            + [jax.device_put(v, ws) for v in (wg, wu, wd)] + [jax.device_put(ct, tok)])


def run_ep(mesh_name, layer, params, routing):
    x, wg, wu, wd, ct = params
    ex, w = ROUTINGS[routing]
    mesh = mesh_of(mesh_name)
    with jax.set_mesh(mesh):
        return layer(*shard(mesh, x, ex, w, wg, wu, wd, ct))


@pytest.fixture(scope="module")
def ep_layers():
    """One compiled value-and-grad per (dispatch, variant); each mesh adds one compile."""
    return {
        "dropless": value_and_grads(lambda *a: moe_ep.routed_experts_ep(*a, dispatch="dropless")),
        "capacity": value_and_grads(lambda *a: moe_ep.routed_experts_ep(
            *a, dispatch="capacity", capacity_factor=1.0)),
        "dropless_novma": value_and_grads(lambda *a: moe_ep.routed_experts_ep(
            *a, dispatch="dropless", check_vma=False)),
    }


@pytest.fixture(scope="module")
def chunked_capacity():
    """shards -> single-device capacity layer applied to each device-local chunk of T/shards
    tokens (EP semantics); one compile per chunk count."""
    def make(shards):
        def layer(x, ex, w, wg, wu, wd):
            def one(x, ex, w):
                return md.routed_experts(x, ex, w, wg, wu, wd, dispatch="capacity",
                                         capacity_factor=1.0)
            tl = T // shards
            y, st = jax.vmap(one)(x.reshape(shards, tl, D), ex.reshape(shards, tl, S),
                                  w.reshape(shards, tl, S))
            return y.reshape(T, D), jax.tree.map(lambda a: a.sum(0), st)
        return value_and_grads(layer)
    cache = {}

    def get(shards):
        if shards not in cache:
            cache[shards] = make(shards)
        return cache[shards]
    return get


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("routing", ["random", "one_expert"])
def test_ep_dropless_equals_single_device(params, dropless, ep_layers, mesh_name, routing):
    x, wg, wu, wd, ct = params
    ex, w = ROUTINGS[routing]
    ref = dropless["xla"](x, ex, w, wg, wu, wd, ct)
    y, stats, grads = run_ep(mesh_name, ep_layers["dropless"], params, routing)
    assert_close([y, *grads], [ref[0], *ref[2]], f"ep-dropless/{mesh_name}/{routing}")
    assert stats["dropped"] == 0
    np.testing.assert_array_equal(stats["expert_tokens"], ref[1]["expert_tokens"])


@pytest.mark.parametrize("mesh_name", ["d2e4", "e4t2"])
def test_ep_dropless_without_vma_check_equals_single_device(params, dropless, ep_layers, mesh_name):
    """The check_vma=False path (used with Pallas/tokamax kernels) must psum weight grads too, and
    under tensor > 1 sum the F-slice outputs without scaling the gradients."""
    x, wg, wu, wd, ct = params
    ex, w = ROUTINGS["full"]
    ref = dropless["xla"](x, ex, w, wg, wu, wd, ct)
    y, stats, grads = run_ep(mesh_name, ep_layers["dropless_novma"], params, "full")
    assert_close([y, *grads], [ref[0], *ref[2]], f"ep-dropless-novma/{mesh_name}")


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("routing", ["random", "full"])
def test_ep_capacity_equals_per_device_capacity(params, ep_layers, chunked_capacity, mesh_name,
                                                routing):
    x, wg, wu, wd, ct = params
    ex, w = ROUTINGS[routing]
    shards = shards_of(mesh_name)
    ref = chunked_capacity(shards)(x, ex, w, wg, wu, wd, ct)
    TL = T // shards
    C = md.capacity_of(1.0, TL, S, E)  # 2 (8 shards) or 4 (4 shards) per expert per device chunk
    drops = sum(np_capacity(ex[c * TL:(c + 1) * TL], C)[1] for c in range(shards))
    assert drops > 0 and int(ref[1]["dropped"]) == drops
    y, stats, grads = run_ep(mesh_name, ep_layers["capacity"], params, routing)
    assert int(stats["dropped"]) == drops
    np.testing.assert_array_equal(stats["expert_tokens"], ref[1]["expert_tokens"])
    assert_close([y, *grads], [ref[0], *ref[2]], f"ep-capacity/{mesh_name}/{routing}")


@pytest.mark.parametrize("check_vma", [True, False])
def test_ep_dropless_with_grouped_loop_dots_equals_single_device(params, dropless, monkeypatch,
                                                                 check_vma):
    """Inside the expert-parallel shard_map (with and without the vma check) the CPU loop with
    two blocks per dot gives the single-device outputs and gradients ('random': ~3 blocks per
    expert, a dot and a single block; 'one_expert': 8 blocks, four dots)."""
    x, wg, wu, wd, ct = params
    calls = grouped_blocking(monkeypatch)
    layer = value_and_grads(lambda *a: moe_ep.routed_experts_ep(*a, dispatch="dropless",
                                                               check_vma=check_vma))
    for routing in ("random", "one_expert"):
        ex, w = ROUTINGS[routing]
        ref = dropless["xla"](x, ex, w, wg, wu, wd, ct)
        y, _, grads = run_ep("d2e4", layer, params, routing)
        assert_close([y, *grads], [ref[0], *ref[2]], f"ep-dropless-grouped/{routing}/{check_vma}")
    assert calls


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_ep_dropless_small_buffer_counts_drops(params, mesh_name, monkeypatch):
    monkeypatch.setattr(moe_ep, "MIN_BUFFER_ROWS", 1)  # let these 16-row chunks drop
    x, wg, wu, wd, _ = params
    ex, w = ROUTINGS["random"]
    ep, shards = MESHES[mesh_name][2], shards_of(mesh_name)
    B = moe_ep.buffer_rows(0.5, T // shards * S, ep)
    kept, dropped, counts = np_ep_buffer(ex, ep, B, shards)
    assert dropped > 0
    cfg = MoEConfig(num_experts=E, top_k=S, d_expert=F, dispatch="dropless", ep_buffer_factor=0.5)
    mesh = mesh_of(mesh_name)
    with jax.set_mesh(mesh):  # moe_ffn must take the EP path here (the buffer is what drops)
        args = shard(mesh, x, ex, w, wg, wu, wd, x)[:6]
        y, stats = jax.jit(lambda *a: md.moe_ffn(*a, cfg=cfg))(*args)
    assert int(stats["dropped"]) == dropped
    np.testing.assert_array_equal(np.asarray(stats["expert_tokens"]), counts)
    y_ref = dense_reference(x, ex, (w * kept).astype(np.float32), wg, wu, wd)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), **TOL)


def test_moe_ffn_single_device_path(params, dropless):
    x, wg, wu, wd, ct = params
    ex, w = ROUTINGS["random"]
    cfg = MoEConfig(num_experts=E, top_k=S, d_expert=F, dispatch="dropless", gmm_impl="xla")
    y, stats = jax.jit(lambda *a: md.moe_ffn(*a, cfg=cfg))(x, ex, w, wg, wu, wd)
    np.testing.assert_allclose(np.asarray(y), dropless["xla"](x, ex, w, wg, wu, wd, ct)[0], **TOL)
    assert int(stats["dropped"]) == 0


def test_experts_not_divisible_by_expert_axis_fail_clearly(params):
    x, _, _, _, _ = params
    ex, w = ROUTINGS["random"]
    E6 = 6
    rng = np.random.default_rng(3)
    wg, wu = (rng.normal(size=(E6, D, F)).astype(np.float32) for _ in range(2))
    wd = rng.normal(size=(E6, F, D)).astype(np.float32)
    cfg = MoEConfig(num_experts=E6, top_k=S, d_expert=F)
    with jax.set_mesh(mesh_of("d2e4")):
        with pytest.raises(ConfigError, match=r"num_experts=6 .*divisible by mesh.expert=4"):
            md.moe_ffn(x, ex, w, wg, wu, wd, cfg=cfg)
        with pytest.raises(ConfigError, match="divisible by mesh.expert=4"):
            moe_ep.routed_experts_ep(x, ex, w, wg, wu, wd)


@pytest.mark.parametrize("floor", [1, None], ids=["no_floor", "floor"])
def test_default_ep_buffer_is_finite_and_counts_drops_exactly(params, floor, monkeypatch):
    """The config default (ep_buffer_factor=2.0) bounds each destination chunk at twice the mean
    load; a skewed routing (every token on expert 3) drops exactly what numpy counts. With the
    real MIN_BUFFER_ROWS floor these small (16-row) chunks are sent whole: nothing drops."""
    if floor is not None:
        monkeypatch.setattr(moe_ep, "MIN_BUFFER_ROWS", floor)
    x, wg, wu, wd, _ = params
    ex, w = ROUTINGS["one_expert"]
    cfg = MoEConfig(num_experts=E, top_k=S, d_expert=F)
    assert cfg.ep_buffer_factor == 2.0 and cfg.ep_exchange == "padded"
    ep, shards = MESHES["d2e4"][2], shards_of("d2e4")
    B = moe_ep.buffer_rows(cfg.ep_buffer_factor, T // shards * S, ep)
    if floor is None:
        assert B == T // shards * S  # the whole chunk
    else:
        assert B == 2 * (T // shards) * S // ep  # finite: ep/2 times below the worst case
    kept, dropped, counts = np_ep_buffer(ex, ep, B, shards)
    assert dropped == (0 if floor is None else T - shards * B)  # each chunk: T/shards rows to one
    mesh = mesh_of("d2e4")
    with jax.set_mesh(mesh):
        y, stats = jax.jit(lambda *a: md.moe_ffn(*a, cfg=cfg))(*shard(mesh, x, ex, w, wg, wu, wd, x)[:6])
    assert int(stats["dropped"]) == dropped
    np.testing.assert_array_equal(np.asarray(stats["expert_tokens"]), counts)
    y_ref = dense_reference(x, ex, (w * kept).astype(np.float32), wg, wu, wd)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), **TOL)


def test_ragged_exchange_is_a_config_option_refused_on_cpu(params):
    x, wg, wu, wd, _ = params
    ex, w = ROUTINGS["random"]
    cfg = MoEConfig(num_experts=E, top_k=S, d_expert=F, ep_exchange="ragged")
    with pytest.raises(ConfigError, match="ep_exchange"):
        MoEConfig(num_experts=E, top_k=S, d_expert=F, ep_exchange="fast")
    with jax.set_mesh(mesh_of("d2e4")):
        with pytest.raises(ConfigError, match=r"model.moe.ep_exchange='ragged' is invalid on CPU"):
            md.moe_ffn(x, ex, w, wg, wu, wd, cfg=cfg)


def test_d_expert_not_divisible_by_tensor_fails_clearly(params):
    x, wg, wu, wd, _ = params
    ex, w = ROUTINGS["random"]
    cut = lambda a, ax: np.take(a, np.arange(F - 1), axis=ax)  # noqa: E731  F=15 over tensor=2
    with jax.set_mesh(mesh_of("e4t2")):
        with pytest.raises(ConfigError, match=r"d_expert=15 .*divisible by mesh.tensor=2"):
            moe_ep.routed_experts_ep(x, ex, w, cut(wg, 2), cut(wu, 2), cut(wd, 1))


ODD_T = (26, 21, 1)  # B x T = 2x13, 3x7 and a 1x1 decode step: none splits over 8 or 4 shards


@pytest.fixture(scope="module")
def ep_dropless_exact():
    return value_and_grads(lambda *a: moe_ep.routed_experts_ep(*a, dispatch="dropless",
                                                               ep_buffer_factor=0.0))


@pytest.mark.parametrize("mesh_name,n", list(zip(["d2e4", "d2f2e2", "e4t2"], ODD_T)))
def test_ep_any_token_count_equals_single_device(params, dropless, ep_dropless_exact, mesh_name, n):
    """Token counts that do not split over the batch shards are padded inside the layer with
    empty rows: values, gradients and counts equal the single-device layer on the same tokens."""
    x, wg, wu, wd, ct = params
    ex, w = ROUTINGS["full"]
    x, ex, w, ct = x[:n], ex[:n], w[:n], ct[:n]
    ref = dropless["xla"](x, ex, w, wg, wu, wd, ct)
    with jax.set_mesh(mesh_of(mesh_name)):
        y, stats, grads = ep_dropless_exact(x, ex, w, wg, wu, wd, ct)
    assert y.shape == (n, D)
    assert_close([y, *grads], [ref[0], *ref[2]], f"ep-odd/{mesh_name}/{n}")
    assert int(stats["dropped"]) == 0
    np.testing.assert_array_equal(stats["expert_tokens"], ref[1]["expert_tokens"])
    np.testing.assert_array_equal(stats["expert_tokens"].sum(), n * S)  # padding counted nowhere


def test_tensor_axis_splits_the_expert_ffn(params):
    """Under tensor > 1 each tensor rank holds an F slice of every local expert (w_gate/w_up split
    on F, w_down on its F rows) instead of repeating all expert work."""
    x, wg, wu, wd, _ = params
    ex, w = ROUTINGS["random"]
    with jax.set_mesh(mesh_of("e4t2")):
        jaxpr = jax.make_jaxpr(lambda *a: moe_ep.routed_experts_ep(*a))(x, ex, w, wg, wu, wd)
    (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "shard_map"]
    assert tuple(eqn.params["in_specs"][-3:]) == (P("expert", None, "tensor"),
                                                 P("expert", None, "tensor"),
                                                 P("expert", "tensor", None))
    local_w = [v.aval.shape for v in eqn.params["jaxpr"].invars[-3:]]
    assert local_w == [(E // 4, D, F // 2)] * 2 + [(E // 4, F // 2, D)]
