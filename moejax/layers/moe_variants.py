"""MoE layer variants selected by ``cfg.moe.variant.kind`` (spec: architecture.md section 8):

* ``ChainOfExperts`` (8.10, 'coe'): C iterations over one expert pool,
  ``x^(c) = x^(c-1) + sum_i g_{c,i} E_i(x^(c-1))``, an independent router per iteration picking
  top_k / C experts; the layer returns ``x^(C)``.
* ``CartesianMoE`` (8.2, 'cartesian'): sub-layer A (routed + shared) on h, then
  ``hbar = Norm(h + A(h))`` and sub-layer B (its own router, experts and shared expert) on hbar;
  returns B(hbar) (or A(h) + B(hbar), ``variant.cartesian_output``).
* ``HyperMoE`` (8.1, 'hyper'): the top-k MoE output plus a per-token adapter
  ``W_up^T ReLU(W_down^T x + b_down) + b_up`` whose weights the ``HyperGenerator`` (one for the
  whole model, the ``cell`` the model hands every MoE layer) emits from
  ``[phi(sum of the unselected experts' embeddings); layer embedding]``.
* ``Finedeep`` (8.8, 'finedeep'): a dense FFN as M sequential pre-norm residual sub-layers,
  ``x^(m) = x^(m-1) + sum_k w_{m,k} E_{m,k}(RMSNorm_m(x^(m-1)))``, all K = num_experts / M experts
  of a sub-layer active, ``w_{m,k} = sigma(r_m . E_{m,k}) / sum_j sigma(r_m . E_{m,j})``
  (``variant.finedeep_weights``); the layer returns the sum of the sub-layer updates
  ``x^(M) - x^(0)`` (the block adds it to the residual stream).
* ``DSMoE`` (8.7, 'dsmoe'): a dense FFN's hidden dim split into num_experts blocks
  (``dsmoe_from_dense``), ``y = sum_i m_i (g_i or 1) E_i(x)`` with ``g = sigmoid(W x)``, the hard
  mask ``m_i = 1[g_i > tau]`` forward and a straight-through gradient (dm/dg = 1); the sparsity
  loss term is reported per layer as ``aux['router/sparsity']``.

BAM's attention experts (8.9) are attention, not an FFN: ``moejax.layers.attention_experts``.

Finedeep and DSMoE run every expert on every token (a dense einsum over expert-sharded weights):
Finedeep by design, DSMoE because the straight-through gradient of an inactive block needs its
output.

Every routed sub-step is the ordinary routed-expert path (``moe_dispatch.moe_ffn``: dropless or
capacity, expert parallel under a mesh), so sharding needs nothing new. Layers return the same aux
keys as ``moe.MoE`` so balance losses and metrics work unchanged; with several routers per layer
their statistics are pooled (``pooled_aux``): selection counts are summed over the routers (the
load each expert pool really carries), probabilities and scalar statistics are averaged.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import ConfigError, ModelConfig, MoEConfig, VariantConfig
from moejax.layers import param, zeros_init
from moejax.layers.balance import document_stats, needs_token_stats
from moejax.layers.mlp import MLP
from moejax.layers.moe import MoE, seq_stats, token_stats
from moejax.layers.moe_dispatch import moe_ffn
from moejax.layers.norms import make_norm
from moejax.layers.router import RecurrentCell, Router, Routing, router_stats
from moejax.mesh import constrain

_HI = jax.lax.Precision.HIGHEST
SUMMED_STATS = ("counts", "active_experts", "dropped")  # per-router counts add up over routers


def make_moe(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """The MoE block ``cfg.moe.variant.kind`` selects (the standard ``MoE`` for 'none')."""
    kind = cfg.moe.variant.kind
    if kind == "none":
        return MoE(cfg, rngs=rngs)
    if kind == "coe":
        return ChainOfExperts(cfg, rngs=rngs)
    if kind == "cartesian":
        return CartesianMoE(cfg, rngs=rngs)
    if kind == "hyper":
        return HyperMoE(cfg, rngs=rngs)
    if kind == "finedeep":
        return Finedeep(cfg, rngs=rngs)
    if kind == "dsmoe":
        return DSMoE(cfg, rngs=rngs)
    if kind == "bam":  # BAM's FFN experts are a plain top-k MoE (attention: AttentionExperts)
        return MoE(cfg, rngs=rngs)
    raise ConfigError(f"model.moe.variant.kind={kind!r} has no layer")


class ExpertBank(nnx.Module):
    """Routed SwiGLU experts w_gate/w_up [E,D,F] ('expert','embed','mlp'), w_down [E,F,D], as in
    ``moe.MoE``; applied to a routing through ``moe_ffn`` (dropless/capacity, EP under a mesh)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        m = cfg.moe
        E, D, F = m.num_experts, cfg.d_model, m.d_expert
        init = jax.nn.initializers.truncated_normal(cfg.init_std)
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        out_init = jax.nn.initializers.truncated_normal(out_std)
        pd = cfg.param_dtype
        self.moe_cfg = m
        self.dtype = jnp.dtype(cfg.dtype)
        self.w_gate = param(init, rngs.params(), (E, D, F), pd, ("expert", "embed", "mlp"))
        self.w_up = param(init, rngs.params(), (E, D, F), pd, ("expert", "embed", "mlp"))
        self.w_down = param(out_init, rngs.params(), (E, F, D), pd, ("expert", "mlp", "embed"))

    def __call__(self, xf: jax.Array, routing: Routing) -> tuple[jax.Array, dict]:
        """xf [N,D] -> (sum over slots of weight * expert output [N,D], compute dtype; stats)."""
        dt = self.dtype
        w = (self.w_gate[...].astype(dt), self.w_up[...].astype(dt), self.w_down[...].astype(dt))
        return moe_ffn(xf.astype(dt), routing.experts, routing.weights, *w, cfg=self.moe_cfg,
                       dtype=dt)


