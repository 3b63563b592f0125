"""BAM (architecture.md 8.9; moejax.bam, attention_experts.AttentionExperts) and the loose ends of
the MoE variants (issue #18): the soft mixture of attention experts against a float64 per-expert loop,
the parallel block against its formula, branch-and-mix of identical branches == the seed, cached
decoding == the full forward, the sharded model == one device (loss, counts and raw gradients), a
tiny BAM model trains; DSMoE's sparsity loss through one train step's gradient; ``num_params`` of
every variant against the instantiated model and ``flops_per_token`` against hand formulas.

Compiles dominate on 2 cores: one jitted forward (``_forward``) and one jitted layer call serve
all shapes of a structure; the sharded/training run is one module-scoped fixture of two gradient
programs (1 and 8 devices), training by plain SGD steps of the 1-device one; models are drawn on
the host from abstract shapes and reference forwards are single jitted programs, since every eager
init or module call compiles each of its ops."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import bam
from moejax import config as C
from moejax import config_moe
from moejax import train as T
from moejax.config import ConfigError, MeshConfig, MoEConfig, VariantConfig
from moejax.layers.attention_experts import AttentionExperts, cache_kv_heads
from moejax.mesh import make_mesh
from moejax.model import Model
from moejax.testing import TOL_SHARDED_FP32, gradients_then_sgd, tiny_config, tiny_model

E, F = 4, 32  # branches = FFN experts = attention experts; FFN width
B_, S_ = 2, 12  # batch, length


def bam_cfg(attention: str = "full", parallel: bool = True, **kw) -> C.ModelConfig:
    moe = MoEConfig(num_experts=E, top_k=2, d_expert=F,
                    variant=VariantConfig(kind="bam", bam_attention=attention))
    return tiny_model(moe=moe, parallel_block=parallel, **kw)


def randomize(module, seed: int, std: float = 0.3, norm_noise: float = 0.1):
    """Every Param of ``module`` ~ N(0, std^2) (norm scales 1 + N(0, norm_noise^2)), in place."""
    rng = np.random.default_rng(seed)
    state = nnx.state(module, nnx.Param)

    def fill(path, a):
        if str(path[-1].key) in ("scale", "q_norm", "k_norm") or (
                len(path) > 1 and str(path[-2].key) in ("q_norm", "k_norm")):
            return jnp.asarray(1 + norm_noise * rng.normal(size=a.shape), jnp.float32)
        return jnp.asarray(std * rng.normal(size=a.shape), jnp.float32)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(
        fill, nnx.to_pure_dict(state)))
    nnx.update(module, state)
    return module


def random_model(cfg, seed: int, std: float = 0.3) -> Model:
    """``randomize`` of an abstract Model: every Param is drawn on the host, so no eager init
    (which would compile each of its random ops) is needed."""
    return randomize(nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0))), seed, std=std)


def packed_segments() -> tuple[np.ndarray, np.ndarray]:
    """Row 0: two documents (positions restart), row 1: one document and right padding."""
    seg = np.ones((B_, S_), np.int32)
    seg[0, 5:] = 2
    seg[1, 9:] = 0
    pos = np.tile(np.arange(S_, dtype=np.int32), (B_, 1))
    pos[0, 5:] -= 5
    return seg, pos


# -- float64 loop reference of the attention experts -----------------------------------------------

def rms_np(x, scale, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale


def rope_np(x, pos, theta):
    """Rotate-half RoPE on x [T,H,hd] (full rotary dim) at positions [T]."""
    hd = x.shape[-1]
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    ang = pos[:, None, None] * inv  # [T,1,hd/2]
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                           x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def attention_np(q, k, v, seg, pos):
    """One row: q [T,H,hd], k/v [T,Hkv,hd]; causal by position within a segment, GQA, padding
    queries give 0 -> [T,H,hd]."""
    T_, H, hd = q.shape
    G = H // k.shape[1]
    out = np.zeros_like(q)
    for t in range(T_):
        if seg[t] == 0:
            continue
        ok = (seg == seg[t]) & (pos <= pos[t])
        for h in range(H):
            z = np.where(ok, k[:, h // G] @ q[t, h] / np.sqrt(hd), -np.inf)
            p = np.exp(z - z.max())
            out[t, h] = (p / p.sum()) @ v[:, h // G]
    return out


def attention_experts_np(p: dict, x, seg, pos, cfg):
    """y = sum_e softmax(x W_r)_e o_e(Attn(q_e, k_e, v_e)) per token, experts looped; k, v (and
    k-norm) shared when they carry no expert axis."""
    theta, eps = cfg.attention.rope_theta, cfg.norm_eps
    y = np.zeros_like(x)
    for b in range(x.shape[0]):
        z = x[b] @ p["router"]
        w = np.exp(z - z.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)  # [T,E]
        for e in range(E):
            pick = lambda a, nd: a[e] if a.ndim == nd + 1 else a  # noqa: E731
            q = rms_np(np.einsum("td,dhk->thk", x[b], p["q"][e]), p["q_norm"][e], eps)
            k = rms_np(np.einsum("td,dhk->thk", x[b], pick(p["k"], 3)), pick(p["k_norm"], 1), eps)
            v = np.einsum("td,dhk->thk", x[b], pick(p["v"], 3))
            a = attention_np(rope_np(q, pos[b], theta), rope_np(k, pos[b], theta), v, seg[b],
                             pos[b])
            y[b] += w[:, e:e + 1] * np.einsum("thk,hkd->td", a, p["o"][e])
    return y


@jax.jit(static_argnums=0)
def _attn_call(graphdef, state, x, seg, pos):
    return nnx.merge(graphdef, state)(x, positions=pos, segment_ids=seg)[0]


@pytest.mark.parametrize("attention", ["full", "kv_shared"])
def test_attention_experts_equal_float64_loop(attention):
    cfg = bam_cfg(attention)
    layer = randomize(nnx.eval_shape(lambda: AttentionExperts(cfg, rngs=nnx.Rngs(0))), seed=1)
    x = np.random.default_rng(2).normal(size=(B_, S_, cfg.d_model)).astype(np.float32)
    seg, pos = packed_segments()
    y = np.asarray(_attn_call(*nnx.split(layer), jnp.asarray(x), jnp.asarray(seg),
                              jnp.asarray(pos)))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64),
                     nnx.to_pure_dict(nnx.state(layer, nnx.Param)))
    ref = attention_experts_np(p, x.astype(np.float64), seg, pos, cfg)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert np.abs(ref).mean() > 0.1
    shared = attention == "kv_shared"  # k, v (and the k-norm) carry no expert axis
    assert p["k"].ndim == (3 if shared else 4) and p["k_norm"].ndim == (1 if shared else 2)


# -- whole models: forward, parallel block, mixing, decoding ---------------------------------------

@jax.jit(static_argnums=0)
def _forward(graphdef, state, tokens, seg, pos):
    return nnx.merge(graphdef, state)(tokens, seg, pos)[0]


def logits_of(model, tokens, seg=None, pos=None):
    seg = np.ones(tokens.shape, np.int32) if seg is None else seg
    pos = np.tile(np.arange(tokens.shape[1], dtype=np.int32), (tokens.shape[0], 1)) \
        if pos is None else pos
    return np.asarray(_forward(*nnx.split(model), jnp.asarray(tokens), jnp.asarray(seg),
                               jnp.asarray(pos)))


def model_with(cfg, pure: dict) -> Model:
    model = nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    nnx.update(model, state)
    return model


TOKENS = np.random.default_rng(3).integers(0, 288, size=(B_, S_)).astype(np.int32)


@jax.jit(static_argnums=0)
def _block_forms(graphdef, state, tokens):
    """(the block's output, x + attn(norm(x)) + ffn(norm'(x)), the sequential pre-norm form): one
    program (eager module calls would compile each op separately)."""
    model = nnx.merge(graphdef, state)
    blk = model.layers[0]
    x = model.embed(tokens)
    pos = jnp.tile(jnp.arange(S_, dtype=jnp.int32), (B_, 1))
    seg = jnp.ones((B_, S_), jnp.int32)
    h = blk.attn(blk.attn_norm(x), positions=pos, segment_ids=seg)[0]
    want = x + h + blk.mlp(blk.mlp_norm(x))
    sequential = x + h + blk.mlp(blk.mlp_norm(x + h))  # the ordinary pre-norm block
    return blk(x, pos, seg)[0], want, sequential


def test_parallel_block_is_x_plus_attn_plus_ffn():
    cfg = tiny_model(parallel_block=True, num_layers=1)
    model = random_model(cfg, seed=4, std=0.1)
    got, want, sequential = map(np.asarray, _block_forms(*nnx.split(model), jnp.asarray(TOKENS)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.abs(sequential - want).max() > 1e-3


@pytest.mark.parametrize("attention, parallel", [("full", True), ("kv_shared", True),
                                                 ("none", False)])
def test_mixing_identical_branches_reproduces_the_seed(attention, parallel):
    cfg = bam_cfg(attention, parallel)
    dense_cfg = bam.dense_branch_config(cfg)
    seed = random_model(dense_cfg, seed=5, std=0.1)
    seed_pure = nnx.to_pure_dict(nnx.state(seed, nnx.Param))
    mixed = bam.branch_and_mix(bam.branch(seed_pure, E), cfg, seed=1)
    model = model_with(cfg, mixed)
    seg, pos = packed_segments()
    ref = logits_of(seed, TOKENS, seg, pos)
    np.testing.assert_allclose(logits_of(model, TOKENS, seg, pos), ref, rtol=1e-5, atol=1e-5)
    router = mixed["layers"][0]["mlp"]["router"]["w"]
    assert np.abs(router).max() > 0  # random routers: the match is not a zero-router accident
    if attention != "none":
        assert np.abs(mixed["layers"][0]["attn"]["router"]).max() > 0


def test_mixing_places_branch_e_as_expert_e_and_averages_the_rest():
    cfg = bam_cfg("kv_shared")
    dense_cfg = bam.dense_branch_config(cfg)
    branches = [nnx.to_pure_dict(nnx.state(random_model(dense_cfg, seed=10 + e), nnx.Param))
                for e in range(E)]
    mixed = bam.branch_and_mix(branches, cfg)
    for e in range(E):
        dense, layer = branches[e]["layers"][1], mixed["layers"][1]
        np.testing.assert_array_equal(layer["mlp"]["w_gate"][e], dense["mlp"]["gate"])
        np.testing.assert_array_equal(layer["mlp"]["w_down"][e], dense["mlp"]["down"])
        np.testing.assert_array_equal(layer["attn"]["q"][e], dense["attn"]["q"])
        np.testing.assert_array_equal(layer["attn"]["o"][e], dense["attn"]["o"])
    mean = lambda get: np.mean([np.float64(get(b)) for b in branches], 0)  # noqa: E731
    np.testing.assert_allclose(mixed["layers"][1]["attn"]["k"],
                               mean(lambda b: b["layers"][1]["attn"]["k"]), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(mixed["embed"]["embedding"],
                               mean(lambda b: b["embed"]["embedding"]), rtol=1e-6, atol=1e-9)
    with pytest.raises(ConfigError, match="num_experts"):
        bam.branch_and_mix(branches[:3], cfg)


def test_mixing_into_a_scanned_model_equals_unrolled():
    cfg = bam_cfg("full")
    dense_cfg = bam.dense_branch_config(cfg)
    branches = [random_model(dense_cfg, seed=20 + e, std=0.1) for e in range(E)]
    pures = [nnx.to_pure_dict(nnx.state(b, nnx.Param)) for b in branches]
    unrolled = model_with(cfg, bam.branch_and_mix(pures, cfg, seed=2))
    scan_cfg = dataclasses.replace(cfg, scan_layers=True)
    stack = lambda p: dict(p, layers=jax.tree.map(  # noqa: E731
        lambda *xs: np.stack(xs), *[p["layers"][i] for i in range(cfg.num_layers)]))
    scanned_pures = [stack(p) for p in pures]
    scanned = model_with(scan_cfg, bam.branch_and_mix(scanned_pures, scan_cfg, seed=2))
    # routers are drawn per leaf: copy the unrolled ones so only the layout differs
    sstate = nnx.state(scanned, nnx.Param)
    upure = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
    spure = nnx.to_pure_dict(sstate)
    for part in (("attn", "router"), ("mlp", "router", "w")):
        node = spure["layers"]
        for k in part[:-1]:
            node = node[k]
        leaves = []
        for i in range(cfg.num_layers):
            u = upure["layers"][i]
            for k in part:
                u = u[k]
            leaves.append(u)
        node[part[-1]] = jnp.stack(leaves)
    nnx.replace_by_pure_dict(sstate, spure)
    nnx.update(scanned, sstate)
    np.testing.assert_allclose(logits_of(scanned, TOKENS), logits_of(unrolled, TOKENS),
                               rtol=1e-5, atol=1e-5)


@jax.jit(static_argnums=0)
def _cached(graphdef, state, tokens, seg, cache):
    logits, _, cache = nnx.merge(graphdef, state)(tokens, seg, cache=cache)
    return logits, cache


@pytest.mark.parametrize("attention", ["full", "kv_shared"])
def test_decoding_equals_the_full_forward(attention):
    cfg = bam_cfg(attention)
    model = random_model(cfg, seed=6, std=0.1)
    full = logits_of(model, TOKENS)
    cache = model.init_cache(B_, 16)
    heads = cfg.attention.num_kv_heads * (E if attention == "full" else 1)
    assert cache.k[0].shape == (B_, heads, 16, cfg.head_dim) and cache_kv_heads(cfg) == heads
    P = 5  # prefill, then one token at a time
    gd, st = nnx.split(model)
    ones = lambda n: jnp.ones((B_, n), jnp.int32)  # noqa: E731
    out, cache = _cached(gd, st, jnp.asarray(TOKENS[:, :P]), ones(P), cache)
    steps = [np.asarray(out)]
    for t in range(P, S_):
        out, cache = _cached(gd, st, jnp.asarray(TOKENS[:, t:t + 1]), ones(1), cache)
        steps.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(steps, 1), full, rtol=2e-5, atol=2e-5)


# -- sharded == single device, training ------------------------------------------------------------

MB, MS = 8, 16


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 288, size=(MB, MS + 1)).astype(np.int32)
    seg = np.ones((MB, MS), np.int32)
    seg[6, 12:] = 0
    seg[2, 7:] = 2
    return dict(inputs=toks[:, :-1], targets=toks[:, 1:], segment_ids=seg,
                positions=np.broadcast_to(np.arange(MS, dtype=np.int32), (MB, MS)).copy(),
                loss_mask=(seg != 0).astype(np.float32), domain=np.zeros((MB,), np.int32))


def train_state(s: T.Setup, pure: dict) -> T.TrainState:
    """The state at ``pure`` on the setup's shardings, without optimizer state: only the jitted
    gradient program reads it (an eager optimizer init would compile a program per shape)."""
    m = nnx.eval_shape(lambda: Model(s.cfg.model, rngs=nnx.Rngs(0)))
    state = nnx.state(m)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(m, state)
    _, params, rest = nnx.split(m, nnx.Param, ...)
    sh = s.state_shardings
    return T.TrainState(step=jax.device_put(np.int32(0), sh.step),
                        params=jax.device_put(params, sh.params),
                        rest=jax.device_put(rest, sh.rest), opt_state=None,
                        rng=jax.device_put(np.array([0, 1], np.uint32), sh.rng))  # key_data(key(1))


SGD_LR = 0.5  # the plain SGD steps of the training check


def run_on(model_cfg, pure, batch, mesh_cfg, ndev, steps=0):
    """Raw loss/gradients/stats at ``pure`` and the losses of ``steps`` plain SGD steps from it
    (the same jitted gradient program: no separate optimizer-step program to compile)."""
    cfg = dataclasses.replace(tiny_config(mesh=mesh_cfg, train={"warmup_steps": 0}),
                              model=model_cfg)
    mesh = make_mesh(mesh_cfg, jax.devices()[:ndev])
    s = T.setup(cfg, mesh)
    state = train_state(s, pure)
    gb = T.global_batch(mesh, batch)
    run = gradients_then_sgd(s, state, gb, steps, SGD_LR)
    return dict(run, grads=nnx.to_pure_dict(run["grads"]))


@pytest.fixture(scope="module")
def runs(batch):
    """A BAM model (full attention experts, parallel block) on 1 device with 3 SGD steps and
    on 8 devices (data 2 x expert 4)."""
    cfg = bam_cfg("full")
    pure = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(random_model(
        cfg, seed=0, std=cfg.init_std))))
    single = run_on(cfg, pure, batch, MeshConfig(data=1), 1, steps=3)
    sharded = run_on(cfg, pure, batch, MeshConfig(data=2, expert=4), 8)
    return single, sharded


def test_bam_sharded_equals_single_device(runs):
    """Loss, expert counts and every raw gradient agree (equal gradients imply equal logits: no
    separate forward program is compiled for them)."""
    ref, got = runs
    np.testing.assert_allclose(got["loss"], ref["loss"], *TOL_SHARDED_FP32)
    np.testing.assert_array_equal(got["sums"]["stats"]["counts"], ref["sums"]["stats"]["counts"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 got["grads"], ref["grads"])
    attn = ref["grads"]["layers"][1]["attn"]
    for name in ("router", "q", "k", "v", "o", "q_norm", "k_norm"):
        per_expert = np.abs(attn[name]).reshape(E, -1).max(1) if name != "router" else \
            np.abs(attn[name]).max(0)
        assert (per_expert > 0).all(), name  # every attention expert gets a gradient


def test_bam_model_trains(runs):
    losses = runs[0]["losses"]
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 1e-3, losses


# -- DSMoE sparsity loss (moejax.layers.balance.moe_aux_loss) --------------------------------------

def dsmoe_grads(coef: float, batch):
    moe = MoEConfig(num_experts=E, top_k=2, d_expert=F, variant=VariantConfig(
        kind="dsmoe", dsmoe_sparsity_coef=coef, dsmoe_threshold=0.5))
    cfg = dataclasses.replace(tiny_config(mesh=MeshConfig(data=1), train={"warmup_steps": 0}),
                              model=tiny_model(moe=moe))
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    s = T.setup(cfg, mesh)
    model = random_model(cfg.model, seed=0, std=cfg.model.init_std)
    for blk in model.layers:  # gates of O(1) logits: some blocks on, some off
        blk.mlp.gate[...] = jnp.asarray(2.0 * np.asarray(blk.mlp.gate[...]) / cfg.model.init_std)
    pure = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    state = train_state(s, pure)
    loss, grads, sums = jax.device_get(jax.jit(T.make_grad_fn(s, 1))(state, T.global_batch(
        mesh, batch)))
    return model, cfg, loss, nnx.to_pure_dict(grads), sums


@jax.jit(static_argnums=0)
def _mlp_inputs(graphdef, state, tokens, seg, pos):
    """Each layer's MoE input, mlp_norm(x + attn(attn_norm(x))), as one program."""
    model = nnx.merge(graphdef, state)
    x, out = model.embed(tokens), []
    for blk in model.layers:
        h = blk.attn(blk.attn_norm(x), positions=pos, segment_ids=seg)[0]
        out.append(blk.mlp_norm(x + h))
        x = blk(x, pos, seg, tokens=tokens)[0]
    return out


