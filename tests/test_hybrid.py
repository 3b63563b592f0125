"""Hybrid models (``ModelConfig.layer_types``): Gated DeltaNet (linear_attention) layers beside full
attention. The default stays today's model; scanned groups of the repeating pattern equal the
unrolled layers (logits, MoE routing, gradients); 8 sharded devices equal one; cached decoding
through the DeltaNet states equals the full forward; a tiny hybrid trains."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import sampling
from moejax.config import ConfigError, DeltaNetConfig, MeshConfig, MoEConfig
from moejax.mesh import make_mesh, rules_for, use_mesh
from moejax.model import Model
from moejax.testing import TOL_FP32, TOL_SHARDED_FP32, tiny_model

B, T, V = 4, 16, 288
LT = ("linear_attention", "full_attention") * 2  # pattern P=2, G=2 groups when scanned
DN = DeltaNetConfig(num_k_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=8, chunk=8)
MOE = MoEConfig(num_experts=4, top_k=2, d_expert=32)
TOKENS = np.random.default_rng(0).integers(0, V, (B, T)).astype(np.int32)


def hybrid(**kw):
    return tiny_model(num_layers=4, layer_types=LT, **{"deltanet": DN, **kw})


def init(cfg, seed=0):
    return nnx.jit(lambda: Model(cfg, rngs=nnx.Rngs(seed)))()


def to_scanned(unrolled: Model, cfg) -> Model:
    """A scanned hybrid model holding ``unrolled``'s weights: layer g*P+p -> stack p, index g."""
    P = len(cfg.layer_pattern)
    G = cfg.num_layers // P
    pure = nnx.to_pure_dict(nnx.state(unrolled))
    layers = pure["layers"]
    pure["layers"] = {p: jax.tree.map(lambda *xs: np.stack(xs),  # host: no program per shape
                                      *[layers[g * P + p] for g in range(G)]) for p in range(P)}
    m = nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(m)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(m, jax.tree.map(jnp.asarray, state))
    return m


@jax.jit(static_argnums=0)
def _logits(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)[0]


def _loss_and_grads(state, graphdef, tokens):
    def loss(params):
        logits, aux = nnx.merge(graphdef, params)(tokens[:, :-1])
        lp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], -1)), (logits, aux)
    (value, (logits, aux)), grads = jax.value_and_grad(loss, has_aux=True)(state)
    return value, logits, aux, grads


def loss_and_grads(model: Model, tokens=TOKENS):
    graphdef, state = nnx.split(model)
    return jax.jit(_loss_and_grads, static_argnums=1)(state, graphdef, tokens)


@pytest.fixture(scope="module")
def dense():
    return init(hybrid())


@pytest.fixture(scope="module")
def dense_out(dense):
    return loss_and_grads(dense)


# -- config --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, needle", [
    (dict(layer_types=("full_attention",) * 3), "model.layer_types"),
    (dict(layer_types=("full_attention", "mamba", "full_attention", "full_attention")),
     "model.layer_types[1]"),
    (dict(deltanet=dict(num_v_heads=3)), "model.deltanet.num_v_heads"),
])
def test_config_errors_name_the_field(kw, needle):
    if "deltanet" in kw:
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
            DeltaNetConfig(**kw["deltanet"])
        return
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("[", r"\[")):
        tiny_model(num_layers=4, **kw)


def test_layer_pattern_is_the_shortest_repeat():
    assert hybrid().layer_pattern == ("linear_attention", "full_attention")
    three_one = ("linear_attention",) * 3 + ("full_attention",)
    assert tiny_model(num_layers=8, layer_types=three_one * 2).layer_pattern == three_one
    assert tiny_model(num_layers=4).layer_pattern == ("full_attention",)


def test_mesh_check_names_deltanet_heads():
    with pytest.raises(ConfigError, match=r"model\.deltanet\.num_k_heads"):
        hybrid(deltanet=DeltaNetConfig(num_k_heads=1, num_v_heads=2)).check_mesh_divisibility(
            {"tensor": 2})


