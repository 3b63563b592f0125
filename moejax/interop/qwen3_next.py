"""Qwen3-Next hybrid interop: Gated DeltaNet (``linear_attention``) layers and the MTP module on
top of ``moejax.interop.qwen3`` (which maps the full-attention blocks, MoE and the other families).

``config_from_hf`` / ``config_to_hf`` / ``check_exportable`` / ``plan`` are what
``moejax.interop.hf`` calls for every family; anything that is not a hybrid or MTP Qwen3-Next model
passes straight through to ``qwen3``.

DeltaNet tensors under ``model.layers.{l}.linear_attn.``: ``in_proj_qkvz`` / ``in_proj_ba`` /
``out_proj`` are ``nn.Linear`` weights (transpose + reshape), ``conv1d.weight`` [C,1,K] is our
``conv`` [K,C] transposed, ``A_log`` / ``dt_bias`` / ``norm.weight`` copy as they are.
MTP (``mtp_num_hidden_layers``, vLLM's Qwen3-Next layout): ``mtp.fc.weight`` [D,2D] over
[embedding | hidden], ``mtp.pre_fc_norm_embedding``, ``mtp.pre_fc_norm_hidden``, ``mtp.norm`` and
one decoder layer ``mtp.layers.0.*`` (full attention, named like a main layer). moejax's MTP depth
owns its fc and norms, so only one MTP layer imports (more are refused by name).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moejax.config import LAYER_TYPES, ConfigError, DeltaNetConfig, ModelConfig
from moejax.interop import qwen3
from moejax.interop.qwen3 import Leaf

FAMILY = "qwen3_next"


@dataclasses.dataclass(frozen=True)
class ConvLeaf(Leaf):
    """The depthwise conv: HF ``conv1d.weight`` [C,1,K] <-> moejax ``conv`` [K,C]."""

    def hf_shape(self) -> tuple[int, ...]:
        K, C = self.shape
        return (C, 1, K)

    def to_param(self, t: np.ndarray) -> np.ndarray:
        return t[:, 0, :].T

    def to_hf(self, a: np.ndarray) -> np.ndarray:
        return a.T[:, None, :]


def config_from_hf(hf: dict, *, dtype: str = "float32", param_dtype: str = "float32",
                   scan_layers: bool = False) -> ModelConfig:
    """``qwen3.config_from_hf`` plus Qwen3-Next's ``layer_types``, DeltaNet sizes and MTP."""
    if hf.get("model_type") != FAMILY:
        return qwen3.config_from_hf(hf, dtype=dtype, param_dtype=param_dtype,
                                    scan_layers=scan_layers)
    L = int(hf["num_hidden_layers"])
    types = tuple(hf.get("layer_types") or ["full_attention"] * L)
    for i, t in enumerate(types):
        if t not in LAYER_TYPES:
            raise qwen3._unsupported(f"layer_types[{i}]", t, f"moejax has {LAYER_TYPES}")
    mtp = int(hf.get("mtp_num_hidden_layers") or 0)
    if mtp > 1:
        raise qwen3._unsupported("mtp_num_hidden_layers", mtp, "only one MTP layer imports "
                                 "(moejax's MTP depths each own their fc and norms)")
    base = qwen3.config_from_hf({**hf, "layer_types": ["full_attention"] * L}, dtype=dtype,
                                param_dtype=param_dtype, scan_layers=scan_layers)
    hybrid = "linear_attention" in types
    dn = DeltaNetConfig(
        num_k_heads=int(hf["linear_num_key_heads"]), num_v_heads=int(hf["linear_num_value_heads"]),
        head_k_dim=int(hf["linear_key_head_dim"]), head_v_dim=int(hf["linear_value_head_dim"]),
        conv_kernel=int(hf.get("linear_conv_kernel_dim", 4))) if hybrid else DeltaNetConfig()
    return dataclasses.replace(base, layer_types=types if hybrid else (), deltanet=dn,
                               mtp_layers=mtp)


def _plain(m: ModelConfig) -> ModelConfig:
    """``m`` without its hybrid layers and MTP (what ``qwen3`` maps)."""
    return dataclasses.replace(m, layer_types=(), mtp_layers=0, mtp_loss_weight=0.0,
                               scan_layers=m.scan_layers and not m.is_hybrid)


def check_exportable(m: ModelConfig) -> str:
    fam = qwen3.check_exportable(_plain(m))
    if (m.is_hybrid or m.mtp_layers) and fam != FAMILY:
        raise ConfigError(f"model.layer_types / model.mtp_layers need the Qwen3-Next blocks "
                          f"(gated q_proj, zero-centred norms), but the model maps to {fam}")
    if m.mtp_layers > 1:
        raise ConfigError(f"model.mtp_layers={m.mtp_layers} has no Qwen3-Next equivalent (one MTP "
                          "layer with its own fc and norms); use 1")
    return fam