def test_dsmoe_sparsity_loss_gradient_matches_hand(batch):
    """L_s = coef * mean_l sparsity_l with sparsity_l = mean over valid tokens and blocks of g.
    Only the last layer's own term reaches its gate, so the gradient difference between coef and
    0 there is coef / L * x^T (g (1 - g)) / (N_valid E), with x that layer's MoE input."""
    coef = 0.3
    model, cfg, loss, grads, sums = dsmoe_grads(coef, batch)
    _, _, loss0, grads0, sums0 = dsmoe_grads(0.0, batch)
    L = cfg.model.num_layers
    seg = batch["segment_ids"]
    sparsity = []
    for blk, x_in in zip(model.layers, _mlp_inputs(*nnx.split(model), *map(jnp.asarray, (
            batch["inputs"], seg, batch["positions"])))):
        x_in = np.asarray(x_in, np.float64).reshape(-1, cfg.model.d_model)
        g = 1 / (1 + np.exp(-(x_in @ np.asarray(blk.mlp.gate[...], np.float64))))  # [N,E]
        valid = seg.reshape(-1) != 0
        sparsity.append(g[valid].mean())
    want_grad = coef / L * x_in[valid].T @ (g * (1 - g))[valid] / (valid.sum() * E)
    got_grad = grads["layers"][L - 1]["mlp"]["gate"] - grads0["layers"][L - 1]["mlp"]["gate"]
    np.testing.assert_allclose(got_grad, want_grad, rtol=2e-3, atol=1e-7)
    assert np.abs(want_grad).max() > 1e-5
    np.testing.assert_allclose(sums["stats"]["sparsity_loss"], np.mean(sparsity), rtol=1e-5)
    np.testing.assert_allclose(sums["stats"]["aux_loss"] - sums0["stats"]["aux_loss"],
                               coef * np.mean(sparsity), rtol=1e-4)
    np.testing.assert_allclose(loss, loss0, rtol=1e-6)  # the summed LM loss does not include it