def test_all_full_attention_is_todays_model():
    """layer_types spelled out as all full attention builds the very same model as the default."""
    ref, got = init(tiny_model(num_layers=2)), init(tiny_model(
        num_layers=2, layer_types=("full_attention",) * 2))
    a, b = nnx.to_pure_dict(nnx.state(ref)), nnx.to_pure_dict(nnx.state(got))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    # jitted (eager module calls would compile each op); one program if the graphs are equal
    np.testing.assert_array_equal(np.asarray(_logits(*nnx.split(ref), TOKENS)),
                                  np.asarray(_logits(*nnx.split(got), TOKENS)))
    assert ref.init_cache(B, T).linear is None


def test_linear_layers_are_gated_deltanet(dense):
    kinds = [type(b.attn).__name__ for b in dense.layers]
    assert kinds == ["GatedDeltaNet", "Attention"] * 2
    n = sum(x.size for x in jax.tree.leaves(nnx.state(dense, nnx.Param)))
    assert n == hybrid().num_params()


# -- scan == unrolled ----------------------------------------------------------------------------

@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_scanned_groups_equal_unrolled(moe, dense, dense_out):
    """Logits, MoE routing (stacked in layer order) and every gradient (unstacked) agree."""
    cfg = hybrid(moe=MOE) if moe else hybrid()
    unrolled = init(cfg) if moe else dense
    ref = loss_and_grads(unrolled) if moe else dense_out
    scanned = to_scanned(unrolled, dataclasses.replace(cfg, scan_layers=True))
    got = loss_and_grads(scanned)
    np.testing.assert_allclose(got[1], ref[1], *TOL_FP32)
    if moe:
        np.testing.assert_array_equal(got[2]["router/experts"], ref[2]["router/experts"])
        assert got[2]["router/experts"].shape[0] == 4
    P = 2
    # on the host: eager indexing of device arrays would compile a program per leaf shape
    g_ref = jax.device_get(nnx.to_pure_dict(ref[3]))
    g_got = jax.device_get(nnx.to_pure_dict(got[3]))
    for i in range(4):
        layer = jax.tree.map(lambda x: x[i // P], g_got["layers"][i % P])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     layer, g_ref["layers"][i])
    np.testing.assert_allclose(g_got["embed"]["embedding"], g_ref["embed"]["embedding"],
                               rtol=1e-5, atol=1e-6)


# -- sharded == single ---------------------------------------------------------------------------

def test_sharded_equals_single_device(dense, dense_out):
    """data=2 x fsdp=2 x tensor=2 (DeltaNet heads over tensor): logits and gradients."""
    mcfg = MeshConfig(data=2, fsdp=2, tensor=2)
    mesh = make_mesh(mcfg)
    hybrid().check_mesh_divisibility(dict(mesh.shape))
    with use_mesh(mesh, rules_for(mcfg)):
        model = init(hybrid())  # created under the mesh: sharded eagerly by the logical rules
        state = nnx.state(model)
        jax.tree.map(np.testing.assert_array_equal, state, nnx.state(dense))
        qkvz = model.layers[0].attn.in_proj_qkvz[...]
        assert qkvz.sharding.spec[1] == "tensor", qkvz.sharding
        got = loss_and_grads(model)
    np.testing.assert_allclose(got[1], dense_out[1], *TOL_SHARDED_FP32)
    for a, b in zip(jax.tree.leaves(got[3]), jax.tree.leaves(dense_out[3]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


# -- cached decoding -----------------------------------------------------------------------------

LENS = np.array([16, 1, 9, 5], np.int32)  # ragged prompts (right padding)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_cached_decoding_equals_the_forward(scan, dense):
    """Prefill ragged prompts, then one token at a time: each step's logits equal the full
    forward's at that position (the DeltaNet conv/recurrent states and the KV ride in the cache)."""
    cfg = hybrid(scan_layers=scan)
    model = to_scanned(dense, cfg) if scan else dense
    graphdef, state = nnx.split(model)
    steps, S = 6, T + 6
    seq = np.random.default_rng(1).integers(0, V, (B, S)).astype(np.int32)

    @jax.jit
    def run(state):
        m = nnx.merge(graphdef, state)
        full = m(jnp.asarray(seq))[0]  # [B,S,V]
        seg = (jnp.arange(T)[None] < LENS[:, None]).astype(jnp.int32)
        first, _, cache = m(jnp.asarray(seq[:, :T]), segment_ids=seg, cache=m.init_cache(B, S))
        outs = []
        for i in range(steps):
            tok = jnp.asarray(seq)[jnp.arange(B), LENS + i][:, None]
            logits, _, cache = m(tok, cache=cache)
            outs.append(logits[:, 0])
        return full, first, jnp.stack(outs, 1), cache

    full, first, steps_out, cache = run(state)
    full, first, steps_out = map(np.asarray, (full, first, steps_out))
    for b in range(B):
        np.testing.assert_allclose(first[b, :LENS[b]], full[b, :LENS[b]], rtol=1e-4, atol=1e-4)
        want = full[b, LENS[b]:LENS[b] + steps]
        np.testing.assert_allclose(steps_out[b], want, rtol=1e-4, atol=1e-4)
    # one entry per linear / full layer, or per pattern position stacked over the G=2 groups
    assert len(cache.linear) == len(cache.k) == (1 if scan else 2)
    assert cache.linear[0].recurrent_state.shape == (2,) * scan + (B, 4, 8, 8)


def test_generate_greedy_equals_argmax_of_the_forward(dense):
    """moejax.sampling.generate (prefill, repeat_rows, while-loop decode) on the hybrid model:
    every greedy token is the argmax of the full forward over the generated sequence."""
    n = 5
    prompt = TOKENS[:, :8]
    lens = np.array([8, 3, 1, 6], np.int32)
    out = np.asarray(sampling.generate(dense, prompt, lens, n, rng=jax.random.key(0),
                                       greedy=True))
    # one jitted causal forward over all rows [B, 8+n]: position i sees only out[b, :i+1], so the
    # pad after row b's lens[b]+n tokens never reaches the logits compared (no per-row eager calls)
    graphdef, state = nnx.split(dense)
    logits = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])(state, out))
    for b in range(B):
        seq = out[b, :lens[b] + n]
        np.testing.assert_array_equal(seq[lens[b]:],
                                      logits[b, lens[b] - 1:lens[b] + n - 1].argmax(-1))


# -- training ------------------------------------------------------------------------------------

def test_hybrid_trains_one_step(dense):
    """Two train steps of the scanned hybrid (the module's weights, stacked on the host: no init
    program) lower the loss and move the DeltaNet parameters."""
    from moejax import train as TR
    from moejax.config import Config, DataConfig, TrainConfig
    cfg = Config(model=hybrid(scan_layers=True), mesh=MeshConfig(data=1),
                 data=DataConfig(seq_len=T), train=TrainConfig(steps=4, batch_size=B,
                                                               warmup_steps=0, lr=1e-2))
    s = TR.setup(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    _, params, rest = nnx.split(to_scanned(dense, cfg.model), nnx.Param, ...)
    state = TR.TrainState(step=np.int32(0), params=params, rest=rest,
                          opt_state=jax.jit(s.tx.init)(params), rng=np.array([0, 1], np.uint32))
    step = TR.make_train_step(s, 1)
    batch = {"inputs": TOKENS[:, :-1], "targets": TOKENS[:, 1:],
             "segment_ids": np.ones((B, T - 1), np.int32),
             "positions": np.broadcast_to(np.arange(T - 1, dtype=np.int32), (B, T - 1)),
             "loss_mask": np.ones((B, T - 1), np.float32), "domain": np.zeros((B,), np.int32)}
    gb = TR.global_batch(s.mesh, batch)
    before = jax.device_get(state.params)
    state, m1 = step(state, gb)
    state, m2 = step(state, gb)
    l1, l2 = float(m1["train/loss"]), float(m2["train/loss"])
    assert np.isfinite(l1) and l2 < l1
    after = jax.device_get(state.params)
    moved = nnx.to_pure_dict(jax.tree.map(lambda a, b: np.abs(a - b).max(), after, before))
    assert moved["layers"][0]["attn"]["A_log"] > 0  # the DeltaNet layers train too


# -- multi-token prediction ----------------------------------------------------------------------

MTP_SEG = np.array([[1] * 10 + [2] * 6, [1] * 16, [1] * 12 + [0] * 4, [3] * 5 + [4] * 11],
                   np.int32)


@pytest.fixture(scope="module")
def mtp_model():
    return init(tiny_model(num_layers=2, mtp_layers=2, mtp_loss_weight=0.5))


def test_mtp_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"model\.mtp_loss_weight"):
        tiny_model(mtp_loss_weight=0.1)
    with pytest.raises(ConfigError, match=r"model\.mtp_layers"):
        tiny_model(mtp_layers=-1)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_mtp_num_params_counts_the_module(moe):
    cfg = tiny_model(num_layers=2, mtp_layers=2, **({"moe": MOE} if moe else {}))
    abstract = nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0)))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n == cfg.num_params()


