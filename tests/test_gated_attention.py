"""Gated attention (G1-G5; elementwise/headwise/head-shared; sigmoid/SiLU/NS-sigmoid;
multiplicative/additive; input-dependent or constant), the Qwen3-Next doubled-q layout and the
softmax sink: each against a by-hand float64 numpy layer; GatedNorm's 2σ gate at init; the
gate-free layer bit for bit against the backbone; every variant sharded (tensor=2 x data=4) and
KV-cached against the single-device full forward.

Compile budget: one small jit per layer variant; the model-level variants share one base model
(params copied into abstract variants, never re-initialised) and each costs 4 compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import kernels
from moejax.config import AttentionConfig, ConfigError, MeshConfig
from moejax.kernels import reference
from moejax.layers.attention import Attention
from moejax.layers.embed import apply_rope
from moejax.layers.norms import GatedNorm, make_block_norm
from moejax.mesh import make_mesh, rules_for, use_mesh
from moejax.model import Model
from moejax.testing import BATCH, SEQ, TOL_FP32, TOL_SHARDED_FP32, tiny_model

B, T = 2, 12
D, H, HKV, HD = 64, 4, 2, 16


# -- numpy reference of one attention layer --------------------------------------------------------

def np_rms(x, w, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def np_act(z, kind):
    return {"sigmoid": np_sigmoid(z), "silu": z * np_sigmoid(z),
            "ns_sigmoid": 0.5 + 0.5 * np_sigmoid(z)}[kind]


def np_rope(x, pos, rot, theta=10_000.0):
    half = rot // 2
    inv = theta ** (-np.arange(0, rot, 2) / rot)
    ang = pos[..., None] * inv  # [B,T,half]
    c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    x1, x2, rest = x[..., :half], x[..., half:rot], x[..., rot:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, rest], -1)


def np_attention_layer(p, x, pos, seg, a: AttentionConfig):
    """The layer by hand: per-head loops, explicit softmax with an optional sink column."""
    x = x.astype(np.float64)
    q_w = p["q"]
    gate_logits = None
    if a.gate_layout == "qwen3_next":
        q_w, gate_logits = q_w[..., :HD], np.einsum("btd,dhk->bthk", x, q_w[..., HD:])
    q, k, v = (np.einsum("btd,dhk->bthk", x, w) for w in (q_w, p["k"], p["v"]))
    if a.gate != "none" and gate_logits is None and a.gate_input == "constant":
        gate_logits = np.broadcast_to(p["gate_bias"], (*x.shape[:2], *p["gate_bias"].shape))
    elif a.gate != "none" and gate_logits is None:
        gate_logits = np.tensordot(x, p["gate"], axes=([2], [0]))  # [B,T,...]
    g = None if a.gate == "none" else np_act(gate_logits, a.gate_activation)

    def gated(y):
        gg = g
        if y.ndim == 4 and a.gate_granularity == "headwise":
            gg = g[..., None]
        elif y.ndim == 4 and a.gate_granularity == "head_shared":
            gg = g[:, :, None, :]
        return y * gg if a.gate_form == "multiplicative" else y + gg

    q, k = np_rms(q, p["q_norm"]), np_rms(k, p["k_norm"])
    if a.gate == "g4":
        q = gated(q)
    if a.gate == "g3":
        k = gated(k)
    if a.gate == "g2":
        v = gated(v)
    q, k = np_rope(q, pos, a.rotary_dim), np_rope(k, pos, a.rotary_dim)
    out = np.zeros((B, T, H, HD))
    for b in range(B):
        for h in range(H):
            kv = h // (H // HKV)
            for i in range(T):
                if seg[b, i] == 0:
                    continue
                vis = [j for j in range(T) if pos[b, j] <= pos[b, i] and seg[b, j] == seg[b, i]]
                logits = np.array([q[b, i, h] @ k[b, j, kv] / np.sqrt(HD) for j in vis])
                if a.sink:
                    logits = np.append(logits, p["sink"][h])
                w = np.exp(logits - logits.max())
                w /= w.sum()
                out[b, i, h] = sum(w[n] * v[b, j, kv] for n, j in enumerate(vis))
    if a.gate == "g1":
        out = gated(out)
    y = np.einsum("bthk,hkd->btd", out, p["o"])
    return gated(y) if a.gate == "g5" else y


# -- layer-level fixtures ---------------------------------------------------------------------------

def layer_cfg(**attn):
    return tiny_model(attention=dict(rope_fraction=0.5, **attn))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    seg = np.array([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3], np.int32)  # packed / padded
    pos = np.array([list(range(5)) + list(range(7)), list(range(12))], np.int32)
    return x, pos, seg


def build_layer(cfg, seed=0):
    """An Attention of cfg with random (non-trivial) values in every parameter, also the norms."""
    layer = Attention(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 1)
    for path, var in nnx.iter_graph(layer):
        if isinstance(var, nnx.Param):
            scale = {"scale": 0.3, "sink": 1.0}.get(path[-1], 0.25)
            base = 1.0 if path[-1] == "scale" else 0.0
            var[...] = jnp.asarray(base + scale * rng.normal(size=var.shape), jnp.float32)
    return layer


def layer_params(layer) -> dict:
    pure = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    out = {k: np.asarray(v, np.float64) for k, v in pure.items() if not isinstance(v, dict)}
    out["q_norm"] = np.asarray(pure["q_norm"]["scale"], np.float64)
    out["k_norm"] = np.asarray(pure["k_norm"]["scale"], np.float64)
    return out


def run_layer(layer, x, pos, seg, jit=True):
    graphdef, state = nnx.split(layer)
    f = lambda st, x, p, s: nnx.merge(graphdef, st)(x, positions=p, segment_ids=s)[0]  # noqa: E731
    return np.asarray((jax.jit(f) if jit else f)(state, x, pos, seg))


LAYER_VARIANTS = [
    dict(gate=g, gate_granularity=gr) for g in ("g1", "g2", "g3", "g4")
    for gr in ("elementwise", "headwise", "head_shared")
] + [
    dict(gate="g5"),
    dict(gate="g1", gate_activation="silu"),
    dict(gate="g1", gate_form="additive"),
    dict(gate="g2", gate_granularity="headwise", gate_activation="silu", gate_form="additive"),
    dict(gate="g1", gate_layout="qwen3_next"),
    dict(gate="g1", gate_activation="ns_sigmoid"),
    dict(gate="g1", gate_input="constant"),
    dict(gate="g2", gate_granularity="headwise", gate_input="constant"),
    dict(gate="g1", gate_granularity="head_shared", gate_input="constant",
         gate_activation="ns_sigmoid"),
    dict(gate="g5", gate_input="constant"),
    dict(sink=True),
    dict(gate="g1", gate_granularity="headwise", sink=True),
]


def test_every_layer_variant_matches_numpy(inputs):
    x, pos, seg = inputs
    for variant in LAYER_VARIANTS:
        cfg = layer_cfg(**variant)
        layer = build_layer(cfg)
        got = run_layer(layer, x, pos, seg)
        want = np_attention_layer(layer_params(layer), x, pos, seg, cfg.attention)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=str(variant))


def test_gate_controls_at_init():
    """The input-independent gate is one logit per gate entry, zero at init (σ = 0.5 for every
    token, as the input-dependent gate starts near); NS-sigmoid stays in [0.5, 1]."""
    const = Attention(layer_cfg(gate="g1", gate_input="constant"), rngs=nnx.Rngs(0))
    assert const.gate is None and const.gate_bias.shape == (H, HD)
    assert np.all(np.asarray(const.gate_bias[...]) == 0)
    assert const.gate_bias.get_metadata()["out_sharding"] == ("heads", "head_dim")
    assert layer_cfg(gate="g1", gate_input="constant").attention.extra_params(D) == H * HD
    x = jnp.asarray(np.random.default_rng(0).normal(size=(B, T, D)) * 30, jnp.float32)
    np.testing.assert_array_equal(np.asarray(const._gate(x, None)), 0.5)
    ns = Attention(layer_cfg(gate="g1", gate_activation="ns_sigmoid"), rngs=nnx.Rngs(0))
    ns.gate[...] = ns.gate[...] * 1000  # saturate both ways
    g = np.asarray(ns._gate(x, None))
    assert g.min() >= 0.5 and g.max() <= 1.0 and g.min() < 0.51 and g.max() > 0.99


def backbone_attention(p, x, pos, seg, cfg):
    """The backbone layer exactly as it was before gating existed (jnp, same op order)."""
    a = cfg.attention
    q = jnp.einsum("btd,dhk->bthk", x, p["q"])
    k = jnp.einsum("btd,dhk->bthk", x, p["k"])
    v = jnp.einsum("btd,dhk->bthk", x, p["v"])
    from moejax.layers.norms import rms_norm
    q, k = rms_norm(q, p["q_norm"]["scale"], eps=1e-6), rms_norm(k, p["k_norm"]["scale"], eps=1e-6)
    q = apply_rope(q, pos, rotary_dim=a.rotary_dim, theta=a.rope_theta)
    k = apply_rope(k, pos, rotary_dim=a.rotary_dim, theta=a.rope_theta)
    out = reference.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos,
                              kv_positions=pos)
    return jnp.einsum("bthk,hkd->btd", out, p["o"])


def test_gate_disabled_is_the_backbone_bit_for_bit(inputs):
    x, pos, seg = inputs
    cfg = layer_cfg()
    assert cfg.attention.gate == "none" and not cfg.attention.sink
    layer = build_layer(cfg)
    assert layer.gate is None and layer.sink is None and layer.q.shape == (D, H, HD)
    got = run_layer(layer, x, pos, seg, jit=True)
    pure = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    want = jax.jit(lambda p, x: backbone_attention(p, x, pos, seg, cfg))(pure, x)
    np.testing.assert_array_equal(got, np.asarray(want))
    # the choices that only matter with a gate leave the layer untouched
    other = layer_cfg(gate_granularity="headwise", gate_activation="silu", gate_form="additive")
    np.testing.assert_array_equal(run_layer(like_layer(other, layer), x, pos, seg, jit=True), got)


def like_layer(cfg, src):
    dst = nnx.eval_shape(lambda: Attention(cfg, rngs=nnx.Rngs(0)))
    nnx.update(dst, nnx.state(src))
    return dst


def test_qwen3_next_layout_equals_separate_gate(inputs):
    x, pos, seg = inputs
    sep = build_layer(layer_cfg(gate="g1", gate_granularity="elementwise"), seed=3)
    qn = nnx.eval_shape(lambda: Attention(layer_cfg(gate="g1", gate_layout="qwen3_next"),
                                          rngs=nnx.Rngs(0)))
    assert qn.q.shape == (D, H, 2 * HD) and qn.gate is None
    st = nnx.to_pure_dict(nnx.state(sep))
    gate_w = st.pop("gate")
    st["q"] = jnp.concatenate([st["q"], gate_w], axis=-1)  # per head: [query | gate], as HF
    state = nnx.state(qn)
    nnx.replace_by_pure_dict(state, st)
    nnx.update(qn, state)
    np.testing.assert_allclose(run_layer(qn, x, pos, seg), run_layer(sep, x, pos, seg), *TOL_FP32)


def test_softmax_sink_kernel_against_numpy():
    rng = np.random.default_rng(4)
    q = rng.normal(size=(1, 5, 4, 8)).astype(np.float32)
    k = rng.normal(size=(1, 5, 2, 8)).astype(np.float32)
    v = rng.normal(size=(1, 5, 2, 8)).astype(np.float32)
    sink = np.array([2.0, -1.0, 0.0, 5.0], np.float32)
    seg, pos = np.ones((1, 5), np.int32), np.arange(5, dtype=np.int32)[None]
    got, stats = reference.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                     q_positions=pos, kv_positions=pos, sink_logits=sink,
                                     return_stats=True)
    want = np.zeros((5, 4, 8))
    share = np.zeros((5, 4))
    for h in range(4):
        for i in range(5):
            z = np.append(q[0, i, h] @ k[0, :i + 1, h // 2].T / np.sqrt(8), sink[h])
            w = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            want[i, h] = w[:-1] @ v[0, :i + 1, h // 2]
            share[i, h] = w[0]
    np.testing.assert_allclose(np.asarray(got)[0], want, *TOL_FP32)
    np.testing.assert_allclose(np.asarray(stats["first_share"])[0], share, *TOL_FP32)
    np.testing.assert_array_equal(np.asarray(stats["is_first"])[0], [1, 0, 0, 0, 0])
    assert float(np.abs(want).sum()) > 0
    with pytest.raises(ValueError, match="sink"):
        kernels.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos,
                          kv_positions=pos, impl="cudnn", sink_logits=sink)
    with pytest.raises(ValueError, match="probes need impl='xla'"):
        kernels.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos,
                          kv_positions=pos, impl="cudnn", return_stats=True)


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="gate_granularity"):
        AttentionConfig(gate="g5", gate_granularity="headwise")
    with pytest.raises(ConfigError, match="gate_layout"):
        AttentionConfig(gate="g2", gate_layout="qwen3_next")
    with pytest.raises(ConfigError, match="model.attention.gate"):
        AttentionConfig(gate="g6")
    with pytest.raises(ConfigError, match="model.attention.sink"):
        AttentionConfig(sink=True, impl="cudnn")
    with pytest.raises(ConfigError, match="model.attention.gate_input"):
        AttentionConfig(gate="g1", gate_layout="qwen3_next", gate_input="constant")
    with pytest.raises(ConfigError, match="model.attention.gate_activation"):
        AttentionConfig(gate="g1", gate_activation="tanh")
    with pytest.raises(ConfigError, match="norm_variant_ffn"):
        tiny_model(norm_variant_ffn="layer")
    with pytest.raises(ConfigError, match="gated_norm_rank"):
        tiny_model(gated_norm_rank=0)


# -- model level: sharded and cached, every variant ----------------------------------------------------

PROMPT, STEPS = 40, 6
LENS = np.array([40, 1, 17, 33, 8, 25, 39, 12], np.int32)

MODEL_VARIANTS = {  # each gate position/granularity once; sink, norms, silu, additive folded in
    "g1_elem_sink": dict(attention=dict(gate="g1", sink=True)),
    "g1_head_preaffine": dict(attention=dict(gate="g1", gate_granularity="headwise"),
                              norm_variant_attn="preaffine", norm_variant_ffn="preaffine",
                              norm_variant_final="preaffine"),
    "g1_shared_silu_add_gatednorm": dict(
        attention=dict(gate="g1", gate_granularity="head_shared", gate_activation="silu",
                       gate_form="additive"),
        norm_variant_attn="gated", norm_variant_ffn="gated", norm_variant_final="gated",
        gated_norm_rank=4),
    "g2_head": dict(attention=dict(gate="g2", gate_granularity="headwise")),
    "g3_shared": dict(attention=dict(gate="g3", gate_granularity="head_shared")),
    "g4_elem": dict(attention=dict(gate="g4")),
    "g5": dict(attention=dict(gate="g5")),
    "qwen3_next": dict(attention=dict(gate="g1", gate_layout="qwen3_next", rope_fraction=0.25)),
    "g1_const_ns_gatednorm_x2": dict(
        attention=dict(gate="g1", gate_input="constant", gate_activation="ns_sigmoid"),
        norm_variant_ffn="gated", gated_norm_rank=4, gated_norm_double_gate=True),
}


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 288, size=(BATCH, SEQ)).astype(np.int32)


def one_layer(**over):
    """The model-level variants run one block: compile time grows with unrolled depth."""
    return tiny_model(num_layers=1, **over)


@pytest.fixture(scope="module")
def base_model():
    return variant_model(one_layer(), None, seed=100)


def variant_model(cfg, base, seed):
    """cfg's model (abstract, no init compile) with base's params where they exist and random
    values in the others (gates, sinks, PreAffine λ, GatedNorm matrices; everything if no base)."""
    m = nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0)))
    have = {} if base is None else nnx.to_pure_dict(nnx.state(base))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        src = have
        for key in path:
            src = src.get(key) if isinstance(src, dict) else None
            if src is None:
                break
        if src is not None and getattr(src, "shape", None) == leaf.shape:
            return src
        mean = 1.0 if path[-1] in ("pre_scale", "scale") else 0.0
        std = 1.0 if path[-1] == "sink" else 0.3
        return jnp.asarray(mean + std * rng.normal(size=leaf.shape), jnp.float32)

    pure = nnx.to_pure_dict(nnx.state(m))
    pure = jax.tree_util.tree_map_with_path(
        lambda p, leaf: fill(tuple(k.key for k in p), leaf), pure)
    state = nnx.state(m)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(m, state)
    return m


def fwd(model, tokens):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda st, t: nnx.merge(graphdef, st)(t)[0])(state, tokens))


def cached_decode(model, tokens):
    graphdef, state = nnx.split(model)
    prefill = jax.jit(lambda st, c, t, s: nnx.merge(graphdef, st)(t, s, cache=c))
    step = jax.jit(lambda st, c, t: nnx.merge(graphdef, st)(t, cache=c), donate_argnums=1)
    seg = (np.arange(PROMPT)[None] < LENS[:, None]).astype(np.int32)
    logits, _, cache = prefill(state, model.init_cache(BATCH, SEQ), tokens[:, :PROMPT], seg)
    rows = np.arange(BATCH)
    out = [np.asarray(logits)[rows, LENS - 1]]
    for i in range(STEPS):
        logits, _, cache = step(state, cache, tokens[rows, LENS + i][:, None])
        out.append(np.asarray(logits)[:, 0])
    return np.stack(out, 1)


def test_every_variant_sharded_and_cached_equal_single_device(base_model, tokens):
    mcfg = MeshConfig(data=4, tensor=2)
    mesh = make_mesh(mcfg)
    rows = np.arange(BATCH)
    for i, (name, over) in enumerate(MODEL_VARIANTS.items()):
        cfg = one_layer(**over)
        single = variant_model(cfg, base_model, seed=i)
        n = sum(x.size for x in jax.tree.leaves(nnx.state(single)))
        assert n == cfg.num_params(), name
        want = fwd(single, tokens)
        assert np.isfinite(want).all() and want.std() > 1e-3, name
        with use_mesh(mesh, rules_for(mcfg)):
            sharded = nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0)))  # sharded abstract
            shardings = nnx.get_named_sharding(nnx.state(sharded), mesh)
            nnx.update(sharded, jax.device_put(nnx.state(single), shardings))
            got = fwd(sharded, tokens)
            np.testing.assert_allclose(got, want, *TOL_SHARDED_FP32, err_msg=name)
            dec = cached_decode(sharded, tokens)
        full = np.stack([want[rows, LENS - 1 + s] for s in range(STEPS + 1)], 1)
        np.testing.assert_allclose(dec, full, *TOL_SHARDED_FP32, err_msg=name)


# -- GatedNorm's 2σ gate ----------------------------------------------------------------------------

def test_gated_norm_double_gate_starts_at_unit_gain():
    """With ``gated_norm_double_gate`` the gate is 2σ(·): at init (W ~ N(0, 0.02)) the norm is
    RMSNorm(x)·γ within 1 %, where the plain σ(·) halves it; with trained (large) weights the
    output is the numpy 2σ formula."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, D)) * 4, jnp.float32)
    rms = np_rms(np.asarray(x, np.float64), 1.0)
    for double, gain in ((True, 1.0), (False, 0.5)):
        cfg = tiny_model(norm_variant_ffn="gated", gated_norm_double_gate=double)
        norm = make_block_norm(cfg, cfg.norm_variant_ffn, rngs=nnx.Rngs(0))
        got = np.asarray(norm(x), np.float64)
        np.testing.assert_allclose(got / rms, gain, rtol=1e-2, err_msg=f"double_gate={double}")
    gn = GatedNorm(D, rank=4, double_gate=True, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    down, up = rng.normal(size=(D, 4)) * 0.5, rng.normal(size=(4, D)) * 0.5
    gn.down[...], gn.up[...] = jnp.asarray(down, jnp.float32), jnp.asarray(up, jnp.float32)
    z = rms @ down
    want = rms * 2 * np_sigmoid((z * np_sigmoid(z)) @ up)
    np.testing.assert_allclose(np.asarray(gn(x)), want, rtol=2e-5, atol=2e-5)
