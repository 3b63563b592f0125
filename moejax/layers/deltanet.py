"""Gated DeltaNet linear attention (Qwen3-Next, spec architecture.md section 9.2), as HF
transformers' ``Qwen3NextGatedDeltaNet``:

    [q k v z] = x W_qkvz,  [b a] = x W_ba       (fused, grouped per key head as HF)
    q, k, v   = SiLU(causal depthwise conv1d_K([q k v]))
    q, k      = L2-normalised; repeated to the value heads (each key head serves r consecutive ones)
    beta      = sigmoid(b),  g = -exp(A_log) * softplus(a + dt_bias)
    o         = gated delta rule (``moejax.kernels.gated_delta``)
    y         = out_proj(RMSNorm_head(o) * SiLU(z))

Parameters (logical names for sharding; heads shard over ``tensor`` like attention's):
``in_proj_qkvz`` [D,Hk,2dk+2r*dv] (per key head [q | k | v_r | z_r], HF's order, so a checkpoint
imports by reshape), ``in_proj_ba`` [D,Hk,2r] ([b_r | a_r]), ``conv`` [K,conv_dim] over HF's
channel order [q (Hk*dk) | k (Hk*dk) | v (Hv*dv)], ``A_log``/``dt_bias`` [Hv], ``norm`` [dv]
(one gated RMSNorm shared by the heads, weight init 1 as HF), ``out_proj`` [Hv,dv,D].

Decoding: ``DeltaNetCache`` holds ``conv_state`` [B,conv_dim,K-1] (the last K-1 pre-conv inputs
of the row's last non-padding token's document) and ``recurrent_state`` [B,Hv,dk,dv] (fp32).
Packing and padding follow the kernel: the conv sees only taps of the same document, padding
tokens (segment 0) change no state and output zeros, and a row's first non-padding token continues
the cached state.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import DeltaNetConfig  # noqa: F401  (re-exported: the config lives there)
from moejax.kernels import gated_delta
from moejax.layers import ones_init, param
from moejax.layers.mlp import linear
from moejax.layers.norms import rms_norm
from moejax.mesh import constrain

HEAD_NAMES = ("batch", "length", "heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeltaNetCache:
    """One layer's decoding state: conv_state [B,conv_dim,K-1] (compute dtype), recurrent_state
    [B,Hv,dk,dv] fp32."""

    conv_state: jax.Array
    recurrent_state: jax.Array


def init_cache(dn: DeltaNetConfig, batch: int, dtype) -> DeltaNetCache:
    """An empty cache (zeros) for ``batch`` rows."""
    return DeltaNetCache(
        conv_state=jnp.zeros((batch, dn.conv_dim, dn.conv_kernel - 1), dtype),
        recurrent_state=jnp.zeros((batch, dn.num_v_heads, dn.head_k_dim, dn.head_v_dim),
                                  jnp.float32))


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x * rsqrt(sum(x^2) + eps) over the last axis, fp32 (as HF/FLA's l2norm)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def conv_taps(segment_ids: jax.Array, K: int) -> jax.Array:
    """Which of the K conv taps each token may read: [K,B,T] bool, tap ``s`` = the input ``s``
    tokens back (s=0 the token itself). A tap is live when it lies in the token's document and is
    not padding; the K-1 cached inputs before the row are live for the row's first document."""
    reset, valid = gated_delta.segment_resets(segment_ids)
    doc = jnp.cumsum(reset.astype(jnp.int32), axis=1)  # [B,T]
    B, T = segment_ids.shape
    ext_valid = jnp.concatenate([jnp.ones((B, K - 1), bool), valid], axis=1)
    ext_doc = jnp.concatenate([jnp.zeros((B, K - 1), jnp.int32), doc], axis=1)
    return jnp.stack([ext_valid[:, K - 1 - s:K - 1 - s + T] & (ext_doc[:, K - 1 - s:K - 1 - s + T]
                                                                == doc) for s in range(K)])


