"""cuDNN flash attention through ``jax.nn.dot_product_attention``, behind ``kernels.attention``.

JAX builds the mask, not us: segments and padding go in as a boolean ``mask`` [B,1,T,S] (one copy
for all heads) and causality as ``is_causal``, so cuDNN runs its causal mask type and skips the
blocks above the diagonal. Packed segments need the mask: ``query_seq_lengths`` /
``key_value_seq_lengths`` describe only one document per row followed by padding, and the
cuDNN packed layout (segment offsets) is not public in jax 0.10.2. Caveat: jax 0.10.2 turns any
mask into a cuDNN bias and still asks cuDNN for its gradient (``should_export_dbias`` returns
True); only an unmasked or lengths-only call avoids that.

The same call runs with ``implementation='xla'`` on CPU, which is how the tests check numerics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
    """[B,1,T,S] bool: same segment and kv not padding; causality is left to ``is_causal``."""
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return (same & (kv_segment_ids[:, None, :] != 0))[:, None]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array,
              kv_segment_ids: jax.Array, q_positions: jax.Array, kv_positions: jax.Array,
              scale: float | None = None, self_attention: bool = False,
              implementation: str = "cudnn") -> jax.Array:
    """q [B,T,H,hd], k/v [B,S,Hkv,hd] -> [B,T,H,hd], same contract as ``reference.attention``.

    With ``self_attention`` (same T tokens, in order) causality is ``is_causal``; otherwise (a KV
    cache) the mask also carries kv_pos <= q_pos. Padding queries (segment 0) give zeros."""
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError("model.attention.impl='cudnn' needs bfloat16/float16 compute, got "
                         f"{q.dtype}; set model.dtype='bfloat16' or use impl='xla' (or 'auto')")
    mask = segment_mask(q_segment_ids, kv_segment_ids)
    if not self_attention:
        mask = mask & (kv_positions[:, None, :] <= q_positions[:, :, None])[:, None]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=self_attention, scale=scale,
                                       implementation=implementation)
    return jnp.where((q_segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)
