"""MoE variants (architecture.md section 8; moejax.layers.moe_variants): each layer against a
float64 per-token, per-expert loop reference (random inputs; all tokens on one expert and an empty
expert), its sharded model (8 devices, experts on 'expert') against one device for the loss, balance
statistics and raw gradients, a few SGD steps, parameter/FLOP matching and config validation.

Compiles dominate on 2 cores: one jitted layer call and one jitted forward are shared by all tests
of a structure; the model tests of a variant share one module-scoped run of two gradient programs
(1 and 8 devices: equal gradients imply equal logits; SGD steps reuse the 1-device one). Layers
and models are drawn on the host from abstract shapes (an eager init compiles each random op)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import train as T
from moejax.config import ConfigError, MeshConfig, MoEConfig, RouterConfig
from moejax.config_moe import VariantConfig
from moejax.layers import moe_ep
from moejax.layers.moe import MoE
from moejax.layers.mlp import MLP
from moejax.layers.moe_variants import (CartesianMoE, ChainOfExperts, DSMoE, Finedeep,
                                         HyperGenerator, HyperMoE, dsmoe_from_dense)
from moejax.mesh import make_mesh
from moejax.model import Model
from moejax.testing import TOL_SHARDED_FP32, gradients_then_sgd, tiny_config, tiny_model

E, F = 8, 16  # experts per pool, expert width
LB, LS = 4, 8  # layer-test batch and length
CASES = {  # variant name -> MoEConfig
    "coe": MoEConfig(num_experts=E, top_k=4, d_expert=F,
                     variant=VariantConfig(kind="coe", coe_iterations=2)),
    "cartesian": MoEConfig(num_experts=E, top_k=2, d_expert=F, num_shared_experts=1,
                           variant=VariantConfig(kind="cartesian")),
    "cartesian_a_plus_b": MoEConfig(num_experts=E, top_k=2, d_expert=F, num_shared_experts=1,
                                    variant=VariantConfig(kind="cartesian",
                                                          cartesian_output="a_plus_b")),
    "hyper": MoEConfig(num_experts=E, top_k=2, d_expert=F,
                       variant=VariantConfig(kind="hyper", hyper_embed_dim=16,
                                             hyper_layer_embed_dim=4, hyper_bottleneck=16,
                                             hyper_adapter_dim=8)),
    "finedeep": MoEConfig(num_experts=E, top_k=E, d_expert=F,
                          variant=VariantConfig(kind="finedeep", finedeep_sublayers=2)),
    "finedeep_sigmoid": MoEConfig(num_experts=E, top_k=E, d_expert=F,
                                  variant=VariantConfig(kind="finedeep", finedeep_sublayers=2,
                                                        finedeep_weights="sigmoid")),
    "dsmoe": MoEConfig(num_experts=E, top_k=2, d_expert=F, variant=VariantConfig(kind="dsmoe")),
    "dsmoe_gate": MoEConfig(num_experts=E, top_k=2, d_expert=F,
                            variant=VariantConfig(kind="dsmoe", dsmoe_scale="gate",
                                                  dsmoe_sparsity="mask", dsmoe_threshold=0.4)),
}
LAYERS = {"coe": ChainOfExperts, "cartesian": CartesianMoE, "hyper": HyperMoE,
          "finedeep": Finedeep, "dsmoe": DSMoE}
NOT_ROUTED = ("cartesian", "finedeep", "dsmoe")  # no routing replay / no fixed top-k record


# -- float64 loop references -----------------------------------------------------------------------

def expert_np(bank: dict, e: int, h: np.ndarray) -> np.ndarray:
    """Expert e of a bank (w_gate, w_up [E,D,F], w_down [E,F,D]) on one token h [D]."""
    g, u = h @ bank["w_gate"][e], h @ bank["w_up"][e]
    return (g / (1 + np.exp(-g)) * u) @ bank["w_down"][e]


def mlp_np(p: dict, h: np.ndarray) -> np.ndarray:
    g, u = h @ p["gate"], h @ p["up"]
    return (g / (1 + np.exp(-g)) * u) @ p["down"]


def routed_np(w_router: np.ndarray, bank: dict, h: np.ndarray, k: int):
    """Softmax top-k (weights renormalised over the picks) by a loop -> (out [N,D], picks [N,k])."""
    out, picks = np.zeros_like(h), np.zeros((h.shape[0], k), int)
    for t in range(h.shape[0]):
        z = h[t] @ w_router
        p = np.exp(z - z.max())
        p /= p.sum()
        top = np.argsort(-p, kind="stable")[:k]
        w = p[top] / p[top].sum()
        out[t] = sum(w[j] * expert_np(bank, e, h[t]) for j, e in enumerate(top))
        picks[t] = top
    return out, picks


def coe_np(params: dict, x: np.ndarray, m: MoEConfig):
    """Chain-of-Experts (8.10): x^(c) = x^(c-1) + routed_c(x^(c-1)), independent routers."""
    C = m.variant.coe_iterations
    h, picks = x, []
    for c in range(C):
        y, p = routed_np(params["routers"][c]["w"], params["experts"], h, m.top_k // C)
        h, picks = h + y, picks + [p]
    return h, np.concatenate(picks, 1)


def cartesian_np(params: dict, x: np.ndarray, m: MoEConfig, eps: float):
    """CartesianMoE (8.2): a = A(x) + A_sh(x); hbar = RMSNorm(x + a); y = B(hbar) + B_sh(hbar)."""
    a, pa = routed_np(params["router_a"]["w"], params["experts_a"], x, m.top_k)
    a = a + mlp_np(params["shared_a"], x)
    s = x + a
    hbar = s / np.sqrt((s * s).mean(-1, keepdims=True) + eps) * params["norm"]["scale"]
    y, pb = routed_np(params["router_b"]["w"], params["experts_b"], hbar, m.top_k)
    y = y + mlp_np(params["shared_b"], hbar)
    if m.variant.cartesian_output == "a_plus_b":
        y = y + a
    return y, np.concatenate([pa, pb], 1)


def hyper_np(params: dict, x: np.ndarray, m: MoEConfig):
    """HyperMoE (8.1): top-k output plus, per token, the adapter W_up^T ReLU(W_down^T x + b_down)
    + b_up whose weights the shared generator makes from [phi(sum of unselected embeddings); l]."""
    layer, gen = params["layer"], params["cell"]
    y, picks = routed_np(layer["router"]["w"], layer["experts"], x, m.top_k)
    dense = lambda p, v: v @ p["w"] + p["b"]  # noqa: E731
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    D, r = x.shape[1], m.variant.hyper_adapter_dim
    for t in range(x.shape[0]):
        u = sum(layer["expert_embed"][i] for i in range(m.num_experts) if i not in picks[t])
        phi = dense(layer["phi_2"], relu(dense(layer["phi_1"], u)))
        h = relu(dense(gen["hidden"], np.concatenate([phi, layer["layer_embed"][0]])))
        w_down = dense(gen["w_down"], h).reshape(D, r)
        w_up = dense(gen["w_up"], h).reshape(r, D)
        y[t] += relu(x[t] @ w_down + dense(gen["b_down"], h)) @ w_up + dense(gen["b_up"], h)
    return y, picks


def finedeep_np(params: dict, x: np.ndarray, m: MoEConfig, eps: float):
    """Finedeep (8.8): per sub-layer, every expert on RMSNorm(h), weights sigma(r . E_k) (over
    their sum when normalised), h += the weighted sum; returns h_M - h_0."""
    h = x.copy()
    for sub in params["sublayers"].values():
        for t in range(x.shape[0]):
            hn = h[t] / np.sqrt((h[t] ** 2).mean() + eps) * sub["norm"]["scale"]
            K = sub["experts"]["w_gate"].shape[0]
            outs = [expert_np(sub["experts"], k, hn) for k in range(K)]
            sig = np.array([1 / (1 + np.exp(-(o @ sub["w"][:, 0]))) for o in outs])
            w = sig / sig.sum() if m.variant.finedeep_weights == "normalized" else sig
            h[t] = h[t] + sum(wk * o for wk, o in zip(w, outs))
    return h - x, np.tile(np.arange(m.num_experts), (x.shape[0], 1))


def dsmoe_np(params: dict, x: np.ndarray, m: MoEConfig):
    """DSMoE (8.7): g = sigmoid(x W); block i on where g_i > tau, scaled by g_i or 1 ->
    (y, picks [N,E]: i where on, else -1, per-token sparsity term [N])."""
    v = m.variant
    y, picks = np.zeros_like(x), -np.ones((x.shape[0], m.num_experts), int)
    sparsity = np.zeros(x.shape[0])
    for t in range(x.shape[0]):
        g = 1 / (1 + np.exp(-(x[t] @ params["gate"])))
        on = g > v.dsmoe_threshold
        for i in np.flatnonzero(on):
            scale = g[i] if v.dsmoe_scale == "gate" else 1.0
            y[t] += scale * expert_np(params["experts"], i, x[t])
            picks[t, i] = i
        sparsity[t] = (g if v.dsmoe_sparsity == "gate" else on).mean()
    return y, picks, sparsity


REFERENCE = {"coe": lambda p, x, cfg: coe_np(p["layer"], x, cfg.moe),
             "dsmoe": lambda p, x, cfg: dsmoe_np(p["layer"], x, cfg.moe)[:2],
             "finedeep": lambda p, x, cfg: finedeep_np(p["layer"], x, cfg.moe, cfg.norm_eps),
             "cartesian": lambda p, x, cfg: cartesian_np(p["layer"], x, cfg.moe, cfg.norm_eps),
             "hyper": lambda p, x, cfg: hyper_np(p, x, cfg.moe)}


# -- layer machinery -------------------------------------------------------------------------------

class Harness(nnx.Module):
    """A variant layer with the model-level module it is handed as ``cell`` (HyperMoE's
    generator; None for the others)."""

    def __init__(self, cfg, seed: int):
        self.layer = LAYERS[cfg.moe.variant.kind](cfg, rngs=nnx.Rngs(seed))
        self.cell = (HyperGenerator(cfg, rngs=nnx.Rngs(seed + 1))
                     if cfg.moe.variant.kind == "hyper" else None)


def layer_of(name: str, seed: int = 0, scale: float = 0.15, dtype: str = "float32"):
    """(Harness, its ModelConfig) with random weights: routers N(0, 0.3^2) (O(1) logits), the
    generator N(0, 0.05^2), the rest N(0, scale^2) (O(1) activations through chained passes),
    norm scales 1 + noise; ``dtype`` is the compute dtype (parameters stay fp32)."""
    cfg = tiny_model(moe=CASES[name], dtype=dtype)
    return randomized(cfg, seed, scale), cfg


def randomized(cfg, seed: int, scale: float = 0.15) -> Harness:
    """``layer_of``'s Harness for ``cfg``: built abstractly and every Param drawn on the host (an
    eager init would compile each of its random ops, only to be overwritten)."""
    harness = nnx.eval_shape(lambda: Harness(cfg, seed))
    rng = np.random.default_rng(seed)
    state = nnx.state(harness, nnx.Param)
    pure = nnx.to_pure_dict(state)

    def fill(path, a):
        keys = [p.key for p in path]
        if keys[-1] == "scale":
            return jnp.asarray(1 + 0.1 * rng.normal(size=a.shape), jnp.float32)
        std = 0.05 if keys[0] == "cell" else 0.3 if "router" in str(keys[1]) else scale
        return jnp.asarray(std * rng.normal(size=a.shape), jnp.float32)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, pure))
    nnx.update(harness, state)
    return harness


def params64(layer) -> dict:
    return jax.tree.map(lambda a: np.asarray(a, np.float64),
                        nnx.to_pure_dict(nnx.state(layer, nnx.Param)))


@jax.jit(static_argnums=0)
def _layer_call(graphdef, state, x, segment_ids, forced):
    h = nnx.merge(graphdef, state)
    y, aux, _ = h.layer(x, token_ids=jnp.zeros(segment_ids.shape, jnp.int32),
                        segment_ids=segment_ids, state=None, cell=h.cell, rng=None, train=False,
                        forced=forced)
    return y, aux


def call(layer, x, seg=None, forced=None):
    seg = np.ones(x.shape[:2], np.int32) if seg is None else seg
    y, aux = _layer_call(*nnx.split(layer), jnp.asarray(x), jnp.asarray(seg), forced)
    return np.asarray(y), jax.device_get(aux)


def random_x(seed: int, shift: float = 0.0) -> np.ndarray:
    x = np.random.default_rng(100 + seed).normal(size=(LB, LS, 64)).astype(np.float32)
    x[..., 0] += shift
    return x


def skew_router(w: np.ndarray, big: float) -> np.ndarray:
    """Router [D,E] whose logits are dominated by input channel 0 (large and positive in the
    skewed inputs): expert 0 first for every token, expert E-1 last. ``big`` keeps the other
    probabilities far above fp32 underflow, so the other picks are not ties of zeros."""
    w = w.copy()
    w[0, 0], w[0, -1] = big, -big
    return w


def skew_routers(layer, big: float = 4.0):
    if isinstance(layer, DSMoE):
        layer.gate[...] = jnp.asarray(skew_router(np.asarray(layer.gate[...]), big))
        return
    routers = (list(layer.routers) if isinstance(layer, ChainOfExperts)
               else [layer.router] if isinstance(layer, HyperMoE)
               else [layer.router_a, layer.router_b])
    for r in routers:
        r.w[...] = jnp.asarray(skew_router(np.asarray(r.w[...]), big))


ROUTERS_PER_LAYER = {"coe": 2, "cartesian": 2, "hyper": 1, "dsmoe": 1}


@pytest.mark.parametrize("name", list(CASES))
def test_variant_layer_equals_float64_loop(name):
    layer, cfg = layer_of(name, seed=1)
    x = random_x(1)
    y, aux = call(layer, x)
    ref, picks = REFERENCE[name.split("_")[0]](params64(layer), x.astype(np.float64).reshape(
        LB * LS, -1), cfg)
    np.testing.assert_allclose(y.reshape(LB * LS, -1), ref, rtol=1e-5, atol=1e-5)
    counts = np.bincount(picks[picks >= 0], minlength=E)  # -1: a DSMoE block that is off
    np.testing.assert_array_equal(aux["router/counts"], counts)  # pooled over the routers
    assert np.abs(ref - x.reshape(LB * LS, -1)).mean() > 0.1  # the experts changed something
    replayable = not name.startswith(NOT_ROUTED)
    assert ("router/experts" in aux) == replayable  # the replay record
    if replayable:
        np.testing.assert_array_equal(aux["router/experts"].reshape(LB * LS, -1), picks)
    if name == "hyper":  # the generated adapter is a real part of the output
        p = params64(layer)["layer"]
        routed, _ = routed_np(p["router"]["w"], p["experts"], x.astype(np.float64).reshape(
            LB * LS, -1), 2)
        assert np.abs(ref - routed).mean() > 0.05


@pytest.mark.parametrize("name", ["coe", "cartesian", "hyper", "dsmoe"])
def test_variant_all_tokens_to_one_expert_and_an_empty_expert(name):
    layer, cfg = layer_of(name, seed=2, scale=0.05)
    skew_routers(layer.layer)
    x = random_x(2, shift=6.0)
    y, aux = call(layer, x)
    ref, picks = REFERENCE[name](params64(layer), x.astype(np.float64).reshape(LB * LS, -1), cfg)
    n_routers = ROUTERS_PER_LAYER[name]
    assert (picks[:, ::picks.shape[1] // n_routers] == 0).all()  # expert 0 first everywhere
    assert aux["router/counts"][0] == n_routers * LB * LS and aux["router/counts"][-1] == 0
    np.testing.assert_allclose(y.reshape(LB * LS, -1), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["coe", "hyper"])
def test_forced_routing_replays_the_recorded_experts(name):
    layer, _ = layer_of(name, seed=3)
    x = random_x(3)
    y, aux = call(layer, x)
    y2, aux2 = call(layer, x, forced=jnp.asarray(aux["router/experts"]))
    np.testing.assert_allclose(y2, y, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(aux2["router/experts"], aux["router/experts"])
    other = jnp.asarray((aux["router/experts"] + 1) % E)  # every slot on another expert
    y3, aux3 = call(layer, x, forced=other)
    np.testing.assert_array_equal(aux3["router/experts"], other)
    assert np.abs(y3 - y).max() > 1e-3


@pytest.mark.parametrize("name", NOT_ROUTED)
def test_forced_routing_is_rejected_without_a_replayable_routing(name):
    layer, _ = layer_of(name, seed=0)
    with pytest.raises(ConfigError, match="replay"):
        call(layer, random_x(0), forced=jnp.zeros((LB, LS, 2), jnp.int32))


def test_padding_tokens_do_not_count():
    layer, _ = layer_of("coe", seed=4)
    seg = np.ones((LB, LS), np.int32)
    seg[1, 5:] = 0
    _, aux = call(layer, random_x(4), seg=seg)
    assert aux["router/counts"].sum() == (seg != 0).sum() * 4  # top_k over both iterations
    np.testing.assert_array_equal(aux["router/seq_tokens"], (seg != 0).sum(1))


@pytest.mark.parametrize("name", ["finedeep", "dsmoe"])
def test_dense_expert_variants_run_in_bfloat16(name):
    """Every-expert einsums in bf16 compute (XLA:CPU once refused their bf16 x bf16 -> f32 form)."""
    x = random_x(8)
    ref, _ = call(layer_of(name, seed=8)[0], x)
    y, _ = call(layer_of(name, seed=8, dtype="bfloat16")[0], jnp.asarray(x, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=0.1,
                               atol=0.05 * np.abs(ref).max())


# -- DSMoE: sparsity term, straight-through gradient, conversion from a dense FFN ------------------

@pytest.mark.parametrize("name", ["dsmoe", "dsmoe_gate"])
def test_dsmoe_sparsity_term_matches_hand(name):
    layer, cfg = layer_of(name, seed=5)
    x = random_x(5)
    seg = np.ones((LB, LS), np.int32)
    seg[2, 3:] = 0
    _, aux = call(layer, x, seg=seg)
    _, picks, sparsity = dsmoe_np(params64(layer)["layer"], x.astype(np.float64).reshape(
        LB * LS, -1), cfg.moe)
    valid = seg.reshape(-1) != 0
    np.testing.assert_allclose(aux["router/sparsity"], sparsity[valid].mean(), rtol=1e-5)
    active = (picks >= 0).sum(1)
    assert active.min() < active.max()  # the number of active blocks varies by token
    np.testing.assert_allclose(aux["router/active_experts"], active[valid].mean(), rtol=1e-6)


@jax.jit(static_argnums=0)
def _layer_grads(graphdef, params, rest, x, ct):
    """Gradient of sum(y * ct) + aux sparsity w.r.t. the layer's parameters."""
    def loss(params):
        h = nnx.merge(graphdef, params, rest)
        seg = jnp.ones(x.shape[:2], jnp.int32)
        y, aux, _ = h.layer(x, token_ids=jnp.zeros_like(seg), segment_ids=seg, state=None,
                            cell=h.cell, rng=None, train=True)
        return jnp.sum(y * ct) + aux["router/sparsity"]
    return jax.grad(loss)(params)


