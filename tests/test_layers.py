"""Layer math against plain numpy float64 references: RMSNorm, RoPE, attention, SwiGLU, GQA."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import kernels
from moejax.layers.attention import Attention
from moejax.layers.embed import apply_rope
from moejax.layers.mlp import MLP
from moejax.layers.norms import RMSNorm, rms_norm
from moejax.testing import BATCH, SEQ, TOL_FP32, tiny_model

B, T = BATCH, SEQ
RNG = np.random.default_rng(0)


def _segments(rng, B, T):
    """Random packed rows: 1-3 documents then padding; positions restart per document."""
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), size=3, replace=False))
        bounds = [0, *cuts]
        for i in range(3):
            seg[b, bounds[i]:bounds[i + 1]] = i + 1
            pos[b, bounds[i]:bounds[i + 1]] = np.arange(bounds[i + 1] - bounds[i])
        pos[b, cuts[-1]:] = np.arange(T - cuts[-1])  # padding tail (segment 0)
    seg[0] = 1  # one row without padding, one single document
    pos[0] = np.arange(T)
    return seg, pos


@pytest.mark.parametrize("zero_centered", [False, True])
def test_rms_norm_matches_float64(zero_centered):
    x = RNG.normal(size=(B, T, 64)).astype(np.float32) * 3
    w = RNG.normal(size=(64,)).astype(np.float32)
    norm = RMSNorm(64, eps=1e-6, zero_centered=zero_centered)
    np.testing.assert_array_equal(norm.scale[...], np.zeros(64) if zero_centered else np.ones(64))
    norm.scale[...] = jnp.asarray(w)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt(np.mean(x64**2, -1, keepdims=True) + 1e-6) * ((1 + w) if zero_centered else w)
    np.testing.assert_allclose(norm(jnp.asarray(x)), ref, *TOL_FP32)
    # bf16 input: statistics in fp32, output in bf16
    y16 = rms_norm(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w), eps=1e-6, zero_centered=zero_centered)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("rotary_dim", [16, 8])  # full and partial (fraction 0.5) RoPE, head_dim 16
def test_rope_matches_complex_rotation(rotary_dim):
    x = RNG.normal(size=(B, T, 4, 16)).astype(np.float32)
    pos = RNG.integers(0, 1000, size=(B, T)).astype(np.int32)
    theta = 10_000.0
    out = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), rotary_dim=rotary_dim, theta=theta))
    half = rotary_dim // 2
    inv = theta ** (-np.arange(half, dtype=np.float64) * 2 / rotary_dim)
    z = x[..., :half].astype(np.float64) + 1j * x[..., half:rotary_dim]
    z = z * np.exp(1j * pos[:, :, None, None] * inv)
    ref = np.concatenate([z.real, z.imag, x[..., rotary_dim:]], axis=-1)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)  # fp32 angles up to 1000 rad
    np.testing.assert_array_equal(out[..., rotary_dim:], x[..., rotary_dim:])
    assert not np.allclose(out[..., :rotary_dim], x[..., :rotary_dim])
    # position 0 is the identity; relative property: <rope(q,m), rope(k,n)> depends on m-n only
    zero = apply_rope(jnp.asarray(x), jnp.zeros((B, T), jnp.int32), rotary_dim=rotary_dim, theta=theta)
    np.testing.assert_allclose(zero, x, atol=1e-6)
    q, k = jnp.asarray(x[:1, :1]), jnp.asarray(x[1:2, :1])
    dot = lambda m, n: float(jnp.sum(  # noqa: E731
        apply_rope(q, jnp.full((1, 1), m), rotary_dim=rotary_dim, theta=theta)
        * apply_rope(k, jnp.full((1, 1), n), rotary_dim=rotary_dim, theta=theta)))
    np.testing.assert_allclose(dot(7, 3), dot(104, 100), rtol=1e-4, atol=1e-4)


def _attention_ref(q, k, v, qseg, kseg, qpos, kpos):
    """float64 loop: per (b, head, query) softmax over the visible keys; padding queries -> 0."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    Bq, Tq, H, hd = q.shape
    G = H // k.shape[2]
    out = np.zeros_like(q)
    for b in range(Bq):
        for t in range(Tq):
            if qseg[b, t] == 0:
                continue
            vis = (kpos[b] <= qpos[b, t]) & (kseg[b] == qseg[b, t])
            for h in range(H):
                s = k[b, vis, h // G] @ q[b, t, h] / np.sqrt(hd)
                p = np.exp(s - s.max())
                out[b, t, h] = (p / p.sum()) @ v[b, vis, h // G]
    return out


def test_attention_kernel_matches_loop_reference_gqa_causal_segments():
    H, Hkv, hd = 4, 2, 16
    q = RNG.normal(size=(B, T, H, hd)).astype(np.float32)
    k = RNG.normal(size=(B, T, Hkv, hd)).astype(np.float32)
    v = RNG.normal(size=(B, T, Hkv, hd)).astype(np.float32)
    seg, pos = _segments(RNG, B, T)
    attn = jax.jit(lambda q, k, v, seg, pos: kernels.attention(
        q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos, impl="xla"))
    out = np.asarray(attn(q, k, v, seg, pos))
    np.testing.assert_allclose(out, _attention_ref(q, k, v, seg, seg, pos, pos), *TOL_FP32)
    pad = seg == 0
    assert pad.sum() > 0 and np.isfinite(out).all()
    np.testing.assert_array_equal(out[pad], 0.0)
    # a row that is entirely padding (every query fully masked) stays finite, as do its grads
    seg0 = seg.copy()
    seg0[1] = 0
    val, g = jax.jit(jax.value_and_grad(lambda q: jnp.sum(attn(q, k, v, seg0, pos) ** 2)))(q)
    assert np.isfinite(float(val)) and np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(np.asarray(g)[1], 0.0)


@pytest.mark.parametrize("sink", [False, True])
def test_self_attention_causal_blocks_match_unblocked_attention(sink):
    """The self-attention path (query blocks skip the key blocks after them) equals the float64
    loop and the unblocked reference: outputs and q/k/v/sink gradients, packed rows + padding."""
    from moejax.kernels import reference
    Bb, Tt, H, Hkv, hd = 2, 256, 4, 2, 16
    assert reference.causal_blocks(Tt) == 4 and reference.causal_blocks(SEQ) == 1
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(Bb, Tt, h, hd)).astype(np.float32) for h in (H, Hkv, Hkv))
    seg, pos = _segments(rng, Bb, Tt)
    w = rng.normal(size=(Bb, Tt, H, hd)).astype(np.float32)  # a random cotangent
    sink_logits = rng.normal(size=(H,)).astype(np.float32) if sink else None

    def loss(self_attention):
        def f(q, k, v, s):
            out = reference.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                      q_positions=pos, kv_positions=pos, sink_logits=s,
                                      self_attention=self_attention)
            return jnp.sum(out * w), out
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3) if sink else (0, 1, 2),
                                          has_aux=True))

    (_, got), g_got = loss(True)(q, k, v, sink_logits)
    (_, want), g_want = loss(False)(q, k, v, sink_logits)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), *TOL_FP32)
    if not sink:
        np.testing.assert_allclose(np.asarray(got), _attention_ref(q, k, v, seg, seg, pos, pos),
                                   *TOL_FP32)
    np.testing.assert_array_equal(np.asarray(got)[seg == 0], 0.0)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_attention_cudnn_raises_clearly_on_cpu():
    q = jnp.zeros((1, 4, 4, 16), jnp.bfloat16)
    kv = jnp.zeros((1, 4, 2, 16), jnp.bfloat16)
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        kernels.attention(q, kv, kv, q_segment_ids=ids, kv_segment_ids=ids, q_positions=ids,
                          kv_positions=ids, impl="cudnn")
    with pytest.raises(ValueError, match="unknown"):
        kernels.attention(q, kv, kv, q_segment_ids=ids, kv_segment_ids=ids, q_positions=ids,
                          kv_positions=ids, impl="nope")