# -- parameter and FLOP counts ---------------------------------------------------------------------

HYPER = VariantConfig(kind="hyper", hyper_embed_dim=16, hyper_layer_embed_dim=4,
                      hyper_bottleneck=16, hyper_adapter_dim=8)
COUNT_CASES = {
    "none": MoEConfig(num_experts=8, top_k=2, d_expert=16),
    "coe": MoEConfig(num_experts=8, top_k=4, d_expert=16,
                     variant=VariantConfig(kind="coe", coe_iterations=2)),
    "cartesian": MoEConfig(num_experts=8, top_k=2, d_expert=16, num_shared_experts=1,
                           variant=VariantConfig(kind="cartesian")),
    "hyper": MoEConfig(num_experts=8, top_k=2, d_expert=16, variant=HYPER),
    "finedeep": MoEConfig(num_experts=8, top_k=8, d_expert=16,
                          variant=VariantConfig(kind="finedeep", finedeep_sublayers=2)),
    "dsmoe": MoEConfig(num_experts=8, top_k=2, d_expert=16, variant=VariantConfig(kind="dsmoe")),
    "bam_full": MoEConfig(num_experts=4, top_k=2, d_expert=32, variant=VariantConfig(kind="bam")),
    "bam_kv_shared": MoEConfig(num_experts=4, top_k=2, d_expert=32,
                               variant=VariantConfig(kind="bam", bam_attention="kv_shared")),
    "bam_none": MoEConfig(num_experts=4, top_k=2, d_expert=32,
                          variant=VariantConfig(kind="bam", bam_attention="none")),
}


