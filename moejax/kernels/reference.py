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
              scale: float | None = None, sink_logits: jax.Array | None = None,
              return_stats: bool = False, sample_len: int = 64):
    """Grouped-query attention with an einsum and fp32 softmax; kv heads are never repeated.

    q: [B,T,H,hd]; k, v: [B,S,Hkv,hd]; query head h reads kv head h // (H/Hkv).
    ``sink_logits`` [H]: a per-head extra logit whose value vector is zero (GPT-OSS sink): it
    joins the softmax normaliser and takes probability mass, so token probabilities sum to < 1.
    Padding queries (segment 0) return zeros. Returns [B,T,H,hd] in q's dtype, or with
    ``return_stats`` (out, stats) where stats holds, from the same probabilities:
      first_share [B,T,H] fp32: probability on the first visible key of the query's segment
                  (the smallest visible kv position; with packing, each segment's first token);
      is_first    [B,T] bool: the query is itself that first token (excluded from the metric);
      map         [n,n] fp32: probabilities of batch row 0, head 0, first n=min(T,S,sample_len).
    """
    B, T, H, hd = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    scale = hd ** -0.5 if scale is None else scale
    qg = q.reshape(B, T, Hkv, G, hd)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions)  # [B,T,S]
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
    if sink_logits is None:
        probs32 = jax.nn.softmax(logits, axis=-1)  # [B,Hkv,G,T,S]
    else:
        sink = sink_logits.astype(jnp.float32).reshape(1, Hkv, G, 1, 1)
        m = jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), sink)
        e = jnp.exp(logits - m)
        probs32 = e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sink - m))
    probs = probs32.astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, H, hd)
    out = jnp.where((q_segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)
    if not return_stats:
        return out
    big = jnp.iinfo(jnp.int32).max
    first_pos = jnp.min(jnp.where(mask, kv_positions[:, None, :], big), axis=-1)  # [B,T]
    first_kv = (mask & (kv_positions[:, None, :] == first_pos[..., None])).astype(jnp.float32)
    share = jnp.einsum("bkgts,bts->btkg", probs32, first_kv).reshape(B, T, H)
    is_first = (q_segment_ids != 0) & (q_positions == first_pos)
    n = min(T, k.shape[1], sample_len)
    stats = {"first_share": share, "is_first": is_first, "map": probs32[0, 0, 0, :n, :n]}
    return out, stats


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
        preferred_element_type=None) -> jax.Array:
    """Grouped matmul by a masked loop over groups: obviously right, G x the FLOPs (tests only).

    lhs: [M,K] rows sorted by group; rhs: [G,K,N]; group_sizes: [G] int32. Row m belongs to group g
    iff starts[g] <= m < ends[g]; rows past sum(group_sizes) give zeros. Returns [M,N].
    """
    M, G = lhs.shape[0], rhs.shape[0]
    out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype)
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))  # [G]
    starts = ends - group_sizes
    row = jnp.arange(M, dtype=jnp.int32)[:, None]  # [M,1]
    member = (row >= starts[None, :]) & (row < ends[None, :])  # [M,G]
    out = jnp.zeros((M, rhs.shape[2]), out_dtype)
    for g in range(G):
        part = jnp.dot(lhs, rhs[g], preferred_element_type=out_dtype)  # [M,N]
        out = out + jnp.where(member[:, g:g + 1], part, 0).astype(out_dtype)
    return out
