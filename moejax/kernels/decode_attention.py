"""Attention of T new queries over a head-major KV cache (``moejax.model.KVCache``).

The cache keeps k, v as [B,Hkv,S,hd] so that a decode step writes its T rows in place and the two
attention einsums read the buffers as they lie (``btkgd,bksd->bkgts`` and ``bkgts,bksd->btkgd``):
with the kv-head axis after S, XLA:CPU wrote a transposed copy of every layer's k and v per step.
Same mask and softmax as ``reference.attention`` (causal by position, same segment, segment 0 =
empty slot; padding queries give zeros; optional zero-value softmax sink).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.kernels.reference import MASK_VALUE, attention_mask


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array,
              kv_segment_ids: jax.Array, q_positions: jax.Array, kv_positions: jax.Array,
              scale: float | None = None, sink_logits: jax.Array | None = None) -> jax.Array:
    """q [B,T,H,hd]; k, v [B,Hkv,S,hd] (query head h reads kv head h // (H/Hkv)); segment ids and
    positions [B,T] / [B,S] int32; ``sink_logits`` [H] or None. Returns [B,T,H,hd] in q's dtype,
    fp32 logits and softmax."""
    B, T, H, hd = q.shape
    Hkv = k.shape[1]
    scale = hd ** -0.5 if scale is None else scale
    qg = q.reshape(B, T, Hkv, H // Hkv, hd)
    logits = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions)  # [B,T,S]
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)  # [B,Hkv,G,T,S]
    probs = _softmax_with_sink(logits, sink_logits).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v).reshape(B, T, H, hd)
    return jnp.where((q_segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)


def _softmax_with_sink(logits: jax.Array, sink_logits: jax.Array | None) -> jax.Array:
    """Softmax over the last axis of logits [B,Hkv,G,T,S]; a sink [Hkv*G] joins the normaliser
    with a zero value vector (its probability mass is dropped)."""
    if sink_logits is None:
        return jax.nn.softmax(logits, axis=-1)
    sink = sink_logits.astype(jnp.float32).reshape(1, *logits.shape[1:3], 1, 1)
    m = jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), sink)
    e = jnp.exp(logits - m)
    return e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sink - m))
