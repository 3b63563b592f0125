"""kernels.attention beyond the reference: the cuDNN call form (run on CPU with
implementation='xla'), Pallas splash attention (interpret mode), the 'auto' resolution table, and
compile checks for accelerators this machine does not have (CUDA lowering; TPU AOT compile when
libtpu is installed)."""

import contextlib
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import kernels
from moejax.kernels import attention_gpu, attention_tpu, reference

B, T, H, HKV, HD = 2, 128, 4, 2, 8  # splash tiles need T % 128 == 0


def np_attention(q, k, v, qseg, kvseg, qpos, kvpos):
    """float64 loop: query (b,t,h) reads kv head h // (H/Hkv) at visible keys; padding rows 0."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    G = q.shape[2] // k.shape[2]
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        for t in range(q.shape[1]):
            if qseg[b, t] == 0:
                continue
            vis = (kvpos[b] <= qpos[b, t]) & (kvseg[b] == qseg[b, t])
            for h in range(q.shape[2]):
                s = k[b, vis, h // G] @ q[b, t, h] / np.sqrt(q.shape[-1])
                p = np.exp(s - s.max())
                out[b, t, h] = (p / p.sum()) @ v[b, vis, h // G]
    return out


def packed_rows():
    """Row 0: one document over the whole row. Row 1: three documents, then 20 padding tokens
    (segment 0); positions restart per document."""
    seg = np.ones((B, T), np.int32)
    pos = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    for sid, (a, b) in enumerate([(0, 40), (40, 41), (41, 108)], start=1):
        seg[1, a:b], pos[1, a:b] = sid, np.arange(b - a)
    seg[1, 108:], pos[1, 108:] = 0, np.arange(T - 108)
    return seg, pos


@pytest.fixture(scope="module")
def operands():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(B, T, H, HD)).astype(np.float32)
    k = rng.normal(size=(B, T, HKV, HD)).astype(np.float32)
    v = rng.normal(size=(B, T, HKV, HD)).astype(np.float32)
    ct = rng.normal(size=(B, T, H, HD)).astype(np.float32)  # output cotangent
    seg, pos = packed_rows()
    return q, k, v, ct, seg, pos


def out_and_grads(fn, q, k, v, ct):
    """fn(q, k, v) -> [B,T,H,hd]; returns (out, (dq, dk, dv)) for cotangent ct, one jit."""
    def f(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(jnp.asarray(ct, out.dtype))
    return jax.tree.map(np.asarray, jax.jit(f)(q, k, v))


@pytest.fixture(scope="module")
def reference_result(operands):
    q, k, v, ct, seg, pos = operands
    fn = lambda q, k, v: reference.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                             q_positions=pos, kv_positions=pos)
    return out_and_grads(fn, q, k, v, ct)


def check_against_reference(got, reference_result, operands, tol=2e-5):
    q, k, v, ct, seg, pos = operands
    out, grads = got
    np.testing.assert_allclose(out, np_attention(q, k, v, seg, seg, pos, pos), rtol=tol, atol=tol)
    assert np.all(out[seg == 0] == 0) and np.abs(out).sum() > 0
    for g, r in zip(grads, reference_result[1]):
        np.testing.assert_allclose(g, r, rtol=tol, atol=tol)


# --- the cuDNN call form, numerics through jax.nn.dot_product_attention(implementation='xla')


def test_cudnn_form_matches_reference_packed_padded_gqa(operands, reference_result):
    """mask [B,1,T,S] + is_causal: causal, packed segments, padding rows, GQA; forward and grads."""
    q, k, v, ct, seg, pos = operands
    fn = lambda q, k, v: attention_gpu.attention(
        q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos,
        self_attention=True, implementation="xla")
    check_against_reference(out_and_grads(fn, q, k, v, ct), reference_result, operands)


def test_cudnn_form_with_kv_cache_positions():
    """Not self-attention (a KV cache: 3 new queries over 8 slots, some empty): the position mask
    goes into the mask, is_causal stays off; equals the float64 loop."""
    rng = np.random.default_rng(1)
    q = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
    k, v = (rng.normal(size=(2, 8, 2, 8)).astype(np.float32) for _ in range(2))
    kvseg = np.array([[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]], np.int32)
    kvpos = np.array([[0, 1, 2, 3, 4, 0, 0, 0], [0, 1, 2, 3, 4, 5, 6, 0]], np.int32)
    qseg = np.array([[1, 1, 0], [1, 1, 1]], np.int32)
    qpos = np.array([[3, 4, 0], [4, 5, 6]], np.int32)
    out = attention_gpu.attention(q, k, v, q_segment_ids=qseg, kv_segment_ids=kvseg,
                                  q_positions=qpos, kv_positions=kvpos, implementation="xla")
    np.testing.assert_allclose(np.asarray(out), np_attention(q, k, v, qseg, kvseg, qpos, kvpos),
                               rtol=2e-5, atol=2e-5)


def test_cudnn_lowers_for_cuda_with_causal_mask_type(monkeypatch):
    """No GPU here: lower the training call for CUDA (jax's cuDNN version probe stubbed, as there is
    no CUDA plugin) and read the custom calls: the causal mask type (so cuDNN skips the upper
    triangle) plus one [B,1,T,S] bias for the segments, and its backward."""
    fa = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
    q = jnp.zeros((B, T, H, 64), jnp.bfloat16)
    kv = jnp.zeros((B, T, HKV, 64), jnp.bfloat16)
    seg, pos = (jnp.asarray(a) for a in packed_rows())

    def step(q, k, v):
        f = lambda q, k, v: jnp.sum(attention_gpu.attention(
            q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos,
            self_attention=True).astype(jnp.float32))
        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)
    text = jax.jit(step).trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r"custom_call @(__cudnn\$\w+)\(", text)
    assert sorted(calls) == ["__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"]
    assert text.count(r"mask_type\22: \22CAUSAL") == 2
    assert f"tensor<{B}x1x{T}x{T}xbf16>" in text  # one mask-bias for all heads


# --- Pallas splash attention, interpret mode


def test_splash_interpret_matches_reference_packed_padded_gqa(operands, reference_result):
    """Splash (shared-kv GQA, causal MultiHeadMask, segment ids) in interpret mode: forward equals
    the float64 loop and gradients equal the reference; padding queries give zeros."""
    q, k, v, ct, seg, pos = operands
    fn = lambda q, k, v: attention_tpu.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                                 interpret=True)
    check_against_reference(out_and_grads(fn, q, k, v, ct), reference_result, operands)


def test_splash_rejects_untileable_lengths_and_sinks():
    q = jnp.zeros((1, 100, 4, 8))
    kv = jnp.zeros((1, 100, 2, 8))
    ids = jnp.ones((1, 100), jnp.int32)
    with pytest.raises(ValueError, match="multiple of 128"):
        attention_tpu.attention(q, kv, kv, q_segment_ids=ids, kv_segment_ids=ids)
    for bad, match in ((dict(sink_logits=jnp.zeros(4)), "sink"),
                       (dict(return_stats=True), "probes need impl='xla'")):
        with pytest.raises(ValueError, match=match):
            kernels.attention(q, kv, kv, q_segment_ids=ids, kv_segment_ids=ids, q_positions=ids,
                              kv_positions=ids, impl="splash", self_attention=True, **bad)


# --- 'auto' resolution


@pytest.mark.parametrize("backend,dtype,call,want", [
    ("cpu", jnp.bfloat16, {}, "xla"),
    ("gpu", jnp.bfloat16, {}, "cudnn"),
    ("gpu", jnp.float16, {}, "cudnn"),
    ("gpu", jnp.float32, {}, "xla"),
    ("gpu", jnp.bfloat16, dict(needs_reference=True), "xla"),  # sink or probes
    ("tpu", jnp.bfloat16, dict(seq_len=256), "splash"),
    ("tpu", jnp.float32, dict(seq_len=128), "splash"),
    ("tpu", jnp.bfloat16, dict(seq_len=100), "xla"),  # splash cannot tile it
    ("tpu", jnp.bfloat16, dict(seq_len=256, self_attention=False), "xla"),  # KV cache
    ("tpu", jnp.bfloat16, dict(seq_len=256, needs_reference=True), "xla"),
])
def test_attention_auto_resolution_table(monkeypatch, backend, dtype, call, want):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert kernels.resolve_attention_impl("auto", dtype, **call) == want
    for explicit in ("xla", "cudnn", "splash"):
        assert kernels.resolve_attention_impl(explicit, dtype, **call) == explicit


def test_auto_on_cpu_runs_the_reference_and_sinks_resolve_to_it(operands):
    q, k, v, _, seg, pos = operands
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos)
    want = reference.attention(q, k, v, self_attention=True, **kw)  # the causal-blocked form
    np.testing.assert_array_equal(kernels.attention(q, k, v, impl="auto", self_attention=True,
                                                    **kw), want)
    np.testing.assert_allclose(want, reference.attention(q, k, v, **kw), rtol=1e-5, atol=1e-6)
    sink = jnp.full((H,), 0.5)
    np.testing.assert_array_equal(
        kernels.attention(q, k, v, impl="auto", sink_logits=sink, **kw),
        reference.attention(q, k, v, sink_logits=sink, **kw))


# --- TPU: ahead-of-time compile for a v5e:2x2 topology (needs libtpu in the environment)


@pytest.fixture(scope="module")
def v5e_mesh():
    """A (data 2, tensor 2) mesh over a v5e:2x2 topology description; skips without libtpu."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install 'jax[tpu]==<jax version>')")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata queries
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another process may hold libtpu
    from jax.experimental import topologies
    from jax.sharding import Mesh
    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
    return Mesh(np.array(topo.devices).reshape(2, 1, 1, 2), ("data", "fsdp", "expert", "tensor"))