def sub_router(cfg: ModelConfig, top_k: int, *, rngs: nnx.Rngs) -> Router:
    """A learned top-k Router over cfg's experts that picks ``top_k`` experts per token (a plain
    router config: the variant's own checks, e.g. CoE's top_k % C, concern the whole layer)."""
    moe = dataclasses.replace(cfg.moe, top_k=top_k, variant=VariantConfig())
    return Router(dataclasses.replace(cfg, moe=moe), rngs=rngs)


def shared_mlp(cfg: ModelConfig, *, rngs: nnx.Rngs) -> MLP | None:
    """The always-active shared expert(s) of width d_shared (or d_expert * count), or None."""
    m = cfg.moe
    if not m.num_shared_experts:
        return None
    return MLP(dataclasses.replace(cfg, d_ff=m.d_shared or m.d_expert * m.num_shared_experts),
               rngs=rngs)


def pooled_aux(routings: list[Routing], valid: jax.Array, segment_ids: jax.Array,
               moe: MoEConfig) -> dict:
    """The MoE aux statistics (``moe.MoE`` keys, 'router/...') of several routers in one layer:
    per-router ``router_stats`` summed (counts) or averaged (the rest); the per-sequence,
    per-document (and, for balance scopes that need them, per-token) balance inputs from the
    summed selections and the mean probabilities."""
    B = segment_ids.shape[0]
    n = len(routings)
    per = [router_stats(r, valid) for r in routings]
    stats = {k: sum(s[k] for s in per) / (1 if k in SUMMED_STATS else n) for k in per[0]}
    selected = sum(r.selected for r in routings)  # [N,E] selections of all routers
    probs = sum(r.probs for r in routings) / n  # [N,E]
    stats.update(seq_stats(selected, probs, valid, B))
    stats.update(document_stats(selected, probs, segment_ids, num_real=moe.num_experts))
    aux = {f"router/{k}": v for k, v in stats.items()}
    if needs_token_stats(moe.balance):
        aux.update(token_stats(selected, probs, valid, B))
    return aux


def _route(router: Router, xf, *, token_ids, valid, rng, train, forced, index: int) -> Routing:
    """One router's decision on xf [N,D] (jitter keys differ per router: fold_in(rng, index))."""
    key = None if rng is None else jax.random.fold_in(rng, index)
    routing, _ = router(xf, token_ids=token_ids, rng=key, train=train, valid=valid, forced=forced)
    return routing


