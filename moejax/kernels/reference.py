"""Plain jnp references: the ground truth kernels are tested against, and the CPU/``xla`` path."""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30  # finite, so a fully masked row gives a uniform softmax instead of NaN


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, q_positions: jax.Array,
                   kv_positions: jax.Array) -> jax.Array:
    """[B,T,S] bool: causal by position (kv_pos <= q_pos), same segment, and kv not padding (seg 0)."""
    causal = kv_positions[:, None, :] <= q_positions[:, :, None]
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return causal & same & (kv_segment_ids[:, None, :] != 0)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array,
              kv_segment_ids: jax.Array, q_positions: jax.Array, kv_positions: jax.Array,
              scale: float | None = None) -> jax.Array:
    """Grouped-query attention with an einsum and fp32 softmax; kv heads are never repeated.

    q: [B,T,H,hd]; k, v: [B,S,Hkv,hd]; query head h reads kv head h // (H/Hkv).
    Padding queries (segment 0) return zeros. Returns [B,T,H,hd] in q's dtype.
    """
    B, T, H, hd = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    scale = hd ** -0.5 if scale is None else scale
    qg = q.reshape(B, T, Hkv, G, hd)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions)  # [B,T,S]
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [B,Hkv,G,T,S]
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, H, hd)
    return jnp.where((q_segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)