def test_swiglu_matches_float64():
    cfg = tiny_model()
    mlp = MLP(cfg, rngs=nnx.Rngs(0))
    # the output projection is initialised smaller by 1/sqrt(2 L)
    np.testing.assert_allclose(np.std(mlp.down[...]) * np.sqrt(2 * cfg.num_layers), np.std(mlp.gate[...]),
                               rtol=0.15)
    x = RNG.normal(size=(B, T, cfg.d_model)).astype(np.float32)
    g, u, d = (np.asarray(p[...], np.float64) for p in (mlp.gate, mlp.up, mlp.down))
    a = x @ g
    ref = (a / (1 + np.exp(-a)) * (x @ u)) @ d
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(mlp, jnp.asarray(x)), ref, rtol=1e-4, atol=1e-6)


def _abstract(module_fn):
    """A module built without running its (compile-heavy) random init; fill with ``set_value``."""
    return nnx.eval_shape(module_fn)


def test_gqa_equals_mha_with_repeated_kv_heads():
    cfg = tiny_model()  # 4 query heads over 2 kv heads
    mha_cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, num_kv_heads=4))
    gqa = _abstract(lambda: Attention(cfg, rngs=nnx.Rngs(1)))
    mha = _abstract(lambda: Attention(mha_cfg, rngs=nnx.Rngs(2)))
    G = cfg.attention.num_heads // cfg.attention.num_kv_heads
    rand = lambda p: jnp.asarray(RNG.normal(size=p.shape) * 0.3, jnp.float32)  # noqa: E731
    for name in ("q", "k", "v", "o"):
        getattr(gqa, name).set_value(rand(getattr(gqa, name)))
    for norm in ("q_norm", "k_norm"):
        w = rand(getattr(gqa, norm).scale)
        getattr(gqa, norm).scale.set_value(w)
        getattr(mha, norm).scale.set_value(w)
    mha.q.set_value(gqa.q[...])
    mha.o.set_value(gqa.o[...])
    mha.k.set_value(jnp.repeat(gqa.k[...], G, axis=1))  # kv head j serves query heads j*G .. j*G+G-1
    mha.v.set_value(jnp.repeat(gqa.v[...], G, axis=1))
    x = jnp.asarray(RNG.normal(size=(B, T, cfg.d_model)), jnp.float32)
    seg, pos = (jnp.asarray(a) for a in _segments(RNG, B, T))
    both = nnx.jit(lambda g, m: (g(x, positions=pos, segment_ids=seg)[0],
                                 m(x, positions=pos, segment_ids=seg)[0]))
    y_gqa, y_mha = both(gqa, mha)
    np.testing.assert_allclose(y_gqa, y_mha, *TOL_FP32)
    assert float(jnp.abs(y_gqa).max()) > 1e-3