class ChainOfExperts(nnx.Module):
    """Chain-of-Experts (8.10): ``routers`` (C of them, D x E each) and one ``experts`` bank."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        m = cfg.moe
        self.cfg = cfg
        C = m.variant.coe_iterations
        self.routers = nnx.List([sub_router(cfg, m.top_k // C, rngs=rngs) for _ in range(C)])
        self.experts = ExpertBank(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, *, token_ids: jax.Array, segment_ids: jax.Array,
                 state: jax.Array | None, cell=None, rng: jax.Array | None = None,
                 train: bool = False, forced: jax.Array | None = None):
        """x [B,T,D] -> (x^(C) [B,T,D], aux, state unchanged). ``forced`` [B,T,top_k] replays a
        routing: iteration c uses slots c*k .. c*k+k-1 (k = top_k / C), the order of
        ``aux['router/experts']``."""
        m = self.cfg.moe
        B, T, D = x.shape
        k = m.top_k // len(self.routers)
        valid = (segment_ids != 0).reshape(B * T)
        ids = token_ids.reshape(B * T)
        h = x.reshape(B * T, D).astype(jnp.dtype(self.cfg.dtype))  # x^(0), batch-major rows
        routings, dropped = [], jnp.zeros((), jnp.int32)
        for c, router in enumerate(self.routers):
            f = None if forced is None else forced.reshape(B * T, -1)[:, c * k:(c + 1) * k]
            routing = _route(router, h, token_ids=ids, valid=valid, rng=rng, train=train, forced=f,
                             index=c)
            y, dispatch = self.experts(h, routing)
            h = h + y  # the inner residual: x^(c) = x^(c-1) + sum_i g_i E_i(x^(c-1))
            routings.append(routing)
            dropped = dropped + dispatch["dropped"]
        aux = pooled_aux(routings, valid, segment_ids, m)
        aux["router/dropped"] = aux["router/dropped"] + dropped
        aux["router/experts"] = jnp.concatenate([r.experts for r in routings], -1).reshape(B, T, -1)
        out = constrain(h.reshape(B, T, D).astype(x.dtype), ("batch", "length", "embed"))
        return out, aux, state


class CartesianMoE(nnx.Module):
    """CartesianMoE (8.2): sub-layers A and B, each a router, an expert bank (num_experts experts
    of d_expert, top_k each) and optional shared experts, with ``norm`` between them."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        m = cfg.moe
        self.cfg = cfg
        self.router_a = sub_router(cfg, m.top_k, rngs=rngs)
        self.experts_a = ExpertBank(cfg, rngs=rngs)
        self.shared_a = shared_mlp(cfg, rngs=rngs)
        self.norm = make_norm(cfg, cfg.d_model)
        self.router_b = sub_router(cfg, m.top_k, rngs=rngs)
        self.experts_b = ExpertBank(cfg, rngs=rngs)
        self.shared_b = shared_mlp(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, *, token_ids: jax.Array, segment_ids: jax.Array,
                 state: jax.Array | None, cell=None, rng: jax.Array | None = None,
                 train: bool = False, forced: jax.Array | None = None):
        """x [B,T,D] -> (B(Norm(x + A(x))) [B,T,D] (plus A(x) with cartesian_output='a_plus_b'),
        aux, state unchanged). Routing replay is not supported (two independent expert sets)."""
        if forced is not None:
            raise ConfigError("model.moe.variant.kind='cartesian' cannot replay a forced routing "
                              "(its two sub-layers route independently); pass forced_experts=None")
        m = self.cfg.moe
        B, T, D = x.shape
        valid = (segment_ids != 0).reshape(B * T)
        ids = token_ids.reshape(B * T)
        kw = dict(token_ids=ids, valid=valid, rng=rng, train=train, forced=None)
        ra = _route(self.router_a, x.reshape(B * T, D), index=0, **kw)
        a, da = self.experts_a(x.reshape(B * T, D), ra)
        a = a.reshape(B, T, D) + (0 if self.shared_a is None else self.shared_a(x))
        hbar = self.norm(x + a.astype(x.dtype))  # [B,T,D]
        rb = _route(self.router_b, hbar.reshape(B * T, D), index=1, **kw)
        y, db = self.experts_b(hbar.reshape(B * T, D), rb)
        y = y.reshape(B, T, D) + (0 if self.shared_b is None else self.shared_b(hbar))
        if m.variant.cartesian_output == "a_plus_b":
            y = y + a
        aux = pooled_aux([ra, rb], valid, segment_ids, m)
        aux["router/dropped"] = aux["router/dropped"] + da["dropped"] + db["dropped"]
        return constrain(y.astype(x.dtype), ("batch", "length", "embed")), aux, state


