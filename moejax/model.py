"""Qwen3-style decoder: embedding, pre-norm blocks (GQA attention + SwiGLU), final norm, LM head.

Layers are an unrolled ``nnx.List`` or, with ``cfg.scan_layers``, one stacked block created with
``nnx.vmap`` (params get a leading 'layers' axis) and applied with ``nnx.scan``. Every block returns
an aux dict; the model stacks it over layers (``[L, ...]``) so MoE routers can report statistics.

KV-cache convention (right padding, per-row lengths):
  * ``cache = model.init_cache(B, S)``: k, v head-major in compute dtype, a tuple of L per-layer
    [B,Hkv,S,hd] buffers (unrolled layers) or one stacked [L,B,Hkv,S,hd] (``scan_layers``: the
    scan carry); positions and segment_ids [B,S] (segment 0 = empty slot, never attended),
    lengths [B] = next write slot. Head-major so a step writes in place and attention reads the
    buffers as they lie (``moejax.kernels.decode_attention``).
  * ``model(tokens [B,T], segment_ids, positions, cache=cache)`` writes row b's T tokens at slots
    lengths[b] .. lengths[b]+T-1 (slots >= S are dropped), attends over the whole cache, and
    advances lengths[b] by the number of non-padding tokens (segment_ids != 0) in that row.
  * So a chunk must be right-padded: valid tokens first, padding (segment 0) after; the padding
    slots are overwritten by the next call. Defaults: segment_ids = 1, positions = lengths + t.
  * Ragged prompts: prefill ``prompt [B,P]`` with segment_ids = (t < len_b), then feed T=1 steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import ConfigError, ModelConfig
from moejax.layers.attention import Attention, LayerCache, write_rows
from moejax.layers.deltanet import DeltaNetCache, GatedDeltaNet
from moejax.layers.deltanet import init_cache as init_linear_cache
from moejax.layers.embed import Embed, LMHead
from moejax.layers.mlp import MLP
from moejax.layers.mtp import MTP, MTP_KEY
from moejax.layers.mtp import block_config as mtp_block_config
from moejax.layers.attention_experts import AttentionExperts, cache_kv_heads
from moejax.layers.moe_variants import make_moe, make_shared_cell
from moejax.layers.norms import make_block_norm
from moejax.mesh import constrain

Aux = dict[str, Any]
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
KV_NAMES = ("layers", "batch", "kv_heads", "length", "head_dim")  # a stacked k/v buffer


def constrain_kv(buf: jax.Array) -> jax.Array:
    """A k/v buffer sharded like activations: stacked [L,B,Hkv,S,hd] or one layer's [B,Hkv,S,hd]
    (batch over the batch axes, kv heads over ``tensor``)."""
    return constrain(buf, KV_NAMES if buf.ndim == len(KV_NAMES) else KV_NAMES[1:])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Decoding state for all layers (a pytree: jit-able and donatable). See the module docstring."""

    k: jax.Array | tuple[jax.Array, ...]  # [L,B,Hkv,S,hd], or L x [B,Hkv,S,hd] (unrolled)
    v: jax.Array | tuple[jax.Array, ...]
    positions: jax.Array  # [B,S] int32, position of the token held in each slot
    segment_ids: jax.Array  # [B,S] int32, 0 = empty or padding
    lengths: jax.Array  # [B] int32, next write slot (= number of valid tokens held)
    # hybrid models (``layer_types``): k/v hold only the full-attention layers (unrolled: one per
    # such layer in order; scanned: one stacked [G,...] per full position of the pattern) and
    # ``linear`` the Gated DeltaNet states the same way (DeltaNetCache, stacked [G,...] when
    # scanned); None for an all-attention model
    linear: tuple[DeltaNetCache, ...] | None = None

    @property
    def max_len(self) -> int:
        return self.positions.shape[1]


