"""BAM's soft mixture of attention experts (architecture.md 8.9; 'bam' with
``variant.bam_attention`` 'full' / 'kv_shared'): ``y = sum_e softmax(x W_r)_e Attn_e(x)``, every expert on every token. The
FFN of a BAM block is the standard top-k ``MoE`` (``moejax.bam`` mixes both from dense branches)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import kernels
from moejax.config import ConfigError, ModelConfig
from moejax.kernels import decode_attention
from moejax.layers import ones_init, param, zeros_init
from moejax.layers.attention import LayerCache
from moejax.layers.embed import apply_rope
from moejax.layers.norms import rms_norm
from moejax.mesh import constrain

_HI = jax.lax.Precision.HIGHEST


def cache_kv_heads(cfg: ModelConfig) -> int:
    """KV heads one layer's cache holds: num_kv_heads, times the attention experts for BAM
    'full' (each expert keeps its own k/v; 'kv_shared' experts read one k/v)."""
    a, v = cfg.attention, cfg.moe.variant
    if cfg.attention_experts and v.bam_attention == "full":
        return a.num_kv_heads * cfg.attention_experts
    return a.num_kv_heads


class AttentionExperts(nnx.Module):
    """BAM's soft mixture of attention experts (8.9): ``router`` [D,E] (softmax over E, all
    experts run); per expert ``q`` [E,D,H,hd], ``o`` [E,H,hd,D] and ``q_norm`` [E,hd]; ``k``,
    ``v`` [E,D,Hkv,hd] and ``k_norm`` [E,hd] ('full') or [D,Hkv,hd] and [hd] ('kv_shared').
    The experts run as one attention over E*H query heads: expert-major against E*Hkv kv heads
    ('full'), or ordered (kv head, expert, group) so GQA maps every expert's heads onto the shared
    Hkv kv heads ('kv_shared'). The weight of expert e multiplies its output projection."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        a, E = cfg.attention, cfg.attention_experts
        D, H, Hkv, hd = cfg.d_model, a.num_heads, a.num_kv_heads, a.head_dim
        self.dtype = jnp.dtype(cfg.dtype)
        self.rotary_dim, self.theta, self.impl = a.rotary_dim, a.rope_theta, a.impl
        self.eps, self.zero_centered = cfg.norm_eps, cfg.norm == "rms_zero_centered"
        self.kv_shared = cfg.moe.variant.bam_attention == "kv_shared"
        init = jax.nn.initializers.truncated_normal(cfg.init_std)
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        out_init = jax.nn.initializers.truncated_normal(out_std)
        pd = cfg.param_dtype
        kv_lead = () if self.kv_shared else (E,)
        kv_names = () if self.kv_shared else (None,)
        self.router = param(init, rngs.params(), (D, E), pd, ("embed", None))
        self.q = param(init, rngs.params(), (E, D, H, hd), pd, (None, "embed", "heads", "head_dim"))
        self.k = param(init, rngs.params(), (*kv_lead, D, Hkv, hd), pd,
                       (*kv_names, "embed", "kv_heads", "head_dim"))
        self.v = param(init, rngs.params(), (*kv_lead, D, Hkv, hd), pd,
                       (*kv_names, "embed", "kv_heads", "head_dim"))
        self.o = param(out_init, rngs.params(), (E, H, hd, D), pd,
                       (None, "heads", "head_dim", "embed"))
        norm_init = zeros_init if self.zero_centered else ones_init
        self.q_norm = param(norm_init, None, (E, hd), pd, (None, "head_dim")) if a.qk_norm else None
        self.k_norm = (param(norm_init, None, (*kv_lead, hd), pd, (*kv_names, "head_dim"))
                       if a.qk_norm else None)

    def _norm(self, x: jax.Array, scale) -> jax.Array:
        """QK-norm over head_dim with a per-expert scale [E,hd] (x [B,T,E,heads,hd]) or a shared
        one [hd]."""
        if scale is None:
            return x
        w = scale[...]
        return rms_norm(x, w[:, None, :] if w.ndim == 2 else w, eps=self.eps,
                        zero_centered=self.zero_centered)

    def weights(self, x: jax.Array) -> jax.Array:
        """The soft router: x [B,T,D] -> softmax weights [B,T,E] fp32."""
        logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32),
                            self.router[...].astype(jnp.float32), precision=_HI)
        return jax.nn.softmax(logits, -1)

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array,
                 cache: LayerCache | None = None, probes: bool = False):
        """x [B,T,D] (normed) -> (y [B,T,D], the cache's updated k, v buffers or None), as
        ``Attention.__call__``; a cache holds ``cache_kv_heads`` heads per layer."""
        if probes:
            raise ConfigError("probes: the attention probes are not implemented for BAM "
                              "attention experts; call the model with probes=False")
        dt = self.dtype
        B, T, _ = x.shape
        E, _, H, hd = self.q.shape
        q = self._norm(jnp.einsum("btd,edhk->btehk", x, self.q[...].astype(dt)), self.q_norm)
        if self.kv_shared:
            k = jnp.einsum("btd,dhk->bthk", x, self.k[...].astype(dt))[:, :, None]
            v = jnp.einsum("btd,dhk->bthk", x, self.v[...].astype(dt))  # [B,T,Hkv,hd]
        else:
            k = jnp.einsum("btd,edhk->btehk", x, self.k[...].astype(dt))
            v = jnp.einsum("btd,edhk->btehk", x, self.v[...].astype(dt))  # [B,T,E,Hkv,hd]
        k = self._norm(k, self.k_norm)
        Hkv = k.shape[3]
        if self.kv_shared:  # query heads ordered (kv head, expert, group): GQA reads kv head h
            q = jnp.swapaxes(q.reshape(B, T, E, Hkv, H // Hkv, hd), 2, 3)
            k = k[:, :, 0]
        q, k, v = (a.reshape(B, T, -1, hd) for a in (q, k, v))  # [B,T,heads,hd]
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        q = apply_rope(q, positions, rotary_dim=self.rotary_dim, theta=self.theta)
        k = apply_rope(k, positions, rotary_dim=self.rotary_dim, theta=self.theta)
        if cache is None:
            new_kv = None
            out = kernels.attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                                    q_positions=positions, kv_positions=positions, impl=self.impl,
                                    self_attention=True)
        else:
            k_all, v_all, k, v = cache.write(k, v)
            names = ("batch", "kv_heads", "length", "head_dim")
            k, v = constrain(k, names).astype(dt), constrain(v, names).astype(dt)
            new_kv = (k_all, v_all)
            out = decode_attention.attention(q, k, v, q_segment_ids=segment_ids,
                                             kv_segment_ids=cache.kv_segment_ids,
                                             q_positions=positions,
                                             kv_positions=cache.kv_positions)
        out = out.reshape(B, T, *((Hkv, E, H // Hkv) if self.kv_shared else (E, H)), hd)
        if self.kv_shared:
            out = jnp.swapaxes(out, 2, 3)
        out = out.reshape(B, T, E, H, hd)
        w = self.weights(x).astype(dt)  # [B,T,E]
        y = jnp.einsum("btehk,ehkd,bte->btd", out, self.o[...].astype(dt), w)
        return constrain(y, ("batch", "length", "embed")), new_kv