@pytest.mark.parametrize("name", ["dsmoe", "dsmoe_gate"])
def test_dsmoe_gate_gradient_is_straight_through(name):
    """dL/dg_i = <ct, E_i(x)> * dw_i/dg_i with dm_i/dg_i := 1 for every block, active or not
    (w = m: 1; w = m g: g + m), plus the sparsity term's gradient; dg/dz = g (1 - g)."""
    layer, cfg = layer_of(name, seed=6)
    v = cfg.moe.variant
    x = random_x(6)
    ct = np.random.default_rng(6).normal(size=x.shape).astype(np.float32)
    g_, p_, r_ = nnx.split(layer, nnx.Param, ...)
    grads = jax.device_get(_layer_grads(g_, p_, r_, jnp.asarray(x), jnp.asarray(ct)))
    p = params64(layer)["layer"]
    xf, ctf = x.astype(np.float64).reshape(LB * LS, -1), ct.astype(np.float64).reshape(LB * LS, -1)
    g = 1 / (1 + np.exp(-(xf @ p["gate"])))
    on = (g > v.dsmoe_threshold).astype(np.float64)
    outs = np.stack([[expert_np(p["experts"], i, xt) for i in range(E)] for xt in xf])  # [N,E,D]
    dl_dw = np.einsum("ned,nd->ne", outs, ctf)
    dl_dg = dl_dw * ((g + on) if v.dsmoe_scale == "gate" else 1.0) + 1.0 / (LB * LS * E)
    want = xf.T @ (dl_dg * g * (1 - g))
    np.testing.assert_allclose(grads["layer"]["gate"], want, rtol=1e-4, atol=1e-5)
    # without the straight-through term (dm/dg = 0) the gradient would be far off
    no_ste = dl_dw * (on if v.dsmoe_scale == "gate" else 0.0) + 1.0 / (LB * LS * E)
    assert np.abs(xf.T @ (no_ste * g * (1 - g)) - want).max() > 100 * 1e-5