def make_shared_cell(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module | None:
    """The module one model shares across its MoE layers (passed to each as ``cell``): RMoE's
    recurrent router cell, HyperMoE's parameter generator, or None."""
    m = cfg.moe
    if not m.enabled:
        return None
    if m.router.recurrent != "none":
        return RecurrentCell(cfg, rngs=rngs)
    if m.variant.kind == "hyper":
        return HyperGenerator(cfg, rngs=rngs)
    return None


class Dense(nnx.Module):
    """x @ w + b with w [n_in, n_out] and b [n_out] (init 0), both replicated, fp32 math."""

    def __init__(self, n_in: int, n_out: int, init, *, param_dtype, rngs: nnx.Rngs):
        self.w = param(init, rngs.params(), (n_in, n_out), param_dtype, (None, None))
        self.b = param(zeros_init, None, (n_out,), param_dtype, (None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., n_in] -> [..., n_out] in fp32."""
        return jnp.dot(x.astype(jnp.float32), self.w[...].astype(jnp.float32),
                       precision=_HI) + self.b[...].astype(jnp.float32)


class HyperGenerator(nnx.Module):
    """HyperMoE's ParameterGenerator, shared by all experts and layers: ``hidden`` [P+Lz -> H]
    (ReLU), then linear heads emitting the adapter's W_down [D,r], b_down [r], W_up [r,D], b_up [D]
    (heads U(-1e-3, 1e-3), biases 0: the adapter starts near zero)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        v, D, pd = cfg.moe.variant, cfg.d_model, cfg.param_dtype
        H, r = v.hyper_bottleneck, v.hyper_adapter_dim
        normal = jax.nn.initializers.truncated_normal(cfg.init_std)
        head = jax.nn.initializers.uniform(2e-3)  # U(0, 2e-3) shifted below to U(-1e-3, 1e-3)
        small = lambda k, s, d: head(k, s, d) - jnp.asarray(1e-3, d)  # noqa: E731
        kw = dict(param_dtype=pd, rngs=rngs)
        self.hidden = Dense(v.hyper_embed_dim + v.hyper_layer_embed_dim, H, normal, **kw)
        self.w_down = Dense(H, D * r, small, **kw)
        self.b_down = Dense(H, r, small, **kw)
        self.w_up = Dense(H, r * D, small, **kw)
        self.b_up = Dense(H, D, small, **kw)

    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
        """The generated adapter on each token: x [N,D] (MoE input), z [N,P+Lz] (processed
        selection embedding and layer embedding) -> [N,D] fp32. The per-token weights are never
        materialised: x^T W_down(h) = (h (x) x) . G_down + x^T B_down (the same for W_up)."""
        N, D = x.shape
        r = self.b_down.b.shape[0]
        h = jax.nn.relu(self.hidden(z))  # [N,H]
        x = x.astype(jnp.float32)
        gd = self.w_down.w[...].astype(jnp.float32).reshape(-1, D, r)  # [H,D,r]
        down = (jnp.einsum("nj,na,jar->nr", h, x, gd, precision=_HI)
                + jnp.dot(x, self.w_down.b[...].astype(jnp.float32).reshape(D, r), precision=_HI)
                + self.b_down(h))
        a = jax.nn.relu(down)  # [N,r]
        gu = self.w_up.w[...].astype(jnp.float32).reshape(-1, r, D)  # [H,r,D]
        return (jnp.einsum("nj,nr,jrd->nd", h, a, gu, precision=_HI)
                + jnp.dot(a, self.w_up.b[...].astype(jnp.float32).reshape(r, D), precision=_HI)
                + self.b_up(h))


class HyperMoE(nnx.Module):
    """HyperMoE (8.1): ``router`` and ``experts`` as a top-k MoE; ``expert_embed`` [E,P], the
    selection processor ``phi_1``/``phi_2`` (P -> P, ReLU between) and ``layer_embed`` [1,Lz];
    the adapter's weights come from the model's shared ``HyperGenerator`` (``cell``)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        m, v, pd = cfg.moe, cfg.moe.variant, cfg.param_dtype
        self.cfg = cfg
        normal = jax.nn.initializers.truncated_normal(cfg.init_std)
        P = v.hyper_embed_dim
        self.router = sub_router(cfg, m.top_k, rngs=rngs)
        self.experts = ExpertBank(cfg, rngs=rngs)
        self.expert_embed = param(normal, rngs.params(), (m.num_experts, P), pd, (None, None))
        self.phi_1 = Dense(P, P, normal, param_dtype=pd, rngs=rngs)
        self.phi_2 = Dense(P, P, normal, param_dtype=pd, rngs=rngs)
        self.layer_embed = param(normal, rngs.params(), (1, v.hyper_layer_embed_dim), pd,
                                 (None, None))

    def __call__(self, x: jax.Array, *, token_ids: jax.Array, segment_ids: jax.Array,
                 state: jax.Array | None, cell: "HyperGenerator | None" = None,
                 rng: jax.Array | None = None, train: bool = False,
                 forced: jax.Array | None = None):
        """x [B,T,D] -> (routed top-k output + generated adapter [B,T,D], aux, state unchanged).
        ``cell``: the model's HyperGenerator. ``forced`` [B,T,top_k] replays a routing (the
        adapter then reads the replayed selection)."""
        if not isinstance(cell, HyperGenerator):
            raise ValueError("HyperMoE needs the model's shared HyperGenerator as cell= "
                             "(moe_variants.make_shared_cell)")
        m = self.cfg.moe
        B, T, D = x.shape
        xf = x.reshape(B * T, D)
        valid = (segment_ids != 0).reshape(B * T)
        f = None if forced is None else forced.reshape(B * T, -1)
        routing = _route(self.router, xf, token_ids=token_ids.reshape(B * T), valid=valid, rng=rng,
                         train=train, forced=f, index=0)
        y, dispatch = self.experts(xf, routing)  # [N,D]
        unselected = 1.0 - routing.selected[:, :m.num_experts]  # [N,E] 0/1, no gradient path
        u = jnp.dot(unselected, self.expert_embed[...].astype(jnp.float32), precision=_HI)  # [N,P]
        phi = self.phi_2(jax.nn.relu(self.phi_1(u)))  # [N,P]
        lz = jnp.broadcast_to(self.layer_embed[...].astype(jnp.float32),
                              (B * T, self.layer_embed.shape[1]))  # [N,Lz]
        adapter = cell(xf, jnp.concatenate([phi, lz], -1))  # [N,D] fp32
        y = (y.astype(jnp.float32) + adapter).reshape(B, T, D)
        aux = pooled_aux([routing], valid, segment_ids, m)
        aux["router/dropped"] = aux["router/dropped"] + dispatch["dropped"]
        aux["router/experts"] = routing.experts.reshape(B, T, -1)
        return constrain(y.astype(x.dtype), ("batch", "length", "embed")), aux, state


class FinedeepSublayer(nnx.Module):
    """One Finedeep sub-layer: ``norm``, the output-guided router ``w`` [D,1] and K dense experts
    (an ExpertBank's weights [K,D,F], [K,F,D]) that all run on every token."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        m = cfg.moe
        K = m.num_experts // m.variant.finedeep_sublayers
        bank_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(
            m, num_experts=K, top_k=K, variant=dataclasses.replace(m.variant, kind="none")))
        self.norm = make_norm(cfg, cfg.d_model)
        self.w = param(jax.nn.initializers.truncated_normal(cfg.init_std), rngs.params(),
                       (cfg.d_model, 1), cfg.param_dtype, ("embed", None))
        self.experts = ExpertBank(bank_cfg, rngs=rngs)
        self.normalize = m.variant.finedeep_weights == "normalized"

    def __call__(self, h: jax.Array) -> tuple[jax.Array, Routing]:
        """h [N,D] -> (the update sum_k w_k E_k(norm(h)) [N,D] f32, a Routing of all K experts
        with weights w, for the layer statistics)."""
        out = every_expert(self.norm(h), self.experts)  # [N,K,D]
        logits = jnp.einsum("nkd,d->nk", out, self.w[...][:, 0].astype(jnp.float32),
                            precision=_HI)  # output-guided scores
        s = jax.nn.sigmoid(logits)
        total = jnp.sum(s, -1, keepdims=True)
        w = s / total if self.normalize else s
        y = jnp.einsum("nkd,nk->nd", out, w, precision=_HI)
        N, K = logits.shape
        routing = Routing(experts=jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), (N, K)),
                          weights=w, probs=s / total, logits=logits, selected=jnp.ones((N, K)),
                          log_probs=jax.nn.log_sigmoid(logits) - jnp.log(total),
                          dropped=jnp.zeros((N,), jnp.float32))
        return y, routing