def causal_conv(x: jax.Array, w: jax.Array, state: jax.Array, taps: jax.Array) -> jax.Array:
    """Depthwise causal conv: x [B,T,C], w [K,C] (w[K-1] weighs the token itself), state
    [B,K-1,C] the inputs before x, taps [K,B,T] from ``conv_taps``. Returns [B,T,C] (no
    activation), fp32."""
    K, T = w.shape[0], x.shape[1]
    ext = jnp.concatenate([state, x], axis=1).astype(jnp.float32)  # [B,K-1+T,C]
    wf = w.astype(jnp.float32)
    out = 0.0
    for s in range(K):
        window = ext[:, K - 1 - s:K - 1 - s + T]  # the input s tokens back
        out = out + jnp.where(taps[s][..., None], window, 0.0) * wf[K - 1 - s]
    return out


def next_conv_state(x: jax.Array, state: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """The K-1 inputs ending at each row's last non-padding token, zeroed outside its document
    (the state is unchanged for a row of padding). x [B,T,C], state [B,K-1,C] -> [B,K-1,C]."""
    K1, T = state.shape[1], x.shape[1]
    reset, valid = gated_delta.segment_resets(segment_ids)
    doc = jnp.cumsum(reset.astype(jnp.int32), axis=1)
    ext = jnp.concatenate([state, x.astype(state.dtype)], axis=1)
    ext_valid = jnp.concatenate([jnp.ones(state.shape[:2], bool), valid], axis=1)
    ext_doc = jnp.concatenate([jnp.zeros(state.shape[:2], jnp.int32), doc], axis=1)
    pos = jnp.where(ext_valid, jnp.arange(K1 + T)[None], -1)
    last = jnp.max(pos, axis=1)  # [B] >= K1-1: the last live input
    idx = last[:, None] - jnp.arange(K1 - 1, -1, -1)[None]  # [B,K1] oldest first
    live = (jnp.take_along_axis(ext_valid, idx, 1)
            & (jnp.take_along_axis(ext_doc, idx, 1)
               == jnp.take_along_axis(ext_doc, last[:, None], 1)))
    rows = jax.vmap(lambda e, i: e[i])(ext, idx)  # [B,K-1,C]
    return jnp.where(live[..., None], rows, 0)


class GatedDeltaNet(nnx.Module):
    """The Qwen3-Next linear-attention token mixer; ``cfg`` a ModelConfig (d_model, dtypes,
    init_std, norm_eps, num_layers), ``dn`` its DeltaNetConfig."""

    def __init__(self, cfg, dn: DeltaNetConfig, *, rngs: nnx.Rngs):
        self.dn, self.eps, self.dtype = dn, cfg.norm_eps, jnp.dtype(cfg.dtype)
        D, Hk, Hv, r = cfg.d_model, dn.num_k_heads, dn.num_v_heads, dn.heads_per_key
        dk, dv, K, pd = dn.head_k_dim, dn.head_v_dim, dn.conv_kernel, cfg.param_dtype
        init = jax.nn.initializers.truncated_normal(cfg.init_std)
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        out_init = jax.nn.initializers.truncated_normal(out_std)
        self.in_proj_qkvz = param(init, rngs.params(), (D, Hk, 2 * dk + 2 * r * dv), pd,
                                  ("embed", "heads", None))
        self.in_proj_ba = param(init, rngs.params(), (D, Hk, 2 * r), pd, ("embed", "heads", None))
        bound = 1.0 / math.sqrt(K)  # torch Conv1d's default (fan_in = K for a depthwise conv)
        conv_init = lambda key, shape, dtype: jax.random.uniform(  # noqa: E731
            key, shape, dtype, -bound, bound)
        self.conv = param(conv_init, rngs.params(), (K, dn.conv_dim), pd, (None, None))
        a_init = lambda key, shape, dtype: jnp.log(jax.random.uniform(  # noqa: E731
            key, shape, jnp.float32, 0.01, 16.0)).astype(dtype)
        self.A_log = param(a_init, rngs.params(), (Hv,), pd, ("heads",))
        self.dt_bias = param(ones_init, None, (Hv,), pd, ("heads",))
        self.norm = param(ones_init, None, (dv,), pd, ("head_dim",))
        self.out_proj = param(out_init, rngs.params(), (Hv, dv, D), pd,
                              ("heads", "head_dim", "embed"))

    def init_cache(self, batch: int) -> DeltaNetCache:
        return init_cache(self.dn, batch, self.dtype)

    def _project(self, x):
        """x [B,T,D] -> pre-conv q, k [B,T,Hk,dk], v, z [B,T,Hv,dv], b, a [B,T,Hv]."""
        dn, dt = self.dn, self.dtype
        B, T = x.shape[:2]
        dk, dv, r = dn.head_k_dim, dn.head_v_dim, dn.heads_per_key
        qkvz = linear(x, self.in_proj_qkvz[...].astype(dt))  # [B,T,Hk,2dk+2r*dv]
        ba = linear(x, self.in_proj_ba[...].astype(dt))  # [B,T,Hk,2r]
        q, k = qkvz[..., :dk], qkvz[..., dk:2 * dk]
        v = qkvz[..., 2 * dk:2 * dk + r * dv].reshape(B, T, dn.num_v_heads, dv)
        z = qkvz[..., 2 * dk + r * dv:].reshape(B, T, dn.num_v_heads, dv)
        b = ba[..., :r].reshape(B, T, dn.num_v_heads)
        a = ba[..., r:].reshape(B, T, dn.num_v_heads)
        return q, k, v, z, b, a

    def _conv(self, q, k, v, state, segment_ids):
        """SiLU(causal conv) of q, k [B,T,Hk,dk] and v [B,T,Hv,dv], each over its own channels
        (heads stay sharded), from state [B,K-1,conv_dim]; returns the three and the next state."""
        dn = self.dn
        B, T = q.shape[:2]
        w = self.conv[...]
        cuts = (0, dn.key_dim, 2 * dn.key_dim, dn.conv_dim)
        taps = conv_taps(segment_ids, dn.conv_kernel)
        outs, flats = [], []
        for i, part in enumerate((q, k, v)):
            lo, hi = cuts[i], cuts[i + 1]
            flat = part.reshape(B, T, hi - lo)
            y = jax.nn.silu(causal_conv(flat, w[:, lo:hi], state[..., lo:hi], taps))
            outs.append(constrain(y.reshape(part.shape), HEAD_NAMES))
            flats.append(flat)
        new_state = next_conv_state(jnp.concatenate(flats, -1), state, segment_ids)
        return (*outs, new_state)

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 cache: DeltaNetCache | None = None):
        """x [B,T,D]; segment_ids [B,T] (default: one document, no padding). Returns (y [B,T,D],
        the updated cache or None). With a cache, the T tokens continue its state (T=1 runs the
        recurrent step, longer prefills ``dn.impl``)."""
        dn, dt = self.dn, self.dtype
        B, T = x.shape[:2]
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        x = jnp.where((segment_ids != 0)[..., None], x, 0).astype(dt)  # HF zeroes padding inputs
        q, k, v, z, b, a = self._project(x)
        q, k, v, z = (constrain(t, HEAD_NAMES) for t in (q, k, v, z))
        conv_state = (jnp.zeros((B, dn.conv_kernel - 1, dn.conv_dim), dt) if cache is None
                      else jnp.swapaxes(cache.conv_state, 1, 2))
        q, k, v, conv_state = self._conv(q, k, v, conv_state, segment_ids)
        q, k = l2_normalize(q), l2_normalize(k)
        q, k = (jnp.repeat(t, dn.heads_per_key, axis=2) for t in (q, k))  # [B,T,Hv,dk]
        beta = jax.nn.sigmoid(b.astype(jnp.float32))
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(
            a.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))  # [B,T,Hv]
        impl = "recurrent" if cache is not None and T == 1 else dn.impl
        o, state = gated_delta.gated_delta_rule(
            q, k, v.astype(dt), g, beta, impl=impl, chunk=dn.chunk, segment_ids=segment_ids,
            initial_state=None if cache is None else cache.recurrent_state)
        o = constrain(o, HEAD_NAMES)  # [B,T,Hv,dv]
        o = rms_norm(o.astype(jnp.float32), self.norm[...], eps=self.eps)
        o = (o * jax.nn.silu(z.astype(jnp.float32))).astype(dt)
        y = linear(o, self.out_proj[...].astype(dt), n_in=2)  # [B,T,D]
        y = constrain(y, ("batch", "length", "embed"))
        if cache is None:
            return y, None
        state = constrain(state, ("batch", "heads", None, None))
        return y, DeltaNetCache(conv_state=jnp.swapaxes(conv_state, 1, 2).astype(dt),
                                recurrent_state=state)