def compile_for_tpu(mesh, fn, *args) -> str:
    """Compiled text of jit(fn) for TPU, kernels resolved for 'tpu'; with a mesh, the mesh and
    the logical rules are active (else the args carry their own device)."""
    from flax import nnx

    from moejax.mesh import RULES
    # conftest's global 'highest' precision would ask Mosaic for fp32 contraction of bf16
    # operands (read at lowering time), which it rejects; production runs use the default.
    # The persistent cache cannot read TPU executables back on a CPU host: keep them out of it.
    min_secs = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)  # write no entry
    try:
        with contextlib.ExitStack() as stack:
            if mesh is not None:
                stack.enter_context(jax.set_mesh(mesh))
                stack.enter_context(nnx.logical_axis_rules(RULES["default"]))
            stack.enter_context(jax.default_matmul_precision("default"))
            stack.enter_context(kernels.target_platform("tpu"))
            return jax.jit(fn).lower(*args).compile().as_text()
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs)


@pytest.mark.optimized  # judged as the real TPU compile (tests/conftest.py)
def test_auto_attention_forward_backward_compiles_to_splash_for_tpu_v5e(v5e_mesh):
    """impl='auto' for TPU is splash: forward+backward, batch over data and heads over tensor,
    compiles with the Pallas kernels (tpu_custom_call: forward, dq, dkv) and no all-gather (the
    shard_map keeps the kernel local; without it Mosaic refuses to be partitioned)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from moejax.mesh import BATCH_AXES
    Bt, Tt, hd = 4, 256, 128

    def spec(shape, dtype, *axes):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(v5e_mesh, P(*axes)))
    qkv = [spec((Bt, Tt, h, hd), jnp.bfloat16, BATCH_AXES, None, "tensor", None)
           for h in (H, HKV, HKV)]
    ids = [spec((Bt, Tt), jnp.int32, BATCH_AXES, None)] * 2

    def step(q, k, v, seg, pos):
        f = lambda q, k, v: jnp.sum(kernels.attention(
            q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos,
            impl="auto", self_attention=True).astype(jnp.float32) ** 2)
        return jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)
    text = compile_for_tpu(v5e_mesh, step, *qkv, *ids)
    assert text.count("tpu_custom_call") >= 3
    assert "all-gather" not in text


@pytest.mark.optimized  # judged as the real TPU compile (tests/conftest.py)
def test_auto_gmm_forward_backward_compiles_to_megablox_for_tpu(v5e_mesh):
    """gmm_impl='auto' for TPU is the Pallas body (megablox here, no tokamax): fwd+bwd compiles
    with its kernels (gmm, dlhs gmm, drhs tgmm) on one chip (the MoE layer calls it per shard)."""
    one = jax.sharding.SingleDeviceSharding(v5e_mesh.devices.flat[0])
    lhs = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16, sharding=one)
    rhs = jax.ShapeDtypeStruct((4, 256, 256), jnp.bfloat16, sharding=one)
    gs = jax.ShapeDtypeStruct((4,), jnp.int32, sharding=one)

    def step(a, b, g):
        f = lambda a, b: jnp.sum(kernels.gmm(a, b, g, impl="auto",
                                             preferred_element_type=jnp.float32) ** 2)
        return jax.grad(f, argnums=(0, 1))(a, b)
    text = compile_for_tpu(None, step, lhs, rhs, gs)
    assert text.count("tpu_custom_call") >= 3


# --- the Attention layer with impl='splash' (interpret mode), one device and a sharded mesh


@pytest.fixture
def interpret_splash(monkeypatch):
    import functools
    monkeypatch.setattr(attention_tpu, "attention",
                        functools.partial(attention_tpu.attention, interpret=True))


@pytest.mark.slow  # ~10 s of interpret-mode kernels on 2 cores, 30 s cold under contention
def test_layer_with_splash_equals_reference_single_and_sharded(interpret_splash):
    """The layer passes self_attention without a cache, so splash runs; its output and input
    gradient equal impl='xla' on one device and on a (data 2, tensor 2) mesh (the shard_map
    path); with a KV cache splash falls back to the reference (same numbers as 'xla')."""
    from flax import nnx

    from moejax.config import MeshConfig
    from moejax.layers.attention import Attention, LayerCache
    from moejax.mesh import make_mesh, rules_for, use_mesh
    from moejax.testing import tiny_model
    rng = np.random.default_rng(2)
    x = rng.normal(size=(B, T, 64)).astype(np.float32)
    ct = rng.normal(size=(B, T, 64)).astype(np.float32)
    seg, pos = packed_rows()

    def layer(impl):
        return Attention(tiny_model(attention=dict(impl=impl)), rngs=nnx.Rngs(0))

    def out_and_dx(model, x):
        f = lambda x: model(x, positions=pos, segment_ids=seg)[0]
        out, vjp = jax.vjp(f, x)
        return out, vjp(jnp.asarray(ct))[0]
    want = jax.tree.map(np.asarray, nnx.jit(out_and_dx)(layer("xla"), x))
    got = jax.tree.map(np.asarray, nnx.jit(out_and_dx)(layer("splash"), x))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)
    mcfg = MeshConfig(data=2, tensor=2)
    with use_mesh(make_mesh(mcfg, jax.devices()[:4]), rules_for(mcfg)):
        sharded = jax.tree.map(np.asarray, nnx.jit(out_and_dx)(layer("splash"), x))
    for g, w in zip(sharded, want):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)

    S = 8  # one decode step over a cache of 8 slots: no splash (T != S, not self-attention)
    cache = LayerCache(k=jnp.asarray(rng.normal(size=(B, 2, S, 16)), jnp.float32),
                       v=jnp.asarray(rng.normal(size=(B, 2, S, 16)), jnp.float32),
                       slots=jnp.full((B, 1), 5), kv_positions=jnp.tile(jnp.arange(S), (B, 1)),
                       kv_segment_ids=jnp.ones((B, S), jnp.int32))
    one = jnp.ones((B, 1), jnp.int32)
    step = lambda m: m(x[:, :1], positions=5 * one, segment_ids=one, cache=cache)[0]
    np.testing.assert_allclose(np.asarray(step(layer("splash"))), np.asarray(step(layer("xla"))),
                               rtol=1e-6, atol=1e-6)


def test_config_takes_the_new_impls_and_keeps_the_sink_rule():
    from moejax.config import AttentionConfig, ConfigError
    assert AttentionConfig().impl == "auto"
    assert AttentionConfig(impl="splash").impl == "splash"
    assert AttentionConfig(impl="auto", sink=True).sink  # auto resolves to the reference
    for impl in ("cudnn", "splash"):
        with pytest.raises(ConfigError, match="model.attention.sink"):
            AttentionConfig(impl=impl, sink=True)


def test_splash_shard_specs_follow_the_rules_and_replicate_what_does_not_divide():
    """Batch over (data, fsdp, expert), heads over tensor; a batch or head count that does not
    divide its axes is replicated instead of failing inside shard_map; length is never split."""
    from jax.sharding import PartitionSpec as P

    from moejax.config import MeshConfig
    from moejax.mesh import BATCH_AXES, make_mesh, rules_for, use_mesh
    mcfg = MeshConfig(data=2, tensor=4)
    mesh = make_mesh(mcfg)
    with use_mesh(mesh, rules_for(mcfg)):
        q, kv, seg = attention_tpu._specs(4, 8, 4, mesh)
        assert (q, kv, seg) == (P(BATCH_AXES, None, "tensor", None),
                                P(BATCH_AXES, None, "tensor", None), P(BATCH_AXES, None))
        q, kv, seg = attention_tpu._specs(3, 4, 2, mesh)  # 3 rows on 2 shards; 2 kv heads on 4
        assert (q, kv, seg) == (P(None, None, None, None), P(None, None, None, None),
                                P(None, None))
