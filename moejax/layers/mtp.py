"""Multi-token prediction (DeepSeek-V3 / Qwen3-Next MTP): D sequential depths after the main model.

Depth k (1..D) at position i combines the previous depth's hidden state h^{k-1}_i (h^0: the main
model's output after its final norm, as vLLM feeds Qwen3-Next/DeepSeek MTP [verify]) with the
embedding of token i+k, and predicts token i+k+1 through the shared embedding/LM head:

    u_i   = fc([RMSNorm_e(Emb(t_{i+k})) ; RMSNorm_h(h^{k-1}_i)])    (Qwen3-Next: embeds first)
    h^k   = RMSNorm_out(Block(u)_i)                                  (one full-attention block)

Parameters per depth (Qwen3-Next names): ``pre_fc_norm_embedding``, ``pre_fc_norm_hidden``, ``fc``
[2,D,D] ([embedding half, hidden half]), ``block`` (a moejax Block, full attention), ``norm``.
The loss (``mtp_loss_sum``): the mean over depths of the masked cross entropy of depth k against
target t_{i+k+1} (= ``targets[:, i+k]``), counted only where tokens i and i+k share a document.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moejax.layers import param
from moejax.layers.mlp import linear
from moejax.layers.norms import make_block_norm

MTP_KEY = "mtp/logits"  # aux key: [D_mtp,B,T,V] fp32, depth k at i predicts token i+k+1


def shift_left(x: jax.Array, k: int, fill=0) -> jax.Array:
    """x [B,T,...] -> x[:, i+k] at i (``fill`` past the end)."""
    if k == 0:
        return x
    pad = jnp.full((x.shape[0], k) + x.shape[2:], fill, x.dtype)
    return jnp.concatenate([x[:, k:], pad], axis=1)


class MTPDepth(nnx.Module):
    """One MTP depth; ``block_factory()`` builds its full-attention Block."""

    def __init__(self, cfg, block_factory, *, rngs: nnx.Rngs):
        D = cfg.d_model
        self.pre_fc_norm_embedding = make_block_norm(cfg, "rms")
        self.pre_fc_norm_hidden = make_block_norm(cfg, "rms")
        init = jax.nn.initializers.truncated_normal(cfg.init_std)
        self.fc = param(init, rngs.params(), (2, D, D), cfg.param_dtype, (None, None, "embed"))
        self.block = block_factory(rngs)
        self.norm = make_block_norm(cfg, "rms")
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, h, emb_next, positions, segment_ids, tokens_next):
        """h [B,T,D] the previous depth's hidden, emb_next [B,T,D] Emb(t_{i+k}) (tokens_next
        [B,T] those tokens, for token-aware MoE routing) -> h^k [B,T,D]."""
        fc = self.fc[...].astype(self.dtype)
        u = (linear(self.pre_fc_norm_embedding(emb_next), fc[0])
             + linear(self.pre_fc_norm_hidden(h), fc[1]))
        y = self.block(u, positions, segment_ids, tokens=tokens_next)[0]
        return self.norm(y)


class MTP(nnx.Module):
    """``cfg.mtp_layers`` sequential depths. ``__call__(h, tokens, positions, segment_ids, embed,
    head)`` -> logits [D_mtp,B,T,V] fp32 (``embed``: tokens -> [B,T,D], ``head``: [B,T,D] ->
    logits, both the main model's)."""

    def __init__(self, cfg, block_factory, *, rngs: nnx.Rngs):
        self.depths = nnx.List([MTPDepth(cfg, block_factory, rngs=rngs)
                                for _ in range(cfg.mtp_layers)])

    def __call__(self, h, tokens, positions, segment_ids, embed, head):
        out = []
        for k, depth in enumerate(self.depths, start=1):
            # a token whose i+k lies in another document sees no future input (masked in the loss)
            same = shift_left(segment_ids, k, fill=-1) == segment_ids
            nxt = shift_left(tokens, k)
            emb = embed(nxt) * same[..., None]
            h = depth(h, emb.astype(h.dtype), positions, segment_ids, nxt)
            out.append(head(h))
        return jnp.stack(out)


def mtp_loss_sum(logits: jax.Array, batch: dict) -> jax.Array:
    """Sum over tokens of the masked CE, averaged over depths: logits [D_mtp,B,T,V]; batch
    ``targets``, ``loss_mask``, ``segment_ids`` [B,T]. Divide by the main loss's token count."""
    seg, total = batch["segment_ids"], 0.0
    for k in range(1, logits.shape[0] + 1):
        target = shift_left(batch["targets"], k)
        mask = shift_left(batch["loss_mask"], k) * (
            (shift_left(seg, k) == seg) & (seg != 0)).astype(batch["loss_mask"].dtype)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[k - 1], target)
        total = total + jnp.sum(ce * mask)
    return total / logits.shape[0]


def mtp_loss_term(aux: dict, batch: dict, weight: float) -> tuple[dict, jax.Array]:
    """(aux without the MTP logits, weight * ``mtp_loss_sum``; 0 without MTP logits)."""
    if MTP_KEY not in aux:
        return aux, jnp.zeros((), jnp.float32)
    rest = {k: v for k, v in aux.items() if k != MTP_KEY}
    return rest, weight * mtp_loss_sum(aux[MTP_KEY], batch)


def block_config(cfg):
    """The ModelConfig an MTP block is built from: one full-attention layer like the last one."""
    return dataclasses.replace(cfg, layer_types=())