class Finedeep(nnx.Module):
    """Finedeep (8.8): ``sublayers`` (M FinedeepSublayer) over one token stream; no routing
    decision (all experts are active), so there is nothing to replay."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        M = cfg.moe.variant.finedeep_sublayers
        self.sublayers = nnx.List([FinedeepSublayer(cfg, rngs=rngs) for _ in range(M)])

    def __call__(self, x: jax.Array, *, token_ids: jax.Array, segment_ids: jax.Array,
                 state: jax.Array | None, cell=None, rng: jax.Array | None = None,
                 train: bool = False, forced: jax.Array | None = None):
        """x [B,T,D] -> (x^(M) - x^(0) [B,T,D], aux, state unchanged). The statistics report
        sub-layer m's K experts as expert columns m*K .. m*K+K-1 of num_experts."""
        if forced is not None:
            raise ConfigError("model.moe.variant.kind='finedeep' runs every expert: there is no "
                              "routing to replay; pass forced_experts=None")
        m = self.cfg.moe
        B, T, D = x.shape
        valid = (segment_ids != 0).reshape(B * T)
        h = x.reshape(B * T, D).astype(jnp.float32)
        total = jnp.zeros_like(h)
        routings = []
        for i, sub in enumerate(self.sublayers):
            y, r = sub((h + total).astype(x.dtype))
            total = total + y
            routings.append(_place_columns(r, i, m.num_experts))
        aux = pooled_aux(routings, valid, segment_ids, m)
        out = constrain(total.reshape(B, T, D).astype(x.dtype), ("batch", "length", "embed"))
        return out, aux, state


