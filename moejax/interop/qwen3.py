"""The Qwen3 family in Hugging Face form: config.json <-> ``ModelConfig`` and checkpoint tensor
names <-> moejax parameter paths.

Families (``model_type``): ``qwen3`` (dense), ``qwen3_moe`` (routed experts; ``norm_topk_prob``,
``mlp_only_layers``, ``decoder_sparse_step``) and ``qwen3_next`` restricted to the blocks moejax has:
full-attention layers with the doubled, gated ``q_proj`` ([query | gate] per head), zero-centred
RMSNorms ``x * (1 + w)``, partial RoPE, and the MoE with a sigmoid-gated shared expert. This module
alone refuses Gated DeltaNet (``linear_attention``) layers and MTP by name; ``moejax.interop.hf``
goes through ``qwen3_next``, which maps those and hands every other field and tensor to this one.

Tensor layout: HF ``nn.Linear`` weights are ``[out, in]``; moejax keeps ``[in, ...out]`` (q: [D,H,hd],
o: [H,hd,D], experts stacked [E,D,F]), so every matrix is a transpose plus a reshape, which is exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from moejax.config import (AttentionConfig, BalanceConfig, ConfigError, ModelConfig, MoEConfig,
                           RouterConfig)

FAMILIES = ("qwen3", "qwen3_moe", "qwen3_next")
ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "qwen3_next": "Qwen3NextForCausalLM"}
# checkpoint tensors that carry no parameters (recomputed buffers): reported as ignored
BUFFER_SUFFIXES = ("rotary_emb.inv_freq",)


def _unsupported(field: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"config.json {field}={value!r}: {why}")


def _rope(hf: dict) -> tuple[float, float]:
    """(theta, partial rotary factor) from transformers v5 ``rope_parameters`` or v4 fields."""
    rp = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = rp.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise _unsupported("rope_type", kind, "only plain RoPE is implemented (no YaRN / linear / "
                           "dynamic scaling)")
    theta = rp.get("rope_theta", hf.get("rope_theta", 10_000.0))
    frac = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    return float(theta), float(frac)


def config_from_hf(hf: dict, *, dtype: str = "float32", param_dtype: str = "float32",
                   scan_layers: bool = False) -> ModelConfig:
    """A ``ModelConfig`` computing the same function as the HF config; unsupported options raise
    ``ConfigError`` naming the config.json field."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise _unsupported("model_type", family, f"supported families are {FAMILIES}")
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported("hidden_act", hf["hidden_act"], "moejax's MLPs are SwiGLU (silu)")
    if hf.get("attention_bias"):
        raise _unsupported("attention_bias", True, "moejax's attention has no biases")
    if hf.get("use_sliding_window"):
        raise _unsupported("use_sliding_window", True, "sliding-window attention is not implemented")
    L = int(hf["num_hidden_layers"])
    for i, t in enumerate(hf.get("layer_types") or ["full_attention"] * L):
        if t != "full_attention":
            raise _unsupported(f"layer_types[{i}]", t, "this module maps full_attention layers only; "
                               "hybrid checkpoints go through moejax.interop.qwen3_next")
    theta, frac = _rope(hf)
    H = int(hf["num_attention_heads"])
    hd = int(hf.get("head_dim") or hf["hidden_size"] // H)
    next_ = family == "qwen3_next"
    attn = AttentionConfig(num_heads=H, num_kv_heads=int(hf.get("num_key_value_heads", H)),
                           head_dim=hd, qk_norm=True, rope_theta=theta, rope_fraction=frac,
                           **(dict(gate="g1", gate_granularity="elementwise",
                                   gate_activation="sigmoid", gate_form="multiplicative",
                                   gate_layout="qwen3_next") if next_ else {}))
    moe = MoEConfig()
    # transformers v5 writes Qwen3-MoE's expert count as num_local_experts
    E = int(hf.get("num_experts") or hf.get("num_local_experts") or 0) if family != "qwen3" else 0
    if E:
        step = int(hf.get("decoder_sparse_step", 1))
        shared = int(hf.get("shared_expert_intermediate_size") or 0) if next_ else 0
        moe = MoEConfig(
            num_experts=E, top_k=int(hf["num_experts_per_tok"]),
            d_expert=int(hf["moe_intermediate_size"]),
            num_shared_experts=1 if shared else 0, d_shared=shared, shared_gate=bool(shared),
            first_dense_layers=step - 1, moe_every=step,
            dense_layers=tuple(sorted(int(l) for l in hf.get("mlp_only_layers") or ())),
            router=RouterConfig(kind="topk", score="softmax",
                                norm_topk_prob=bool(hf.get("norm_topk_prob", next_))),
            balance=BalanceConfig(coef=float(hf.get("router_aux_loss_coef", 1e-3))))
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]), num_layers=L,
        d_ff=int(hf.get("intermediate_size") or 1), attention=attn,
        norm="rms_zero_centered" if next_ else "rms", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        init_std=float(hf.get("initializer_range", 0.02)), dtype=dtype, param_dtype=param_dtype,
        scan_layers=scan_layers, moe=moe)


