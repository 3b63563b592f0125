"""W4A4 fake quantisation (moejax.analysis.quant) against a float64 numpy reference written from the
formulas: rounding (half to even), clipping, symmetric/asymmetric, group boundaries, all-zero rows;
the projection hook on a tiny model (which linears, nothing else, only inside the block)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.analysis import quant
from moejax.config import ConfigError, DeltaNetConfig
from moejax.layers import attention, deltanet, mlp
from moejax.layers.mlp import MLP
from moejax.model import Model
from moejax.testing import PROBE_TOKENS, tiny_model


# -- numpy reference --------------------------------------------------------------------------------

def np_fake_quant_row(x, bits, symmetric):
    """One slice (1-D) quantised and dequantised, float64, straight from the formulas."""
    x = np.asarray(x, np.float64)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = np.abs(x).max() / qmax
        if s == 0:
            return np.zeros_like(x)
        return np.clip(np.round(x / s), -qmax - 1, qmax) * s
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    s = (hi - lo) / (2 ** bits - 1)
    if s == 0:
        return np.zeros_like(x)
    z = np.round(-lo / s)
    return (np.clip(np.round(x / s) + z, 0, 2 ** bits - 1) - z) * s


def np_tokens(x, n_in, bits, symmetric):
    """Per token: every leading index's K = prod(last n_in dims) channels share one scale."""
    lead = x.shape[:x.ndim - n_in]
    flat = np.asarray(x, np.float64).reshape(int(np.prod(lead)), -1)
    return np.stack([np_fake_quant_row(r, bits, symmetric) for r in flat]).reshape(x.shape)


def np_weight_groups(w, n_in, bits, symmetric, group):
    """Per output column, consecutive runs of ``group`` input channels (the last one shorter)."""
    K = int(np.prod(w.shape[:n_in]))
    flat = np.asarray(w, np.float64).reshape(K, -1)
    out = np.zeros_like(flat)
    for n in range(flat.shape[1]):
        for start in range(0, K, group):
            out[start:start + group, n] = np_fake_quant_row(flat[start:start + group, n], bits,
                                                            symmetric)
    return out.reshape(w.shape)


# -- the quantisers ---------------------------------------------------------------------------------

def test_rounding_and_clipping_by_hand():
    # symmetric 4 bit, max 7 -> s = 1: 0.5 rounds to 0 and 2.5 to 2 (half to even), -1.4 to -1
    x = jnp.asarray([[0.0, 0.5, 2.5, -1.4, 7.0]])
    np.testing.assert_array_equal(quant.fake_quant(x, 4, symmetric=True), [[0, 0, 2, -1, 7]])
    # asymmetric 2 bit on [-2, 4]: s = 2, z = 1; 1/2 = 0.5 -> 0, 3/2 = 1.5 -> 2
    x = jnp.asarray([[-2.0, 1.0, 3.0, 4.0]])
    np.testing.assert_array_equal(quant.fake_quant(x, 2, symmetric=False), [[-2, 0, 4, 4]])
    # asymmetric 2 bit on [-1.5, 1.5]: s = 1, z = round(1.5) = 2; 1.5 -> 2 + 2 = 4, clipped to 3
    x = jnp.asarray([[-1.5, 1.5]])
    np.testing.assert_array_equal(quant.fake_quant(x, 2, symmetric=False), [[-2, 1]])
    # zero stays exactly representable asymmetrically even when every value is positive
    x = jnp.asarray([[0.0, 3.0, 15.0]])
    np.testing.assert_array_equal(quant.fake_quant(x, 4, symmetric=False), [[0, 3, 15]])


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 3, 8])
def test_fake_quant_rows_against_numpy(bits, symmetric):
    rng = np.random.default_rng(bits)
    x = rng.normal(size=(6, 40)).astype(np.float32)
    x[1] = 0.0  # a row of zeros (padding token): stays zero, no NaN
    x[2, 7] = 300.0  # a massive activation: its row's other channels collapse to few levels
    x[3] = np.abs(x[3])  # one-signed rows: asymmetric still represents 0
    x[4] = -np.abs(x[4])
    got = np.asarray(quant.fake_quant(jnp.asarray(x), bits, symmetric=symmetric))
    want = np.stack([np_fake_quant_row(r, bits, symmetric) for r in x])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.all(got[1] == 0) and np.isfinite(got).all()
    assert len(np.unique(got[0])) <= 2 ** bits  # at most 2^b levels per row
    if bits == 4:  # the outlier row: everything but the outlier rounds to zero (s = 300/7 or /15)
        assert np.count_nonzero(got[2]) == 1