def _place_columns(r: Routing, index: int, num_experts: int) -> Routing:
    """A sub-layer's Routing over its K experts as columns index*K .. of num_experts (zeros
    elsewhere; log_probs 0 there so entropy terms vanish), expert ids offset to match."""
    N, K = r.probs.shape
    pad = lambda a: jnp.pad(a, ((0, 0), (index * K, num_experts - (index + 1) * K)))  # noqa: E731
    return Routing(experts=r.experts + index * K, weights=r.weights, probs=pad(r.probs),
                   logits=pad(r.logits), selected=pad(r.selected), log_probs=pad(r.log_probs),
                   dropped=r.dropped)


def every_expert(h: jax.Array, bank: ExpertBank) -> jax.Array:
    """Every expert of ``bank`` on every token: h [N,D] -> [N,K,D] f32. Matmuls in the compute
    dtype with its own output type (XLA:CPU has no bf16 x bf16 -> f32 form of these dots)."""
    dt = bank.dtype
    h = h.astype(dt)
    g = jnp.einsum("nd,kdf->nkf", h, bank.w_gate[...].astype(dt))
    u = jnp.einsum("nd,kdf->nkf", h, bank.w_up[...].astype(dt))
    act = jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)  # [N,K,F]
    out = jnp.einsum("nkf,kfd->nkd", act.astype(dt), bank.w_down[...].astype(dt))
    return out.astype(jnp.float32)


