"""Decoder backbone: causality, packing, tied/untied, bf16, scan/remat equivalence, KV-cached decoding,
and sharded forward/decode on 8 CPU devices against the single-device result."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax.config import ConfigError, MeshConfig
from moejax.mesh import BATCH_AXES, make_mesh, rules_for, use_mesh
from moejax.model import KVCache, Model
from moejax.testing import BATCH, SEQ, TOL_FP32, TOL_SHARDED_FP32, tiny_model

B, T = BATCH, SEQ
PROMPT, STEPS = 40, 8
LENS = np.array([40, 1, 17, 33, 8, 25, 39, 12], np.int32)  # ragged prompt lengths, len + STEPS <= T


def init(cfg, seed=0):
    return nnx.jit(lambda: Model(cfg, rngs=nnx.Rngs(seed)))()


def like(cfg, base):
    """A model of ``cfg`` holding ``base``'s parameters, built abstractly (no init compile)."""
    m = nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0)))
    if cfg.scan_layers:
        return to_scan(base, m)
    state = nnx.state(m)
    nnx.replace_by_pure_dict(state, {k: v for k, v in nnx.to_pure_dict(base.state).items() if k in state})
    nnx.update(m, state)
    return m


def forward_fn(graphdef):
    @jax.jit
    def fwd(state, tokens, segment_ids, positions):
        return nnx.merge(graphdef, state)(tokens, segment_ids, positions)
    return fwd


def decode_fns(graphdef):
    """(prefill, step): jitted cached calls; the cache is donated like a production decode loop."""
    @jax.jit
    def prefill(state, cache, tokens, segment_ids):
        return nnx.merge(graphdef, state)(tokens, segment_ids, cache=cache)

    @jax.jit(donate_argnums=1)
    def step(state, cache, tokens):
        return nnx.merge(graphdef, state)(tokens, cache=cache)
    return prefill, step


class Runner:
    """A model plus its jitted forward, shared by the tests of this module (one compile each)."""

    def __init__(self, model):
        self.model = model
        self.graphdef, self.state = nnx.split(model)
        self.fwd = forward_fn(self.graphdef)

    def __call__(self, tokens, segment_ids=None, positions=None, state=None):
        segment_ids = np.ones((B, T), np.int32) if segment_ids is None else segment_ids
        positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)) if positions is None else positions
        return self.fwd(self.state if state is None else state, tokens, segment_ids, positions)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 288, size=(B, T)).astype(np.int32)


@pytest.fixture(scope="module")
def base():
    return Runner(init(tiny_model()))


@pytest.fixture(scope="module")
def base_logits(base, tokens):
    return np.asarray(base(tokens)[0])


def stack_layers(pure: dict, L: int) -> dict:
    """Unrolled pure-dict state {'layers': {0: tree, 1: tree}} -> scanned layout (leading L axis)."""
    out = dict(pure)
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[pure["layers"][i] for i in range(L)])
    return out


def to_scan(base, scan_model):
    state = nnx.state(scan_model)
    nnx.replace_by_pure_dict(state, stack_layers(nnx.to_pure_dict(base.state), 2))
    nnx.update(scan_model, state)
    return scan_model


# -- structure -----------------------------------------------------------------------------------

def test_param_shapes_and_logical_names(base):
    m = base.model
    a = m.layers[0].attn
    assert a.q.shape == (64, 4, 16) and a.q.get_metadata()["out_sharding"] == ("embed", "heads", "head_dim")
    assert a.k.shape == (64, 2, 16)
    assert a.k.get_metadata()["out_sharding"] == ("embed", "kv_heads", "head_dim")
    assert a.o.shape == (4, 16, 64) and a.o.get_metadata()["out_sharding"] == ("heads", "head_dim", "embed")
    assert a.q_norm.scale.get_metadata()["out_sharding"] == ("head_dim",)
    assert m.layers[0].mlp.down.get_metadata()["out_sharding"] == ("mlp", "embed")
    assert m.embed.embedding.shape == (288, 64) and m.lm_head is None
    n = sum(x.size for x in jax.tree.leaves(base.state))
    assert n == tiny_model().num_params()
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(base.state))


def test_logits_shape_dtype_and_aux(base, base_logits):
    assert base_logits.shape == (B, T, 288) and base_logits.dtype == np.float32
    assert np.isfinite(base_logits).all() and base_logits.std() > 1e-3
    _, aux = base(np.zeros((B, T), np.int32))
    assert aux == {}


