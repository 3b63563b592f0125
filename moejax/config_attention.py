"""Token-mixer configuration: softmax attention (``AttentionConfig``: GQA, QK-norm, partial RoPE,
gated attention G1-G5, the softmax sink) and the Gated DeltaNet linear-attention layers
(``DeltaNetConfig``); re-exported by ``moejax.config``."""

from __future__ import annotations

import dataclasses
from typing import Literal

from moejax.config_checks import _check_choice, _check_positive, _fail


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Grouped-query attention with optional QK-norm and (partial) RoPE."""

    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    qk_norm: bool = True
    rope_theta: float = 10_000.0
    rope_fraction: float = 1.0  # share of head_dim that is rotated (partial RoPE < 1)
    # kernels.attention: auto = splash on TPU, cudnn on GPU for bf16/fp16, xla (reference) else
    impl: Literal["auto", "xla", "cudnn", "splash"] = "auto"
    # Gated attention (spec section 2): where the gate acts -- g1 SDPA output (before o_proj),
    # g2 values, g3 keys, g4 queries (both after QK-norm, before RoPE), g5 after o_proj.
    gate: Literal["none", "g1", "g2", "g3", "g4", "g5"] = "none"
    gate_granularity: Literal["elementwise", "headwise", "head_shared"] = "elementwise"
    # ns_sigmoid: the non-sparse control 0.5 + 0.5σ (gate confined to [0.5, 1])
    gate_activation: Literal["sigmoid", "silu", "ns_sigmoid"] = "sigmoid"
    gate_form: Literal["multiplicative", "additive"] = "multiplicative"  # y*act(g) | y+act(g)
    # 'separate': own gate projection; 'qwen3_next': doubled q [D,H,2*hd] = per head [query|gate]
    gate_layout: Literal["separate", "qwen3_next"] = "separate"
    sink: bool = False  # learnable per-head softmax sink logit with a zero value (GPT-OSS style)
    # 'hidden': gate logits x W_θ from the normed input; 'constant': a learned logit per gate entry
    # (no D axis, init 0), the same for every token -- the paper's input-independent control
    gate_input: Literal["hidden", "constant"] = "hidden"

    def __post_init__(self):
        _check_positive("model.attention.num_heads", self.num_heads)
        _check_positive("model.attention.num_kv_heads", self.num_kv_heads)
        _check_positive("model.attention.head_dim", self.head_dim)
        if self.num_heads % self.num_kv_heads:
            _fail("model.attention.num_kv_heads", self.num_kv_heads,
                  f"must divide num_heads={self.num_heads} (grouped-query attention)")
        if not 0.0 < self.rope_fraction <= 1.0:
            _fail("model.attention.rope_fraction", self.rope_fraction, "must lie in (0, 1]")
        if self.rotary_dim % 2:
            _fail("model.attention.rope_fraction", self.rope_fraction,
                  f"head_dim*rope_fraction={self.head_dim * self.rope_fraction:g} must be an even "
                  "integer (RoPE rotates pairs of channels)")
        _check_positive("model.attention.rope_theta", self.rope_theta)
        _check_choice("model.attention.impl", self.impl, ("auto", "xla", "cudnn", "splash"))
        _check_choice("model.attention.gate", self.gate, ("none", "g1", "g2", "g3", "g4", "g5"))
        _check_choice("model.attention.gate_granularity", self.gate_granularity,
                      ("elementwise", "headwise", "head_shared"))
        _check_choice("model.attention.gate_activation", self.gate_activation,
                      ("sigmoid", "silu", "ns_sigmoid"))
        _check_choice("model.attention.gate_form", self.gate_form, ("multiplicative", "additive"))
        _check_choice("model.attention.gate_layout", self.gate_layout, ("separate", "qwen3_next"))
        if self.gate == "g5" and self.gate_granularity != "elementwise":
            _fail("model.attention.gate_granularity", self.gate_granularity,
                  "gate='g5' acts on the d_model output, which has no heads: use 'elementwise'")
        if self.gate_layout == "qwen3_next" and (
                self.gate != "g1" or self.gate_granularity != "elementwise"):
            _fail("model.attention.gate_layout", self.gate_layout,
                  "the Qwen3-Next doubled q_proj holds an elementwise SDPA-output gate: set "
                  "gate='g1' and gate_granularity='elementwise', or gate_layout='separate'")
        _check_choice("model.attention.gate_input", self.gate_input, ("hidden", "constant"))
        if self.gate_input == "constant" and self.gate_layout != "separate":
            _fail("model.attention.gate_input", self.gate_input,
                  "an input-independent gate has no projection to fold into q: set "
                  "gate_layout='separate'")
        if self.sink and self.impl in ("cudnn", "splash"):
            _fail("model.attention.sink", True,
                  "the softmax sink is implemented in the reference kernel only: set impl='xla' "
                  "or 'auto'")

    @property
    def rotary_dim(self) -> int:
        rot = self.head_dim * self.rope_fraction
        return int(rot) if float(rot).is_integer() else -1

    def extra_params(self, d_model: int) -> int:
        """Parameters of the gate and the sink beyond plain GQA attention (per layer)."""
        H, Hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        n = H if self.sink else 0
        if self.gate == "none":
            return n
        rows = 1 if self.gate_input == "constant" else d_model  # W_θ [D, ...] or one logit row
        if self.gate == "g5":
            return n + rows * d_model
        heads = Hkv if self.gate in ("g2", "g3") else H
        width = {"elementwise": heads * hd, "headwise": heads, "head_shared": hd}
        return n + rows * width[self.gate_granularity]


@dataclasses.dataclass(frozen=True)
class DeltaNetConfig:
    """Gated DeltaNet sizes of the ``linear_attention`` layers (Qwen3-Next: 16 key heads and 32
    value heads of 128, conv kernel 4); the layer is ``moejax.layers.deltanet``."""

    num_k_heads: int = 2
    num_v_heads: int = 4
    head_k_dim: int = 16
    head_v_dim: int = 16
    conv_kernel: int = 4
    chunk: int = 64  # tokens per chunk of the chunked form
    impl: Literal["chunked", "recurrent"] = "chunked"  # the no-cache / prefill form

    def __post_init__(self):
        for name in ("num_k_heads", "num_v_heads", "head_k_dim", "head_v_dim", "conv_kernel",
                     "chunk"):
            _check_positive(f"model.deltanet.{name}", getattr(self, name))
        if self.conv_kernel < 2:
            _fail("model.deltanet.conv_kernel", self.conv_kernel,
                  "must be >= 2 (the causal conv keeps the K-1 previous inputs as decode state)")
        if self.num_v_heads % self.num_k_heads:
            _fail("model.deltanet.num_v_heads", self.num_v_heads,
                  f"must be a multiple of num_k_heads={self.num_k_heads} (each key head serves "
                  "num_v_heads/num_k_heads value heads)")
        _check_choice("model.deltanet.impl", self.impl, ("chunked", "recurrent"))

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    @property
    def heads_per_key(self) -> int:
        return self.num_v_heads // self.num_k_heads

    def num_params(self, d_model: int) -> int:
        """One layer's parameters: in_proj_qkvz, in_proj_ba, conv, A_log, dt_bias, norm,
        out_proj."""
        D, Hv = d_model, self.num_v_heads
        return (D * (2 * self.key_dim + 2 * self.value_dim) + D * 2 * Hv
                + self.conv_kernel * self.conv_dim + 2 * Hv + self.head_v_dim
                + self.value_dim * D)
