"""Grouped-query self-attention with QK-norm and (partial) RoPE (Qwen3), optionally over a KV cache,
with the gating variants of Gated Attention (spec section 2) and an optional softmax sink (3.3).

Gate ``y' = y ⊙ act(x W_θ)`` (multiplicative) or ``y + act(x W_θ)`` (additive), computed from the
same normed input ``x`` as q/k/v, at one position (``cfg.attention.gate``):
  g1  SDPA output [B,T,H,hd], before the output projection (the paper's best; Qwen3-Next)
  g2  values [B,T,Hkv,hd] (key-side token; applied before the cache write)
  g3  keys   [B,T,Hkv,hd] after QK-norm, before RoPE (a headwise gate survives the norm there)
  g4  queries [B,T,H,hd] after QK-norm, before RoPE
  g5  the d_model output after the output projection (elementwise only)
Granularity: elementwise (one gate per head channel), headwise (one per head), head_shared (one
per channel, shared by all heads). Controls (spec 2.1): ``gate_input='constant'`` replaces x W_θ
by one learned logit per gate entry (input-independent); ``gate_activation='ns_sigmoid'`` is the
non-sparse 0.5 + 0.5σ, confined to [0.5, 1]. ``gate_layout='qwen3_next'`` stores the g1 gate in a
doubled q projection ``[D, H, 2*hd]`` whose per-head halves are [query | gate], as HF Qwen3-Next;
``'separate'`` keeps its own ``gate`` parameter. The gate is applied outside the kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import kernels
from moejax.kernels import decode_attention
from moejax.layers import param, zeros_init
from moejax.layers.embed import apply_rope
from moejax.layers.mlp import linear
from moejax.layers.norms import make_norm
from moejax.mesh import constrain


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's view of the head-major KV cache (see ``moejax.model.KVCache``).

    k, v: this layer's buffers [B,Hkv,S,hd] (``layer=None``: unrolled layers, a standalone call),
    or the stacked buffers [L,B,Hkv,S,hd] of all layers and ``layer`` (int32 scalar, the scan
    index) the one this layer owns. slots: [B,T] where this step's tokens are written
    (out-of-range slots are dropped); kv_positions / kv_segment_ids: [B,S] after the write.
    """

    k: jax.Array
    v: jax.Array
    slots: jax.Array
    kv_positions: jax.Array
    kv_segment_ids: jax.Array
    layer: jax.Array | int | None = None

    def write(self, k: jax.Array, v: jax.Array):
        """Scatter this step's k, v [B,T,Hkv,hd] into the buffers, in place (only T rows per
        sequence move) -> (new k buffer, new v buffer, this layer's k, v [B,Hkv,S,hd])."""
        if self.layer is None:
            k_all = write_head_major_rows(self.k, self.slots, k)
            v_all = write_head_major_rows(self.v, self.slots, v)
            return k_all, v_all, k_all, v_all
        k_all = write_layer_rows(self.k, self.layer, self.slots, k)
        v_all = write_layer_rows(self.v, self.layer, self.slots, v)
        return k_all, v_all, k_all[self.layer], v_all[self.layer]


def write_rows(buf: jax.Array, slots: jax.Array, new: jax.Array) -> jax.Array:
    """buf [B,S,...] with new [B,T,...] written at buf[b, slots[b,t]]; slots >= S are dropped."""
    b = jnp.arange(buf.shape[0])[:, None]
    return buf.at[b, slots].set(new.astype(buf.dtype), mode="drop")


def write_head_major_rows(buf: jax.Array, slots: jax.Array, new: jax.Array) -> jax.Array:
    """buf [B,Hkv,S,hd] with new [B,T,Hkv,hd] written at buf[b, :, slots[b,t]] (slots >= S
    dropped)."""
    b = jnp.arange(buf.shape[0])[:, None]
    return buf.at[b, :, slots].set(new.astype(buf.dtype), mode="drop")


def write_layer_rows(buf: jax.Array, layer, slots: jax.Array, new: jax.Array) -> jax.Array:
    """buf [L,B,Hkv,S,hd] with new [B,T,Hkv,hd] written at buf[layer, b, :, slots[b,t]] (slots
    >= S dropped)."""
    b = jnp.arange(buf.shape[1])[:, None]
    return buf.at[layer, b, :, slots].set(new.astype(buf.dtype), mode="drop")


_GATE_NAMES = {  # (position, granularity) -> W_θ's logical names (x [B,T,D] @ W_θ [D,...])
    ("q", "elementwise"): ("embed", "heads", "head_dim"),
    ("q", "headwise"): ("embed", "heads"),
    ("q", "head_shared"): ("embed", "head_dim"),
    ("kv", "elementwise"): ("embed", "kv_heads", "head_dim"),
    ("kv", "headwise"): ("embed", "kv_heads"),
    ("kv", "head_shared"): ("embed", "head_dim"),
    ("out", "elementwise"): ("embed", None),
}
GATE_ACTIVATIONS = {"sigmoid": jax.nn.sigmoid, "silu": jax.nn.silu,
                    "ns_sigmoid": lambda z: 0.5 + 0.5 * jax.nn.sigmoid(z)}