def test_aux_is_stacked_over_layers(monkeypatch, base, tokens):
    """Per-block aux values come out stacked [L, ...] for unrolled and scanned stacks alike."""
    from moejax import model as model_lib
    orig = model_lib.Block.__call__

    def with_aux(self, x, *args, **kw):
        x, _, kv, state = orig(self, x, *args, **kw)
        return x, {"resid/max_abs": jnp.max(jnp.abs(x)), "router/counts": jnp.ones(3)}, kv, state
    monkeypatch.setattr(model_lib.Block, "__call__", with_aux)
    maxes = []
    for scan in (False, True):
        _, aux = Runner(like(tiny_model(scan_layers=scan), base))(tokens)  # new jit: traced patched
        assert aux["resid/max_abs"].shape == (2,) and aux["router/counts"].shape == (2, 3)
        maxes.append(np.asarray(aux["resid/max_abs"]))
    assert maxes[0][1] > 0
    np.testing.assert_allclose(maxes[1], maxes[0], *TOL_FP32)


# -- causality and packing ------------------------------------------------------------------------

def test_causality(base, tokens, base_logits):
    changed = tokens.copy()
    changed[:, 40:] = (changed[:, 40:] + 7) % 288
    out = np.asarray(base(changed)[0])
    np.testing.assert_allclose(out[:, :40], base_logits[:, :40], *TOL_FP32)
    assert np.abs(out[:, 40:] - base_logits[:, 40:]).max() > 1e-3


def test_packing_isolates_segments(base, tokens):
    n1 = np.array([10, 24, 3, 30, 17, 1, 40, 20])  # segment 1 length per row; segment 2 follows
    n2 = np.array([30, 30, 50, 34, 20, 60, 24, 10])  # then padding to T
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    alone_tok, alone_seg = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for b in range(B):
        seg[b, :n1[b]], seg[b, n1[b]:n1[b] + n2[b]] = 1, 2
        pos[b, :n1[b]] = np.arange(n1[b])
        pos[b, n1[b]:] = np.arange(T - n1[b])
        alone_tok[b, :n2[b]] = tokens[b, n1[b]:n1[b] + n2[b]]
        alone_seg[b, :n2[b]] = 1
    packed = np.asarray(base(tokens, seg, pos)[0])
    changed = tokens.copy()
    changed[seg == 1] = (changed[seg == 1] + 11) % 288
    packed2 = np.asarray(base(changed, seg, pos)[0])
    alone = np.asarray(base(alone_tok, alone_seg)[0])
    for b in range(B):
        s2 = slice(n1[b], n1[b] + n2[b])
        np.testing.assert_allclose(packed2[b, s2], packed[b, s2], *TOL_FP32)
        np.testing.assert_allclose(packed[b, s2], alone[b, :n2[b]], *TOL_FP32)
        assert np.abs(packed2[b, :n1[b]] - packed[b, :n1[b]]).max() > 1e-4
    assert np.isfinite(packed).all()


# -- head, dtype, scan, remat ----------------------------------------------------------------------

def test_untied_head_with_transposed_embedding_equals_tied(base, tokens, base_logits):
    untied = like(tiny_model(tie_embeddings=False), base)
    assert untied.lm_head.kernel.shape == (64, 288)
    assert untied.lm_head.kernel.get_metadata()["out_sharding"] == ("embed", "vocab")
    untied.lm_head.kernel.set_value(base.model.embed.embedding[...].T)
    out = np.asarray(Runner(untied)(tokens)[0])
    np.testing.assert_allclose(out, base_logits, *TOL_FP32)


def test_bf16_compute_close_to_fp32(base, tokens, base_logits):
    m = like(tiny_model(dtype="bfloat16"), base)  # same params (fp32), compute in bf16
    assert m.embed.embedding[...].dtype == jnp.float32
    out = np.asarray(Runner(m)(tokens)[0])
    assert out.dtype == np.float32
    err = np.abs(out - base_logits).max() / np.abs(base_logits).max()
    assert 0 < err < 3e-2, err


@pytest.fixture(scope="module")
def scan_runner(base):
    return Runner(like(tiny_model(scan_layers=True), base))


def test_scan_equals_unrolled(scan_runner, tokens, base_logits):
    q = scan_runner.model.layers.attn.q
    assert q.shape == (2, 64, 4, 16) and q.get_metadata()["out_sharding"][0] == "layers"
    out = np.asarray(scan_runner(tokens)[0])
    np.testing.assert_allclose(out, base_logits, *TOL_FP32)


