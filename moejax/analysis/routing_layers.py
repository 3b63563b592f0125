"""Cross-layer routing metrics of RMoE (spec section 4.3): how much one MoE layer's expert choice
tells about the next layer's, and how spread each layer's routing is.

* ``coselection_counts``: per token, every pair (expert i chosen at MoE layer l, expert j chosen at
  layer l+1) counts once: ``[L-1, E, E]``. With top-k routing a token adds k x k pairs, so the
  marginals of the pair joint are the layers' selection frequencies.
* ``consecutive_layer_mi``: I(expert at l; expert at l+1) of that joint, in nats (0 when the next
  layer's choice is independent of this one's).
* ``usage_entropy``: entropy of a layer's expert-usage distribution (selection shares), in nats;
  log E when every expert is used equally.

``collect_routing`` runs a trained model over fixed batches and sums what these need on device
(the per-token choices never leave it): co-selection counts, selections per domain, router
tokens per domain and the mean per-token router entropy per layer.
"""

from __future__ import annotations

import numpy as np

from moejax.analysis.specialisation import _xlogy_ratio


def coselection_counts(experts, num_experts: int, valid=None) -> np.ndarray:
    """experts [L, N, k] int (expert per slot, -1 = empty; ids >= num_experts, e.g. null experts,
    are ignored), valid [N] bool (None = all) -> [L-1, E, E] float64 pair counts."""
    ex = np.asarray(experts)
    L, N, _ = ex.shape
    keep = np.ones(N, bool) if valid is None else np.asarray(valid, bool)
    sel = np.zeros((L, N, num_experts), np.float64)  # 0/1 selection per (layer, token, expert)
    for layer in range(L):
        for slot in range(ex.shape[2]):
            e = ex[layer, :, slot]
            ok = keep & (e >= 0) & (e < num_experts)
            sel[layer, np.nonzero(ok)[0], e[ok]] = 1.0
    return np.einsum("lni,lnj->lij", sel[:-1], sel[1:])


def consecutive_layer_mi(cooc) -> np.ndarray:
    """Mutual information (nats) of each consecutive-layer pair joint: [L-1, E, E] -> [L-1]."""
    c = np.asarray(cooc, np.float64)
    joint = c / np.maximum(c.sum((-2, -1), keepdims=True), 1e-300)
    pa = joint.sum(-1, keepdims=True)
    pb = joint.sum(-2, keepdims=True)
    return _xlogy_ratio(joint, pa * pb).sum((-2, -1))


def usage_entropy(counts) -> np.ndarray:
    """Entropy (nats) of each layer's expert-usage shares: selections [L, E] -> [L]."""
    c = np.asarray(counts, np.float64)
    p = c / np.maximum(c.sum(-1, keepdims=True), 1e-300)
    return -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)


def collect_routing(setup, state, batches, num_domains: int) -> dict[str, np.ndarray]:
    """Routing sums of ``state``'s model over ``batches`` (global batches as ``Trainer.evaluate``
    holds them), each forward in ``train.grad_accum`` micro-batches like the eval step:
    ``domain_counts`` [L, D, E_all] selections, ``tokens`` [D] router (non-padding) tokens,
    ``entropy`` [L] mean per-token router entropy -sum p log p, and, where the layers report
    per-token choices (``aux['router/experts']``, token-choice routers), ``cooc`` [L-1, E, E]
    co-selection counts of consecutive MoE layers (real experts only)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from moejax import train as T

    E = setup.cfg.model.moe.num_experts
    accum = setup.cfg.train.grad_accum

    def one(state, mb):
        params, rest = jax.tree.map(lambda x: x, (state.params, state.rest))
        _, aux = T.token_losses(nnx.merge(setup.graphdef, params, rest), mb)
        valid = (mb["segment_ids"] != 0).astype(jnp.float32)  # [b,T]
        onehot = jax.nn.one_hot(mb["domain"], num_domains, dtype=jnp.float32)  # [b,D]
        n = valid.sum()
        out = {"domain_counts": jnp.einsum("lbe,bd->lde", aux["router/seq_counts"], onehot),
               "tokens": jnp.einsum("bt,bd->d", valid, onehot),
               "entropy": aux["router/entropy"] * n}
        if "router/experts" in aux:
            ex = aux["router/experts"]  # [L,b,T,k]
            sel = jnp.sum(jax.nn.one_hot(ex, E, dtype=jnp.float32), axis=-2)  # -1 and nulls -> 0
            sel = sel * valid[None, :, :, None]  # [L,b,T,E]
            out["cooc"] = jnp.einsum("lbti,lbtj->lij", sel[:-1], sel[1:])
        return out

    @jax.jit
    def step(state, batch):
        with T.tracing_mesh(setup):
            micro = T._split_microbatches(batch, accum)
            sums = jax.lax.scan(lambda c, mb: (c, one(state, mb)), None, micro)[1]
            return jax.tree.map(lambda x: x.sum(0), sums)

    totals: dict[str, np.ndarray] = {}
    for b in batches:
        for k, v in jax.device_get(step(state, b)).items():
            totals[k] = totals.get(k, 0) + np.asarray(v, np.float64)
    totals["entropy"] = totals["entropy"] / max(float(totals["tokens"].sum()), 1.0)
    return totals