GATE_LOW = 0.1  # gate sparsity threshold (spec section 2.4)


def gate_shape(cfg) -> tuple[int, ...]:
    """Shape of the separate gate projection W_θ for a ModelConfig (without its leading D for an
    input-independent gate, ``gate_input='constant'``)."""
    a, D = cfg.attention, cfg.d_model
    heads = a.num_kv_heads if a.gate in ("g2", "g3") else a.num_heads
    if a.gate == "g5":
        shape = (D, D)
    else:
        shape = {"elementwise": (D, heads, a.head_dim), "headwise": (D, heads),
                 "head_shared": (D, a.head_dim)}[a.gate_granularity]
    return shape[1:] if a.gate_input == "constant" else shape


def _gate_side(gate: str) -> str:
    return {"g1": "q", "g4": "q", "g2": "kv", "g3": "kv", "g5": "out"}[gate]


def apply_gate(y: jax.Array, act: jax.Array, *, granularity: str, form: str) -> jax.Array:
    """y [B,T,heads,hd] or [B,T,D]; act the activated gate in its own shape ([B,T,heads,hd],
    [B,T,heads] headwise, [B,T,hd] head_shared, [B,T,D]). Returns y's shape and dtype."""
    if y.ndim == 4 and granularity == "headwise":
        act = act[..., None]
    elif y.ndim == 4 and granularity == "head_shared":
        act = act[:, :, None, :]
    act = act.astype(y.dtype)
    return y * act if form == "multiplicative" else y + act


def gate_stats(act: jax.Array, valid: jax.Array, first: jax.Array) -> dict[str, jax.Array]:
    """Gate probes over tokens: mean, fraction below 0.1, and the mean on segment-first tokens vs
    the rest. act [B,T,...] activated gate; valid / first [B,T] bool (non-padding / first tokens)."""
    a = act.astype(jnp.float32).reshape(act.shape[0], act.shape[1], -1)
    tok_mean, tok_low = a.mean(-1), (a < GATE_LOW).astype(jnp.float32).mean(-1)
    rest = valid & ~first

    def mean(x, m):
        return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1)
    return {"attn/gate_mean": mean(tok_mean, valid),
            "attn/gate_frac_below_0.1": mean(tok_low, valid),
            "attn/gate_mean_first": mean(tok_mean, first),
            "attn/gate_mean_rest": mean(tok_mean, rest)}