def straight_through(hard: jax.Array, soft: jax.Array) -> jax.Array:
    """``hard`` in the forward pass, the gradient of ``soft`` in the backward pass."""
    return hard + soft - jax.lax.stop_gradient(soft)


class DSMoE(nnx.Module):
    """DSMoE (8.7): ``gate`` [D,E] (one sigmoid gate per block, 'embed', None) and the blocks of a
    dense FFN as ``experts`` (an ExpertBank, d_expert = d_ff / num_experts)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.gate = param(jax.nn.initializers.truncated_normal(cfg.init_std), rngs.params(),
                          (cfg.d_model, cfg.moe.num_experts), cfg.param_dtype, ("embed", None))
        self.experts = ExpertBank(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, *, token_ids: jax.Array, segment_ids: jax.Array,
                 state: jax.Array | None, cell=None, rng: jax.Array | None = None,
                 train: bool = False, forced: jax.Array | None = None):
        """x [B,T,D] -> (sum_i m_i (g_i or 1) E_i(x) [B,T,D], aux, state unchanged); aux adds
        ``router/sparsity``: the mean over valid tokens and blocks of g (or of the mask)."""
        if forced is not None:
            raise ConfigError("model.moe.variant.kind='dsmoe' gates every block by a threshold: "
                              "there is no top-k routing to replay; pass forced_experts=None")
        m, v = self.cfg.moe, self.cfg.moe.variant
        B, T, D = x.shape
        xf = x.reshape(B * T, D)
        valid = (segment_ids != 0).reshape(B * T)
        logits = jnp.dot(xf.astype(jnp.float32), self.gate[...].astype(jnp.float32),
                         precision=_HI)  # [N,E]
        g = jax.nn.sigmoid(logits)
        hard = (g > v.dsmoe_threshold).astype(jnp.float32)
        mask = straight_through(hard, g)
        w = mask * g if v.dsmoe_scale == "gate" else mask  # [N,E]
        y = jnp.einsum("ned,ne->nd", every_expert(xf, self.experts), w, precision=_HI)
        total = jnp.maximum(jnp.sum(g, -1, keepdims=True), 1e-20)
        E = m.num_experts
        routing = Routing(experts=jnp.where(hard > 0, jnp.arange(E, dtype=jnp.int32), -1),
                          weights=w, probs=g / total, logits=logits, selected=hard,
                          log_probs=jax.nn.log_sigmoid(logits) - jnp.log(total),
                          dropped=jnp.zeros((B * T,), jnp.float32))
        aux = pooled_aux([routing], valid, segment_ids, m)
        per_token = jnp.mean(g if v.dsmoe_sparsity == "gate" else mask, -1)  # [N]
        vf = valid.astype(jnp.float32)
        aux["router/sparsity"] = jnp.sum(per_token * vf) / jnp.maximum(jnp.sum(vf), 1.0)
        out = constrain(y.reshape(B, T, D).astype(x.dtype), ("batch", "length", "embed"))
        return out, aux, state


def dsmoe_from_dense(gate: jax.Array, up: jax.Array, down: jax.Array, num_experts: int) -> dict:
    """A dense SwiGLU FFN (gate, up [D,F], down [F,D]) as DSMoE's expert bank: block i holds
    hidden units i*F/E .. (i+1)*F/E - 1, so the sum of all blocks is the dense FFN exactly.
    Returns {'w_gate', 'w_up': [E,D,F/E], 'w_down': [E,F/E,D]}."""
    D, F = gate.shape
    if F % num_experts:
        raise ConfigError(f"model.moe.num_experts={num_experts} must divide the dense d_ff={F} "
                          "(DSMoE splits the FFN hidden dim into equal blocks)")
    Fe = F // num_experts
    split_in = lambda w: jnp.transpose(w.reshape(D, num_experts, Fe), (1, 0, 2))  # noqa: E731
    return {"w_gate": split_in(gate), "w_up": split_in(up),
            "w_down": down.reshape(num_experts, Fe, down.shape[1])}
