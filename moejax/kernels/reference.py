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
              return_stats: bool = False, sample_len: int = 64, self_attention: bool = False):
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
    ``self_attention``: q and kv are the same T tokens in order (no KV cache; see
    ``kernels.attention``), so no key after a query's index is visible to it: the query blocks
    then skip the key blocks above the diagonal (``causal_blocked_attention``).
    """
    B, T, H, hd = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    scale = hd ** -0.5 if scale is None else scale
    blocks = causal_blocks(T) if self_attention and k.shape[1] == T and not return_stats else 1
    if blocks > 1:
        return causal_blocked_attention(
            q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
            q_positions=q_positions, kv_positions=kv_positions, scale=scale,
            sink_logits=sink_logits, blocks=blocks)
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


MIN_QUERY_BLOCK = 64  # rows per query block of the causal blocked path
MAX_QUERY_BLOCKS = 8


def causal_blocks(T: int) -> int:
    """Query blocks for self-attention over T tokens: T/64 up to 8, 1 (no blocking) when T is
    shorter than two blocks or does not split evenly."""
    n = min(MAX_QUERY_BLOCKS, T // MIN_QUERY_BLOCK)
    return n if n > 1 and T % n == 0 else 1


def _attend(qh: jax.Array, kh: jax.Array, vh: jax.Array, mask: jax.Array, scale: float,
            sink_logits: jax.Array | None) -> jax.Array:
    """Head-major attention core: qh [B,Hkv,G,t,hd], kh/vh [B,Hkv,s,hd], mask [B,t,s] ->
    [B,Hkv,G,t,hd]; fp32 logits and softmax (with the optional zero-value sink [Hkv*G])."""
    logits = jnp.einsum("bkgtd,bksd->bkgts", qh, kh, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
    if sink_logits is None:
        probs = jax.nn.softmax(logits, axis=-1)
    else:
        sink = sink_logits.astype(jnp.float32).reshape(1, *qh.shape[1:3], 1, 1)
        m = jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), sink)
        e = jnp.exp(logits - m)
        probs = e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sink - m))
    return jnp.einsum("bkgts,bksd->bkgtd", probs.astype(vh.dtype), vh)


def causal_blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids,
                             kv_segment_ids, q_positions, kv_positions, scale: float,
                             sink_logits: jax.Array | None = None, blocks: int) -> jax.Array:
    """``attention`` for self-attention (kv = the same T tokens as q, in order), with the T
    queries in ``blocks`` row blocks: block i attends only keys [0, (i+1)T/blocks), since no key
    after a query's own index is visible to it. Same mask and softmax as ``attention``, so equal
    to it up to float summation order for every non-padding query (a padding query's output is
    zero either way), at (blocks+1)/(2 blocks) of its logits work: 5/8 at 4 blocks.

    Computed head-major ([B,Hkv,G,T,hd]): the batched matmuls then need no per-block transposes.
    """
    B, T, H, hd = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions)  # [B,T,T]
    qh = q.reshape(B, T, Hkv, G, hd).transpose(0, 2, 3, 1, 4)  # [B,Hkv,G,T,hd]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B,Hkv,T,hd]
    n = T // blocks
    outs = [_attend(qh[:, :, :, i * n:(i + 1) * n], kh[:, :, :(i + 1) * n], vh[:, :, :(i + 1) * n],
                    mask[:, i * n:(i + 1) * n, :(i + 1) * n], scale, sink_logits)
            for i in range(blocks)]
    out = jnp.concatenate(outs, axis=3).transpose(0, 3, 1, 2, 4).reshape(B, T, H, hd)
    return jnp.where((q_segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)


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