def count_cfg(name: str) -> C.ModelConfig:
    return tiny_model(moe=COUNT_CASES[name], num_layers=3, parallel_block=name.startswith("bam"))


@pytest.mark.parametrize("name", list(COUNT_CASES))
def test_num_params_counts_the_instantiated_model(name):
    cfg = count_cfg(name)
    abstract = nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert cfg.num_params() == n
    emb = cfg.vocab_size * cfg.d_model
    assert cfg.num_params(include_embeddings=False) == n - emb


def extra_active_per_layer(name: str, cfg) -> int:
    """Active parameters of one variant layer beyond the same-shaped standard top-k MoE layer
    (num_experts, d_expert, top_k), by hand from the spec's structure."""
    D, m = cfg.d_model, cfg.moe
    Fe, K, N = m.d_expert, m.top_k, m.num_experts
    a = cfg.attention
    hd, H, Hkv = a.head_dim, a.num_heads, a.num_kv_heads
    gen = (20 * 16 + 16) + (16 * D * 8 + D * 8) + (16 * 8 + 8) + (16 * 8 * D + 8 * D) + (16 * D + D)
    attn = D * hd * (2 * H + 2 * Hkv) + 2 * hd
    return {
        "none": 0,
        "coe": D * N,  # a second router; C x K/C = K expert calls
        "cartesian": 3 * D * Fe * K + D * N + 2 * 3 * D * Fe + D,  # B, both shared experts, norm
        "hyper": N * 16 + 2 * (16 * 16 + 16) + 4 + gen,  # the generator runs in every layer
        "finedeep": 2 * 2 * D - D * N,  # M router vectors and norms replace the router
        "dsmoe": 3 * D * Fe * (N - K),  # every block runs in training
        "bam_full": (N - 1) * attn + D * N,  # N attention experts and their soft router
        "bam_kv_shared": (N - 1) * (2 * D * H * hd + hd) + D * N,
        "bam_none": 0,
    }[name]