def config_to_hf(m: ModelConfig, *, torch_dtype: str) -> dict:
    check_exportable(m)
    hf = qwen3.config_to_hf(_plain(m), torch_dtype=torch_dtype)
    if m.is_hybrid:
        dn = m.deltanet
        hf.update({"layer_types": [m.layer_type(i) for i in range(m.num_layers)],
                   "linear_num_key_heads": dn.num_k_heads,
                   "linear_num_value_heads": dn.num_v_heads,
                   "linear_key_head_dim": dn.head_k_dim, "linear_value_head_dim": dn.head_v_dim,
                   "linear_conv_kernel_dim": dn.conv_kernel})
    if m.mtp_layers:
        hf["mtp_num_hidden_layers"] = m.mtp_layers
    return hf


def _linear_leaves(m: ModelConfig) -> list[tuple]:
    """(path suffix, name template, shape, in_ndim or 'conv') of one Gated DeltaNet mixer."""
    dn, D = m.deltanet, m.d_model
    Hk, Hv, dk, dv, r = (dn.num_k_heads, dn.num_v_heads, dn.head_k_dim, dn.head_v_dim,
                         dn.heads_per_key)
    return [(("attn", "in_proj_qkvz"), "linear_attn.in_proj_qkvz.weight",
             (D, Hk, 2 * dk + 2 * r * dv), 1),
            (("attn", "in_proj_ba"), "linear_attn.in_proj_ba.weight", (D, Hk, 2 * r), 1),
            (("attn", "conv"), "linear_attn.conv1d.weight", (dn.conv_kernel, dn.conv_dim), "conv"),
            (("attn", "A_log"), "linear_attn.A_log", (Hv,), 0),
            (("attn", "dt_bias"), "linear_attn.dt_bias", (Hv,), 0),
            (("attn", "norm"), "linear_attn.norm.weight", (dv,), 0),
            (("attn", "out_proj"), "linear_attn.out_proj.weight", (Hv, dv, D), 2)]


def _layer_leaves(m: ModelConfig, layer: int) -> list[tuple]:
    """One main-model block: qwen3's, with the attention swapped for DeltaNet in linear layers."""
    out = qwen3._block_leaves(_plain(m), layer)
    if m.layer_type(layer) != "linear_attention":
        return out
    return [e for e in out if e[0][0] != "attn"] + _linear_leaves(m)


def _leaf(path, names, shape, k) -> Leaf:
    names = np.array(names, dtype=object)
    return ConvLeaf(path, names, shape, 1) if k == "conv" else Leaf(path, names, shape, k)


def _names(m: ModelConfig, prefix: str, template: str):
    """One tensor name, or the [E] expert names of a ``{e}`` template."""
    base = prefix + template
    return ([base.format(e=e) for e in range(m.moe.num_experts)] if "{e}" in template else base)


def plan(m: ModelConfig) -> list[Leaf]:
    """Every moejax parameter of ``m`` with its checkpoint tensors."""
    if not m.is_hybrid and not m.mtp_layers:
        return qwen3.plan(m)
    leaves = [lf for lf in qwen3.plan(_plain(m)) if lf.path[0] != "layers"]  # embed, norm, head
    if m.scan_layers and m.is_hybrid:  # stack p holds layers g*P+p
        P = len(m.layer_pattern)
        for p in range(P):
            for suffix, template, shape, k in _layer_leaves(m, p):
                names = [_names(m, f"model.layers.{g * P + p}.", template)
                         for g in range(m.num_layers // P)]
                leaves.append(_leaf(("layers", p) + suffix, names, shape, k))
    elif m.scan_layers:
        leaves += [lf for lf in qwen3.plan(_plain(m)) if lf.path[0] == "layers"]
    else:
        for layer in range(m.num_layers):
            for suffix, template, shape, k in _layer_leaves(m, layer):
                leaves.append(_leaf(("layers", layer) + suffix,
                                    _names(m, f"model.layers.{layer}.", template), shape, k))
    leaves += _mtp_leaves(m)
    return leaves


def _mtp_leaves(m: ModelConfig) -> list[Leaf]:
    """MTP depth 0: fc, the three norms and its full-attention block (``mtp.layers.0.``)."""
    if not m.mtp_layers:
        return []
    D, base = m.d_model, ("mtp", "depths", 0)
    out = [_leaf(base + ("fc",), "mtp.fc.weight", (2, D, D), 2)]
    for ours, theirs in (("pre_fc_norm_embedding", "pre_fc_norm_embedding"),
                         ("pre_fc_norm_hidden", "pre_fc_norm_hidden"), ("norm", "norm")):
        out.append(_leaf(base + (ours, "scale"), f"mtp.{theirs}.weight", (D,), 0))
    block = qwen3._block_leaves(_plain(m), m.num_layers - 1)  # full attention, last layer's FFN
    for suffix, template, shape, k in block:
        out.append(_leaf(base + ("block",) + suffix, _names(m, "mtp.layers.0.", template),
                         shape, k))
    return out