def test_tokens_are_quantised_per_token_over_all_contracted_axes():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)  # [B,T,H,hd], n_in=2 -> K = 32
    x[0, 1] = 0.0
    spec = quant.QuantSpec()
    got = np.asarray(quant.quantize_tokens(jnp.asarray(x), 2, spec))
    np.testing.assert_allclose(got, np_tokens(x, 2, 4, True), rtol=1e-6, atol=1e-6)
    # one scale per token: scaling one token leaves the others' values untouched
    y = x.copy()
    y[1, 2] *= 50
    again = np.asarray(quant.quantize_tokens(jnp.asarray(y), 2, spec))
    np.testing.assert_array_equal(np.delete(again.reshape(6, -1), 5, 0),
                                  np.delete(got.reshape(6, -1), 5, 0))
    asym = quant.QuantSpec(act_symmetric=False, act_bits=3)
    np.testing.assert_allclose(np.asarray(quant.quantize_tokens(jnp.asarray(x), 1, asym)),
                               np_tokens(x, 1, 3, False), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,n_in,group", [((200, 6), 1, 128),  # groups [0,128) and [128,200)
                                              ((64, 5), 1, 128),  # one short group
                                              ((4, 48, 3), 2, 64),  # [H,hd,D]: K = 192 = 3 x 64
                                              ((256, 2), 1, 128)])
def test_weight_groups_against_numpy(shape, n_in, group):
    rng = np.random.default_rng(len(shape) + shape[0])
    w = rng.normal(size=shape).astype(np.float32)
    spec = quant.QuantSpec(group_size=group)
    got = np.asarray(quant.quantize_weight_groups(jnp.asarray(w), n_in, spec))
    np.testing.assert_allclose(got, np_weight_groups(w, n_in, 4, True, group), rtol=1e-6,
                               atol=1e-6)
    asym = quant.QuantSpec(group_size=group, weight_symmetric=False)
    np.testing.assert_allclose(np.asarray(quant.quantize_weight_groups(jnp.asarray(w), n_in, asym)),
                               np_weight_groups(w, n_in, 4, False, group), rtol=1e-6, atol=1e-6)


def test_an_outlier_only_coarsens_its_own_group():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(200, 3)).astype(np.float32)
    spec = quant.QuantSpec()
    base = np.asarray(quant.quantize_weight_groups(jnp.asarray(w), 1, spec))
    w[150, 1] = 1000.0  # inside the second (short) group of column 1
    hit = np.asarray(quant.quantize_weight_groups(jnp.asarray(w), 1, spec))
    np.testing.assert_array_equal(hit[:128], base[:128])  # the first group is untouched
    np.testing.assert_array_equal(hit[:, [0, 2]], base[:, [0, 2]])  # other columns too
    assert np.count_nonzero(hit[128:, 1]) == 1  # its own group collapses to the outlier


def test_spec_validation_names_the_field():
    with pytest.raises(ConfigError, match="quant.act_bits"):
        quant.QuantSpec(act_bits=1)
    with pytest.raises(ConfigError, match="quant.group_size"):
        quant.QuantSpec(group_size=0)
    assert quant.QuantSpec().label == "W4A4 (g128, w sym / a sym)"


# -- the hook ---------------------------------------------------------------------------------------

def test_mlp_under_the_hook_matches_numpy():
    cfg = tiny_model()
    layer = MLP(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(5)
    for var in (layer.gate, layer.up, layer.down):
        var[...] = jnp.asarray(rng.normal(size=var.shape) * 0.3, jnp.float32)
    x = rng.normal(size=(2, 5, cfg.d_model)).astype(np.float32)
    spec = quant.QuantSpec(group_size=32)  # two groups over D=64, four over F=128
    graphdef, state = nnx.split(layer)
    with quant.fake_quant_linears(spec) as trace:
        got = np.asarray(jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, x))
    assert trace.shapes == [(64, 128), (64, 128), (128, 64)]
    p = {k: np.asarray(getattr(layer, k)[...], np.float64) for k in ("gate", "up", "down")}
    q = lambda a: np_tokens(a, 1, 4, True)  # noqa: E731
    wq = lambda w: np_weight_groups(w, 1, 4, True, 32)  # noqa: E731
    g, u = q(x) @ wq(p["gate"]), q(x) @ wq(p["up"])
    h = g / (1 + np.exp(-g)) * u
    np.testing.assert_allclose(got, q(h) @ wq(p["down"]), rtol=2e-4, atol=2e-4)