def test_dsmoe_from_dense_with_every_block_on_is_the_dense_ffn():
    """The dense FFN (its float64 form, ``mlp_np``: no eager module call) split into E blocks,
    all on, is the layer's output."""
    cfg = tiny_model(moe=MoEConfig(num_experts=E, top_k=2, d_expert=F, variant=VariantConfig(
        kind="dsmoe", dsmoe_threshold=0.0)))
    rng = np.random.default_rng(7)
    dense = {k: (0.15 * rng.normal(size=shape)).astype(np.float32)
             for k, shape in (("gate", (64, E * F)), ("up", (64, E * F)), ("down", (E * F, 64)))}
    layer = randomized(cfg, 7)
    bank = dsmoe_from_dense(dense["gate"], dense["up"], dense["down"], E)
    for name, value in bank.items():
        getattr(layer.layer.experts, name)[...] = jnp.asarray(value)
    x = random_x(7)
    y, aux = call(layer, x)
    want = mlp_np({k: v.astype(np.float64) for k, v in dense.items()},
                  x.astype(np.float64).reshape(LB * LS, -1))
    np.testing.assert_allclose(y.reshape(LB * LS, -1), want, rtol=1e-5, atol=1e-5)
    assert aux["router/active_experts"] == E
    with pytest.raises(ConfigError, match="must divide"):
        dsmoe_from_dense(dense["gate"], dense["up"], dense["down"], 3)


