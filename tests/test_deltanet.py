"""Gated DeltaNet (moejax.kernels.gated_delta, moejax.layers.deltanet): the chunked and recurrent
forms against a float64 per-token numpy loop (values; gradients against float64 central
differences of the loop), with packed documents, padding and a carried state; the layer against HF
transformers' Qwen3NextGatedDeltaNet with the same weights, its cached decoding against its full
forward, packed rows against separate documents, and its run sharded over 8 devices (heads on
``tensor``) against one device."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen3NextConfig
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

from moejax.config import ConfigError, MeshConfig
from moejax.kernels import gated_delta as gd
from moejax.layers import deltanet as dnl
from moejax.mesh import make_mesh, rules_for, use_mesh
from moejax.testing import TOL_SHARDED_FP32, tiny_model

B, H, DK, DV = 2, 2, 8, 6
LENGTHS = (1, 63, 64, 130)
FORMS = {  # name -> the form under test, all with the kernel's one signature
    "chunked64": functools.partial(gd.chunked, chunk=64),
    "chunked16": functools.partial(gd.chunked, chunk=16),
    "recurrent": gd.recurrent,
}


# -- the float64 reference ----------------------------------------------------------------------

def loop_reference(q, k, v, g, beta, seg, s0):
    """The gated delta rule token by token in float64: padding (segment 0) is skipped, the state
    resets when a token's segment differs from the row's previous non-padding token's."""
    Bn, T, Hn, dk = q.shape
    q = q.astype(np.float64) / np.sqrt(dk)
    k, v, g, beta = (x.astype(np.float64) for x in (k, v, g, beta))
    o = np.zeros((*q.shape[:3], v.shape[-1]))
    final = np.array(s0, np.float64)
    for b in range(Bn):
        S, last = final[b], None
        for t in range(T):
            if seg[b, t] == 0:
                continue
            if last is not None and last != seg[b, t]:
                S[:] = 0.0
            last = seg[b, t]
            for h in range(Hn):
                S[h] *= np.exp(g[b, t, h])
                delta = beta[b, t, h] * (v[b, t, h] - S[h].T @ k[b, t, h])
                S[h] += np.outer(k[b, t, h], delta)
                o[b, t, h] = S[h].T @ q[b, t, h]
    return o, final


