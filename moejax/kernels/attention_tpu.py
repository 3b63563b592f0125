"""Pallas splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) for TPU, behind
``kernels.attention``: causal self-attention over packed rows, flash-style (never materialises the
[T,S] probabilities), with its own custom VJP.

- causality: a ``MultiHeadMask`` of ``CausalMask`` per query head (static, by index: callers pass
  ``self_attention=True`` only when q and kv are the same tokens in order);
- packing and padding: ``SegmentIds``; a kv token is seen only by queries of its own segment, so
  padding keys (segment 0) reach only padding queries, whose outputs (and so cotangents) are zeroed
  here as in the reference;
- GQA: the kernel's own shared-kv form (``make_splash_mha`` with k/v [Hkv,S,hd]; query head h reads
  kv head h // (H/Hkv), as the reference), so kv heads are never repeated in HBM;
- scale: the kernel has none, so q is scaled before the call (as MaxText does);
- sharding: a Pallas call cannot be partitioned by XLA, so under a multi-device mesh it runs in a
  ``shard_map`` with batch and heads split as the logical rules say (replicated heads where the
  head counts do not divide the tensor axis).
Block sizes: the largest of 512/256/128 dividing T (the kernel needs multiples of 128); not yet
tuned on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

BLOCKS = (512, 256, 128)


def supports(seq_len: int | None, self_attention: bool) -> bool:
    """Whether splash can run this call: same-sequence attention with T a multiple of 128."""
    return self_attention and seq_len is not None and seq_len % BLOCKS[-1] == 0


def block_sizes(seq_len: int):
    """Forward and backward tiles: the largest preferred block dividing ``seq_len``."""
    from jax.experimental.pallas.ops.tpu.splash_attention import BlockSizes
    b = next((b for b in BLOCKS if seq_len % b == 0), None)
    if b is None:
        raise ValueError(f"attention impl='splash' needs the sequence length to be a multiple of "
                         f"{BLOCKS[-1]}, got {seq_len}: set data.seq_len accordingly or use "
                         "model.attention.impl='auto' (falls back to the reference)")
    return BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                      block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)


def _kernel(num_heads: int, seq_len: int, interpret: bool):
    """The splash kernel for one example: q [H,T,hd], k/v [Hkv,T,hd], SegmentIds([T],[T]).
    Built per trace (its block-mask tables become constants of that trace; caching the object
    across traces would leak tracers)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    mask = sa.MultiHeadMask([sa.CausalMask((seq_len, seq_len)) for _ in range(num_heads)])
    return sa.make_splash_mha(mask, block_sizes=block_sizes(seq_len), head_shards=1,
                              q_seq_shards=1, interpret=interpret)


def _local(q, k, v, q_segment_ids, kv_segment_ids, *, scale, interpret):
    """Splash on local (unsharded) arrays: q [B,T,H,hd], k/v [B,T,Hkv,hd] -> [B,T,H,hd]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
    B, T, H, hd = q.shape
    kernel = _kernel(H, T, interpret)
    qh = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)  # [B,H,T,hd]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B,Hkv,T,hd]
    seg = SegmentIds(q=q_segment_ids.astype(jnp.int32), kv=kv_segment_ids.astype(jnp.int32))
    out = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=s))(qh, kh, vh, seg)
    out = out.transpose(0, 2, 1, 3)  # [B,T,H,hd]
    return jnp.where((q_segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)


def _specs(B: int, H: int, Hkv: int, mesh) -> tuple:
    """(q spec, kv spec, segment spec) from the logical rules: batch and heads split, length and
    head_dim whole; batch or heads replicated where they do not divide their axes (shard_map
    needs whole shards, and every q-head shard must hold whole kv groups)."""
    from moejax.mesh import logical_to_spec
    q_spec = logical_to_spec(("batch", "length", "heads", "head_dim"))
    kv_spec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"))
    batch, heads, kv_heads = q_spec[0], q_spec[2], kv_spec[2]

    def size(axes):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        n = 1
        for a in axes:
            n *= mesh.shape[a]
        return n
    if B % size(batch):
        batch = None
    if heads != kv_heads or H % size(heads) or Hkv % size(kv_heads):
        heads = kv_heads = None
    # whole sequences per shard (a length-sharded layout is gathered: splash sees all keys)
    return P(batch, None, heads, None), P(batch, None, kv_heads, None), P(batch, None)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array,
              kv_segment_ids: jax.Array, scale: float | None = None,
              interpret: bool = False) -> jax.Array:
    """Causal segment-masked GQA self-attention by splash: q [B,T,H,hd], k/v [B,T,Hkv,hd],
    segment ids [B,T] -> [B,T,H,hd] in q's dtype; padding queries (segment 0) give zeros.
    ``interpret`` runs the Pallas kernels in interpret mode (CPU tests)."""
    B, T, H, hd = q.shape
    if k.shape[1] != T:
        raise ValueError(f"attention impl='splash' is self-attention: q has {T} tokens, kv "
                         f"{k.shape[1]}")
    block_sizes(T)  # a clear error for a length the kernel cannot tile
    scale = hd ** -0.5 if scale is None else scale
    local = functools.partial(_local, scale=scale, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q, k, v, q_segment_ids, kv_segment_ids)
    q_spec, kv_spec, seg_spec = _specs(B, H, k.shape[2], mesh)
    return jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v, q_segment_ids,
                                                            kv_segment_ids)
