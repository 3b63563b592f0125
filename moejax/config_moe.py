"""MoE configuration: routers (``RouterConfig``), load-balancing losses (``BalanceConfig``) and the
MoE block (``MoEConfig``); re-exported by ``moejax.config``."""

from __future__ import annotations

import dataclasses
from typing import Literal

from moejax.config_checks import _check_choice, _check_positive, _fail


ROUTER_KINDS = ("topk", "topp", "expert_choice")
BALANCE_SCOPES = ("none", "micro", "sequence", "group", "shuffled", "global", "global+micro")


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
    # RMoE cell init: PyTorch's U(+-1/sqrt(p)), or 'normal' N(0, model.init_std) on every GRU
    # weight and bias (the reference code's Megatron init_method)
    recurrent_init: Literal["default", "normal"] = "default"
    aux_free_bias: bool = False  # DeepSeek-V3 selection bias, updated outside the optimizer
    bias_update_rate: float = 1e-3
    bias_update: Literal["sign", "sign_centered"] = "sign"  # centred: subtract the mean after
    group_mode: Literal["none", "limited", "moge"] = "none"  # device/node-limited or Pangu MoGE
    num_groups: int = 1
    topk_groups: int = 1  # 'limited': keep the best topk_groups groups, then top-k inside them
    # 'limited' group score: DeepSeek-V3's sum of the top-(k/topk_groups) scores in the group, or
    # DeepSeek-V2's device-limited routing by each group's max affinity
    group_score: Literal["topsum", "max"] = "topsum"
    # 'moge': weights are the global-softmax scores of the picks (Pangu MoGE, spec 8.11) unless
    # True (then renormalised to sum 1); norm_topk_prob does not apply to MoGE
    moge_renormalize: bool = False
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
    # RMoE same-parameter control: the GRU input state is zero at every MoE layer (h_l =
    # GRU(W_proj x_l, 0)), so no routing information crosses layers; parameters are unchanged
    recurrent_reset: bool = False
    # robustness probe (CartesianMoE, spec 8.2; eval only): every top-k router empties the slots
    # of its ``drop_top_experts`` best-scoring picks (weights of the rest renormalised as for any
    # empty slot when norm_topk_prob); 0 = off
    drop_top_experts: int = 0

    def __post_init__(self):
        _check_choice("model.moe.router.kind", self.kind, ROUTER_KINDS)
        _check_choice("model.moe.router.score", self.score, ("softmax", "sigmoid"))
        _check_choice("model.moe.router.recurrent", self.recurrent, ("none", "gru", "rnn"))
        _check_choice("model.moe.router.group_mode", self.group_mode, ("none", "limited", "moge"))
        _check_choice("model.moe.router.group_score", self.group_score, ("topsum", "max"))
        _check_choice("model.moe.router.recurrent_init", self.recurrent_init, ("default", "normal"))
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
        if self.recurrent_reset and self.recurrent == "none":
            _fail("model.moe.router.recurrent_reset", True,
                  "resets the RMoE state: needs model.moe.router.recurrent='gru' or 'rnn'")
        if self.drop_top_experts and (self.kind != "topk" or self.group_mode == "moge"):
            _fail("model.moe.router.drop_top_experts", self.drop_top_experts,
                  "the drop-top probe needs kind='topk' and group_mode other than 'moge'")
        for name in ("num_null_experts", "max_experts_per_token", "gw_max_slots",
                     "drop_top_experts"):
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

    scope: Literal["none", "micro", "sequence", "group", "shuffled", "global",
                   "global+micro"] = "global"
    coef: float = 1e-3
    # scope='group': sequences per balance group; a group larger than a micro-step's rows pools
    # consecutive rows of the global batch across micro-steps (moejax.layers.balance)
    group_size: int = 1
    # scope='global': > 0 balances per micro-batch (scope 'micro') before this optimizer step,
    # globally from it on (derived from the checkpointed step: resume-exact)
    switch_step: int = 0
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
        if self.switch_step < 0 or (self.switch_step and self.scope != "global"):
            _fail("model.moe.balance.switch_step", self.switch_step,
                  "must be >= 0, and > 0 only with scope='global' (micro before it, global after)")
        for name in ("coef", "micro_ratio", "z_loss_coef", "device_coef", "entropy_coef"):
            if getattr(self, name) < 0:
                _fail(f"model.moe.balance.{name}", getattr(self, name), "must be >= 0")