def test_mtp_logits_equal_the_hand_wiring(mtp_model):
    """Depth k at i: fc([norm_e(Emb(t_{i+k})) ; norm_h(h^{k-1}_i)]) (HF's concatenation, one
    [2D,D] matrix), a full block, its norm, the shared head; h^0 = the main model's normed output;
    a token whose i+k lies in another document gets a zero embedding."""
    got, want = map(np.asarray, _mtp_hand_wiring(*nnx.split(mtp_model), jnp.asarray(TOKENS)))
    assert got.shape == (2, B, T, V)
    for k in range(2):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)


@jax.jit(static_argnums=0)
def _mtp_hand_wiring(graphdef, state, tok):
    """(the model's mtp/logits, the hand wiring's per depth): one program (eager module calls
    would compile each op)."""
    m, D = nnx.merge(graphdef, state), 64
    seg = jnp.asarray(MTP_SEG)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    got = m(tok, segment_ids=seg)[1]["mtp/logits"]
    x = m.embed(tok)
    for blk in m.layers:
        x = blk(x, pos, seg)[0]
    h = m.final_norm(x)
    want = []
    for k, depth in enumerate(m.mtp.depths, start=1):
        nxt = jnp.zeros_like(tok).at[:, :T - k].set(tok[:, k:])
        same = np.zeros((B, T), bool)
        same[:, :T - k] = MTP_SEG[:, k:] == MTP_SEG[:, :T - k]
        emb = m.embed(nxt) * jnp.asarray(same)[..., None]
        cat = jnp.concatenate([depth.pre_fc_norm_embedding(emb), depth.pre_fc_norm_hidden(h)], -1)
        u = cat @ depth.fc[...].reshape(2 * D, D)
        h = depth.norm(depth.block(u, pos, seg, tokens=nxt)[0])
        want.append(m.embed.attend(h))
    return got, want