def _loss_and_grad(model, tokens):
    graphdef, state = nnx.split(model)
    targets = jnp.roll(tokens, -1, axis=1)

    @jax.jit
    def f(state):
        logits, _ = nnx.merge(graphdef, state)(tokens)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
    return jax.value_and_grad(f)(state)


def test_remat_preserves_value_and_grad(base, tokens):
    loss0, g0 = _loss_and_grad(base.model, tokens)
    g0 = nnx.to_pure_dict(g0)
    loss1, g1 = _loss_and_grad(like(tiny_model(remat="full"), base), tokens)
    dots = like(tiny_model(remat="dots", scan_layers=True), base)
    loss2, g2 = _loss_and_grad(dots, tokens)
    np.testing.assert_allclose(loss1, loss0, *TOL_FP32)
    np.testing.assert_allclose(loss2, loss0, *TOL_FP32)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # noqa: E731
    jax.tree.map(close, nnx.to_pure_dict(g1), g0)
    jax.tree.map(close, nnx.to_pure_dict(g2), stack_layers(g0, 2))
    assert float(jnp.abs(g0["layers"][0]["attn"]["q"]).max()) > 0


# -- KV-cached decoding ---------------------------------------------------------------------------

def cached_decode(runner, tokens, cache=None):
    """Prefill right-padded ragged prompts, then STEPS one-token steps of the true continuation.
    Returns logits at [b, len_b-1+i] for i in 0..STEPS: [B, STEPS+1, V], and the final cache."""
    prefill, step = decode_fns(runner.graphdef)
    cache = runner.model.init_cache(B, T) if cache is None else cache
    seg = (np.arange(PROMPT)[None] < LENS[:, None]).astype(np.int32)
    logits, _, cache = prefill(runner.state, cache, tokens[:, :PROMPT], seg)
    rows = np.arange(B)
    out = [np.asarray(logits)[rows, LENS - 1]]
    for i in range(STEPS):
        logits, _, cache = step(runner.state, cache, tokens[rows, LENS + i][:, None])
        out.append(np.asarray(logits)[:, 0])
    return np.stack(out, 1), cache, np.asarray(logits)


def expected_decode(full_logits):
    rows = np.arange(B)
    return np.stack([full_logits[rows, LENS - 1 + i] for i in range(STEPS + 1)], 1)


def test_cached_decode_matches_full_forward(base, tokens, base_logits):
    got, cache, _ = cached_decode(base, tokens)
    np.testing.assert_allclose(got, expected_decode(base_logits), *TOL_FP32)
    assert isinstance(cache, KVCache) and cache.max_len == T
    assert [k.shape for k in cache.k] == [(B, 2, T, 16)] * 2  # head-major, one buffer per layer
    np.testing.assert_array_equal(cache.lengths, LENS + STEPS)
    np.testing.assert_array_equal(np.asarray(cache.segment_ids).sum(1), LENS + STEPS)
    with pytest.raises(ConfigError, match="max_seq_len"):
        base.model.init_cache(B, 1000)


def test_cached_decode_with_scan_layers(scan_runner, tokens, base_logits):
    got, cache, _ = cached_decode(scan_runner, tokens)
    np.testing.assert_allclose(got, expected_decode(base_logits), *TOL_FP32)
    assert cache.k.shape == (2, B, 2, T, 16)  # head-major, stacked in the scan carry


def test_cached_prefill_probes_equal_the_uncached_ones(base, tokens):
    """Attention probes through a KV cache (the token-major view of the head-major buffers) equal
    those of the plain forward over the same full-length prompts."""
    @jax.jit
    def probe(state, tok, cache):
        model = nnx.merge(base.graphdef, state)
        if cache is None:
            return model(tok, probes=True)[1]
        return model(tok, cache=cache, probes=True)[1]
    want = probe(base.state, tokens[:, :PROMPT], None)
    got = probe(base.state, tokens[:, :PROMPT], base.model.init_cache(B, T))
    for key in ("attn/first_token_share", "attn/map"):
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), *TOL_FP32)
    assert float(np.asarray(want["attn/first_token_share"]).min()) > 0