@jax.jit(static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _zeros_cache(L, B, S, Hkv, hd, dtype, stacked: bool) -> KVCache:
    def kv():
        if stacked:
            return constrain_kv(jnp.zeros((L, B, Hkv, S, hd), dtype))
        return tuple(constrain_kv(jnp.zeros((B, Hkv, S, hd), dtype)) for _ in range(L))
    z = lambda *shape: jnp.zeros(shape, jnp.int32)  # noqa: E731
    return KVCache(k=kv(), v=kv(), positions=constrain(z(B, S), ("batch", "length")),
                   segment_ids=constrain(z(B, S), ("batch", "length")),
                   lengths=constrain(z(B), ("batch",)))


def constrain_linear(c: DeltaNetCache) -> DeltaNetCache:
    """A Gated DeltaNet cache sharded like activations (rows over batch, value heads over
    ``tensor``); one layer's or stacked over a leading 'layers' axis."""
    lead = ("layers",) if c.conv_state.ndim == 4 else ()
    return DeltaNetCache(conv_state=constrain(c.conv_state, lead + ("batch", None, None)),
                         recurrent_state=constrain(c.recurrent_state,
                                                   lead + ("batch", "heads", None, None)))


@jax.jit(static_argnums=(0, 1, 2))
def _zeros_hybrid_cache(cfg: ModelConfig, B: int, S: int) -> KVCache:
    """An empty hybrid cache (``KVCache.linear``): unrolled, one k/v per full-attention layer and
    one DeltaNetCache per linear layer; scanned, each stacked [G,...] per pattern position."""
    a = cfg.attention
    types = cfg.layer_pattern if cfg.scan_layers else tuple(
        cfg.layer_type(i) for i in range(cfg.num_layers))
    lead = (cfg.num_layers // len(types),) if cfg.scan_layers else ()
    stack = lambda t: jnp.broadcast_to(t, lead + t.shape)  # noqa: E731
    kv = lambda: tuple(  # noqa: E731
        constrain_kv(jnp.zeros(lead + (B, cache_kv_heads(cfg), S, a.head_dim), cfg.dtype))
        for t in types if t == "full_attention")
    linear = tuple(constrain_linear(jax.tree.map(stack, init_linear_cache(
        cfg.deltanet, B, jnp.dtype(cfg.dtype)))) for t in types if t == "linear_attention")
    z = lambda *shape: jnp.zeros(shape, jnp.int32)  # noqa: E731
    return KVCache(k=kv(), v=kv(), positions=constrain(z(B, S), ("batch", "length")),
                   segment_ids=constrain(z(B, S), ("batch", "length")),
                   lengths=constrain(z(B), ("batch",)), linear=linear)


def _stacked_blocks(cfg: ModelConfig, position: int, rngs: nnx.Rngs) -> Block:
    """The G = num_layers / P blocks at ``position`` of the layer pattern, stacked (nnx.vmap,
    params get a leading 'layers' axis) for the hybrid scan."""
    @nnx.split_rngs(splits=cfg.num_layers // len(cfg.layer_pattern))
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return Block(cfg, position, rngs=r)
    return make(rngs)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)); ffn is the dense MLP or,
    in MoE layers (``cfg.moe.is_moe_layer(layer)``), the MoE block. ``cfg.parallel_block``:
    x + attn(norm(x)) + ffn(norm'(x)). BAM's attention experts replace attn
    (``cfg.attention_experts``)."""

    def __init__(self, cfg: ModelConfig, layer: int = 0, *, rngs: nnx.Rngs):
        self.attn_norm = make_block_norm(cfg, cfg.norm_variant_attn, rngs=rngs)
        self.linear = cfg.layer_type(layer) == "linear_attention"  # Gated DeltaNet mixer
        self.attn = (GatedDeltaNet(cfg, cfg.deltanet, rngs=rngs) if self.linear
                     else AttentionExperts(cfg, rngs=rngs) if cfg.attention_experts
                     else Attention(cfg, rngs=rngs))
        self.parallel = cfg.parallel_block
        self.mlp_norm = make_block_norm(cfg, cfg.norm_variant_ffn, rngs=rngs)
        self.is_moe = cfg.moe.is_moe_layer(layer)
        self.mlp = make_moe(cfg, rngs=rngs) if self.is_moe else MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, segment_ids, cache: LayerCache | None = None, *,
                 tokens=None, cell=None, state=None, rng=None, forced=None, train: bool = False,
                 probes: bool = False):
        """x [B,T,D] -> (x [B,T,D], aux dict of per-layer values, the cache's updated (k, v)
        buffers (``LayerCache.write``) or None, router state). ``forced`` [B,T,k] replays a
        routing in an MoE layer (``Model.__call__``). ``probes`` adds the attention probes
        (``Attention.__call__``) and residual-stream probes of this block's output
        (``resid_probes``) to aux."""
        if self.linear:  # cache: this layer's DeltaNetCache (no attention probes)
            out = (*self.attn(self.attn_norm(x), segment_ids=segment_ids, cache=cache), {})
        else:
            out = self.attn(self.attn_norm(x), positions=positions, segment_ids=segment_ids,
                            cache=cache, probes=probes)
        h, new_kv = out[:2]
        ffn_in = x if self.parallel else x + h  # a parallel block's branches share the input
        aux: Aux = {}
        if self.is_moe:
            y, aux, state = self.mlp(self.mlp_norm(ffn_in), token_ids=tokens,
                                     segment_ids=segment_ids, state=state, cell=cell, rng=rng,
                                     train=train, forced=forced)
        else:
            y = self.mlp(self.mlp_norm(ffn_in))
        x = x + h + y
        x = constrain(x, ("batch", "length", "embed"))
        if probes:
            aux = {**aux, **out[2], **resid_probes(x, segment_ids)}
        return x, aux, new_kv, state


PROBE_SAMPLE = 64  # tokens of batch row 0 kept for the |h| heatmap and the attention map


def resid_probes(x: jax.Array, segment_ids: jax.Array) -> Aux:
    """Residual-stream probes of a block output x [B,T,D] over non-padding tokens:
    ``resid/max_abs`` (massive activation), ``resid/channel_median_abs`` [D] (median over tokens
    of |h| per channel: residual-sink dims stand out) and ``resid/sample_abs`` [n,D] (|h| of the
    first n tokens of row 0, for the tokens x channels heatmap)."""
    a = jnp.abs(x.astype(jnp.float32))
    valid = (segment_ids != 0)[..., None]
    flat = jnp.where(valid, a, jnp.nan).reshape(-1, a.shape[-1])
    return {"resid/max_abs": jnp.max(jnp.where(valid, a, 0.0)),
            "resid/channel_median_abs": jnp.nan_to_num(jnp.nanmedian(flat, axis=0)),
            "resid/sample_abs": a[0, :PROBE_SAMPLE]}


def _apply_block(block: Block, x, positions, segment_ids, cache, tokens, cell, state, rng, forced,
                 train, probes=False):
    """Block application as a plain function (what nnx.remat/nnx.scan wrap); ``train`` and
    ``probes`` are static. ``tokens`` feed MaskMoE, ``cell`` is the module shared by all MoE
    layers (RMoE recurrent cell, HyperMoE generator), ``forced`` [B,T,k] (or None) the replayed
    routing of this layer."""
    return block(x, positions, segment_ids, cache, tokens=tokens, cell=cell, state=state, rng=rng,
                 forced=forced, train=train, probes=probes)


class Model(nnx.Module):
    """``logits [B,T,V] fp32, aux = model(tokens [B,T] int32, segment_ids=None, positions=None)``;
    with ``cache=`` it also returns the updated KVCache."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg, rngs=rngs)
        if cfg.scan_layers and cfg.is_hybrid:  # one stack of G layers per pattern position
            self.layers = nnx.List([_stacked_blocks(cfg, p, rngs) for p in
                                    range(len(cfg.layer_pattern))])
        elif cfg.scan_layers:
            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make(r):
                return Block(cfg, 0, rngs=r)
            self.layers = make(rngs)
        else:
            self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        # one module shared by all MoE layers, passed to each as cell=: RMoE's recurrent router
        # cell or HyperMoE's parameter generator (None otherwise)
        self.router_cell = make_shared_cell(cfg, rngs=rngs)
        self.final_norm = make_block_norm(cfg, cfg.norm_variant_final, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else LMHead(cfg, rngs=rngs)
        self.mtp = None if not cfg.mtp_layers else MTP(  # Block like the last layer, full attn
            cfg, lambda r: Block(mtp_block_config(cfg), cfg.num_layers - 1, rngs=r), rngs=rngs)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache of ``max_len`` slots per row, sharded like activations under a mesh
        (``cache_kv_heads``: BAM's 'full' attention experts keep num_kv_heads per expert)."""
        cfg, a = self.cfg, self.cfg.attention
        if max_len > cfg.max_seq_len:
            raise ConfigError(f"init_cache(max_len={max_len}) exceeds model.max_seq_len="
                              f"{cfg.max_seq_len}; raise model.max_seq_len or shorten the cache")
        if cfg.is_hybrid:
            return _zeros_hybrid_cache(cfg, batch, max_len)
        return _zeros_cache(cfg.num_layers, batch, max_len, cache_kv_heads(cfg), a.head_dim,
                            jnp.dtype(cfg.dtype), cfg.scan_layers)

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: KVCache | None = None, *,
                 train: bool = False, rng: jax.Array | None = None, probes: bool = False,
                 forced_experts: jax.Array | None = None):
        """``train`` enables train-only routing behaviour (jitter, GW-MoE); ``rng`` feeds it.
        MoE statistics in ``aux`` are stacked over the MoE layers only ([L_moe, ...]); token-choice
        top-k routers also report the experts they used, ``aux["router/experts"]`` int32
        [L_moe,B,T,k] (-1 = empty slot: null or masked expert).
        ``forced_experts`` int32 [L_moe,B,T,k] (routing replay, R2/R3) makes every MoE layer use
        exactly those expert sets (-1 = empty slot) with combine weights from its live router
        scores (``moejax.layers.router.forced_route``); capacity dispatch still applies its
        capacity after forcing (RL runs dropless).
        ``probes=True`` also puts attention/residual probes of this same forward into ``aux``,
        stacked over all layers: ``attn/first_token_share [L]``, ``resid/max_abs [L]``,
        ``resid/channel_median_abs [L,D]``, ``resid/sample_abs [L,n,D]``, ``attn/map [L,n,n]`` and,
        with a gate, ``attn/gate_mean [L]``, ``attn/gate_frac_below_0.1 [L]``,
        ``attn/gate_mean_first [L]``, ``attn/gate_mean_rest [L]`` (see ``moejax.analysis.sinks``).

        With a cache, the k/v buffers ride through the layers (the stacked ones in the scan carry,
        or each unrolled layer its own) and each layer scatters only its T new rows into them:
        nothing is re-stacked or transposed, so a donated cache is updated in place."""
        cfg = self.cfg
        B, T = tokens.shape
        tokens = constrain(tokens, ("batch", "length"))
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        start = jnp.zeros((B,), jnp.int32) if cache is None else cache.lengths
        if positions is None:
            positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
        segment_ids, positions = segment_ids.astype(jnp.int32), positions.astype(jnp.int32)
        forced = self._checked_forced(forced_experts, B, T)  # [L_moe,B,T,k] or None

        kv = None  # (k, v): stacked [L,B,Hkv,S,hd] (scan carry) or lists of L [B,Hkv,S,hd]
        if cache is not None:
            slots = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None]  # [B,T]
            kv_pos = write_rows(cache.positions, slots, positions)  # [B,S]
            kv_seg = write_rows(cache.segment_ids, slots, segment_ids)
            kv = (cache.k, cache.v) if cfg.scan_layers else (list(cache.k), list(cache.v))
            if cfg.is_hybrid:  # tuples over the pattern's full positions (scan) or layers
                kv = (list(cache.k), list(cache.v))

            def layer_cache(k, v, layer=None):
                return LayerCache(k, v, slots, kv_pos, kv_seg, layer)

        block_fn = _apply_block
        if cfg.remat != "none":
            block_fn = nnx.remat(_apply_block, policy=REMAT_POLICIES[cfg.remat],
                                 prevent_cse=not cfg.scan_layers, static_argnums=(10, 11))

        x = self.embed(tokens)  # [B,T,D]
        cell = self.router_cell
        state = None
        if cfg.moe.enabled and cfg.moe.router.recurrent != "none":
            state = jnp.zeros((B * T, cfg.moe.router.recurrent_dim), jnp.float32)  # h_0 = 0
        rngs = None if rng is None else jax.random.split(rng, cfg.num_layers)
        linear = None if cache is None else cache.linear
        if cfg.is_hybrid:
            x, aux, kv, state, linear = self._apply_hybrid(
                x, block_fn, positions, segment_ids, kv, linear,
                None if cache is None else layer_cache, tokens, cell, state, rngs, forced, train,
                probes)
        elif cfg.scan_layers:  # every layer is MoE or none is (config check): forced is [L,B,T,k]
            def body(carry, block, layer, rng_l, forced_l, cell):
                x, state, kv = carry
                lc = None if kv is None else layer_cache(kv[0], kv[1], layer)
                x, aux_l, kv, state = block_fn(block, x, positions, segment_ids, lc, tokens, cell,
                                               state, rng_l, forced_l, train, probes)
                return (x, state, kv), aux_l

            (x, state, kv), aux = nnx.scan(
                body, in_axes=(nnx.Carry, 0, 0, 0, 0, None), out_axes=(nnx.Carry, 0),
                transform_metadata={nnx.PARTITION_NAME: "layers"})(
                    (x, state, kv), self.layers, jnp.arange(cfg.num_layers, dtype=jnp.int32), rngs,
                    forced, cell)
        else:
            auxes, moe_index = [], 0
            for i, block in enumerate(self.layers):
                lc = None if kv is None else layer_cache(kv[0][i], kv[1][i])
                forced_l = None
                if forced is not None and block.is_moe:
                    forced_l, moe_index = forced[moe_index], moe_index + 1
                x, aux_l, kv_i, state = block_fn(block, x, positions, segment_ids, lc, tokens,
                                                 cell, state, None if rngs is None else rngs[i],
                                                 forced_l, train, probes)
                if kv is not None:
                    kv[0][i], kv[1][i] = kv_i
                if aux_l:
                    auxes.append(aux_l)
            kv = None if kv is None else (tuple(kv[0]), tuple(kv[1]))
            # stacked per key: MoE stats over the MoE layers, probes over all layers
            aux = {k: jax.tree.map(lambda *xs: jnp.stack(xs), *[a[k] for a in auxes if k in a])
                   for k in dict.fromkeys(k for a in auxes for k in a)}

        h = self.final_norm(x)
        head = self.embed.attend if self.lm_head is None else self.lm_head
        logits = head(h)  # [B,T,V] fp32
        if self.mtp is not None and cache is None:  # [D_mtp,B,T,V]: the training loss's input
            aux = {**aux, MTP_KEY: self.mtp(h, tokens, positions, segment_ids, self.embed, head)}
        if cache is None:
            return logits, aux
        new_cache = KVCache(
            k=jax.tree.map(constrain_kv, kv[0]), v=jax.tree.map(constrain_kv, kv[1]),
            positions=kv_pos, segment_ids=kv_seg,
            lengths=cache.lengths + jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32),
            linear=None if linear is None else tuple(map(constrain_linear, linear)))
        return logits, aux, new_cache

    def _apply_hybrid(self, x, block_fn, positions, segment_ids, kv, linear, layer_cache, tokens,
                      cell, state, rngs, forced, train, probes):
        """The layers of a hybrid (``layer_types``) model: unrolled, or a scan over the G groups
        of the repeating pattern (each group applies its P blocks in order). kv: lists of the
        full layers' buffers (stacked [G,...] per full position when scanned) or None; linear:
        the DeltaNetCaches likewise. -> (x, aux stacked over layers, kv as tuples, state,
        linear)."""
        cfg = self.cfg
        if not cfg.scan_layers:
            return self._hybrid_unrolled(x, block_fn, positions, segment_ids, kv, linear,
                                         layer_cache, tokens, cell, state, rngs, forced, train,
                                         probes)
        L, P = cfg.num_layers, len(cfg.layer_pattern)
        G = L // P
        grouped = lambda a: None if a is None else a.reshape(G, P, *a.shape[1:])  # noqa: E731

        def body(carry, blocks, group, rng_g, forced_g, linear_g, cell):
            x, state, kv = carry
            kv = None if kv is None else (list(kv[0]), list(kv[1]))
            auxes, new_linear, f, n = [], [], 0, 0
            for p, block in enumerate(blocks):
                if block.linear:
                    lc = None if linear_g is None else linear_g[n]
                else:
                    lc = None if kv is None else layer_cache(kv[0][f], kv[1][f], group)
                x, aux_p, new, state = block_fn(
                    block, x, positions, segment_ids, lc, tokens, cell, state,
                    None if rng_g is None else rng_g[p], None if forced_g is None else forced_g[p],
                    train, probes)
                if block.linear:
                    new_linear.append(new)
                    n += 1
                else:
                    if kv is not None:
                        kv[0][f], kv[1][f] = new
                    f += 1
                auxes.append(aux_p)
            shared = [k for k in auxes[0] if all(k in a for a in auxes)]  # [P, ...] per key
            aux = {k: jax.tree.map(lambda *xs: jnp.stack(xs), *[a[k] for a in auxes])
                   for k in shared}
            kv = None if kv is None else (tuple(kv[0]), tuple(kv[1]))
            return (x, state, kv), (aux, None if linear_g is None else tuple(new_linear))

        kv = None if kv is None else (tuple(kv[0]), tuple(kv[1]))
        (x, state, kv), (aux, linear) = nnx.scan(
            body, in_axes=(nnx.Carry, 0, 0, 0, 0, 0, None), out_axes=(nnx.Carry, 0),
            transform_metadata={nnx.PARTITION_NAME: "layers"})(
                (x, state, kv), self.layers, jnp.arange(G, dtype=jnp.int32), grouped(rngs),
                grouped(forced), linear, cell)
        aux = jax.tree.map(lambda a: a.reshape(L, *a.shape[2:]), aux)  # group-major = layer order
        return x, aux, kv, state, linear

    def _hybrid_unrolled(self, x, block_fn, positions, segment_ids, kv, linear, layer_cache,
                         tokens, cell, state, rngs, forced, train, probes):
        """``_apply_hybrid`` over unrolled layers: full layer j uses kv[.][j], linear layer j
        linear[j]."""
        linear = None if linear is None else list(linear)
        auxes, moe_index, f, n = [], 0, 0, 0
        for i, block in enumerate(self.layers):
            if block.linear:
                lc = None if linear is None else linear[n]
            else:
                lc = None if kv is None else layer_cache(kv[0][f], kv[1][f])
            forced_l = None
            if forced is not None and block.is_moe:
                forced_l, moe_index = forced[moe_index], moe_index + 1
            x, aux_l, new, state = block_fn(block, x, positions, segment_ids, lc, tokens, cell,
                                            state, None if rngs is None else rngs[i], forced_l,
                                            train, probes)
            if block.linear:
                if linear is not None:
                    linear[n] = new
                n += 1
            else:
                if kv is not None:
                    kv[0][f], kv[1][f] = new
                f += 1
            if aux_l:
                auxes.append(aux_l)
        kv = None if kv is None else (tuple(kv[0]), tuple(kv[1]))
        aux = {k: jax.tree.map(lambda *xs: jnp.stack(xs), *[a[k] for a in auxes if k in a])
               for k in dict.fromkeys(k for a in auxes for k in a)}
        return x, aux, kv, state, None if linear is None else tuple(linear)

    def _checked_forced(self, forced: jax.Array | None, B: int, T: int) -> jax.Array | None:
        """``forced_experts`` validated against the model and the batch -> int32 [L_moe,B,T,k]."""
        if forced is None:
            return None
        m = self.cfg.moe
        if not m.enabled:
            raise ConfigError("forced_experts: replay on a dense model (model.moe is not enabled, "
                              "num_experts=0); pass forced_experts=None")
        if m.router.kind != "topk":
            raise ConfigError(f"forced_experts: model.moe.router.kind={m.router.kind!r} cannot be "
                              "replayed (only kind='topk' routes by fixed expert sets); pass "
                              "forced_experts=None")
        n_moe = sum(m.is_moe_layer(i) for i in range(self.cfg.num_layers))
        want = (n_moe, B, T, m.top_k)
        if tuple(forced.shape) != want or not jnp.issubdtype(forced.dtype, jnp.integer):
            raise ConfigError(f"forced_experts: got {forced.dtype} {tuple(forced.shape)}; expected "
                              f"integer [L_moe, B, T, top_k] = {want} (aux['router/experts'])")
        return constrain(jnp.asarray(forced, jnp.int32), (None, "batch", "length", None))