# -- parameters and FLOPs --------------------------------------------------------------------------

def n_params(make, cfg) -> int:
    abstract = nnx.eval_shape(lambda: make(cfg, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_cartesian_half_experts_match_the_top_k_moe_in_params():
    """Baseline: E experts of width 2F, top-K, a shared expert of 2F. Cartesian: two sub-layers of E
    experts of width F and top-K each, a shared expert of F each: the same expert parameters and
    the same active expert FLOPs (2 x K x 3DF = K x 3D(2F)); it adds one router and one norm."""
    D = 64
    base = tiny_model(moe=MoEConfig(num_experts=E, top_k=2, d_expert=2 * F, num_shared_experts=1))
    cart = tiny_model(moe=CASES["cartesian"])
    assert n_params(CartesianMoE, cart) == n_params(MoE, base) + D * E + D


def test_finedeep_matches_the_dense_ffn_in_params():
    """Finedeep with M x K experts of width F is the dense FFN of d_ff = M K F (same params, all
    active: same FLOPs) plus, per sub-layer, a router vector and a norm (2D each)."""
    fd = tiny_model(moe=CASES["finedeep"])
    dense = dataclasses.replace(fd, d_ff=E * F)
    assert n_params(Finedeep, fd) == n_params(MLP, dense) + 2 * 2 * 64


def test_coe_params_are_the_moe_plus_one_router_per_extra_iteration():
    """CoE-C(K/C of E): the expert pool of the top-K MoE, C routers; C x K/C = K expert calls per
    token, so the same active expert FLOPs (and C - 1 extra router matmuls)."""
    coe = tiny_model(moe=CASES["coe"])
    base = tiny_model(moe=dataclasses.replace(CASES["coe"], variant=VariantConfig()))
    assert n_params(ChainOfExperts, coe) == n_params(MoE, base) + 64 * E


# -- config validation -----------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    (dict(top_k=3, variant=VariantConfig(kind="coe", coe_iterations=2)), "top_k"),
    (dict(num_shared_experts=1, variant=VariantConfig(kind="coe")), "num_shared_experts"),
    (dict(router=RouterConfig(aux_free_bias=True), variant=VariantConfig(kind="cartesian")),
     "variant.kind"),
    (dict(router=RouterConfig(kind="topp"), variant=VariantConfig(kind="coe")), "variant.kind"),
    (dict(top_k=4, variant=VariantConfig(kind="finedeep")), "finedeep_sublayers"),
    (dict(top_k=E, variant=VariantConfig(kind="finedeep", finedeep_sublayers=3)),
     "finedeep_sublayers"),
    (dict(num_shared_experts=1, variant=VariantConfig(kind="dsmoe")), "num_shared_experts"),
])
def test_variant_config_rejects_invalid_combinations(kw, match):
    with pytest.raises(ConfigError, match=match):
        MoEConfig(num_experts=E, **{"top_k": 2, **kw})


