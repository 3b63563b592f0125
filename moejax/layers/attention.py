"""Grouped-query self-attention with QK-norm and (partial) RoPE (Qwen3), optionally over a KV cache."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import kernels
from moejax.layers import param
from moejax.layers.embed import apply_rope
from moejax.layers.norms import make_norm
from moejax.mesh import constrain


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's view of the KV cache (see ``moejax.model.KVCache`` for the convention).

    k, v: [B,S,Hkv,hd] before this step's write; slots: [B,T] where this step's tokens are written
    (out-of-range slots are dropped); kv_positions / kv_segment_ids: [B,S] after the write.
    """

    k: jax.Array
    v: jax.Array
    slots: jax.Array
    kv_positions: jax.Array
    kv_segment_ids: jax.Array


def write_rows(buf: jax.Array, slots: jax.Array, new: jax.Array) -> jax.Array:
    """buf [B,S,...] with new [B,T,...] written at buf[b, slots[b,t]]; slots >= S are dropped."""
    b = jnp.arange(buf.shape[0])[:, None]
    return buf.at[b, slots].set(new.astype(buf.dtype), mode="drop")


class Attention(nnx.Module):
    """q [D,H,hd], k/v [D,Hkv,hd], o [H,hd,D]; RMSNorm over head_dim on q and k before RoPE."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        a = cfg.attention
        self.dtype = jnp.dtype(cfg.dtype)
        self.rotary_dim, self.theta, self.impl = a.rotary_dim, a.rope_theta, a.impl
        D, H, Hkv, hd = cfg.d_model, a.num_heads, a.num_kv_heads, a.head_dim
        init = jax.nn.initializers.truncated_normal(cfg.init_std)
        out_init = jax.nn.initializers.truncated_normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
        pd = cfg.param_dtype
        self.q = param(init, rngs.params(), (D, H, hd), pd, ("embed", "heads", "head_dim"))
        self.k = param(init, rngs.params(), (D, Hkv, hd), pd, ("embed", "kv_heads", "head_dim"))
        self.v = param(init, rngs.params(), (D, Hkv, hd), pd, ("embed", "kv_heads", "head_dim"))
        self.o = param(out_init, rngs.params(), (H, hd, D), pd, ("heads", "head_dim", "embed"))
        if a.qk_norm:
            self.q_norm = make_norm(cfg, hd, ("head_dim",))
            self.k_norm = make_norm(cfg, hd, ("head_dim",))
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array,
                 cache: LayerCache | None = None):
        """x [B,T,D]; positions, segment_ids [B,T]. Returns (y [B,T,D], (k, v) [B,S,Hkv,hd] or None).

        Without a cache the T tokens attend among themselves; with one, their k/v are written at
        ``cache.slots`` and the queries attend over the whole cache; the updated k/v are returned.
        """
        dt = self.dtype
        q = jnp.einsum("btd,dhk->bthk", x, self.q[...].astype(dt))
        k = jnp.einsum("btd,dhk->bthk", x, self.k[...].astype(dt))
        v = jnp.einsum("btd,dhk->bthk", x, self.v[...].astype(dt))
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions, rotary_dim=self.rotary_dim, theta=self.theta)
        k = apply_rope(k, positions, rotary_dim=self.rotary_dim, theta=self.theta)
        if cache is None:
            kv_pos, kv_seg, new_kv = positions, segment_ids, None
        else:
            k = constrain(write_rows(cache.k, cache.slots, k), ("batch", "length", "kv_heads", "head_dim"))
            v = constrain(write_rows(cache.v, cache.slots, v), ("batch", "length", "kv_heads", "head_dim"))
            kv_pos, kv_seg, new_kv = cache.kv_positions, cache.kv_segment_ids, (k, v)
            k, v = k.astype(dt), v.astype(dt)
        out = kernels.attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=kv_seg,
                                q_positions=positions, kv_positions=kv_pos, impl=self.impl)
        out = constrain(out, ("batch", "length", "heads", "head_dim"))  # [B,T,H,hd]
        y = jnp.einsum("bthk,hkd->btd", out, self.o[...].astype(dt))
        return constrain(y, ("batch", "length", "embed")), new_kv