def big_ops(hlo: str, min_bytes: float) -> set[str]:
    """Opcodes in optimized HLO text (fusion bodies included) whose f32 result has >= min_bytes."""
    ops = set()
    for m in re.finditer(r"= f32\[([\d,]+)\]\{[^}]*\} ([\w-]+)\(", hlo):
        if 4 * math.prod(int(d) for d in m.group(1).split(",")) >= min_bytes:
            ops.add(m.group(2))
    return ops


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_decode_step_writes_the_cache_in_place(scan):
    """A jitted one-token step with the cache donated writes it in place: each layer scatters its
    new rows into its head-major buffers and the attention einsums read them as they lie, so the
    compiled step has no transpose or copy of a layer's k/v (the token-major cache had one of
    each per layer and step). Unrolled layers own their buffers: scratch stays far below one
    layer's k+v. The scan slices its layer out of the stacked carry (one layer's k+v of
    scratch). Compile only (abstract inputs): 8 layers, B=8, S=1024 = 16 MiB of k/v."""
    L = 8
    cfg = tiny_model(num_layers=L, max_seq_len=1024, scan_layers=scan)
    model = nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    cache = jax.eval_shape(lambda: model.init_cache(8, 1024))

    @jax.jit(donate_argnums=1)
    def step(state, cache, tok):
        return nnx.merge(graphdef, state)(tok, cache=cache)[::2]  # (logits, cache)
    tok = jax.ShapeDtypeStruct((8, 1), jnp.int32)
    compiled = step.lower(state, cache, tok).compile()
    mem = compiled.memory_analysis()
    kv_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((cache.k, cache.v)))
    assert kv_bytes == 16 * 2**20
    one_layer = kv_bytes / L  # 2 MiB
    big = big_ops(compiled.as_text(), one_layer / 2)  # ops on arrays of >= one layer's k
    assert not {"transpose", "copy"} & big, big
    if scan:
        assert mem.temp_size_in_bytes < 1.25 * one_layer, (mem.temp_size_in_bytes, kv_bytes)
    else:
        assert not {"slice", "dynamic-slice"} & big, big
        assert mem.temp_size_in_bytes < one_layer / 4, (mem.temp_size_in_bytes, kv_bytes)
    assert mem.alias_size_in_bytes >= kv_bytes  # the donated buffers are the output cache's


# -- sharded ----------------------------------------------------------------------------------------

def sharded_as(x, mesh, spec) -> bool:
    return x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)


@pytest.mark.parametrize("sizes", [dict(data=2, fsdp=2, tensor=2), dict(data=8)])
def test_sharded_forward_equals_single_device(sizes, base, tokens, base_logits):
    mcfg = MeshConfig(**{"data": 1, **sizes})
    mesh = make_mesh(mcfg)
    with use_mesh(mesh, rules_for(mcfg)):
        if sizes.get("tensor"):  # created under the mesh: eager sharding by the logical rules
            r = Runner(init(tiny_model()))
            jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), r.state, base.state)
        else:  # data parallel: the single-device params, replicated
            r = Runner(like(tiny_model(), base))
            nnx.update(r.model, jax.device_put(base.state, NamedSharding(mesh, P())))
            r.state = nnx.state(r.model)
        a = r.model.layers[0].attn
        if sizes.get("tensor"):
            assert sharded_as(a.q[...], mesh, P("fsdp", "tensor", None))
            assert sharded_as(a.o[...], mesh, P("tensor", None, "fsdp"))
            assert sharded_as(r.model.embed.embedding[...], mesh, P("tensor", "fsdp"))
            assert sharded_as(r.model.layers[1].mlp.down[...], mesh, P("tensor", "fsdp"))
            assert sharded_as(r.model.final_norm.scale[...], mesh, P("fsdp"))
            abstract = nnx.eval_shape(lambda: Model(tiny_model(scan_layers=True), rngs=nnx.Rngs(0)))
            specs = nnx.get_partition_spec(nnx.state(abstract))
            assert specs["layers"]["attn"]["q"].get_value() == P(None, "fsdp", "tensor", None)
        logits = r(tokens)[0]
        assert sharded_as(logits, mesh, P(BATCH_AXES, None, "tensor" if sizes.get("tensor") else None))
        np.testing.assert_allclose(np.asarray(logits), base_logits, *TOL_SHARDED_FP32)
        if sizes.get("tensor"):
            cache = r.model.init_cache(B, T)
            layer_spec = P(BATCH_AXES, "tensor", None, None)  # [B,Hkv,S,hd]
            assert all(sharded_as(k, mesh, layer_spec) for k in cache.k + cache.v)
            assert sharded_as(cache.lengths, mesh, P(BATCH_AXES))
            got, cache, _ = cached_decode(r, tokens, cache)
            np.testing.assert_allclose(got, expected_decode(base_logits), *TOL_SHARDED_FP32)
            assert all(sharded_as(k, mesh, layer_spec) for k in cache.k + cache.v)