@pytest.mark.parametrize("name", list(COUNT_CASES))
def test_flops_per_token_matches_hand_formula(name):
    cfg = count_cfg(name)
    base_moe = dataclasses.replace(cfg.moe, variant=VariantConfig(), num_shared_experts=0)
    base = dataclasses.replace(cfg, moe=base_moe, parallel_block=False)
    L, S = cfg.num_layers, 64
    attn_experts = E if name in ("bam_full", "bam_kv_shared") else 1
    extra_scores = 2 * L * S * cfg.attention.num_heads * cfg.head_dim * (attn_experts - 1)
    want = base.flops_per_token(S) + 3 * (2 * L * extra_active_per_layer(name, cfg) + extra_scores)
    assert cfg.flops_per_token(S) == pytest.approx(want, rel=1e-12)


# -- config ----------------------------------------------------------------------------------------

def test_variant_config_is_reexported_from_config():
    assert C.VariantConfig is config_moe.VariantConfig


@pytest.mark.parametrize("kw, match", [
    (dict(moe=dict(first_dense_layers=1)), "first_dense_layers"),
    (dict(moe=dict(num_shared_experts=1)), "num_shared_experts"),
    (dict(attention=dict(gate="g1")), "bam_attention"),
    (dict(attention=dict(sink=True)), "bam_attention"),
    (dict(model=dict(layer_types=("linear_attention", "full_attention"))), "bam_attention"),
])
def test_bam_config_rejects_invalid_combinations(kw, match):
    moe = dict(num_experts=E, top_k=2, d_expert=F, variant=VariantConfig(kind="bam"))
    moe.update(kw.get("moe", {}))
    with pytest.raises(ConfigError, match=match):
        tiny_model(moe=MoEConfig(**moe), attention=kw.get("attention", {}), **kw.get("model", {}))


def test_bam_config_rejects_unknown_attention_variant():
    with pytest.raises(ConfigError, match="bam_attention"):
        VariantConfig(kind="bam", bam_attention="shared_q")
    with pytest.raises(ConfigError, match="kind='bam'"):
        bam.dense_branch_config(tiny_model())
