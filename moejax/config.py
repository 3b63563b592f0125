"""Typed, frozen run configuration, validated on construction.

Every dataclass checks its own fields in ``__post_init__``; ``Config`` checks the cross-field
constraints (batch vs mesh, sequence length vs model, sharded dims vs mesh axes). An invalid value
raises ``ConfigError`` naming the dotted field and the fix. Dotted overrides (``train.lr=3e-4``) go
through ``moejax.overrides`` (tyro), which type-checks values and re-runs the validation. The MoE
configs live in ``moejax.config_moe``, the attention and Gated DeltaNet ones in
``moejax.config_attention``, the validation primitives in ``moejax.config_checks``; all are
re-exported here, so ``from moejax.config import MoEConfig, AttentionConfig, ConfigError`` works.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Literal

from moejax.config_checks import ConfigError, _check_choice, _check_positive, _fail  # noqa: F401
from moejax.config_attention import AttentionConfig, DeltaNetConfig  # noqa: F401
from moejax.config_moe import (BALANCE_SCOPES, ROUTER_KINDS, BalanceConfig,  # noqa: F401
                               MoEConfig, RouterConfig, VariantConfig)

DTYPES = ("float32", "bfloat16", "float16")


NORM_VARIANTS = ("rms", "preaffine", "gated")
LAYER_TYPES = ("full_attention", "linear_attention")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Qwen3-style decoder: pre-norm blocks of GQA attention and a SwiGLU MLP."""

    vocab_size: int = 512
    d_model: int = 256
    num_layers: int = 4
    d_ff: int = 768
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    norm: Literal["rms", "rms_zero_centered"] = "rms"
    norm_eps: float = 1e-6
    # Block norm variants (spec section 3.3), chosen separately for the pre-attention, pre-FFN
    # and final norms: 'rms' (plain, γ form from `norm`), 'preaffine' γ ⊙ RMSNorm(λ ⊙ x),
    # 'gated' GatedNorm y ⊙ σ(W_up SiLU(W_down y)) with y = RMSNorm(x)·γ, rank gated_norm_rank.
    norm_variant_attn: Literal["rms", "preaffine", "gated"] = "rms"
    norm_variant_ffn: Literal["rms", "preaffine", "gated"] = "rms"
    norm_variant_final: Literal["rms", "preaffine", "gated"] = "rms"
    gated_norm_rank: int = 16
    tie_embeddings: bool = True
    max_seq_len: int = 2048  # KV-cache capacity and RoPE range checked at decode time
    init_std: float = 0.02
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = False  # stack layers with nnx.vmap and apply with nnx.scan
    remat: Literal["none", "full", "dots"] = "none"
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    # GatedNorm gate 2σ(·) instead of σ(·): the gain starts at ≈1 instead of ≈0.5 (spec 3.3)
    gated_norm_double_gate: bool = False
    # parallel block (GPT-J, BAM 8.9): x + attn(norm_attn(x)) + ffn(norm_ffn(x)), both branches
    # reading the block input, instead of two sequential residual steps
    parallel_block: bool = False
    # token mixer per layer, 'full_attention' or 'linear_attention' (Gated DeltaNet, ``deltanet``);
    # () = all full attention. Scanned layers scan over groups of the shortest repeating pattern.
    layer_types: tuple[str, ...] = ()
    deltanet: DeltaNetConfig = dataclasses.field(default_factory=DeltaNetConfig)
    # multi-token prediction depths (``moejax.layers.mtp``; Qwen3-Next has 1) and the weight of
    # their mean cross entropy in the training loss
    mtp_layers: int = 0
    mtp_loss_weight: float = 0.0

    def __post_init__(self):
        self._check_layer_types()
        self._check_mtp()
        if self.moe.enabled and self.scan_layers and (
                self.moe.first_dense_layers or self.moe.moe_every != 1 or self.moe.dense_layers):
            _fail("model.scan_layers", True, "scan needs identical layers: set "
                  "moe.first_dense_layers=0, moe.moe_every=1 and moe.dense_layers=(), or "
                  "scan_layers=False")
        for name in ("vocab_size", "d_model", "num_layers", "d_ff", "max_seq_len"):
            _check_positive(f"model.{name}", getattr(self, name))
        _check_positive("model.norm_eps", self.norm_eps)
        _check_positive("model.init_std", self.init_std)
        _check_choice("model.norm", self.norm, ("rms", "rms_zero_centered"))
        for name in ("norm_variant_attn", "norm_variant_ffn", "norm_variant_final"):
            _check_choice(f"model.{name}", getattr(self, name), NORM_VARIANTS)
        _check_positive("model.gated_norm_rank", self.gated_norm_rank)
        _check_choice("model.dtype", self.dtype, DTYPES)
        _check_choice("model.param_dtype", self.param_dtype, ("float32", "bfloat16"))
        _check_choice("model.remat", self.remat, ("none", "full", "dots"))
        a = self.attention
        if self.attention_experts and (a.gate != "none" or a.sink
                                       or "linear_attention" in self.layer_types):
            _fail("model.moe.variant.bam_attention", self.moe.variant.bam_attention,
                  "BAM attention experts take no attention gate, sink or linear-attention "
                  "layers: set attention.gate='none', attention.sink=False, layer_types=(), or "
                  "bam_attention='none'")

    def _check_layer_types(self):
        if not self.layer_types:
            return
        if len(self.layer_types) != self.num_layers:
            _fail("model.layer_types", self.layer_types,
                  f"must name one mixer per layer (num_layers={self.num_layers}) or be ()")
        for i, t in enumerate(self.layer_types):
            _check_choice(f"model.layer_types[{i}]", t, LAYER_TYPES)
        if self.is_hybrid and self.attention_experts:
            _fail("model.layer_types", self.layer_types, "BAM attention experts replace full "
                  "attention only: set moe.variant.bam_attention='none' or all full_attention")

    def _check_mtp(self):
        if self.mtp_layers < 0:
            _fail("model.mtp_layers", self.mtp_layers, "must be >= 0 (0 = no MTP module)")
        if self.mtp_loss_weight < 0:
            _fail("model.mtp_loss_weight", self.mtp_loss_weight, "must be >= 0")
        if self.mtp_loss_weight and not self.mtp_layers:
            _fail("model.mtp_loss_weight", self.mtp_loss_weight,
                  "needs an MTP module: set model.mtp_layers >= 1, or the weight to 0")
        if self.mtp_layers and self.moe.enabled and (
                self.moe.router.recurrent != "none" or self.moe.variant.kind == "hyper"):
            _fail("model.mtp_layers", self.mtp_layers, "the MTP block has no shared router "
                  "cell (RMoE/HyperMoE): set mtp_layers=0 or a plain router")

    def layer_type(self, layer: int) -> str:
        """The token mixer of ``layer``: 'full_attention' or 'linear_attention'."""
        return self.layer_types[layer] if self.layer_types else "full_attention"

    @property
    def is_hybrid(self) -> bool:
        """Any Gated DeltaNet (linear_attention) layer."""
        return "linear_attention" in self.layer_types

    @property
    def layer_pattern(self) -> tuple[str, ...]:
        """The shortest prefix of ``layer_types`` that repeats to all layers (scan group)."""
        types = tuple(self.layer_type(i) for i in range(self.num_layers))
        for p in range(1, self.num_layers + 1):
            if self.num_layers % p == 0 and types == types[:p] * (self.num_layers // p):
                return types[:p]
        return types

    @property
    def head_dim(self) -> int:
        return self.attention.head_dim

    @property
    def attention_experts(self) -> int:
        """BAM soft mixture-of-attention experts per block (0: plain attention)."""
        v = self.moe.variant
        return self.moe.num_experts if v.kind == "bam" and v.bam_attention != "none" else 0

    def check_mesh_divisibility(self, sizes: dict[str, int]) -> None:
        """Sharded parameter dims must divide by their mesh axes (``sizes``: resolved axis sizes)."""
        a = self.attention
        t, f = sizes.get("tensor", 1), sizes.get("fsdp", 1)
        for field, dim in (("model.attention.num_heads", a.num_heads),
                           ("model.attention.num_kv_heads", a.num_kv_heads),
                           ("model.d_ff", self.d_ff), ("model.vocab_size", self.vocab_size)):
            if dim % t:
                _fail(field, dim, f"must be divisible by mesh.tensor={t}")
        if self.d_model % f:
            _fail("model.d_model", self.d_model, f"must be divisible by mesh.fsdp={f}")
        if self.is_hybrid:
            for name in ("num_k_heads", "num_v_heads"):
                dim = getattr(self.deltanet, name)
                if dim % t:
                    _fail(f"model.deltanet.{name}", dim, f"must be divisible by mesh.tensor={t}")
        e = sizes.get("expert", 1)
        if self.moe.enabled and self.moe.num_experts % e:
            _fail("model.moe.num_experts", self.moe.num_experts,
                  f"must be divisible by mesh.expert={e} (experts are split evenly over it)")
        if self.moe.enabled and self.moe.d_expert % t:
            _fail("model.moe.d_expert", self.moe.d_expert,
                  f"must be divisible by mesh.tensor={t} (each expert's FFN is split over it)")

    def num_params(self, *, include_embeddings: bool = True, active: bool = False) -> int:
        """Trainable parameter count; ``active`` counts only the top_k routed experts a token
        uses (MFU counts active FLOPs)."""
        a, m, D = self.attention, self.moe, self.d_model
        attn = D * a.head_dim * (a.num_heads * 2 + a.num_kv_heads * 2)
        attn += 2 * a.head_dim if a.qk_norm else 0
        attn += a.extra_params(D)
        norm_extra = {"rms": 0, "preaffine": D, "gated": 2 * D * self.gated_norm_rank}
        attn += norm_extra[self.norm_variant_attn] + norm_extra[self.norm_variant_ffn]
        dense_block = attn + 3 * D * self.d_ff + 2 * D
        total = 0
        if self.attention_experts:  # BAM: the attention of every (MoE) block is mixed
            attn += self._attention_experts_params() - self._attention_params()
        linear_minus_full = (self.deltanet.num_params(D) - self._attention_params()
                             - a.extra_params(D))  # a Gated DeltaNet layer's mixer instead
        for layer in range(self.num_layers):
            mixer = linear_minus_full if self.layer_type(layer) == "linear_attention" else 0
            block = (attn + self._moe_block_params(active) + 2 * D if m.is_moe_layer(layer)
                     else dense_block)
            total += block + mixer
        # MTP depths: fc [2D,D], three norms and a full-attention block like the last layer's
        total += self.mtp_layers * (block + 2 * D * D + 3 * D)
        if m.enabled and m.router.recurrent != "none":  # one cell shared by all layers
            p = m.router.recurrent_dim
            total += (3 if m.router.recurrent == "gru" else 1) * (2 * p * p + 2 * p)
        if m.enabled and m.variant.kind == "hyper":  # one generator shared by all layers
            total += self._hyper_generator_params()
        emb = self.vocab_size * D * (1 if self.tie_embeddings else 2)
        total += norm_extra[self.norm_variant_final]
        return total + D + (emb if include_embeddings else 0)

    def _attention_params(self) -> int:
        """One plain GQA attention's projections and QK-norm scales."""
        a = self.attention
        qk = 2 * a.head_dim if a.qk_norm else 0
        return self.d_model * a.head_dim * (a.num_heads * 2 + a.num_kv_heads * 2) + qk

    def _attention_experts_params(self) -> int:
        """BAM's mixture of attention experts in one block: per expert q, o (and q-norm); k, v
        (and k-norm) per expert ('full') or once ('kv_shared'); the soft router [D,E]."""
        a, D, n = self.attention, self.d_model, self.attention_experts
        hd = a.head_dim
        q_side = 2 * D * a.num_heads * hd + (hd if a.qk_norm else 0)
        kv_side = 2 * D * a.num_kv_heads * hd + (hd if a.qk_norm else 0)
        kv_copies = n if self.moe.variant.bam_attention == "full" else 1
        return n * q_side + kv_copies * kv_side + D * n

    def _moe_block_params(self, active: bool) -> int:
        """One MoE layer's FFN block (``active``: what one token's forward uses) per variant."""
        m, D = self.moe, self.d_model
        r, v = m.router, m.variant
        experts = m.top_k if active else m.num_experts
        router = D * m.num_experts if r.recurrent == "none" else 0  # RMoE reads out of h
        router = 0 if r.gating == "avg_key" else router  # EMoE keys are not parameters
        shared = 0
        if m.num_shared_experts:
            shared = 3 * D * (m.d_shared or m.d_expert * m.num_shared_experts)
            shared += D if m.shared_gate else 0
        if v.kind == "coe":  # one router per iteration; C x top_k/C = top_k expert calls
            router *= v.coe_iterations
        elif v.kind == "cartesian":  # sub-layers A and B, and the norm between them
            return 2 * (3 * D * m.d_expert * experts + router + shared) + D
        elif v.kind == "hyper":  # expert embeddings, phi (2 x Linear(P, P)), layer embedding
            P = v.hyper_embed_dim
            router += m.num_experts * P + 2 * (P * P + P) + v.hyper_layer_embed_dim
        elif v.kind == "finedeep":  # per sub-layer an output-guided router vector and a norm
            router = 2 * v.finedeep_sublayers * D
        elif v.kind == "dsmoe":  # every block runs in training (the straight-through gradient)
            experts = m.num_experts
        moe = 3 * D * m.d_expert * experts + router + D * r.num_null_experts + shared
        if r.recurrent != "none":
            moe += D * r.recurrent_dim + r.recurrent_dim * m.num_experts
        return moe

    def _hyper_generator_params(self) -> int:
        """HyperMoE's generator: hidden [P+Lz,H] and the heads emitting W_down [D,r], b_down [r],
        W_up [r,D], b_up [D] (each a Dense with a bias)."""
        v, D = self.moe.variant, self.d_model
        H, r = v.hyper_bottleneck, v.hyper_adapter_dim
        dense = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731
        return (dense(v.hyper_embed_dim + v.hyper_layer_embed_dim, H) + dense(H, D * r)
                + dense(H, r) + dense(H, r * D) + dense(H, D))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward) over *active* parameters,
        attention included. Shared modules count once per use: HyperMoE's generator runs in
        every MoE layer; BAM's attention experts each attend (heads x experts)."""
        matmul_params = (self.num_params(include_embeddings=False, active=True)
                         + self.vocab_size * self.d_model)
        m = self.moe
        if m.enabled and m.variant.kind == "hyper":
            n_moe = sum(m.is_moe_layer(i) for i in range(self.num_layers))
            matmul_params += (n_moe - 1) * self._hyper_generator_params()
        heads = self.attention.num_heads * max(1, self.attention_experts)
        n_linear = sum(self.layer_type(i) == "linear_attention" for i in range(self.num_layers))
        attn = 2 * (self.num_layers - n_linear) * seq_len * heads * self.head_dim  # QK^T+PV, /2
        dn = self.deltanet  # per token: S^T k, the rank-1 update and S^T q on each value head
        attn += n_linear * 3 * 2 * dn.num_v_heads * dn.head_k_dim * dn.head_v_dim
        return 3.0 * (2.0 * matmul_params + attn)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; at most one axis may be -1 (takes the remaining devices)."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    rules: Literal["default"] = "default"  # logical-axis rule table, see moejax.mesh.RULES

    AXES = ("data", "fsdp", "expert", "tensor")

    def __post_init__(self):
        sizes = self.sizes
        if sum(s == -1 for s in sizes) > 1:
            _fail("mesh", dict(zip(self.AXES, sizes)), "at most one axis may be -1")
        for axis, s in zip(self.AXES, sizes):
            if s == 0 or s < -1:
                _fail(f"mesh.{axis}", s, "must be a positive size or -1 (fill with remaining devices)")
        _check_choice("mesh.rules", self.rules, ("default",))

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        return (self.data, self.fsdp, self.expert, self.tensor)

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Axis sizes for ``num_devices`` devices; raises if the product does not match."""
        known = math.prod(s for s in self.sizes if s != -1)
        sizes = list(self.sizes)
        if -1 in sizes:
            if num_devices % known:
                _fail("mesh", dict(zip(self.AXES, self.sizes)),
                      f"the fixed axes multiply to {known}, which does not divide the "
                      f"{num_devices} available devices")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            _fail("mesh", dict(zip(self.AXES, self.sizes)),
                  f"axis sizes multiply to {math.prod(sizes)} but {num_devices} devices are "
                  "available; set one axis to -1 or match the device count")
        return dict(zip(self.AXES, sizes))


DOMAINS = ("code", "prose", "math")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Token data: the embedded corpus (or a local text dir), tokenizer, packing and mixture."""

    # "embedded", a local directory of <domain>/*.txt files, a *.jsonl, or a directory (local or
    # gs://) written by `python -m moejax.data.prepare` (opened in place; its manifest's domains)
    corpus: str = "embedded"
    cache_dir: str = "~/.cache/moejax"  # corpus text and token shards are built once and cached here
    tokenizer: str = "byte"  # "byte", "bpe" (trained locally) or a path to a tokenizer.json
    bpe_vocab_size: int = 512
    seq_len: int = 256
    domains: tuple[str, ...] = DOMAINS
    mixture: tuple[float, ...] = (1.0, 1.0, 1.0)  # sampling weight per domain
    val_fraction: float = 0.02  # held-out share of every domain
    corpus_bytes_per_domain: int = 4_000_000  # cap per domain on the embedded corpus
    seed: int = 0
    prefetch_threads: int = 0

    def __post_init__(self):
        _check_positive("data.seq_len", self.seq_len)
        if not self.domains or len(set(self.domains)) != len(self.domains):
            _fail("data.domains", self.domains, "list each domain once")
        if len(self.mixture) != len(self.domains):
            _fail("data.mixture", self.mixture,
                  f"give one weight per domain ({len(self.domains)}: {self.domains})")
        if any(w < 0 for w in self.mixture) or sum(self.mixture) <= 0:
            _fail("data.mixture", self.mixture, "weights must be >= 0 and not all zero")
        if not 0.0 < self.val_fraction < 0.5:
            _fail("data.val_fraction", self.val_fraction, "must lie in (0, 0.5)")
        if self.tokenizer == "bpe" and self.bpe_vocab_size < 260:
            _fail("data.bpe_vocab_size", self.bpe_vocab_size, "must be >= 260 (256 bytes + specials)")
        _check_positive("data.corpus_bytes_per_domain", self.corpus_bytes_per_domain)
        if self.prefetch_threads < 0:
            _fail("data.prefetch_threads", self.prefetch_threads, "must be >= 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, logging, evaluation and checkpoint cadence."""

    steps: int = 1000
    batch_size: int = 16  # global, in sequences per optimizer step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1  # on matrices only (moejax.train.decay_mask: by parameter role)
    decay_zero_centered_norms: bool = False  # also decay zero-centred norm weights (Qwen3-Next)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # 0 disables clipping
    seed: int = 0
    nan_policy: Literal["skip", "stop"] = "skip"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    ckpt_every: int = 200
    keep_ckpts: int = 2
    async_ckpt: bool = True
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = look up the device kind

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "lr", "log_every", "eval_every",
                     "eval_batches", "ckpt_every", "keep_ckpts"):
            _check_positive(f"train.{name}", getattr(self, name))
        if self.batch_size % self.grad_accum:
            _fail("train.grad_accum", self.grad_accum,
                  f"must divide train.batch_size={self.batch_size}")
        if not 0 <= self.warmup_steps <= self.steps:
            _fail("train.warmup_steps", self.warmup_steps, f"must lie in [0, train.steps={self.steps}]")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            _fail("train.min_lr_ratio", self.min_lr_ratio, "must lie in [0, 1]")
        if self.weight_decay < 0:
            _fail("train.weight_decay", self.weight_decay, "must be >= 0")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                _fail(f"train.{name}", getattr(self, name), "must lie in [0, 1)")
        if self.clip_norm < 0:
            _fail("train.clip_norm", self.clip_norm, "must be >= 0 (0 disables clipping)")
        _check_choice("train.nan_policy", self.nan_policy, ("skip", "stop"))
        if self.peak_flops < 0:
            _fail("train.peak_flops", self.peak_flops, "must be >= 0 (0 = look up the device)")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum


GROWTH_OPS = ("none", "identity", "stack", "zero_depth", "random_depth", "learn_depth", "split",
              "zero_width", "random_width", "copy", "fine", "emoe", "emoe_learn", "dsmoe", "bam")
UPCYCLE_OPS = ("copy", "fine", "emoe", "emoe_learn", "dsmoe")  # moejax.upcycle's (moe_layers)
DENSE_TO_MOE_OPS = UPCYCLE_OPS + ("bam",)  # ops whose source is the target's dense model


@dataclasses.dataclass(frozen=True)
class GrowthConfig:
    """Growth inside a run (moejax.grow_run, spec sections 5, 6, 8.6): train a source model for
    ``source_steps`` steps, apply ``op`` (moejax.growth / moejax.upcycle), continue training the
    target (this config's model) for ``train.steps`` steps. 'none' = an ordinary run."""

    op: Literal["none", "identity", "stack", "zero_depth", "random_depth", "learn_depth", "split",
                "zero_width", "random_width", "copy", "fine", "emoe", "emoe_learn", "dsmoe",
                "bam"] = "none"
    factor: int = 4  # depth: source has num_layers/factor layers; width: d_ff/factor neurons
    stack_mode: Literal["block", "interleave"] = "block"  # G_stack: l -> l mod L/g | l // g
    new_layers: Literal["interleave", "top"] = "interleave"  # where G_zero/G_random add layers
    # G_zero depth: new layers copy a source layer (the one before them; on top: l mod L_s) or
    # take the fresh init; their output projections are zero either way (function preserving)
    new_layer_init: Literal["copy", "fresh"] = "copy"
    source_steps: int = 0
    optimizer: Literal["fresh", "transform"] = "fresh"
    # G_random depth (MSG): the new layers' residual branches are scaled by m(t) = min(1, t / this)
    # at grown-phase step t (moejax.growth.fade_in_ramp); 0 = no mask (plain random init). Only
    # op='random_depth' reads it (a preset may set it for its G_random arm)
    fade_in_steps: int = 0
    # the source phase's data.mixture (one weight per data.domains); () = the grown phase's. An
    # out-of-distribution run pretrains on every domain and fine-tunes with one weighted 0.
    source_mixture: tuple[float, ...] = ()
    # upcycling: which layers become MoE (EMoE's choice, section 6.2): 'all' keeps the model's
    # model.moe layout; 'last_half' = every 4th layer from L/2, 'last_quarter' = every 2nd layer
    # from 3L/4 (moejax.upcycle.apply_moe_layers sets first_dense_layers / moe_every from it)
    moe_layers: Literal["all", "last_half", "last_quarter"] = "all"
    split: Literal["even", "random"] = "even"  # G_split: down rows shared evenly or randomly
    noise: float = 0.0  # upcycling: relative std of multiplicative noise on expert weights
    router_init: Literal["zero", "random"] = "random"  # upcycled router; zero = uniform softmax
    learn_steps: int = 10  # G_learn: steps that fit the depth map
    learn_lr: float = 1e-2
    kmeans_iters: int = 30  # EMoE balanced k-means
    # BAM (op='bam', moejax.bam_run): steps each dense branch continues on its own domain before
    # mixing (their tokens count in the arm's budget); 0 = the branches are the source itself.
    # Only op='bam' reads it (a preset may set it for its BAM arm)
    branch_steps: int = 0

    def __post_init__(self):
        _check_choice("growth.op", self.op, GROWTH_OPS)
        _check_positive("growth.factor", self.factor)
        _check_choice("growth.new_layer_init", self.new_layer_init, ("copy", "fresh"))
        _check_choice("growth.moe_layers", self.moe_layers, ("all", "last_half", "last_quarter"))
        if self.moe_layers != "all" and self.op not in UPCYCLE_OPS:
            _fail("growth.moe_layers", self.moe_layers,
                  f"chooses upcycled MoE layers (op {'/'.join(UPCYCLE_OPS)}, got {self.op!r}); "
                  "use 'all'")
        for name in ("source_steps", "learn_steps", "kmeans_iters", "fade_in_steps",
                     "branch_steps"):
            if getattr(self, name) < 0:
                _fail(f"growth.{name}", getattr(self, name), "must be >= 0")
        if self.op != "none" and self.source_steps <= 0:
            _fail("growth.source_steps", self.source_steps, f"op={self.op!r} needs > 0 steps")
        if self.noise < 0:
            _fail("growth.noise", self.noise, "must be >= 0")
        if any(w < 0 for w in self.source_mixture) or (self.source_mixture
                                                       and sum(self.source_mixture) <= 0):
            _fail("growth.source_mixture", self.source_mixture,
                  "weights must be >= 0 and not all zero (or () for the grown phase's mixture)")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run: model, mesh, data and training."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    growth: GrowthConfig = dataclasses.field(default_factory=GrowthConfig)

    def __post_init__(self):
        if self.data.seq_len > self.model.max_seq_len:
            _fail("data.seq_len", self.data.seq_len,
                  f"exceeds model.max_seq_len={self.model.max_seq_len}; raise it or shorten sequences")
        if self.data.tokenizer == "bpe" and self.data.bpe_vocab_size > self.model.vocab_size:
            _fail("model.vocab_size", self.model.vocab_size,
                  f"must be >= data.bpe_vocab_size={self.data.bpe_vocab_size}")
        if self.data.tokenizer == "byte" and self.model.vocab_size < 259:
            _fail("model.vocab_size", self.model.vocab_size,
                  "must be >= 259 for the byte tokenizer (256 bytes + pad/bos/eos)")
        if self.train.decay_zero_centered_norms and self.model.norm != "rms_zero_centered":
            _fail("train.decay_zero_centered_norms", True,
                  f"needs model.norm='rms_zero_centered' (got {self.model.norm!r}): a plain RMSNorm "
                  "weight (scale w, init 1) would decay towards 0; set it False")
        v = self.model.moe.variant
        if self.growth.op == "dsmoe" and self.growth.router_init == "zero" \
                and v.dsmoe_threshold >= 0.5:
            _fail("growth.router_init", "zero",
                  f"a zero DSMoE gate gives sigmoid(0) = 0.5, not above "
                  f"model.moe.variant.dsmoe_threshold={v.dsmoe_threshold}: every block would start "
                  "off (no FFN at all); use 'random' or a threshold below 0.5")
        m = self.mesh
        batch_axes = [s for s in (m.data, m.fsdp, m.expert) if s != -1]
        shards = math.prod(batch_axes)
        if -1 not in (m.data, m.fsdp, m.expert) and self.train.micro_batch_size % shards:
            _fail("train.batch_size", self.train.batch_size,
                  f"the micro-batch ({self.train.micro_batch_size} sequences) must be divisible by "
                  f"mesh data*fsdp*expert={shards}")
        self.check_mesh_divisibility({k: v for k, v in zip(m.AXES, m.sizes) if v != -1})

    def check_mesh_divisibility(self, sizes: dict[str, int]) -> None:
        """Sharded dimensions must divide by their mesh axes (call again once -1 is resolved)."""

        batch = math.prod(sizes.get(k, 1) for k in ("data", "fsdp", "expert"))
        if self.train.micro_batch_size % batch:
            _fail("train.batch_size", self.train.batch_size,
                  f"the micro-batch ({self.train.micro_batch_size} sequences) must be divisible by "
                  f"mesh data*fsdp*expert={batch}")
        self.model.check_mesh_divisibility(sizes)

    @property
    def uses_corpus(self) -> bool:
        """Whether the run trains on the ``data.*`` corpus (an RL run on tasks does not)."""
        return True

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return _from_dict(cls, d)


def _from_dict(cls, d: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v, t = d[f.name], hints[f.name]
        if dataclasses.is_dataclass(t):
            v = _from_dict(t, v)
        elif typing.get_origin(t) is tuple and isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"unknown config fields {sorted(unknown)} for {cls.__name__}")
    return cls(**kwargs)
