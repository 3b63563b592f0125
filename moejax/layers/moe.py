"""The MoE block: route -> routed experts (dropless or capacity, EP via shard_map) -> combine,
plus optional shared experts (plain or Qwen3-Next sigmoid-gated) and GW-MoE's dense mixture for
uncertain tokens at train time.

Returns per-layer statistics for ``aux`` (DESIGN contract); balance losses are computed from them
in the training loop (``moejax.layers.balance``), never here.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import ModelConfig, MoEConfig
from moejax.layers import param
from moejax.layers.balance import document_stats, needs_token_stats
from moejax.layers.mlp import MLP
from moejax.layers.moe_dispatch import expert_choice_experts, moe_ffn
from moejax.layers.router import ExpertChoice, RecurrentCell, Router, router_stats, uncertain_tokens
from moejax.mesh import constrain


def seq_stats(selected: jax.Array, probs: jax.Array, valid: jax.Array, batch: int) -> dict:
    """Per-sequence balance statistics: counts (stop-gradient) and prob sums [B, E_all], tokens [B]."""
    T = selected.shape[0] // batch
    v = valid.astype(jnp.float32)[:, None]
    return {
        "seq_counts": jax.lax.stop_gradient((selected * v).reshape(batch, T, -1).sum(1)),
        "seq_prob_sum": (probs * v).reshape(batch, T, -1).sum(1),
        "seq_tokens": valid.astype(jnp.float32).reshape(batch, T).sum(1),
    }


def token_stats(selected: jax.Array, probs: jax.Array, valid: jax.Array, batch: int) -> dict:
    """Token-level selections (stop-gradient) and probabilities [B, T, E_all], zero at padding:
    what balance groups pooled across micro-steps need (moejax.layers.balance.pooled_balance)."""
    v = valid.astype(jnp.float32)[:, None]
    return {"router/token_selected": jax.lax.stop_gradient(selected * v).reshape(
                batch, -1, selected.shape[-1]),
            "router/token_probs": (probs * v).reshape(batch, -1, probs.shape[-1])}


class MoE(nnx.Module):
    """Routed experts w_gate/w_up [E, D, F] ('expert','embed','mlp'), w_down [E, F, D]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        m = cfg.moe
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        E, D, F = m.num_experts, cfg.d_model, m.d_expert
        init = jax.nn.initializers.truncated_normal(cfg.init_std)
        out_init = jax.nn.initializers.truncated_normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
        pd = cfg.param_dtype
        self.router = Router(cfg, rngs=rngs)
        self.w_gate = param(init, rngs.params(), (E, D, F), pd, ("expert", "embed", "mlp"))
        self.w_up = param(init, rngs.params(), (E, D, F), pd, ("expert", "embed", "mlp"))
        self.w_down = param(out_init, rngs.params(), (E, F, D), pd, ("expert", "mlp", "embed"))
        d_shared = m.d_shared or m.d_expert * m.num_shared_experts
        self.shared = (MLP(dataclasses.replace(cfg, d_ff=d_shared), rngs=rngs)
                       if m.num_shared_experts else None)
        self.shared_gate = (param(init, rngs.params(), (D, 1), pd, ("embed", None))
                            if m.num_shared_experts and m.shared_gate else None)

    def __call__(self, x: jax.Array, *, token_ids: jax.Array, segment_ids: jax.Array,
                 state: jax.Array | None, cell: RecurrentCell | None, rng: jax.Array | None,
                 train: bool, forced: jax.Array | None = None):
        """x [B,T,D] -> (y [B,T,D], aux dict, new router state [B*T, p] or None).

        ``forced`` [B,T,k] int32 replays a recorded routing (``Router.__call__``); capacity
        dispatch still applies its capacity to the forced assignment. Top-k routing reports the
        experts it used as ``router/experts`` [B,T,k] (-1 = empty slot)."""
        m, dt = self.cfg.moe, self.dtype
        B, T, D = x.shape
        xf = x.reshape(B * T, D)  # batch-major: token rows stay sharded over the batch axes
        valid = (segment_ids != 0).reshape(B * T)
        keys = None
        if m.router.gating == "avg_key":  # EMoE: mean key of each block, from the live gates
            keys = jnp.mean(self.w_gate[...].astype(jnp.float32), axis=-1).T  # [D,E]
        forced = None if forced is None else forced.reshape(B * T, -1)  # [B*T,k]
        routing, new_state = self.router(xf, token_ids=token_ids.reshape(B * T), state=state,
                                         cell=cell, rng=rng, train=train, valid=valid,
                                         expert_keys=keys, forced=forced)
        w = (self.w_gate[...].astype(dt), self.w_up[...].astype(dt), self.w_down[...].astype(dt))
        if isinstance(routing, ExpertChoice):
            y = expert_choice_experts(xf.astype(dt), routing.tokens, routing.weights, *w)
            dispatch = {"dropped": jnp.zeros((), jnp.int32)}
        else:
            y, dispatch = moe_ffn(xf.astype(dt), routing.experts, routing.weights, *w, cfg=m, dtype=dt)
        if train and m.router.gw_entropy_threshold > 0:
            y = self._gw_mixture(xf, y, routing.probs, segment_ids, w)
        y = y.reshape(B, T, D)
        if self.shared is not None:
            s = self.shared(x)
            if self.shared_gate is not None:
                s = s * jax.nn.sigmoid(jnp.einsum("btd,dk->btk", x, self.shared_gate[...].astype(dt)))
            y = y + s
        stats = router_stats(routing, valid, num_null=m.router.num_null_experts)
        aux = {f"router/{k}": v for k, v in stats.items()}
        if m.router.kind == "topk":  # the routing replay record (R2/R3)
            aux["router/experts"] = routing.experts.reshape(B, T, -1)
        aux["router/dropped"] = aux.get("router/dropped", 0) + dispatch["dropped"]
        aux.update({f"router/{k}": v for k, v in
                    seq_stats(routing.selected, routing.probs, valid, B).items()})
        aux.update({f"router/{k}": v for k, v in document_stats(
            routing.selected, routing.probs, segment_ids, num_real=m.num_experts).items()})
        if needs_token_stats(m.balance):
            aux.update(token_stats(routing.selected, routing.probs, valid, B))
        return constrain(y.astype(x.dtype), ("batch", "length", "embed")), aux, new_state

    def _gw_mixture(self, xf, y, probs, segment_ids, w):
        """GW-MoE (section 7): the first ``gw_max_slots`` uncertain tokens of each document
        (segment) get the dense probability-weighted mixture of all experts, times the same combine
        scale as the top-k output (``gw_combine_scale``), instead of their top-k output."""
        m = self.cfg.moe
        r, E = m.router, m.num_experts
        batch, T = segment_ids.shape
        mask = uncertain_tokens(probs[:, :E].reshape(batch, T, E), segment_ids,
                                r.gw_entropy_threshold, r.gw_max_slots).reshape(-1)  # [B*T]
        N = xf.shape[0]
        U = min(N, batch * r.gw_max_slots * r.gw_docs_per_row)  # static budget of dense rows
        # [U] token rows; unused entries get the out-of-range row N and are dropped by the scatter
        # (a fill of a real row, e.g. 0, would write that row twice and the stale top-k value
        # could win, since the order of duplicate scatter writes is unspecified)
        idx = jnp.nonzero(mask, size=U, fill_value=N)[0]
        rows = jnp.minimum(idx, N - 1)
        xu = xf[rows].astype(self.dtype)  # [U, D]
        wg, wu, wd = w
        mix = probs[rows, :E] * gw_combine_scale(m)  # [U, E]
        h = jax.nn.silu(jnp.einsum("ud,edf->uef", xu, wg)) * jnp.einsum("ud,edf->uef", xu, wu)
        out = jnp.einsum("uef,efd,ue->ud", h, wd, mix.astype(self.dtype))  # [U, D]
        return y.at[idx].set(out.astype(y.dtype), mode="drop")


def gw_combine_scale(m: MoEConfig) -> float:
    """Total combine weight the top-k output gives a token whose probability mass sits on its
    top-k: routed_scaling for renormalised/raw-probability top-k, top_k * routed_scaling for EMoE
    (avg_key: each selected block has weight routed_scaling), 1 for top-p / expert choice. The GW
    dense mixture sum_e p_e E_e(x) is multiplied by it so train and inference outputs share a scale."""
    r = m.router
    if r.kind != "topk":
        return 1.0
    return r.routed_scaling * (m.top_k if r.gating == "avg_key" else 1)