def test_variant_on_a_dense_model_is_rejected():
    with pytest.raises(ConfigError, match="num_experts > 0"):
        MoEConfig(num_experts=0, variant=VariantConfig(kind="coe"))


def test_variant_config_rejects_unknown_values():
    with pytest.raises(ConfigError, match="variant.kind"):
        VariantConfig(kind="hyperr")
    with pytest.raises(ConfigError, match="coe_iterations"):
        VariantConfig(kind="coe", coe_iterations=0)
    with pytest.raises(ConfigError, match="cartesian_output"):
        VariantConfig(cartesian_output="b_only")
    with pytest.raises(ConfigError, match="hyper_adapter_dim"):
        VariantConfig(kind="hyper", hyper_adapter_dim=0)
    with pytest.raises(ConfigError, match="finedeep_weights"):
        VariantConfig(finedeep_weights="softmax")
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="dsmoe_threshold"):
            VariantConfig(dsmoe_threshold=bad)
    with pytest.raises(ConfigError, match="dsmoe_sparsity_coef"):
        VariantConfig(dsmoe_sparsity_coef=-1.0)
    with pytest.raises(ConfigError, match="dsmoe_scale"):
        VariantConfig(dsmoe_scale="half")


# -- tiny model: sharded == single device, train steps ---------------------------------------------