def segments(T: int) -> np.ndarray:
    """Row 0: three packed documents with inner padding; row 1: left and right padding."""
    seg = np.ones((B, T), np.int32)
    if T == 1:
        seg[1] = 0
        return seg
    seg[0, T // 3:] = 2
    seg[0, T // 3 + 2:T // 3 + 4] = 0  # padding inside document 2
    seg[0, 2 * T // 3:] = 3
    seg[1, :2] = 0
    seg[1, T - 3:] = 0
    return seg


def kernel_inputs(T: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa
    return dict(q=unit(rng.normal(size=(B, T, H, DK))), k=unit(rng.normal(size=(B, T, H, DK))),
                v=rng.normal(size=(B, T, H, DV)).astype(np.float32),
                g=-rng.uniform(0.01, 1.5, (B, T, H)).astype(np.float32),
                beta=rng.uniform(0.05, 1.0, (B, T, H)).astype(np.float32),
                initial_state=rng.normal(size=(B, H, DK, DV)).astype(np.float32))


ARGS = ("q", "k", "v", "g", "beta", "initial_state")


def reference_loss(x: dict, seg, w_o, w_s) -> float:
    o, s = loop_reference(x["q"], x["k"], x["v"], x["g"], x["beta"], seg, x["initial_state"])
    return float(np.sum(o * w_o) + np.sum(s * w_s))


@functools.lru_cache(maxsize=None)
def loss_and_grad(form: str):
    """jit(value_and_grad) of sum(o * w_o) + sum(state * w_s) w.r.t. every input, per form."""
    def loss(x, seg, w_o, w_s):
        o, s = FORMS[form](x["q"], x["k"], x["v"], x["g"], x["beta"],
                           initial_state=x["initial_state"], segment_ids=seg)
        return jnp.sum(o * w_o) + jnp.sum(s * w_s), (o, s)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope="module", params=LENGTHS, ids=lambda T: f"T{T}")
def case(request):
    """Inputs, cotangents and each form's (outputs, state, gradients) at one length."""
    T = request.param
    x, seg = kernel_inputs(T), segments(T)
    rng = np.random.default_rng(1)
    w_o = rng.normal(size=(B, T, H, DV)).astype(np.float32)
    w_s = rng.normal(size=(B, H, DK, DV)).astype(np.float32)
    runs = {}
    for form in FORMS:
        (_, (o, s)), grads = loss_and_grad(form)(x, seg, w_o, w_s)
        runs[form] = (np.asarray(o), np.asarray(s), {a: np.asarray(grads[a]) for a in ARGS})
    return dict(T=T, x=x, seg=seg, w_o=w_o, w_s=w_s, runs=runs)


# -- kernel -------------------------------------------------------------------------------------

def test_every_form_equals_the_float64_loop(case):
    x, seg = case["x"], case["seg"]
    want_o, want_s = loop_reference(x["q"], x["k"], x["v"], x["g"], x["beta"], seg,
                                    x["initial_state"])
    assert np.abs(want_o).max() > 0.1  # the comparison is not between zeros
    for form, (o, s, _) in case["runs"].items():
        np.testing.assert_allclose(o, want_o, rtol=1e-5, atol=2e-5, err_msg=form)
        np.testing.assert_allclose(s, want_s, rtol=1e-5, atol=2e-5, err_msg=form)
        assert not o[seg == 0].any(), form  # padding outputs zeros


def test_gradients_equal_float64_central_differences(case):
    """<grad, d> of every form against (L(x + eps d) - L(x - eps d)) / 2 eps of the float64 loop,
    one random direction d per input; the forms' full gradients agree with each other."""
    x, seg = case["x"], case["seg"]
    rng, eps = np.random.default_rng(2), 1e-4
    runs = case["runs"]
    for name in ARGS:
        d = rng.normal(size=x[name].shape)
        hi = {**x, name: x[name].astype(np.float64) + eps * d}
        lo = {**x, name: x[name].astype(np.float64) - eps * d}
        want = (reference_loss(hi, seg, case["w_o"], case["w_s"])
                - reference_loss(lo, seg, case["w_o"], case["w_s"])) / (2 * eps)
        for form, (_, _, grads) in runs.items():
            got = float(np.sum(grads[name].astype(np.float64) * d))
            assert got == pytest.approx(want, rel=1e-4, abs=1e-4), (form, name)
        for form in ("chunked64", "chunked16"):
            np.testing.assert_allclose(runs[form][2][name], runs["recurrent"][2][name],
                                       rtol=1e-4, atol=1e-5, err_msg=f"{form} {name}")


def test_padding_tokens_get_zero_gradient(case):
    pad = case["seg"] == 0
    for form, (_, _, grads) in case["runs"].items():
        for name in ("q", "k", "v", "g", "beta"):
            assert not grads[name][pad].any(), (form, name)


def test_segment_resets_follow_the_last_non_padding_token():
    seg = np.array([[0, 1, 1, 0, 1, 2, 0, 0, 2, 3]], np.int32)
    reset, valid = gd.segment_resets(jnp.asarray(seg))
    np.testing.assert_array_equal(valid[0], seg[0] != 0)
    np.testing.assert_array_equal(reset[0], [0, 0, 0, 0, 0, 1, 0, 0, 0, 1])


@pytest.mark.parametrize("C", [1, 5, 40, 64])  # one block, series only, not /16, 4 blocks of 16
def test_unit_lower_solve_equals_numpy_solve(C):
    rng = np.random.default_rng(C)
    a = np.tril(rng.normal(size=(3, C, C)) * 0.3, -1)
    r = rng.normal(size=(3, C, 7))
    want = np.linalg.solve(np.eye(C) + a, r)
    got = np.asarray(gd.unit_lower_solve(jnp.asarray(a, jnp.float32), jnp.asarray(r, jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_recurrent_step_is_one_token_of_the_loop():
    x = kernel_inputs(1, seed=4)
    o, s = jax.jit(gd.recurrent_step)(x["initial_state"], *(x[n][:, 0] for n in ARGS[:5]))
    want_o, want_s = loop_reference(*(x[n] for n in ARGS[:5]), np.ones((B, 1), np.int32),
                                    x["initial_state"])
    np.testing.assert_allclose(np.asarray(o), want_o[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s), want_s, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_keep_an_fp32_state():
    x, seg = kernel_inputs(40, seed=3), segments(40)
    bf = {n: jnp.asarray(x[n], jnp.bfloat16) for n in ARGS[:5]}
    o, s = jax.jit(gd.chunked, static_argnames="chunk")(
        **bf, chunk=16, initial_state=x["initial_state"], segment_ids=seg)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    r = {n: np.asarray(bf[n], np.float32) for n in bf}  # the same bf16-rounded inputs
    want_o, want_s = loop_reference(r["q"], r["k"], r["v"], r["g"], r["beta"], seg,
                                    x["initial_state"])
    np.testing.assert_allclose(np.asarray(s), want_s, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(o, np.float32), want_o, rtol=1e-2, atol=1e-2)


# -- layer --------------------------------------------------------------------------------------

D, HK, HV, LDK, LDV, LT = 32, 2, 4, 8, 6, 37
DN = dnl.DeltaNetConfig(num_k_heads=HK, num_v_heads=HV, head_k_dim=LDK, head_v_dim=LDV, chunk=16)


def hf_layer():
    """A tiny random HF Qwen3NextGatedDeltaNet (fp32) with non-trivial norm weight and dt_bias."""
    cfg = Qwen3NextConfig(hidden_size=D, linear_num_key_heads=HK, linear_num_value_heads=HV,
                          linear_key_head_dim=LDK, linear_value_head_dim=LDV,
                          linear_conv_kernel_dim=DN.conv_kernel, num_hidden_layers=1,
                          layer_types=["linear_attention"], rms_norm_eps=1e-6)
    torch.manual_seed(0)
    layer = Qwen3NextGatedDeltaNet(cfg, 0).float()
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
        layer.dt_bias.uniform_(0.5, 1.5)
    return layer


def import_hf_weights(layer: dnl.GatedDeltaNet, hf) -> None:
    """HF's tensors into ours: transposes and reshapes only (the split orders are HF's)."""
    t = lambda p: p.detach().numpy()  # noqa: E731
    layer.in_proj_qkvz[...] = t(hf.in_proj_qkvz.weight).T.reshape(D, HK, -1)
    layer.in_proj_ba[...] = t(hf.in_proj_ba.weight).T.reshape(D, HK, -1)
    layer.conv[...] = t(hf.conv1d.weight)[:, 0, :].T
    layer.A_log[...] = t(hf.A_log)
    layer.dt_bias[...] = t(hf.dt_bias)
    layer.norm[...] = t(hf.norm.weight)
    layer.out_proj[...] = t(hf.out_proj.weight).T.reshape(HV, LDV, D)


def make_layer(dn=DN):
    return dnl.GatedDeltaNet(tiny_model(d_model=D), dn, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def layers():
    """(HF layer, our layer with its weights)."""
    hf = hf_layer()
    ours = make_layer()
    import_hf_weights(ours, hf)
    return hf, ours


@pytest.fixture(scope="module")
def hidden():
    return np.random.default_rng(5).normal(size=(B, LT, D)).astype(np.float32)


def run(layer, x, seg=None, cache=None):
    """jit(layer)(x, segment_ids, cache) -> (y, cache) as a pure function of the layer's state."""
    graphdef, state = nnx.split(layer)
    return _run(graphdef, state, x, seg, cache)


@functools.partial(jax.jit, static_argnums=0)
def _run(graphdef, state, x, seg, cache):
    return nnx.merge(graphdef, state)(x, segment_ids=seg, cache=cache)


def test_layer_matches_hf_qwen3_next(layers, hidden):
    hf, ours = layers
    with torch.no_grad():
        want = hf(torch.from_numpy(hidden)).numpy()
    got, cache = run(ours, hidden)
    assert cache is None and np.abs(want).max() > 0.1
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_decode_one_token_at_a_time_equals_the_forward(layers, hidden):
    """A right-padded prefill (rows of 9 and 5 tokens) then one token per step, each row's tokens
    following its own prompt, equals the chunked forward of the unpadded rows."""
    _, ours = layers
    full = np.asarray(run(ours, hidden)[0])
    lens = np.array([9, 5])
    prompt_seg = (np.arange(9)[None] < lens[:, None]).astype(np.int32)
    prompt = np.where(prompt_seg[..., None] > 0, hidden[:, :9], 7.0)  # padding is ignored
    y, cache = run(ours, prompt, prompt_seg, ours.init_cache(B))
    assert cache.conv_state.shape == (B, DN.conv_dim, DN.conv_kernel - 1)
    assert cache.recurrent_state.shape == (B, HV, LDK, LDV)
    rows = np.arange(B)
    for b in rows:
        np.testing.assert_allclose(np.asarray(y)[b, :lens[b]], full[b, :lens[b]], rtol=1e-5,
                                   atol=1e-5)
    for i in range(LT - 9):
        y, cache = run(ours, hidden[rows, lens + i][:, None], None, cache)
        np.testing.assert_allclose(np.asarray(y)[:, 0], full[rows, lens + i], rtol=1e-5,
                                   atol=1e-5, err_msg=f"step {i}")


def test_recurrent_impl_equals_chunked(layers, hidden):
    _, ours = layers
    rec = make_layer(dnl.DeltaNetConfig(**{**DN.__dict__, "impl": "recurrent"}))
    nnx.update(rec, nnx.state(ours))
    np.testing.assert_allclose(np.asarray(run(rec, hidden)[0]), np.asarray(run(ours, hidden)[0]),
                               rtol=1e-5, atol=1e-5)


def test_packed_row_equals_separate_documents(layers, hidden):
    """Documents of 11 and 20 tokens packed in one row with padding after each (conv taps and
    state never cross them) equal each document run alone."""
    _, ours = layers
    a, b = hidden[0, :11], hidden[1, :20]
    pad = np.zeros((3, D), np.float32)
    packed = np.concatenate([a, pad, b, pad])[None]
    seg = np.concatenate([np.full(11, 1), np.zeros(3), np.full(20, 2), np.zeros(3)])[None]
    got = np.asarray(run(ours, packed, seg.astype(np.int32))[0])[0]
    alone_a = np.asarray(run(ours, a[None])[0])[0]
    alone_b = np.asarray(run(ours, b[None])[0])[0]
    np.testing.assert_allclose(got[:11], alone_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[14:34], alone_b, rtol=1e-5, atol=1e-5)
    assert not got[11:14].any() and not got[34:].any()


def layer_loss_and_grads(layer, x, seg):
    """(y, d sum(y*w)/d params, d/dx) of the layer (one compile per mesh)."""
    graphdef, state = nnx.split(layer)
    w = jnp.asarray(np.random.default_rng(6).normal(size=x.shape), jnp.float32)

    def loss(st, xx):
        y, _ = nnx.merge(graphdef, st)(xx, segment_ids=seg)
        return jnp.sum(y * w), y
    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x)
    return np.asarray(y), jax.tree.map(np.asarray, grads)


def test_sharded_over_heads_equals_one_device(layers):
    """data=4 x tensor=2 (key and value heads split over ``tensor``): outputs and gradients
    (every parameter and the input) equal the single-device run."""
    _, ours = layers
    x = np.random.default_rng(7).normal(size=(4, 40, D)).astype(np.float32)
    seg = np.ones((4, 40), np.int32)
    seg[1, 25:] = 2
    seg[2, 30:] = 0
    want_y, want_g = layer_loss_and_grads(ours, x, seg)
    mcfg = MeshConfig(data=4, tensor=2)
    mesh = make_mesh(mcfg)
    with use_mesh(mesh, rules_for(mcfg)):
        sharded = nnx.eval_shape(make_layer)
        shardings = nnx.get_named_sharding(nnx.state(sharded), mesh)
        assert shardings["out_proj"].spec[0] == "tensor"
        assert shardings["in_proj_qkvz"].spec[1] == "tensor"
        nnx.update(sharded, jax.device_put(nnx.state(ours), shardings))
        got_y, got_g = layer_loss_and_grads(sharded, x, seg)
    np.testing.assert_allclose(got_y, want_y, *TOL_SHARDED_FP32)
    flat_want = jax.tree.leaves_with_path(want_g)
    for (path, w), g in zip(flat_want, jax.tree.leaves(got_g)):
        scale = np.abs(w).max()
        assert scale > 0, path
        # float32 sums over 160 positions in another order: the error scales with the tensor's
        # largest entries, not each entry (AVX-512 hosts: 2e-5 on an entry of 0.07 beside 17)
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale, err_msg=str(path))


@pytest.mark.parametrize("field,value,needle", [
    ("num_v_heads", 3, "num_v_heads"), ("impl", "scan", "impl"), ("conv_kernel", 1, "conv_kernel"),
    ("chunk", 0, "chunk"), ("head_k_dim", -1, "head_k_dim")])
def test_config_validation_names_the_field(field, value, needle):
    with pytest.raises(ConfigError, match=f"model.deltanet.{needle}"):
        dnl.DeltaNetConfig(**{field: value})