MOE_VARIANTS = ("none", "coe", "cartesian", "hyper", "finedeep", "dsmoe", "bam")
BAM_ATTENTION = ("full", "kv_shared", "none")


@dataclasses.dataclass(frozen=True)
class VariantConfig:
    """MoE layer variants (architecture.md section 8; built by ``moejax.layers.moe_variants``).

    'none' is the standard MoE block. 'coe' (Chain-of-Experts, 8.10): ``coe_iterations`` = C
    passes over one expert pool, each with its own router picking top_k / C experts, with the
    inner residual. 'cartesian' (CartesianMoE, 8.2): two routed sub-layers A and B of
    ``num_experts`` experts each (top_k each, ``d_expert`` the half-size sub-expert; shared
    experts per sub-layer), B reading Norm(h + A(h)). 'hyper' (HyperMoE, 8.1): top-k MoE plus a
    per-token adapter that one hypernetwork, shared by all layers, generates from the unselected
    experts' embeddings and a layer embedding. 'finedeep' (Finedeep, 8.8): a dense FFN split into
    ``finedeep_sublayers`` = M sequential pre-norm residual sub-layers of num_experts / M experts
    each, all active (top_k must equal num_experts), mixed by output-guided sigmoid weights.
    'dsmoe' (DSMoE, 8.7): a dense FFN split along its hidden dim into num_experts blocks
    (``moe_variants.dsmoe_from_dense``), block i on where sigmoid(w_i . x) > ``dsmoe_threshold``
    (straight-through gradient); top_k is unused (the count varies per token).
    'bam' (BAM, 8.9): the FFN is a plain top-k MoE (one expert per dense branch) and, with
    ``bam_attention`` 'full' or 'kv_shared', every block's attention is a soft mixture of
    num_experts attention experts (``attention_experts.AttentionExperts``; 'none' = FFN-only BTX);
    ``moejax.bam.branch_and_mix`` builds it from N dense branches.
    """

    kind: Literal["none", "coe", "cartesian", "hyper", "finedeep", "dsmoe", "bam"] = "none"
    coe_iterations: int = 2
    # CartesianMoE output wiring [verify in the paper]: 'b' = B's output only (the spec's
    # formula); 'a_plus_b' = A's output plus B's, so both sub-layers write to the residual stream
    cartesian_output: Literal["b", "a_plus_b"] = "b"
    hyper_embed_dim: int = 128  # HyperMoE expert embeddings and the selection processor phi
    hyper_layer_embed_dim: int = 10  # layer embedding fed to the shared generator
    hyper_bottleneck: int = 128  # generator hidden width
    hyper_adapter_dim: int = 64  # r: the generated adapter's width (weights D x r, r x D)
    finedeep_sublayers: int = 2  # M; num_experts / M experts per sub-layer
    # Finedeep expert weights [verify in the paper]: 'normalized' sigma(r.E_k) / sum_j
    # sigma(r.E_j) (the spec's reading), or the raw 'sigmoid' sigma(r.E_k)
    finedeep_weights: Literal["normalized", "sigmoid"] = "normalized"
    dsmoe_threshold: float = 0.5  # tau: block i is active where g_i = sigmoid(w_i . x) > tau
    # DSMoE [verify in the paper]: an active block's output times g_i ('gate') or times 1
    # ('one': a converted dense checkpoint starts as the dense FFN on its active blocks)
    dsmoe_scale: Literal["gate", "one"] = "one"
    # DSMoE sparsity loss [verify]: mean over tokens and blocks of g ('gate') or of the
    # straight-through mask ('mask'); reported per layer as aux['router/sparsity']
    dsmoe_sparsity: Literal["gate", "mask"] = "gate"
    dsmoe_sparsity_coef: float = 0.0  # lambda
    # BAM attention experts [verify in the paper]: 'full' = own q, k, v, o (and QK-norm scales)
    # per expert; 'kv_shared' = own q, o, one k/v shared by all experts (a KV cache of plain
    # size; mixed from the branches' average); 'none' = dense attention (BTX)
    bam_attention: Literal["full", "kv_shared", "none"] = "full"

    def __post_init__(self):
        _check_choice("model.moe.variant.kind", self.kind, MOE_VARIANTS)
        _check_positive("model.moe.variant.coe_iterations", self.coe_iterations)
        for name in ("hyper_embed_dim", "hyper_layer_embed_dim", "hyper_bottleneck",
                     "hyper_adapter_dim"):
            _check_positive(f"model.moe.variant.{name}", getattr(self, name))
        _check_choice("model.moe.variant.cartesian_output", self.cartesian_output,
                      ("b", "a_plus_b"))
        _check_positive("model.moe.variant.finedeep_sublayers", self.finedeep_sublayers)
        _check_choice("model.moe.variant.finedeep_weights", self.finedeep_weights,
                      ("normalized", "sigmoid"))
        _check_choice("model.moe.variant.dsmoe_scale", self.dsmoe_scale, ("gate", "one"))
        _check_choice("model.moe.variant.dsmoe_sparsity", self.dsmoe_sparsity, ("gate", "mask"))
        if not 0.0 <= self.dsmoe_threshold < 1.0:
            _fail("model.moe.variant.dsmoe_threshold", self.dsmoe_threshold, "must lie in [0, 1)")
        _check_choice("model.moe.variant.bam_attention", self.bam_attention, BAM_ATTENTION)
        if self.dsmoe_sparsity_coef < 0:
            _fail("model.moe.variant.dsmoe_sparsity_coef", self.dsmoe_sparsity_coef, "must be >= 0")

    def check_against(self, moe: "MoEConfig") -> None:
        """Cross-field rules: variants route with plain learned token-choice top-k."""
        if self.kind == "none":
            return
        r = moe.router
        plain = (r.kind == "topk" and r.recurrent == "none" and r.gating == "learned"
                 and not r.aux_free_bias and r.token_mask == "none" and not r.num_null_experts
                 and r.gw_entropy_threshold == 0 and r.group_mode == "none")
        if not plain:
            _fail("model.moe.variant.kind", self.kind,
                  "MoE variants need router.kind='topk' with recurrent='none', gating='learned', "
                  "aux_free_bias=False, token_mask='none', no null experts, "
                  "gw_entropy_threshold=0 and group_mode='none'")
        if self.kind == "coe" and moe.top_k % self.coe_iterations:
            _fail("model.moe.top_k", moe.top_k,
                  f"CoE routes top_k / coe_iterations per iteration: must be divisible by "
                  f"variant.coe_iterations={self.coe_iterations}")
        if self.kind == "finedeep" and (moe.num_experts % self.finedeep_sublayers
                                        or moe.top_k != moe.num_experts):
            _fail("model.moe.variant.finedeep_sublayers", self.finedeep_sublayers,
                  f"Finedeep runs every expert: finedeep_sublayers must divide num_experts="
                  f"{moe.num_experts} and top_k must equal num_experts (got {moe.top_k})")
        if self.kind == "bam" and (moe.first_dense_layers or moe.moe_every != 1
                                   or moe.dense_layers):
            _fail("model.moe.variant.kind", self.kind,
                  "BAM mixes every block of the dense branches: set first_dense_layers=0, "
                  "moe_every=1 and dense_layers=()")
        if self.kind in ("coe", "hyper", "finedeep", "dsmoe", "bam") and moe.num_shared_experts:
            _fail("model.moe.num_shared_experts", moe.num_shared_experts,
                  f"variant {self.kind!r} takes no shared experts here (set 0)")


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
    variant: VariantConfig = dataclasses.field(default_factory=VariantConfig)

    def __post_init__(self):
        if self.num_experts < 0:
            _fail("model.moe.num_experts", self.num_experts, "must be >= 0 (0 = dense model)")
        if not self.enabled:
            if self.variant.kind != "none":
                _fail("model.moe.variant.kind", self.variant.kind,
                      "an MoE variant needs num_experts > 0")
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
        self.variant.check_against(self)

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return (self.enabled and layer >= self.first_dense_layers and layer not in self.dense_layers
                and (layer - self.first_dense_layers) % self.moe_every == 0)