class Attention(nnx.Module):
    """q [D,H,hd] (``[D,H,2*hd]`` = [query|gate] per head in the qwen3_next layout), k/v [D,Hkv,hd],
    o [H,hd,D]; RMSNorm over head_dim on q and k before RoPE; optional ``gate`` (shape
    ``gate_shape(cfg)``; ``gate_bias`` instead for an input-independent gate) and ``sink`` [H]
    logits."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        a = cfg.attention
        self.dtype = jnp.dtype(cfg.dtype)
        self.rotary_dim, self.theta, self.impl = a.rotary_dim, a.rope_theta, a.impl
        D, H, Hkv, hd = cfg.d_model, a.num_heads, a.num_kv_heads, a.head_dim
        init = jax.nn.initializers.truncated_normal(cfg.init_std)
        out_init = jax.nn.initializers.truncated_normal(cfg.init_std / math.sqrt(2 * cfg.num_layers))
        pd = cfg.param_dtype
        self.gate_cfg = (a.gate, a.gate_granularity, a.gate_activation, a.gate_form, a.gate_layout)
        self.gate_input = a.gate_input
        q_dim = 2 * hd if a.gate_layout == "qwen3_next" else hd
        self.q = param(init, rngs.params(), (D, H, q_dim), pd, ("embed", "heads", "head_dim"))
        self.k = param(init, rngs.params(), (D, Hkv, hd), pd, ("embed", "kv_heads", "head_dim"))
        self.v = param(init, rngs.params(), (D, Hkv, hd), pd, ("embed", "kv_heads", "head_dim"))
        self.o = param(out_init, rngs.params(), (H, hd, D), pd, ("heads", "head_dim", "embed"))
        if a.qk_norm:
            self.q_norm = make_norm(cfg, hd, ("head_dim",))
            self.k_norm = make_norm(cfg, hd, ("head_dim",))
        else:
            self.q_norm = self.k_norm = None
        gate = gate_bias = None
        if a.gate != "none" and a.gate_layout == "separate":
            names = _GATE_NAMES[(_gate_side(a.gate), a.gate_granularity)]
            if a.gate_input == "constant":  # the logits alone (a bias, no x W_θ): σ(0) = 0.5
                gate_bias = param(zeros_init, None, gate_shape(cfg), pd, names[1:])
            else:
                gate = param(init, rngs.params(), gate_shape(cfg), pd, names)
        self.gate, self.gate_bias = gate, gate_bias
        self.sink = param(zeros_init, None, (H,), pd, ("heads",)) if a.sink else None

    def _gate(self, x: jax.Array, qg: jax.Array | None) -> jax.Array | None:
        """The activated gate (fp32) from the normed input x [B,T,D], or from the gate half
        ``qg`` [B,T,H,hd] of a qwen3_next-layout q projection, or (input-independent) the learned
        logits broadcast over [B,T]; None without a gate."""
        pos, gran, act, _, layout = self.gate_cfg
        if pos == "none":
            return None
        if layout == "qwen3_next":
            return GATE_ACTIVATIONS[act](qg.astype(jnp.float32))
        if self.gate_input == "constant":
            b = self.gate_bias[...].astype(self.dtype)
            logits = jnp.broadcast_to(b, (*x.shape[:2], *b.shape))
        else:
            logits = linear(x, self.gate[...].astype(self.dtype))  # [B,T,*W_θ.shape[1:]]
        names = _GATE_NAMES[(_gate_side(pos), gran)]
        logits = constrain(logits, ("batch", "length", *names[1:]))
        return GATE_ACTIVATIONS[act](logits.astype(jnp.float32))

    def _cached_attention(self, q, k, v, cache: LayerCache, positions, segment_ids, sink, probes):
        """q [B,T,H,hd] over this layer's head-major cache k, v [B,Hkv,S,hd]: the dense
        head-major kernel for every ``impl`` (a cached step reads the cache once, memory-bound;
        cudnn or splash would need a token-major copy of it per step), except that the probes'
        statistics come from the reference kernel on the token-major view [B,S,Hkv,hd]."""
        kw = dict(q_segment_ids=segment_ids, kv_segment_ids=cache.kv_segment_ids,
                  q_positions=positions, kv_positions=cache.kv_positions, sink_logits=sink)
        if not probes:
            return decode_attention.attention(q, k, v, **kw)
        token_major = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731
        return kernels.attention(q, token_major(k), token_major(v), impl="xla", return_stats=True,
                                 **kw)

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array,
                 cache: LayerCache | None = None, probes: bool = False):
        """x [B,T,D]; positions, segment_ids [B,T]. Returns (y [B,T,D], the cache's updated k, v
        buffers (``LayerCache.write``) or None),
        plus, with ``probes``, a dict of this layer's attention probes (scalars unless noted):
        ``attn/first_token_share`` (mean over heads and non-first queries of the probability on
        the segment's first token), ``attn/map`` [n,n] (row 0, head 0), and with a gate
        ``attn/gate_mean``, ``attn/gate_frac_below_0.1``, ``attn/gate_mean_first``/``_rest``.
        Probes always run the reference kernel (they need the probabilities).

        Without a cache the T tokens attend among themselves; with one, their k/v are scattered
        into the buffers at ``cache.slots`` and the queries attend over this layer's whole cache.
        """
        dt = self.dtype
        pos, gran, _, form, layout = self.gate_cfg
        q = linear(x, self.q[...].astype(dt))  # [B,T,H,q_dim]
        qg = None
        if layout == "qwen3_next":
            hd = q.shape[-1] // 2
            q, qg = q[..., :hd], q[..., hd:]
        gate = self._gate(x, qg)
        gated = functools.partial(apply_gate, act=gate, granularity=gran, form=form)
        k = linear(x, self.k[...].astype(dt))  # [B,T,Hkv,hd]
        v = linear(x, self.v[...].astype(dt))
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if pos == "g4":
            q = gated(q)
        elif pos == "g3":
            k = gated(k)
        elif pos == "g2":
            v = gated(v)
        q = apply_rope(q, positions, rotary_dim=self.rotary_dim, theta=self.theta)
        k = apply_rope(k, positions, rotary_dim=self.rotary_dim, theta=self.theta)
        sink = None if self.sink is None else self.sink[...]
        if cache is None:
            new_kv = None
            out = kernels.attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                                    q_positions=positions, kv_positions=positions,
                                    impl="xla" if probes else self.impl, sink_logits=sink,
                                    return_stats=probes, self_attention=True)
        else:
            k_all, v_all, k, v = cache.write(k, v)
            names = ("batch", "kv_heads", "length", "head_dim")
            k, v = constrain(k, names).astype(dt), constrain(v, names).astype(dt)  # [B,Hkv,S,hd]
            new_kv = (k_all, v_all)
            out = self._cached_attention(q, k, v, cache, positions, segment_ids, sink, probes)
        out, kstats = out if probes else (out, None)
        out = constrain(out, ("batch", "length", "heads", "head_dim"))  # [B,T,H,hd]
        if pos == "g1":
            out = gated(out)
        y = linear(out, self.o[...].astype(dt), n_in=2)  # [B,T,D]
        if pos == "g5":
            y = gated(y)
        y = constrain(y, ("batch", "length", "embed"))
        if not probes:
            return y, new_kv
        valid = segment_ids != 0
        first = kstats["is_first"]
        later = (valid & ~first).astype(jnp.float32)
        share = jnp.sum(kstats["first_share"] * later[..., None]) / jnp.maximum(
            jnp.sum(later) * kstats["first_share"].shape[-1], 1)
        stats = {"attn/first_token_share": share, "attn/map": kstats["map"]}
        if gate is not None:
            stats.update(gate_stats(gate, valid, first))
        return y, new_kv, stats
