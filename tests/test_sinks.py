"""Sink probes and the norms that absorb sinks: the first-token share on hand-made maps and from the
kernel's statistics, massive-activation / residual-sink detection of a planted outlier channel
(by hand and through the model's probe forward), PreAffine RMSNorm and GatedNorm against numpy,
probe stacking over layers (unrolled, scanned, MoE), and the plots."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.analysis import sinks
from moejax.config import MoEConfig
from moejax.kernels import reference
from moejax.layers.norms import GatedNorm, PreAffineRMSNorm
from moejax.model import Model, resid_probes
from moejax.testing import BATCH, SEQ, TOL_FP32, tiny_model


# -- the first-token share ------------------------------------------------------------------------

def causal_uniform(T):
    return np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]


def test_first_token_share_on_hand_made_maps():
    A = np.stack([causal_uniform(4), np.zeros((4, 4))])
    A[1, :, 0] = 1.0  # head 1: every query attends only to the first token (a full sink)
    want = ((1 / 2 + 1 / 3 + 1 / 4) / 3 + 1.0) / 2
    assert sinks.first_token_share(A) == pytest.approx(want)
    # packed: segments [1,1,1,2,2,0]; head 0 uniform inside segments, the padding query ignored
    seg = np.array([1, 1, 1, 2, 2, 0])
    P = np.zeros((1, 6, 6))
    for i in range(5):
        s = [j for j in range(i + 1) if seg[j] == seg[i]]
        P[0, i, s] = 1.0 / len(s)
    P[0, 5, :] = 1.0 / 6  # padding row: must not count
    assert sinks.first_token_share(P, seg) == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)


def test_kernel_statistic_equals_the_definition():
    rng = np.random.default_rng(1)
    Bk, Tk, Hk, Hkv, hd = 2, 9, 4, 2, 8
    q = rng.normal(size=(Bk, Tk, Hk, hd)).astype(np.float32) * 2
    k = rng.normal(size=(Bk, Tk, Hkv, hd)).astype(np.float32) * 2
    v = rng.normal(size=(Bk, Tk, Hkv, hd)).astype(np.float32)
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0, 0, 0]], np.int32)
    pos = np.array([[0, 1, 2, 3, 0, 1, 2, 3, 4], [3, 4, 5, 6, 7, 8, 0, 0, 0]], np.int32)  # row 1 starts mid-document
    _, st = reference.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos,
                                kv_positions=pos, return_stats=True)
    later = (seg != 0) & ~np.asarray(st["is_first"])
    got = (np.asarray(st["first_share"]) * later[..., None]).sum() / (later.sum() * Hk)
    # probabilities by hand
    mask = np.asarray(reference.attention_mask(seg, seg, pos, pos))
    logits = np.einsum("bthd,bshd->bhts", q, np.repeat(k, Hk // Hkv, axis=2)) / np.sqrt(hd)
    logits = np.where(mask[:, None], logits, -1e30)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
    assert got == pytest.approx(sinks.first_token_share(probs, seg), rel=1e-5)
    np.testing.assert_allclose(np.asarray(st["map"]), probs[0, 0], *TOL_FP32)


# -- massive activations and residual sinks ---------------------------------------------------------

def test_resid_probes_find_a_planted_outlier_channel():
    rng = np.random.default_rng(2)
    h = rng.normal(size=(2, 16, 32)).astype(np.float32)
    h[:, :, 5] += 50.0  # residual sink: a fixed dim, large on every token
    h[1, 3, 9] = -1000.0  # a token-specific massive activation
    h[1, 10:, :] = 5000.0  # padding rows: excluded
    seg = np.ones((2, 16), np.int32)
    seg[1, 10:] = 0
    p = jax.device_get(resid_probes(jnp.asarray(h), jnp.asarray(seg)))
    assert float(p["resid/max_abs"]) == pytest.approx(1000.0)
    assert sinks.massive_activation(h[seg != 0]) == pytest.approx(1000.0)
    np.testing.assert_allclose(p["resid/channel_median_abs"],
                               sinks.channel_median_abs(h[seg != 0]), rtol=1e-6)
    assert sinks.residual_sink_dims(p["resid/channel_median_abs"]).tolist() == [5]
    assert p["resid/sample_abs"].shape == (16, 32)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 288, size=(BATCH, SEQ)).astype(np.int32)


def planted_model(cfg, channel=7, value=40.0):
    m = nnx.jit(lambda: Model(cfg, rngs=nnx.Rngs(0)))()
    m.embed.embedding[...] = m.embed.embedding[...].at[:, channel].set(value)
    return m


def test_model_probes_find_the_planted_sink_in_every_layer(tokens):
    cfg = tiny_model(attention=dict(gate="g1", gate_granularity="headwise"))
    model = planted_model(cfg)
    p = sinks.probe_forward(model, tokens)
    L = cfg.num_layers
    for key in sinks.SCALAR_KEYS:
        assert p[key].shape == (L,), key
    assert p["attn/map"].shape == (L, SEQ, SEQ) and p["resid/sample_abs"].shape == (L, SEQ, 64)
    assert (p["resid/max_abs"] >= 39.0).all()
    s = sinks.summarize(p)
    assert s["sink_dims"] == [[7]] * L
    assert 0.0 < s["first_token_share_mean"] < 1.0
    assert 0.0 < s["gate_mean_avg"] < 1.0 and 0.0 <= s["gate_frac_below_0.1_avg"] <= 1.0
    # by definition, on row 0 head 0 of layer 0 (the map is the whole sequence here)
    np.testing.assert_allclose(p["attn/map"][0].sum(-1), 1.0, rtol=1e-5)
    w = sinks.norm_weights(model, [7])
    assert w["attn_norm"].shape == (L, 1) and w["final_norm"].shape == (1,)

    # the scanned stack gives the same probes from the same parameters
    scan = nnx.eval_shape(lambda: Model(tiny_model(scan_layers=True, attention=dict(
        gate="g1", gate_granularity="headwise")), rngs=nnx.Rngs(0)))
    pure = nnx.to_pure_dict(nnx.state(model))
    pure["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[pure["layers"][i] for i in range(L)])
    st = nnx.state(scan)
    nnx.replace_by_pure_dict(st, pure)
    nnx.update(scan, st)
    ps = sinks.probe_forward(scan, tokens)
    for key in sinks.SCALAR_KEYS:
        np.testing.assert_allclose(ps[key], p[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert sinks.norm_weights(scan, [7])["mlp_norm"].shape == (L, 1)


def test_probes_stack_over_all_layers_next_to_moe_stats(tokens):
    cfg = tiny_model(moe=MoEConfig(num_experts=4, top_k=2, d_expert=32, first_dense_layers=1))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0))))
    _, aux = jax.eval_shape(lambda s, t: nnx.merge(graphdef, s)(t, probes=True), state, tokens)
    assert aux["router/counts"].shape[0] == 1  # MoE layers only
    assert aux["resid/max_abs"].shape == (2,) and aux["attn/first_token_share"].shape == (2,)
    assert "attn/gate_mean" not in aux


# -- norms ------------------------------------------------------------------------------------------

def np_rms(x, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def test_preaffine_and_gated_norm_against_numpy():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 32)).astype(np.float32) * 3
    pa = PreAffineRMSNorm(32)
    assert np.all(np.asarray(pa.pre_scale[...]) == 1.0)  # λ init 1: starts as plain RMSNorm
    lam, gam = rng.uniform(0.1, 4, 32).astype(np.float32), rng.normal(size=32).astype(np.float32)
    pa.pre_scale[...], pa.scale[...] = lam, gam
    np.testing.assert_allclose(np.asarray(pa(jnp.asarray(x))), gam * np_rms(lam * x), *TOL_FP32)

    gn = GatedNorm(32, rank=16, rngs=nnx.Rngs(0))
    assert gn.down.shape == (32, 16) and gn.up.shape == (16, 32)
    assert gn.down.get_metadata()["out_sharding"] == ("embed", None)
    down = rng.normal(size=(32, 16)).astype(np.float32) * 0.3
    up = rng.normal(size=(16, 32)).astype(np.float32) * 0.3
    gn.down[...], gn.up[...], gn.scale[...] = down, up, gam
    y = gam * np_rms(x)
    z = y @ down
    want = y / (1 + np.exp(-((z / (1 + np.exp(-z))) @ up)))
    np.testing.assert_allclose(np.asarray(gn(jnp.asarray(x))), want, *TOL_FP32)
    # zero-centred γ (Qwen3-Next form) multiplies by 1 + w
    zc = PreAffineRMSNorm(32, zero_centered=True)
    np.testing.assert_allclose(np.asarray(zc(jnp.asarray(x))), np_rms(x), *TOL_FP32)


# -- plots ------------------------------------------------------------------------------------------

def test_plots_write_pngs(tmp_path):
    out = [
        sinks.plot_layer_curves({"a": {"resid/max_abs": [1, 5, 3]}, "b": {"resid/max_abs": [1, 2, 2]}},
                                ["resid/max_abs"], str(tmp_path / "curves.png"), title="t"),
        sinks.plot_attention_map(causal_uniform(8), str(tmp_path / "map.png"), title="head 0"),
        sinks.plot_resid_heatmap(np.abs(np.random.default_rng(0).normal(size=(16, 32))),
                                 str(tmp_path / "heat.png")),
    ]
    assert all(os.path.getsize(p) > 1000 for p in out)