def test_mtp_loss_equals_a_float64_loop():
    from moejax.layers.mtp import mtp_loss_sum
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, B, T, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (B, T)).astype(np.int32)
    mask = (rng.random((B, T)) > 0.2).astype(np.float32)
    got = float(mtp_loss_sum(jnp.asarray(logits), dict(
        targets=targets, loss_mask=mask, segment_ids=MTP_SEG)))
    lp = logits.astype(np.float64)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    want = 0.0
    for k in (1, 2):
        for b in range(B):
            for i in range(T - k):
                if MTP_SEG[b, i] and MTP_SEG[b, i + k] == MTP_SEG[b, i] and mask[b, i + k]:
                    want -= lp[k - 1, b, i, targets[b, i + k]]
    np.testing.assert_allclose(got, want / 2, rtol=1e-5)


def test_training_adds_the_weighted_mtp_loss(mtp_model):
    """make_grad_fn's gradient with weight w = the plain LM gradient + w * grad(MTP loss / tokens),
    the MTP parameters get a gradient only through it, and the reported loss stays the LM loss."""
    from moejax import train as TR
    from moejax.config import Config, DataConfig, TrainConfig
    from moejax.layers.mtp import mtp_loss_sum

    def setup(w):
        model = tiny_model(num_layers=2, mtp_layers=2, mtp_loss_weight=w)
        cfg = Config(model=model, mesh=MeshConfig(data=1), data=DataConfig(seq_len=T),
                     train=TrainConfig(steps=4, batch_size=B, warmup_steps=0))
        return TR.setup(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))

    s_w, s_0 = setup(0.5), setup(0.0)
    # the fixture's model is this config's (no init program of its own); only the gradient
    # programs read the state, so no optimizer state
    _, params, rest = nnx.split(mtp_model, nnx.Param, ...)
    state = TR.TrainState(step=np.int32(0), params=params, rest=rest, opt_state=None,
                          rng=np.array([0, 1], np.uint32))
    mask = (MTP_SEG != 0).astype(np.float32)
    batch = {"inputs": TOKENS, "targets": np.roll(TOKENS, -1, 1), "segment_ids": MTP_SEG,
             "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
             "loss_mask": mask, "domain": np.zeros((B,), np.int32)}
    gb = TR.global_batch(s_w.mesh, batch)
    loss_w, g_w, _ = jax.jit(TR.make_grad_fn(s_w, 1))(state, gb)
    loss_0, g_0, _ = jax.jit(TR.make_grad_fn(s_0, 1))(state, gb)

    @jax.jit
    def mtp_grad(params):
        def f(p):
            m = nnx.merge(s_w.graphdef, p, state.rest)
            aux = m(gb["inputs"], segment_ids=gb["segment_ids"], positions=gb["positions"])[1]
            return mtp_loss_sum(aux["mtp/logits"], batch) / mask.sum()
        return jax.grad(f)(params)

    g_m = mtp_grad(state.params)
    np.testing.assert_allclose(float(loss_w), float(loss_0), rtol=1e-6)
    for a, b, c in zip(jax.tree.leaves(g_w), jax.tree.leaves(g_0), jax.tree.leaves(g_m),
                       strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b) + 0.5 * np.asarray(c),
                                   rtol=1e-4, atol=1e-7)
    fc0 = nnx.to_pure_dict(g_0)["mtp"]["depths"][0]["fc"]
    fcw = nnx.to_pure_dict(g_w)["mtp"]["depths"][0]["fc"]
    assert np.all(np.asarray(fc0) == 0) and np.abs(np.asarray(fcw)).max() > 0


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_repeat_rows_repeats_the_deltanet_states(scan):
    """The rollout engine's G generations per prompt: row b*G+g of every DeltaNet state (stacked
    over groups when scanned) is prompt row b's."""
    model = nnx.eval_shape(lambda: Model(hybrid(scan_layers=scan), rngs=nnx.Rngs(0)))
    cache = Model.init_cache(model, 2, 8)
    rng = np.random.default_rng(0)
    cache = dataclasses.replace(cache, linear=jax.tree.map(
        lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), cache.linear))
    got = sampling.repeat_rows(cache, 3)
    axis = 1 if scan else 0
    for a, b in zip(jax.tree.leaves(got.linear), jax.tree.leaves(cache.linear), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.repeat(np.asarray(b), 3, axis=axis))