def family_of(m: ModelConfig) -> str:
    """The HF family that can hold ``m`` (Qwen3-Next iff it has the gated q, zero-centred norms or
    a gated shared expert)."""
    if m.attention.gate != "none" or m.norm == "rms_zero_centered" or m.moe.shared_gate:
        return "qwen3_next"
    return "qwen3_moe" if m.moe.enabled else "qwen3"


def check_exportable(m: ModelConfig) -> str:
    """The family for ``m``; raises ``ConfigError`` naming the first moejax option HF cannot hold."""
    fam = family_of(m)
    a, mc, r = m.attention, m.moe, m.moe.router
    need = {
        "model.attention.qk_norm": (a.qk_norm, True),
        "model.attention.sink": (a.sink, False),
        "model.norm_variant_attn": (m.norm_variant_attn, "rms"),
        "model.norm_variant_ffn": (m.norm_variant_ffn, "rms"),
        "model.norm_variant_final": (m.norm_variant_final, "rms"),
    }
    if fam == "qwen3_next":
        need.update({"model.attention.gate": (a.gate, "g1"),
                     "model.attention.gate_layout": (a.gate_layout, "qwen3_next"),
                     "model.attention.gate_activation": (a.gate_activation, "sigmoid"),
                     "model.attention.gate_form": (a.gate_form, "multiplicative"),
                     "model.norm": (m.norm, "rms_zero_centered")})
        if mc.enabled:
            need["model.moe.shared_gate"] = (mc.shared_gate, mc.num_shared_experts > 0)
    else:
        need["model.attention.rope_fraction"] = (a.rope_fraction, 1.0)
    if mc.enabled:
        need.update({
            "model.moe.router.kind": (r.kind, "topk"), "model.moe.router.score": (r.score, "softmax"),
            "model.moe.router.routed_scaling": (r.routed_scaling, 1.0),
            "model.moe.router.recurrent": (r.recurrent, "none"),
            "model.moe.router.aux_free_bias": (r.aux_free_bias, False),
            "model.moe.router.group_mode": (r.group_mode, "none"),
            "model.moe.router.num_null_experts": (r.num_null_experts, 0),
            "model.moe.router.token_mask": (r.token_mask, "none"),
            "model.moe.router.gating": (r.gating, "learned")})
        # GW-MoE's dense mixture and router jitter act in training only: inference is plain top-k
        if fam == "qwen3_moe":
            need["model.moe.num_shared_experts"] = (mc.num_shared_experts, 0)
    for field, (have, want) in need.items():
        if have != want:
            raise ConfigError(f"{field}={have!r} has no Hugging Face {fam} equivalent (needs "
                              f"{want!r}); export supports the Qwen3 / Qwen3-MoE / Qwen3-Next blocks")
    return fam


def config_to_hf(m: ModelConfig, *, torch_dtype: str) -> dict:
    """config.json for ``m`` (transformers v5 ``rope_parameters`` plus the v4 fields)."""
    fam = check_exportable(m)
    a, mc = m.attention, m.moe
    rope = {"rope_type": "default", "rope_theta": a.rope_theta}
    if fam == "qwen3_next":
        rope["partial_rotary_factor"] = a.rope_fraction
    hf = {
        "architectures": [ARCHITECTURES[fam]], "model_type": fam, "vocab_size": m.vocab_size,
        "hidden_size": m.d_model, "intermediate_size": m.d_ff, "num_hidden_layers": m.num_layers,
        "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads,
        "head_dim": a.head_dim, "hidden_act": "silu", "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps, "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std, "attention_bias": False, "attention_dropout": 0.0,
        "use_sliding_window": False, "rope_parameters": rope, "rope_theta": a.rope_theta,
        "dtype": torch_dtype, "torch_dtype": torch_dtype, "use_cache": True,
        "layer_types": ["full_attention"] * m.num_layers,
    }
    if fam == "qwen3_next":
        hf["partial_rotary_factor"] = a.rope_fraction
    if fam != "qwen3":
        hf.update({
            "num_experts": mc.num_experts, "num_experts_per_tok": mc.top_k if mc.enabled else 1,
            "moe_intermediate_size": mc.d_expert if mc.enabled else 1,
            "norm_topk_prob": mc.router.norm_topk_prob, "decoder_sparse_step": 1,
            "mlp_only_layers": [l for l in range(m.num_layers) if not mc.is_moe_layer(l)],
            "router_aux_loss_coef": mc.balance.coef, "output_router_logits": False})
    if fam == "qwen3_next":
        hf["shared_expert_intermediate_size"] = (
            (mc.d_shared or mc.d_expert * mc.num_shared_experts) if mc.num_shared_experts else 0)
    return hf


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One moejax parameter and the checkpoint tensors it is made of.

    ``path``: keys into the params pure dict. ``names``: object array over the stacked leading dims
    of the parameter (scanned layers [L], experts [E], or both [L,E]; shape () for a plain leaf).
    ``shape``: the parameter's shape without those dims. ``in_ndim``: how many leading dims of
    ``shape`` are the input side of an HF ``nn.Linear`` weight [out, in], i.e. ``hf =
    param.reshape(in, out).T`` (q [D,H,hd]: 1, o [H,hd,D]: 2); 0 = the same array (norms, embedding)."""

    path: tuple
    names: np.ndarray
    shape: tuple[int, ...]
    in_ndim: int

    def hf_shape(self) -> tuple[int, ...]:
        if not self.in_ndim:
            return self.shape
        k = self.in_ndim
        return (int(np.prod(self.shape[k:])), int(np.prod(self.shape[:k])))

    def to_param(self, t: np.ndarray) -> np.ndarray:
        """One HF tensor -> the parameter's element (without stacked dims)."""
        return t.T.reshape(self.shape) if self.in_ndim else t

    def to_hf(self, a: np.ndarray) -> np.ndarray:
        """One parameter element -> the HF tensor."""
        return a.reshape(self.hf_shape()[::-1]).T if self.in_ndim else a