MB, MS = 8, 16


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 288, size=(MB, MS + 1)).astype(np.int32)
    seg = np.ones((MB, MS), np.int32)
    seg[6, 12:] = 0
    return dict(inputs=toks[:, :-1], targets=toks[:, 1:], segment_ids=seg,
                positions=np.broadcast_to(np.arange(MS, dtype=np.int32), (MB, MS)).copy(),
                loss_mask=(seg != 0).astype(np.float32), domain=np.zeros((MB,), np.int32))


@jax.jit(static_argnums=0)
def _forward(graphdef, params, rest, tokens, segment_ids, positions):
    return nnx.merge(graphdef, params, rest)(tokens, segment_ids, positions)


def make_state(s: T.Setup, pure: dict) -> T.TrainState:
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


def host_params(cfg, seed: int) -> dict:
    """A Model's parameters (pure dict) drawn on the host: norm scales 1, the rest
    N(0, init_std^2); an eager init would compile each of its random ops."""
    rng = np.random.default_rng(seed)
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0)))))

    def draw(path, a):
        if str(path[-1].key) == "scale":
            return np.ones(a.shape, np.float32)
        return (cfg.init_std * rng.normal(size=a.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, abstract)


def model_from(cfg, pure: dict) -> Model:
    model = nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    nnx.update(model, state)
    return model


def run_on(model_cfg, pure, batch, mesh_cfg, ndev, steps=0):
    """Raw loss/gradients/stats at ``pure`` and the losses of ``steps`` plain SGD steps from it,
    on a mesh of ``ndev`` devices, all by one jitted gradient program (no separate forward or
    optimizer-step programs); ``ep``: whether the expert-parallel shard_map path was traced."""
    cfg = dataclasses.replace(tiny_config(mesh=mesh_cfg, train={"warmup_steps": 0}),
                              model=model_cfg)
    mesh = make_mesh(mesh_cfg, jax.devices()[:ndev])
    s = T.setup(cfg, mesh)
    state = make_state(s, pure)
    gb = T.global_batch(mesh, batch)
    calls = []
    orig = moe_ep.routed_experts_ep
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(moe_ep, "routed_experts_ep", lambda *a, **k: calls.append(1) or orig(*a, **k))
        run = gradients_then_sgd(s, state, gb, steps, SGD_LR)
    return dict(run, grads=nnx.to_pure_dict(run["grads"]), ep=bool(calls))


@pytest.fixture(scope="module", params=["coe", "cartesian", "hyper", "finedeep", "dsmoe"])
def runs(request, batch):
    """The variant's tiny model on 1 device (with 3 SGD steps) and on 8 (data 2 x expert 4)."""
    model_cfg = tiny_model(moe=CASES[request.param])
    pure = host_params(model_cfg, 0)
    single = run_on(model_cfg, pure, batch, MeshConfig(data=1), 1, steps=3)
    sharded = run_on(model_cfg, pure, batch, MeshConfig(data=2, expert=4), 8)
    return request.param, single, sharded


def test_variant_sharded_equals_single_device(runs):
    """Loss, every balance statistic (counts exactly) and every raw gradient agree: equal
    gradients imply equal logits and routing, so no separate forward program is compiled."""
    name, ref, got = runs
    # routed experts really ran expert-parallel (Finedeep's dense experts are plain einsums over
    # expert-sharded weights)
    assert got["ep"] == (name not in ("finedeep", "dsmoe")) and not ref["ep"]
    np.testing.assert_allclose(got["loss"], ref["loss"], *TOL_SHARDED_FP32)
    stats, ref_stats = got["sums"]["stats"], ref["sums"]["stats"]
    assert set(stats) == set(ref_stats)
    for k in ref_stats:
        tol = (0, 0) if k == "counts" else TOL_SHARDED_FP32
        np.testing.assert_allclose(stats[k], ref_stats[k], *tol, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 got["grads"], ref["grads"])
    layer0 = ref["grads"]["layers"][0]["mlp"]
    for path in TRAINED[name]:  # every router, expert bank and embedding gets a gradient
        leaf = layer0
        for key in path:
            leaf = leaf[key]
        assert np.abs(leaf).max() > 0, path
    if name == "hyper":  # one generator for the whole model
        assert set(ref["grads"]["router_cell"]) == {"hidden", "w_down", "b_down", "w_up", "b_up"}
        assert np.abs(ref["grads"]["router_cell"]["w_up"]["w"]).max() > 0


TRAINED = {  # gradient leaves of an MoE layer that must be non-zero
    "coe": [("routers", 0, "w"), ("routers", 1, "w"), ("experts", "w_gate")],
    "cartesian": [("router_a", "w"), ("router_b", "w"), ("experts_a", "w_gate"),
                  ("experts_b", "w_up"), ("shared_b", "down"), ("norm", "scale")],
    "hyper": [("router", "w"), ("experts", "w_gate"), ("expert_embed",), ("phi_1", "w"),
              ("layer_embed",)],
    "dsmoe": [("gate",), ("experts", "w_gate"), ("experts", "w_down")],
    "finedeep": [("sublayers", 0, "w"), ("sublayers", 1, "w"), ("sublayers", 0, "experts", "w_up"),
                 ("sublayers", 1, "norm", "scale")],
}


@pytest.mark.parametrize("name", ["coe", "hyper"])
def test_variant_scan_equals_unrolled(name, batch):
    """Scanned layers (stacked params; HyperMoE's generator broadcast into the scan) == unrolled."""
    cfg = tiny_model(moe=CASES[name])
    pure = host_params(cfg, 1)
    scan_cfg = dataclasses.replace(cfg, scan_layers=True)
    stacked = dict(pure, layers=jax.tree.map(lambda *xs: np.stack(xs),
                                             *[pure["layers"][i] for i in range(cfg.num_layers)]))
    model, scanned = model_from(cfg, pure), model_from(scan_cfg, stacked)
    args = (batch["inputs"], batch["segment_ids"], batch["positions"])
    ref = jax.device_get(_forward(*nnx.split(model, nnx.Param, ...), *args))
    got = jax.device_get(_forward(*nnx.split(scanned, nnx.Param, ...), *args))
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-5)
    assert set(got[1]) == set(ref[1])
    for k in ref[1]:
        np.testing.assert_allclose(got[1][k], ref[1][k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_variant_model_trains(runs):
    """Plain SGD on the raw gradient lowers the loss; every layer routes over the E experts."""
    _, ref, _ = runs
    losses = ref["losses"]
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 1e-3, losses
    assert ref["sums"]["stats"]["counts"].shape == (2, E)


def test_coe_with_one_expert_per_iteration_builds_and_routes():
    """CoE-2 with top_k=2 picks one expert per iteration: its sub-routers are plain top-1 routers
    (the layer's own check, top_k % C == 0, must not be re-applied to each sub-router's k=1)."""
    moe = MoEConfig(num_experts=E, top_k=2, d_expert=F,
                    variant=VariantConfig(kind="coe", coe_iterations=2))
    layer = ChainOfExperts(tiny_model(moe=moe), rngs=nnx.Rngs(0))
    assert [r.moe_cfg.top_k for r in layer.routers] == [1, 1]