def test_deltanet_projections_under_the_hook_match_numpy():
    """Gated DeltaNet's in_proj_qkvz and in_proj_ba see per-token INT4 inputs and g32 weights like
    the MLP's; its out_proj ([Hv,dv,D], Hv*dv = 32 contracted inputs) is hooked too."""
    cfg = tiny_model()
    dn = DeltaNetConfig(num_k_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=8)
    layer = deltanet.GatedDeltaNet(cfg, dn, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 5, cfg.d_model)).astype(np.float32)
    spec = quant.QuantSpec(group_size=32)
    graphdef, state = nnx.split(layer)
    with quant.fake_quant_linears(spec) as trace:
        got = jax.jit(lambda st, x: nnx.merge(graphdef, st)._project(x))(state, x)
        y = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x)[0])(state, x)
    W = 2 * 8 + 2 * 2 * 8  # per key head [q | k | v_r | z_r]; ba per key head [b_r | a_r]
    assert trace.shapes == [(64, 2 * W), (64, 2 * 4), (64, 2 * W), (64, 2 * 4), (32, 64)]
    assert deltanet.linear is mlp.linear and deltanet.linear.__name__ == "linear"  # restored
    xq = np_tokens(x, 1, 4, True)
    qkvz, ba = (xq @ np_weight_groups(np.asarray(w[...], np.float64).reshape(64, -1), 1, 4, True, 32)
                for w in (layer.in_proj_qkvz, layer.in_proj_ba))
    qkvz, ba = qkvz.reshape(2, 5, 2, W), ba.reshape(2, 5, 2, 4)
    want = (qkvz[..., :8], qkvz[..., 8:16], qkvz[..., 16:32].reshape(2, 5, 4, 8),
            qkvz[..., 32:].reshape(2, 5, 4, 8), ba[..., :2].reshape(2, 5, 4),
            ba[..., 2:].reshape(2, 5, 4))
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=2e-4, atol=2e-4)
    plain = np.asarray(jax.jit(lambda st, x: nnx.merge(graphdef, st)(x)[0])(state, x))
    assert np.abs(np.asarray(y) - plain).max() > 1e-4  # hooked forward != one traced after


@pytest.fixture(scope="module")
def gated_model():
    cfg = tiny_model(attention=dict(gate="g1"))
    return cfg, Model(cfg, rngs=nnx.Rngs(0))


def forward(model):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda st, t: nnx.merge(graphdef, st)(t)[0])(state, PROBE_TOKENS))


def test_hook_quantises_every_block_projection_and_nothing_else(gated_model):
    cfg, model = gated_model
    plain = forward(model)
    with quant.fake_quant_linears(quant.QuantSpec()) as trace:
        w4a4 = forward(model)
    D, F, H, Hkv, hd = cfg.d_model, cfg.d_ff, 4, 2, 16
    per_layer = [(D, H * hd), (D, H * hd), (D, Hkv * hd), (D, Hkv * hd), (H * hd, D),
                 (D, F), (D, F), (F, D)]  # q, gate W_θ, k, v, o; MLP gate, up, down
    assert sorted(trace.shapes) == sorted(per_layer * cfg.num_layers)  # no (D, vocab) LM head
    assert attention.linear is mlp.linear and attention.linear.__name__ == "linear"  # restored
    assert np.abs(w4a4 - plain).max() > 1e-3  # the hook changed the forward...
    np.testing.assert_array_equal(forward(model), plain)  # ...and only inside the block
    with quant.fake_quant_linears(quant.QuantSpec(act_bits=16, weight_bits=16)):
        fine = forward(model)
    np.testing.assert_allclose(fine, plain, rtol=1e-2, atol=2e-3)  # 16 bit ≈ no quantisation
    assert np.abs(fine - plain).max() < np.abs(w4a4 - plain).max() / 10


def test_evaluate_refuses_moe_models():
    moe = types.SimpleNamespace(cfg=types.SimpleNamespace(model=types.SimpleNamespace(
        moe=types.SimpleNamespace(enabled=True))))
    with pytest.raises(ValueError, match="dense models only"):
        quant.evaluate_w4a4(moe, None)