def _block_leaves(m: ModelConfig, layer: int | None) -> list[tuple]:
    """(path suffix, name template under ``model.layers.{l}.`` with {e} the expert, shape,
    in_ndim) for one block; ``layer`` None means a scanned (homogeneous) block."""
    a, mc = m.attention, m.moe
    D, H, Hkv, hd = m.d_model, a.num_heads, a.num_kv_heads, a.head_dim
    qd = 2 * hd if a.gate_layout == "qwen3_next" and a.gate != "none" else hd
    out = [(("attn_norm", "scale"), "input_layernorm.weight", (D,), 0),
           (("attn", "q"), "self_attn.q_proj.weight", (D, H, qd), 1),
           (("attn", "k"), "self_attn.k_proj.weight", (D, Hkv, hd), 1),
           (("attn", "v"), "self_attn.v_proj.weight", (D, Hkv, hd), 1),
           (("attn", "o"), "self_attn.o_proj.weight", (H, hd, D), 2),
           (("attn", "q_norm", "scale"), "self_attn.q_norm.weight", (hd,), 0),
           (("attn", "k_norm", "scale"), "self_attn.k_norm.weight", (hd,), 0),
           (("mlp_norm", "scale"), "post_attention_layernorm.weight", (D,), 0)]
    moe = mc.is_moe_layer(0 if layer is None else layer)
    if not moe:
        F = m.d_ff
        out += [(("mlp", "gate"), "mlp.gate_proj.weight", (D, F), 1),
                (("mlp", "up"), "mlp.up_proj.weight", (D, F), 1),
                (("mlp", "down"), "mlp.down_proj.weight", (F, D), 1)]
        return out
    F = mc.d_expert
    out += [(("mlp", "router", "w"), "mlp.gate.weight", (D, mc.num_experts), 1),
            (("mlp", "w_gate"), "mlp.experts.{e}.gate_proj.weight", (D, F), 1),
            (("mlp", "w_up"), "mlp.experts.{e}.up_proj.weight", (D, F), 1),
            (("mlp", "w_down"), "mlp.experts.{e}.down_proj.weight", (F, D), 1)]
    if mc.num_shared_experts:
        S = mc.d_shared or mc.d_expert * mc.num_shared_experts
        out += [(("mlp", "shared", "gate"), "mlp.shared_expert.gate_proj.weight", (D, S), 1),
                (("mlp", "shared", "up"), "mlp.shared_expert.up_proj.weight", (D, S), 1),
                (("mlp", "shared", "down"), "mlp.shared_expert.down_proj.weight", (S, D), 1)]
        if mc.shared_gate:
            out.append((("mlp", "shared_gate"), "mlp.shared_expert_gate.weight", (D, 1), 1))
    return out


def plan(m: ModelConfig) -> list[Leaf]:
    """Every moejax parameter of ``m`` with its checkpoint tensors (Qwen3 naming)."""
    leaves = [Leaf(("embed", "embedding"), np.array("model.embed_tokens.weight", dtype=object),
                   (m.vocab_size, m.d_model), 0),
              Leaf(("final_norm", "scale"), np.array("model.norm.weight", dtype=object),
                   (m.d_model,), 0)]
    if not m.tie_embeddings:
        leaves.append(Leaf(("lm_head", "kernel"), np.array("lm_head.weight", dtype=object),
                           (m.d_model, m.vocab_size), 1))
    E = m.moe.num_experts

    def names(template: str, layer: int):  # one layer's tensor name, or [E] of them
        base = f"model.layers.{layer}.{template}"
        return [base.format(e=e) for e in range(E)] if "{e}" in template else base

    if m.scan_layers:
        for suffix, template, shape, k in _block_leaves(m, None):
            stacked = np.array([names(template, l) for l in range(m.num_layers)], dtype=object)
            leaves.append(Leaf(("layers",) + suffix, stacked, shape, k))
    else:
        for l in range(m.num_layers):
            for suffix, template, shape, k in _block_leaves(m, l):
                leaves.append(Leaf(("layers", l) + suffix, np.array(names(template, l), dtype=object),
                                   shape, k))
    return leaves
