"""Token embedding, (partial) rotary position embedding and the tied/untied LM head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.layers import param
from moejax.layers.mlp import linear
from moejax.mesh import constrain


def rope_inv_freq(rotary_dim: int, theta: float) -> jax.Array:
    """inv_freq[i] = theta^(-2i/rotary_dim), i < rotary_dim/2 (fp32)."""
    return theta ** (-jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim)


def apply_rope(x: jax.Array, positions: jax.Array, *, rotary_dim: int, theta: float) -> jax.Array:
    """Rotate-half (Qwen/NeoX) RoPE on the first ``rotary_dim`` channels of each head.

    x: [B, T, H, hd]; positions: [B, T] int. Channel i pairs with i + rotary_dim/2; channels
    beyond ``rotary_dim`` pass through (partial RoPE). Computed in fp32, returned in x's dtype.
    """
    half = rotary_dim // 2
    ang = positions.astype(jnp.float32)[..., None] * rope_inv_freq(rotary_dim, theta)  # [B,T,half]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]  # [B,T,1,half]
    xf = x.astype(jnp.float32)
    x1, x2, rest = xf[..., :half], xf[..., half:rotary_dim], xf[..., rotary_dim:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding table E [V, D]; ``attend`` gives tied logits h @ E^T."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(cfg.dtype)
        init = jax.nn.initializers.normal(cfg.init_std)
        self.embedding = param(init, rngs.params(), (cfg.vocab_size, cfg.d_model), cfg.param_dtype,
                               ("vocab", "embed"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        # gather 'embed' first (as FSDP does for any weight at use): a lookup into an fsdp-sharded
        # D would otherwise make XLA replicate the result before re-sharding it over the batch
        table = constrain(self.embedding[...].astype(self.dtype), ("vocab", None))
        x = jnp.take(table, tokens, axis=0)  # [B,T,D]
        return constrain(x, ("batch", "length", "embed"))

    def attend(self, h: jax.Array) -> jax.Array:
        """h [B,T,D] -> fp32 logits [B,T,V]."""
        logits = linear(h, self.embedding[...].astype(self.dtype).T,
                        preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "vocab"))


class LMHead(nnx.Module):
    """Untied output projection W [D, V]."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(cfg.dtype)
        init = jax.nn.initializers.truncated_normal(cfg.init_std)
        self.kernel = param(init, rngs.params(), (cfg.d_model, cfg.vocab_size), cfg.param_dtype,
                            ("embed", "vocab"))

    def __call__(self, h: jax.Array) -> jax.Array:
        """h [B,T,D] -> fp32 logits [B,T,V]."""
        logits = linear(h, self.kernel[...].astype(self.dtype), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "vocab"))
