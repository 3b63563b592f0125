"""MoE configuration: routers (``RouterConfig``), load-balancing losses (``BalanceConfig``) and the
MoE block (``MoEConfig``); re-exported by ``moejax.config``."""

from __future__ import annotations

import dataclasses
from typing import Literal

from moejax.config_checks import _check_choice, _check_positive, _fail


ROUTER_KINDS = ("topk", "topp", "expert_choice")
BALANCE_SCOPES = ("none", "micro", "sequence", "group", "global", "global+micro")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """How tokens pick experts (spec: shared/methods/architecture.md sections 0, 4, 7, 8).

    ``kind`` is the selection rule; the other fields are orthogonal options. Router math is fp32.
    """

    kind: Literal["topk", "topp", "expert_choice"] = "topk"
    score: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = True  # renormalise selected weights to sum to 1
    routed_scaling: float = 1.0  # DeepSeek-V3 multiplies routed weights (2.5 there)
    recurrent: Literal["none", "gru", "rnn"] = "none"  # RMoE: router state threaded across layers
    recurrent_dim: int = 256
    aux_free_bias: bool = False  # DeepSeek-V3 selection bias, updated outside the optimizer
    bias_update_rate: float = 1e-3
    bias_update: Literal["sign", "sign_centered"] = "sign"  # centred: subtract the mean after
    group_mode: Literal["none", "limited", "moge"] = "none"  # device/node-limited or Pangu MoGE
    num_groups: int = 1
    topk_groups: int = 1  # 'limited': keep the best topk_groups groups, then top-k inside them
    top_p: float = 0.4  # kind='topp': smallest prefix whose mass reaches top_p (crossing expert in)
    max_experts_per_token: int = 0  # kind='topp' slot cap; 0 = num_experts
    num_null_experts: int = 0  # AdaMoE zero-compute experts
    expert_choice_capacity: float = 1.0  # kind='expert_choice': tokens per expert = cap*T*k/E
    token_mask: Literal["none", "maskmoe"] = "none"  # MaskMoE fixed per-token-id expert masks
    maskmoe_frequent_visible: int = 4  # visible experts for frequent token ids
    maskmoe_frequent_fraction: float = 0.1  # share of ids (by frequency rank) that are frequent
    gw_entropy_threshold: float = 0.0  # GW-MoE: > 0 enables the dense mixture for uncertain tokens
    gw_max_slots: int = 1  # uncertain tokens per document (segment) that get the dense mixture
    # static budget of the dense mixture: batch * gw_max_slots * gw_docs_per_row token rows; in
    # rows packing more documents, uncertain tokens past the budget keep their top-k output
    gw_docs_per_row: int = 8
    jitter: float = 0.0  # multiplicative uniform noise 1 +- jitter on router input (train only)
    # EMoE (section 6.1) 'avg_key': logits x . k_e from a non-trainable average-key matrix [D,E]
    # (the mean of each expert's current w_gate), top-k blocks combined with weight 1; no params
    gating: Literal["learned", "avg_key"] = "learned"

    def __post_init__(self):
        _check_choice("model.moe.router.kind", self.kind, ROUTER_KINDS)
        _check_choice("model.moe.router.score", self.score, ("softmax", "sigmoid"))
        _check_choice("model.moe.router.recurrent", self.recurrent, ("none", "gru", "rnn"))
        _check_choice("model.moe.router.group_mode", self.group_mode, ("none", "limited", "moge"))
        _check_choice("model.moe.router.bias_update", self.bias_update, ("sign", "sign_centered"))
        _check_choice("model.moe.router.token_mask", self.token_mask, ("none", "maskmoe"))
        _check_choice("model.moe.router.gating", self.gating, ("learned", "avg_key"))
        if self.gating == "avg_key" and (self.kind != "topk" or self.recurrent != "none"
                                         or self.num_null_experts):
            _fail("model.moe.router.gating", self.gating,
                  "avg_key (EMoE) routing needs kind='topk', recurrent='none', no null experts")
        _check_positive("model.moe.router.routed_scaling", self.routed_scaling)
        _check_positive("model.moe.router.recurrent_dim", self.recurrent_dim)
        _check_positive("model.moe.router.num_groups", self.num_groups)
        _check_positive("model.moe.router.gw_docs_per_row", self.gw_docs_per_row)
        if not 0.0 < self.top_p <= 1.0:
            _fail("model.moe.router.top_p", self.top_p, "must lie in (0, 1]")
        for name in ("num_null_experts", "max_experts_per_token", "gw_max_slots"):
            if getattr(self, name) < 0:
                _fail(f"model.moe.router.{name}", getattr(self, name), "must be >= 0")
        if self.jitter < 0 or self.gw_entropy_threshold < 0 or self.bias_update_rate < 0:
            _fail("model.moe.router", (self.jitter, self.gw_entropy_threshold, self.bias_update_rate),
                  "jitter, gw_entropy_threshold and bias_update_rate must be >= 0")


