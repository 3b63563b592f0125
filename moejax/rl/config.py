"""The configuration of an RL run: ``RLRunConfig`` is a ``moejax.config.Config`` (model, mesh, data,
train) plus an ``rl`` section (tasks, rewards, rollout, advantages, loss, routing replay, the SFT
warm start and the loop's batch geometry). Dotted overrides work as for any config
(``--set rl.loss.eps_high=0.28``); every invalid value raises ``ConfigError`` naming its field.

Batch geometry of one RL step: ``prompts_per_step`` prompts x ``num_generations`` completions are
generated, rewarded and turned into advantages; the rows are split into ``mini_batches`` optimizer
steps, repeated for ``ppo_epochs`` epochs, each accumulated over ``micro_batches`` micro-steps with
the mini-batch's global loss denominators. ``train.steps`` counts RL steps.

Method switches (methods B.1-B.4, all off by default): ``rl.prefix`` (Prefix-RFT; its variants
multiply the rows by ``prefix.num_prefix``), ``rl.minibatch_sampler`` / ``rl.positive_only`` /
``rl.balanced_subsample`` (B.2), ``rl.reward_calibration`` (B.3) and ``rl.budget`` (B.4).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from moejax.config import Config
from moejax.config_checks import _check_choice, _fail
from moejax.rl.advantages import FILTER_RULES, AdvantageConfig
from moejax.rl.budget import (CurriculumConfig, DifficultyFilterConfig, KnapsackConfig,
                              success_buffer)
from moejax.rl.calibration import METHODS as CALIBRATION_METHODS, CalibrationConfig
from moejax.rl.losses import PolicyLossConfig
from moejax.rl.minibatch import SAMPLERS
from moejax.rl.prefix import PrefixConfig
from moejax.rl.rewards import RewardConfig
from moejax.rl.rollout import RolloutConfig
from moejax.rl.tasks import TaskConfig

REPLAY_MODES = ("none", "r2", "r3")
OLD_LOGPROBS = ("recompute", "rollout")
ALLOCATIONS = ("fixed", "knapsack")
FILTER_WHERE = ("none", "online", "offline")
REWARD_SOURCES = ("verifier", "reward_model")


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    """MoE routing replay (methods B.5.1): ``r3`` forces the rollout engine's recorded top-k sets
    in the pi_old recompute and every update; ``r2`` records them in the pi_old recompute and
    forces them in the updates; ``none`` routes live (disagreement with the rollout is logged).
    ``balance_loss``: the MoE balance/z losses during RL from live scores, or off (OpenRLHF's 0)."""

    mode: str = "none"
    balance_loss: Literal["off", "live"] = "off"

    def __post_init__(self):
        _check_choice("rl.replay.mode", self.mode, REPLAY_MODES)
        _check_choice("rl.replay.balance_loss", self.balance_loss, ("off", "live"))


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """The supervised warm start on task demonstrations (prompt tokens carry no loss)."""

    steps: int = 200  # 0 skips the stage (start RL from the initial or imported model)
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20
    scratchpad: bool = True  # demonstrations with the solver's worked steps
    eval_items: int = 256  # held-out demonstrations for the SFT validation loss

    def __post_init__(self):
        for name in ("steps", "warmup_steps"):
            if getattr(self, name) < 0:
                _fail(f"rl.sft.{name}", getattr(self, name), "must be >= 0")
        for name in ("batch_size", "eval_items"):
            if getattr(self, name) < 1:
                _fail(f"rl.sft.{name}", getattr(self, name), "must be >= 1")
        if not self.lr > 0:
            _fail("rl.sft.lr", self.lr, "must be > 0")


@dataclasses.dataclass(frozen=True)
class PrefixRFTConfig(PrefixConfig):
    """Prefix-RFT in the loop (methods B.1, ``moejax.rl.prefix``): off unless ``enabled``. Each of
    the ``prompts_per_step`` prompts gets ``num_prefix`` variants x ``num_generations`` rollouts;
    advantages are the prefix ones (Dr.GRPO style, ``rl.advantage`` unused)."""

    enabled: bool = False


@dataclasses.dataclass(frozen=True)
class RewardCalibrationConfig(CalibrationConfig):
    """Reward calibration against response length (methods B.3, ``moejax.rl.calibration``):
    ``method='none'`` (default) leaves rewards raw; otherwise every step appends its (length,
    reward) points to a rolling buffer of ``buffer_size``, fits, and trains on r - alpha*b(len)."""

    method: str = "none"
    buffer_size: int = 512

    def __post_init__(self):
        _check_choice("rl.reward_calibration.method", self.method, ("none",) + CALIBRATION_METHODS)
        if self.method != "none":
            super().__post_init__()
        if self.buffer_size < 1:
            _fail("rl.reward_calibration.buffer_size", self.buffer_size, "must be >= 1")
        if self.method == "local_average" and self.half_width is None:
            _fail("rl.reward_calibration.half_width", None, "the local average over rollouts has "
                  "no preference pairs to size its window: set half_width (in tokens)")

    @property
    def enabled(self) -> bool:
        return self.method != "none"


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
    """Rollout budget and curriculum (methods B.4, ``moejax.rl.budget``); defaults = fixed G, no
    filter, no curriculum. ``allocation='knapsack'`` spreads prompts_per_step x num_generations
    rollouts over the prompts by estimated value (``knapsack.mean_n`` must equal
    ``num_generations``); ``filter`` applies ``difficulty`` to this step's own rollouts
    (``online``, refilling as DAPO) or to the success buffer before generation (``offline``);
    ``curriculum`` draws each prompt's task family from SEC's Q-table (``sec``)."""

    allocation: str = "fixed"
    knapsack: KnapsackConfig = KnapsackConfig()
    filter: str = "none"
    difficulty: DifficultyFilterConfig = DifficultyFilterConfig()
    curriculum: bool = False
    sec: CurriculumConfig = CurriculumConfig()
    buffer_window: int = 16  # success buffer: outcomes kept per prompt
    buffer_min_count: int = 8  # outcomes before a prompt's estimate counts

    def __post_init__(self):
        _check_choice("rl.budget.allocation", self.allocation, ALLOCATIONS)
        _check_choice("rl.budget.filter", self.filter, FILTER_WHERE)
        if self.buffer_window < 1:
            _fail("rl.budget.buffer_window", self.buffer_window, "must be >= 1")
        if not 1 <= self.buffer_min_count <= self.buffer_window:
            _fail("rl.budget.buffer_min_count", self.buffer_min_count,
                  f"must be in [1, buffer_window={self.buffer_window}]")

    @property
    def uses_success_buffer(self) -> bool:
        return self.allocation == "knapsack" or self.filter == "offline"

    def empty_buffer(self) -> dict:
        return success_buffer(self.buffer_window, self.buffer_min_count)


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Everything RL-specific; see the module docstring for the batch geometry."""

    tasks: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    task_file: str = ""  # a local JSONL of {"prompt", "answer"} replaces the synthetic tasks
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    advantage: AdvantageConfig = dataclasses.field(default_factory=AdvantageConfig)
    loss: PolicyLossConfig = dataclasses.field(default_factory=PolicyLossConfig)
    replay: ReplayConfig = dataclasses.field(default_factory=ReplayConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    prompts_per_step: int = 16
    num_generations: int = 8  # G completions per prompt (a group)
    mini_batches: int = 1  # optimizer steps per epoch over one rollout batch
    ppo_epochs: int = 1
    micro_batches: int = 1  # gradient accumulation inside a mini-batch
    old_logprobs: str = "recompute"  # pi_old: a recompute by the trainer, or the rollout's (bypass)
    kl_in_reward_coef: float = 0.0  # KL to the reference folded into the reward (verl use_kl_in_reward)
    dynamic_sampling: bool = False  # DAPO: drop groups without reward variance and refill
    filter_rule: str = "nonzero_std"
    max_refills: int = 4  # extra rollout batches a dynamic-sampling step may draw
    overlong_cache_len: int = 0  # DAPO soft overlong punishment window in tokens; 0 = off
    overlong_factor: float = 1.0
    chat_template: str = "auto"  # "auto" (the tokenizer's when it has one) or "none"
    eval_every: int = 20  # RL steps between evaluations (also at the start and the end)
    eval_items_per_tier: int = 64
    eval_samples: int = 4  # sampled completions per eval prompt for pass@1 / pass@k; 0 = greedy only
    # compute dtype of the rollout engine ("" = model.dtype): e.g. a bf16 sampler against an fp32
    # trainer, the train/inference mismatch routing replay and TIS correct (methods B.5)
    rollout_dtype: str = ""
    # method switches (methods B.1-B.4); every default is the plain GRPO loop above
    prefix: PrefixRFTConfig = PrefixRFTConfig()
    minibatch_sampler: str = "shuffled"  # shuffled | query_preserved | reward_balanced (B.2)
    positive_only: bool = False  # B.2's control: rows with advantage <= 0 carry no signal
    # B.2's reward-balanced batching (b): each group's majority class (correct / not) subsampled
    # to its minority's count before the advantages; the other rows stay as masked padding
    balanced_subsample: bool = False
    reward_calibration: RewardCalibrationConfig = RewardCalibrationConfig()
    # B.3: what RL trains on, the verifier's reward or a Bradley-Terry reward model's score of
    # the rollout (``moejax.rl.reward_model``, trained in reward_model_dir); pass@1 stays verified
    reward_source: str = "verifier"
    reward_model_dir: str = ""
    budget: BudgetConfig = BudgetConfig()
    # which RL prompts (the SFT stage is unaffected): ``prompt_pool`` = N > 0 cycles the first N
    # items of the stream (prompts come back, so the success buffer fills: Knapsack, B.4);
    # ``family_weights`` draws each prompt's family with these weights, one per
    # ``rl.tasks.families`` entry (C.1 MoDoMoDo; normalised), then a uniform tier of it;
    # () keeps the uniform tier draw
    prompt_pool: int = 0
    family_weights: tuple[float, ...] = ()

    def __post_init__(self):
        for name in ("prompts_per_step", "mini_batches", "ppo_epochs", "micro_batches",
                     "eval_every", "eval_items_per_tier"):
            if getattr(self, name) < 1:
                _fail(f"rl.{name}", getattr(self, name), "must be >= 1")
        if self.num_generations < 2:
            _fail("rl.num_generations", self.num_generations,
                  "group advantages need G >= 2 completions per prompt")
        if self.eval_samples < 0:
            _fail("rl.eval_samples", self.eval_samples, "must be >= 0 (0 = greedy only)")
        _check_choice("rl.old_logprobs", self.old_logprobs, OLD_LOGPROBS)
        _check_choice("rl.filter_rule", self.filter_rule, FILTER_RULES)
        _check_choice("rl.chat_template", self.chat_template, ("auto", "none"))
        _check_choice("rl.rollout_dtype", self.rollout_dtype, ("", "float32", "bfloat16", "float16"))
        if self.kl_in_reward_coef < 0:
            _fail("rl.kl_in_reward_coef", self.kl_in_reward_coef, "must be >= 0")
        if self.max_refills < 0:
            _fail("rl.max_refills", self.max_refills, "must be >= 0")
        rows = self.rows_per_step
        if rows % self.mini_batches:
            _fail("rl.mini_batches", self.mini_batches,
                  f"must divide the rollout batch of prompts_per_step x num_generations "
                  f"(x prefix.num_prefix) = {rows}")
        if (rows // self.mini_batches) % self.micro_batches:
            _fail("rl.micro_batches", self.micro_batches,
                  f"must divide the mini-batch of {rows // self.mini_batches} rows")
        if not 0 <= self.overlong_cache_len <= self.rollout.max_new_tokens:
            _fail("rl.overlong_cache_len", self.overlong_cache_len,
                  f"must be in [0, rollout.max_new_tokens={self.rollout.max_new_tokens}]")
        if self.old_logprobs == "rollout" and self.replay.mode == "r2":
            _fail("rl.replay.mode", "r2", "records routing in the pi_old recompute, which "
                  "rl.old_logprobs='rollout' skips; use r3 or recompute")
        self._check_methods()
        self._check_prompt_stream()
        self._check_reward_source()

    def _check_reward_source(self) -> None:
        _check_choice("rl.reward_source", self.reward_source, REWARD_SOURCES)
        learned = self.reward_source == "reward_model"
        if learned != bool(self.reward_model_dir):
            _fail("rl.reward_model_dir", self.reward_model_dir, "set it (the reward model's "
                  "directory) exactly when rl.reward_source='reward_model'")
        if learned and self.dynamic_sampling:
            _fail("rl.dynamic_sampling", True, "filters groups on the verifier's reward; turn it "
                  "off with rl.reward_source='reward_model'")

    def _check_prompt_stream(self) -> None:
        if self.prompt_pool < 0:
            _fail("rl.prompt_pool", self.prompt_pool, "must be >= 0 (0 = the endless stream)")
        w = self.family_weights
        if not w:
            return
        if len(w) != len(self.tasks.families):
            _fail("rl.family_weights", w, f"give one weight per rl.tasks.families entry "
                  f"{self.tasks.families}")
        if not all(math.isfinite(x) and x >= 0 for x in w) or not sum(w) > 0:
            _fail("rl.family_weights", w, "weights must be finite, >= 0, with a positive sum")
        if self.task_file or self.budget.curriculum:
            _fail("rl.family_weights", w, "draws synthetic task families; not combined with "
                  "rl.task_file or rl.budget.curriculum (which draws families itself)")

    def _check_methods(self) -> None:
        """The method switches' combinations the loop supports (fixed shapes per step)."""
        _check_choice("rl.minibatch_sampler", self.minibatch_sampler, SAMPLERS)
        knapsack = self.budget.allocation == "knapsack"
        if self.minibatch_sampler != "shuffled":
            if self.prompts_per_step % self.mini_batches:
                _fail("rl.mini_batches", self.mini_batches,
                      f"{self.minibatch_sampler} mini-batches hold whole prompts: must divide "
                      f"prompts_per_step={self.prompts_per_step}")
            if knapsack:
                _fail("rl.minibatch_sampler", self.minibatch_sampler, "whole-prompt mini-batches "
                      "need equal groups; rl.budget.allocation='knapsack' varies them (use "
                      "'shuffled')")
        if self.prefix.enabled:
            if self.loss.algo != "ppo":
                _fail("rl.loss.algo", self.loss.algo, "Prefix-RFT's surrogate is token-level: "
                      "use 'ppo' with rl.prefix.enabled")
            if self.dynamic_sampling or self.budget.filter == "online":
                _fail("rl.prefix.enabled", True, "prefix variants are not refilled: turn off "
                      "rl.dynamic_sampling and rl.budget.filter='online'")
            if knapsack:
                _fail("rl.budget.allocation", "knapsack", "not combined with rl.prefix.enabled "
                      "(variants have a fixed num_generations)")
            if self.balanced_subsample:
                _fail("rl.balanced_subsample", True, "not combined with rl.prefix.enabled "
                      "(prefix advantages are baselined on every on-policy rollout)")
        if knapsack:
            k = self.budget.knapsack
            if k.mean_n != self.num_generations:
                _fail("rl.budget.knapsack.mean_n", k.mean_n, "the budget is prompts_per_step x "
                      f"num_generations: set it to rl.num_generations={self.num_generations}")
            smallest = min(k.min_n, k.negative_n or k.min_n, k.positive_n or k.min_n)
            if smallest < 2 and self.advantage.singleton == "error":
                _fail("rl.budget.knapsack.min_n", smallest, "group advantages need >= 2 rollouts "
                      "per prompt (min_n, negative_n, positive_n >= 2)")
            if self.dynamic_sampling or self.budget.filter == "online":
                _fail("rl.budget.allocation", "knapsack", "online filtering refills whole groups "
                      "of num_generations; use rl.budget.filter='offline' with knapsack")
        if self.budget.curriculum and self.task_file:
            _fail("rl.budget.curriculum", True, "draws task families; a rl.task_file has none")

    @property
    def rows_per_step(self) -> int:
        variants = self.prefix.num_prefix if self.prefix.enabled else 1
        return self.prompts_per_step * variants * self.num_generations

    @property
    def needs_reference(self) -> bool:
        """A frozen reference model is kept when a KL term (loss or reward) uses it."""
        return self.loss.kl_coef > 0 or self.kl_in_reward_coef > 0

    @property
    def updates_per_step(self) -> int:
        return self.mini_batches * self.ppo_epochs


@dataclasses.dataclass(frozen=True)
class RLRunConfig(Config):
    """A whole RL run: the model/mesh/data/train sections of ``Config`` plus ``rl``. The data
    section supplies the tokenizer; ``train`` the optimizer (``train.steps`` = RL steps)."""

    rl: RLConfig = dataclasses.field(default_factory=RLConfig)

    @property
    def uses_corpus(self) -> bool:
        """Tasks, not the corpus, feed an RL run; only a BPE tokenizer is trained on the corpus."""
        return self.data.tokenizer == "bpe"

    def __post_init__(self):
        super().__post_init__()
        rl, moe = self.rl, self.model.moe
        if rl.replay.mode != "none" and not moe.enabled:
            _fail("rl.replay.mode", rl.replay.mode,
                  "routing replay needs an MoE model (model.moe.num_experts > 0); set it 'none'")
        if rl.replay.mode != "none" and moe.router.kind != "topk":
            _fail("rl.replay.mode", rl.replay.mode,
                  f"replay forces top-k sets; model.moe.router.kind={moe.router.kind!r} cannot "
                  "be replayed (use kind='topk' or replay 'none')")
        need = rl.rollout.max_prompt_len + rl.rollout.max_new_tokens
        if need > self.model.max_seq_len:
            _fail("rl.rollout.max_new_tokens", rl.rollout.max_new_tokens,
                  f"prompt + new tokens = {need} exceeds model.max_seq_len="
                  f"{self.model.max_seq_len}")
        if self.train.grad_accum != 1:
            _fail("train.grad_accum", self.train.grad_accum,
                  "RL accumulates with rl.micro_batches; leave train.grad_accum at 1")

    def optimizer_config(self) -> "RLRunConfig":
        """The config the optimizer is built from: its schedule counts optimizer steps,
        ``rl.updates_per_step`` per RL step (``train.steps`` and warmup count RL steps)."""
        u = self.rl.updates_per_step
        return dataclasses.replace(self, train=dataclasses.replace(
            self.train, steps=self.train.steps * u, warmup_steps=self.train.warmup_steps * u))

    def check_mesh_divisibility(self, sizes: dict[str, int]) -> None:
        """Also: an update's micro-batch rows divide over the batch shards."""
        super().check_mesh_divisibility(sizes)
        shards = 1
        for axis in ("data", "fsdp", "expert"):
            shards *= sizes.get(axis, 1)
        rows = self.rl.rows_per_step // self.rl.mini_batches // self.rl.micro_batches
        if rows % shards:
            _fail("rl.micro_batches", self.rl.micro_batches,
                  f"an update micro-batch of {rows} rows (prompts_per_step x num_generations / "
                  f"mini_batches / micro_batches) must divide over mesh data*fsdp*expert={shards}")
