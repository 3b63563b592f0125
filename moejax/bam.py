"""BAM, Branch-Attend-Mix upcycling (architecture.md 8.9): N dense branches of one seed -> one MoE.

Pipeline: ``branch`` makes N copies of a dense seed's parameters; each copy continues
pre-training on its own domain mixture (ordinary training runs of ``dense_branch_config(cfg)``);
``branch_and_mix`` then builds the BAM model ``cfg`` (``model.moe.variant.kind='bam'``):

  * FFN experts: expert e of every layer is branch e's FFN (``d_expert == d_ff``), top-k routed.
  * Attention experts (``variant.bam_attention``): 'full' = expert e is branch e's whole
    attention (q, k, v, o, QK-norm scales); 'kv_shared' = expert e's q, o and q-norm, with k, v
    and k-norm the branches' average; 'none' = one attention, averaged (BTX).
  * Routers (FFN and attention) are freshly initialised; everything else (embeddings, block and
    final norms, LM head) is the average over the branches.

Mixing N identical branches gives the seed's function back (identical experts under weights that
sum to 1: renormalised top-k and the softmax attention mixture), which the tests check.
Parameters are pure dicts (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``) of unrolled or
scanned (leading layer axis) models.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from moejax.config import ConfigError, ModelConfig, MoEConfig

# dense FFN parameter -> MoE expert bank parameter (moejax.layers.mlp.MLP -> moe.MoE)
FFN_TO_EXPERTS = {"gate": "w_gate", "up": "w_up", "down": "w_down"}
PER_EXPERT_ATTENTION = ("q", "o", "q_norm")  # every attention-expert variant keeps these per branch
KV_ATTENTION = ("k", "v", "k_norm")  # per branch with 'full', averaged with 'kv_shared'


def dense_branch_config(cfg: ModelConfig) -> ModelConfig:
    """The dense model each branch trains: ``cfg`` without experts, FFN width d_expert."""
    _check_bam(cfg)
    return dataclasses.replace(cfg, moe=MoEConfig(), d_ff=cfg.moe.d_expert)


def branch(seed: dict, n: int) -> list[dict]:
    """N independent host copies of a dense seed's parameters (a pure dict), one per domain."""
    if n < 1:
        raise ValueError(f"branch(n={n}): need at least one branch")
    return [jax.tree.map(lambda a: np.array(a, copy=True), seed) for _ in range(n)]


def branch_and_mix(branches: list[dict], cfg: ModelConfig, *, seed: int = 0) -> dict:
    """The BAM model ``cfg``'s parameters (a pure dict for ``Model(cfg)``) mixed from the pure
    parameter dicts of ``num_experts`` dense branches of ``dense_branch_config(cfg)``; routers
    drawn from ``seed`` (truncated normal, ``cfg.init_std``, as a fresh model)."""
    _check_bam(cfg)
    if len(branches) != cfg.moe.num_experts:
        raise ConfigError(f"model.moe.num_experts={cfg.moe.num_experts} must equal the number of "
                          f"dense branches ({len(branches)}): one FFN/attention expert per branch")
    from moejax.model import Model  # the model imports the layers, which import the config

    target = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: Model(cfg, rngs=nnx.Rngs(0))),
                                        nnx.Param))
    axis = 1 if cfg.scan_layers else 0  # where the expert axis goes (after a stacked layer axis)
    key = jax.random.key(seed)
    routers = iter(jax.random.split(key, 2 * cfg.num_layers + 2))
    kv_shared = cfg.moe.variant.bam_attention == "kv_shared"

    def mix(path, leaf):
        keys = [str(p.key) for p in path]
        name = keys[-1] if keys[-1] not in ("scale", "w") else keys[-2]
        if name == "router":  # a fresh soft router / the MoE router's weight
            init = jax.nn.initializers.truncated_normal(cfg.init_std)
            return np.asarray(init(next(routers), leaf.shape, leaf.dtype))
        if "mlp" in keys and name in FFN_TO_EXPERTS.values():
            dense_name = {v: k for k, v in FFN_TO_EXPERTS.items()}[name]
            src = [_at(b, keys[:-1] + [dense_name]) for b in branches]
            return _stacked(src, axis, leaf)
        if cfg.attention_experts and "attn" in keys:
            dense = keys + ["scale"] if name in ("q_norm", "k_norm") else keys  # RMSNorm modules
            src = [_at(b, dense) for b in branches]
            if name in PER_EXPERT_ATTENTION or (name in KV_ATTENTION and not kv_shared):
                return _stacked(src, axis, leaf)
            return _averaged(src, leaf)
        return _averaged([_at(b, keys) for b in branches], leaf)

    return jax.tree_util.tree_map_with_path(mix, target)


def _check_bam(cfg: ModelConfig) -> None:
    m = cfg.moe
    if m.variant.kind != "bam":
        raise ConfigError(f"model.moe.variant.kind={m.variant.kind!r}: BAM mixing builds a "
                          "variant.kind='bam' model; set it")
    if m.router.kind != "topk" or not m.router.norm_topk_prob:
        raise ConfigError("model.moe.router: BAM's FFN experts need kind='topk' with "
                          "norm_topk_prob=True (identical branches then mix back to the seed)")


def _at(tree: dict, keys: list[str]):
    """The leaf of a pure dict at ``keys`` (list indices of unrolled layers are ints there)."""
    node = tree
    for k in keys:
        node = node[int(k)] if isinstance(node, (list, tuple)) or (
            isinstance(node, dict) and k not in node and k.isdigit()) else node[k]
    return np.asarray(node)


def _stacked(src: list[np.ndarray], axis: int, like) -> np.ndarray:
    """Branch e's tensor as expert e (a new axis at ``axis``), checked against the target."""
    out = np.stack(src, axis=axis).astype(like.dtype)
    if out.shape != tuple(like.shape):
        raise ConfigError(f"BAM mixing: branch tensors stack to {out.shape}, the model expects "
                          f"{tuple(like.shape)}; train the branches as dense_branch_config(cfg)")
    return out


def _averaged(src: list[np.ndarray], like) -> np.ndarray:
    """The mean over the branches (float64 accumulation), checked against the target."""
    out = np.mean(np.stack(src).astype(np.float64), axis=0).astype(like.dtype)
    if out.shape != tuple(like.shape):
        raise ConfigError(f"BAM mixing: branch tensors have shape {out.shape}, the model expects "
                          f"{tuple(like.shape)}; train the branches as dense_branch_config(cfg)")
    return out