@dataclasses.dataclass(frozen=True)
class BalanceConfig:
    """Load-balancing losses; the scope is a training-loop decision (moejax.layers.balance).

    Normalisation: LBL = E * sum_i f_i p_i with sum_i f_i = 1, so perfect balance gives 1 * coef.
    """

    scope: Literal["none", "micro", "sequence", "group", "global", "global+micro"] = "global"
    coef: float = 1e-3
    group_size: int = 1  # scope='group': sequences per balance group
    micro_ratio: float = 0.01  # scope='global+micro': micro term weight relative to coef
    z_loss_coef: float = 0.0
    device_coef: float = 0.0  # DeepSeek device-level balance over router.num_groups groups
    entropy_coef: float = 1e-4  # router entropy loss for kind='topp'
    # what scope='sequence' (and the sequence-imbalance statistic) pools over: one document
    # (segment of a packed row) or the whole packed row
    sequence_unit: Literal["document", "row"] = "document"

    def __post_init__(self):
        _check_choice("model.moe.balance.scope", self.scope, BALANCE_SCOPES)
        _check_choice("model.moe.balance.sequence_unit", self.sequence_unit, ("document", "row"))
        _check_positive("model.moe.balance.group_size", self.group_size)
        for name in ("coef", "micro_ratio", "z_loss_coef", "device_coef", "entropy_coef"):
            if getattr(self, name) < 0:
                _fail(f"model.moe.balance.{name}", getattr(self, name), "must be >= 0")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Routed (fine-grained) experts plus optional shared experts; num_experts=0 means dense."""

    num_experts: int = 0
    top_k: int = 2
    d_expert: int = 256  # intermediate size of one routed expert
    num_shared_experts: int = 0
    d_shared: int = 0  # intermediate size of the shared expert(s) together; 0 = d_expert * count
    shared_gate: bool = False  # Qwen3-Next: sigmoid(x W) gate on the shared-expert output
    first_dense_layers: int = 0
    moe_every: int = 1  # layer l is MoE iff l >= first_dense_layers and (l - first) % every == 0
    dense_layers: tuple[int, ...] = ()  # further dense layers (HF Qwen3-MoE ``mlp_only_layers``)
    dispatch: Literal["dropless", "capacity"] = "dropless"
    capacity_factor: float = 1.25
    # dropless EP: rows each device may send to one destination device, over the mean load
    # T_local*top_k/ep. 2.0 lets one destination take twice its fair share from a source before
    # any assignment drops (balanced routers stay well under that; drops are counted exactly in
    # router/dropped) while the receive buffer is ep/2 times smaller than the worst case. Chunks
    # of <= 128 rows (moe_ep.MIN_BUFFER_ROWS: decode steps, small eval batches) are sent whole.
    # 0 = the worst case T_local*top_k rows per destination (exactly dropless; ep x the memory)
    ep_buffer_factor: float = 2.0
    # dropless EP exchange: 'padded' all_to_all of fixed chunks, or 'ragged' (ragged_all_to_all:
    # only the true rows travel; GPU/TPU only, XLA:CPU cannot run it)
    ep_exchange: Literal["padded", "ragged"] = "padded"
    # kernels.gmm: auto = 'blocked' on CPU, tokamax (else 'blocked') on GPU, 'pallas' (megablox) on
    # TPU; see kernels.resolve_gmm_impl
    gmm_impl: Literal["auto", "reference", "xla", "blocked", "tokamax", "pallas"] = "auto"
    router: RouterConfig = dataclasses.field(default_factory=RouterConfig)
    balance: BalanceConfig = dataclasses.field(default_factory=BalanceConfig)

    def __post_init__(self):
        if self.num_experts < 0:
            _fail("model.moe.num_experts", self.num_experts, "must be >= 0 (0 = dense model)")
        if not self.enabled:
            return
        _check_positive("model.moe.top_k", self.top_k)
        _check_positive("model.moe.d_expert", self.d_expert)
        total = self.num_experts + self.router.num_null_experts
        if self.top_k > total:
            _fail("model.moe.top_k", self.top_k,
                  f"must be <= num_experts (+ null experts) = {total}")
        if self.num_shared_experts < 0 or self.d_shared < 0:
            _fail("model.moe.num_shared_experts", self.num_shared_experts, "must be >= 0")
        if self.first_dense_layers < 0:
            _fail("model.moe.first_dense_layers", self.first_dense_layers, "must be >= 0")
        _check_positive("model.moe.moe_every", self.moe_every)
        if any(l < 0 for l in self.dense_layers):
            _fail("model.moe.dense_layers", self.dense_layers, "layer indices must be >= 0")
        _check_choice("model.moe.dispatch", self.dispatch, ("dropless", "capacity"))
        _check_choice("model.moe.gmm_impl", self.gmm_impl,
                      ("auto", "reference", "xla", "blocked", "tokamax", "pallas"))
        _check_positive("model.moe.capacity_factor", self.capacity_factor)
        if self.ep_buffer_factor < 0:
            _fail("model.moe.ep_buffer_factor", self.ep_buffer_factor, "must be >= 0 (0 = exact)")
        _check_choice("model.moe.ep_exchange", self.ep_exchange, ("padded", "ragged"))
        r = self.router
        if r.group_mode != "none" and self.num_experts % r.num_groups:
            _fail("model.moe.router.num_groups", r.num_groups,
                  f"must divide num_experts={self.num_experts}")
        if r.group_mode == "moge" and self.top_k % r.num_groups:
            _fail("model.moe.top_k", self.top_k,
                  f"MoGE picks top_k/num_groups per group: must be divisible by {r.num_groups}")
        if r.group_mode == "limited" and not 1 <= r.topk_groups <= r.num_groups:
            _fail("model.moe.router.topk_groups", r.topk_groups, f"must lie in [1, {r.num_groups}]")
        if r.group_mode == "limited" and self.top_k > r.topk_groups * self.num_experts // r.num_groups:
            _fail("model.moe.top_k", self.top_k, "exceeds the experts in the kept groups")
        if r.kind == "expert_choice" and (r.num_null_experts or r.recurrent != "none"):
            _fail("model.moe.router.kind", r.kind, "expert choice takes no null experts / recurrence")
        if r.aux_free_bias and r.kind != "topk":
            _fail("model.moe.router.aux_free_bias", True, "only applies to kind='topk'")
        if self.balance.scope == "group" and self.balance.group_size < 1:
            _fail("model.moe.balance.group_size", self.balance.group_size, "must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return (self.enabled and layer >= self.first_dense_layers and layer not in self.dense_layers
                and (layer - self.first_dense_layers) % self.moe_every == 0)
