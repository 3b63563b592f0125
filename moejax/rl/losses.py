"""Policy losses for critic-free RL, as pure JAX functions of per-token logprobs [n,T].

Spec: ../shared/methods/rl-and-data.md A.1 (note 1: aggregation by formula; note 2: global
denominators), B.5.2 (GSPO), B.5.3 (mismatch corrections). Per token, with ρ = π/π_old and Â:
    ℓ = -min(ρÂ, clip(ρ, 1-ε_lo, 1+ε_hi)Â);   dual clip (Â<0): ℓ = min(ℓ, -cÂ).
Algorithms (``PolicyLossConfig.algo``):
- ``ppo``:        token ratio ρ_t = exp(logπ_t - logπ_old_t) (log clamped to ±``ratio_log_clamp``).
- ``gspo``:       sequence ratio s_i = exp(mean_t (logπ - logπ_old)) and sequence advantage
                  (the masked mean of ``advantages`` over the completion); ℓ_i is placed on each of
                  the sequence's tokens, so ``seq_mean_token_mean`` gives GSPO's (1/N) Σ_i ℓ_i.
- ``gspo_token``: s_{i,t} = sg[s_i]·π_t/sg[π_t] (value s_i, gradient of the token), per-token Â.
GSPO's log ratio is clamped above at ``seq_ratio_log_max`` (10, tunix/verl); its clip ranges are
its own (3e-4/4e-4, ``PolicyLossConfig.gspo()``).

Aggregation (Σ over the micro-batch's masked tokens, denominators from the whole mini-batch):
- ``token_mean``          Σ_i Σ_t m ℓ / num_tokens
- ``seq_mean_token_mean`` Σ_i (Σ_t m ℓ / |o_i|) / num_seqs
- ``seq_mean_token_sum``  Σ_i Σ_t m ℓ / num_seqs
- ``dr_grpo``             Σ_i Σ_t m ℓ / (num_seqs · L_max)  (``dr_grpo_form="tunix"``)
                          Σ_i Σ_t m ℓ / L_max             (``dr_grpo_form="verl"``, no 1/N)
``loss_denominators`` computes (num_tokens, num_seqs, L_max) once from the full mini-batch's
completion mask (all micro-batches, all data shards); ``policy_loss`` takes them as an argument, so
the sum of the micro-batch losses (and gradients) equals the full mini-batch's whatever the split.

Train/rollout mismatch (weight w_t = sg[exp(logπ_old_train - logπ_rollout)] multiplies ℓ_t):
``tis`` clip(w, tis_floor, tis_cap) (tunix/verl: floor 0, cap 2; OpenRLHF also floors);
``icepop`` w inside ``mismatch_band`` [lo, hi], 0 outside; ``seq_mask_tis`` w, times 0 for a
sequence whose geometric-mean w is outside the band (OpenRLHF). **Bypass** (rollout logprobs as
π_old): pass the rollout's ``logprobs`` as ``old_logprobs`` with ``mismatch="none"``.

KL to a frozen reference as a loss term (``kl_coef`` · aggregate(k)), entropy bonus
(-``entropy_coef`` · aggregate(H)); both use the same aggregation and denominators. For KL folded
into the reward instead see ``moejax.rl.advantages.kl_penalized_reward``.

Every returned metric is normalised by the global denominators (token metrics by num_tokens,
sequence metrics by num_seqs), so summing a metric over the micro-batches of a mini-batch gives the
mini-batch's value.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax.config_checks import _check_choice, _fail
from moejax.rl import kl as kl_lib

ALGOS = ("ppo", "gspo", "gspo_token")
AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "dr_grpo")
DR_GRPO_FORMS = ("tunix", "verl")
MISMATCH = ("none", "tis", "icepop", "seq_mask_tis")


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """The policy loss: algorithm, clipping, aggregation, KL/entropy terms, mismatch correction."""

    algo: str = "ppo"
    eps_low: float = 0.2
    eps_high: float = 0.2  # > eps_low is DAPO's clip-higher (0.2 / 0.28)
    dual_clip: float | None = None  # c > 1 bounds the loss of Â<0 tokens at -cÂ (verl: 3.0)
    agg: str = "token_mean"
    dr_grpo_form: str = "tunix"
    ratio_log_clamp: float | None = 20.0  # ppo: log ρ clipped to ±this before exp (verl)
    seq_ratio_log_max: float | None = 10.0  # gspo/gspo_token: log s clipped above (tunix/verl)
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    kl_input_clamp: float | None = 20.0
    kl_output_clamp: float | None = 10.0
    entropy_coef: float = 0.0
    mismatch: str = "none"
    tis_cap: float = 2.0
    tis_floor: float = 0.0
    mismatch_band: tuple[float, float] = (0.5, 5.0)

    def __post_init__(self):
        _check_choice("loss.algo", self.algo, ALGOS)
        _check_choice("loss.agg", self.agg, AGG_MODES)
        _check_choice("loss.dr_grpo_form", self.dr_grpo_form, DR_GRPO_FORMS)
        _check_choice("loss.kl_estimator", self.kl_estimator, kl_lib.ESTIMATORS)
        _check_choice("loss.mismatch", self.mismatch, MISMATCH)
        if not 0.0 <= self.eps_low < 1.0:
            _fail("loss.eps_low", self.eps_low, "must be in [0, 1) so 1 - eps_low > 0")
        if not self.eps_high >= 0.0:
            _fail("loss.eps_high", self.eps_high, "must be >= 0")
        if self.dual_clip is not None and not self.dual_clip > 1.0 + self.eps_high:
            _fail("loss.dual_clip", self.dual_clip, "must be > 1 + eps_high (verl: 3.0), or None")
        for name in ("kl_coef", "entropy_coef"):
            if not getattr(self, name) >= 0.0:
                _fail(f"loss.{name}", getattr(self, name), "must be >= 0")
        for name in ("ratio_log_clamp", "seq_ratio_log_max", "kl_input_clamp", "kl_output_clamp"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                _fail(f"loss.{name}", value, "must be > 0, or None for no clamp")
        if not 0.0 <= self.tis_floor < self.tis_cap:
            _fail("loss.tis_floor", self.tis_floor, f"must be in [0, tis_cap={self.tis_cap})")
        lo, hi = self.mismatch_band
        if not 0.0 <= lo < hi:
            _fail("loss.mismatch_band", self.mismatch_band, "must be (lo, hi) with 0 <= lo < hi")

    @classmethod
    def dapo(cls, **overrides) -> "PolicyLossConfig":
        """DAPO: clip-higher 0.2/0.28 and token-mean aggregation."""
        return cls(**{"eps_low": 0.2, "eps_high": 0.28, "agg": "token_mean", **overrides})

    @classmethod
    def gspo(cls, **overrides) -> "PolicyLossConfig":
        """GSPO: sequence ratio, clip 3e-4/4e-4, sequence-level aggregation."""
        return cls(**{"algo": "gspo", "eps_low": 3e-4, "eps_high": 4e-4,
                      "agg": "seq_mean_token_mean", **overrides})


class LossDenominators(NamedTuple):
    """Global normalisers of one mini-batch (scalars; arrays so a new batch never recompiles)."""

    num_tokens: jax.Array  # Σ_i |o_i| over the whole mini-batch
    num_seqs: jax.Array  # sequences with |o_i| > 0 (fully masked padding rows do not count)
    max_len: jax.Array  # L_max for the dr_grpo mode (the generation cap)


def loss_denominators(completion_mask, max_len: int | None = None) -> LossDenominators:
    """Denominators from the FULL mini-batch's ``completion_mask [N,T]`` (all micro-batches and
    data shards). ``max_len`` defaults to T, the padded width; pass the generation cap if wider."""
    mask = jnp.asarray(completion_mask, jnp.float32)
    lengths = jnp.sum(mask, axis=-1)
    width = mask.shape[-1] if max_len is None else max_len
    return LossDenominators(num_tokens=jnp.sum(lengths),
                            num_seqs=jnp.sum((lengths > 0).astype(jnp.float32)),
                            max_len=jnp.asarray(width, jnp.float32))


def _safe(x):
    return jnp.maximum(x, 1.0)


def aggregate(loss_tokens, completion_mask, den: LossDenominators, mode: str,
              dr_grpo_form: str = "tunix"):
    """Reduce a per-token loss [n,T] to this micro-batch's share of the mini-batch scalar."""
    mask = completion_mask.astype(jnp.float32)
    masked = jnp.where(mask > 0, loss_tokens, 0.0) * mask
    if mode == "token_mean":
        return jnp.sum(masked) / _safe(den.num_tokens)
    if mode == "seq_mean_token_mean":
        per_seq = jnp.sum(masked, axis=-1) / _safe(jnp.sum(mask, axis=-1))
        return jnp.sum(per_seq) / _safe(den.num_seqs)
    if mode == "seq_mean_token_sum":
        return jnp.sum(masked) / _safe(den.num_seqs)
    if mode == "dr_grpo":
        scale = den.max_len * den.num_seqs if dr_grpo_form == "tunix" else den.max_len
        return jnp.sum(masked) / _safe(scale)
    raise ValueError(f"aggregation mode {mode!r} is not one of {AGG_MODES}")


def clipped_surrogate(ratio, adv, eps_low: float, eps_high: float, dual_clip: float | None):
    """-min(ρÂ, clip(ρ)Â) (and dual clip) -> (loss, high, low, dual); the masks mark where a clip
    is active (strictly past its bound), and a clipped entry is a constant (zero gradient)."""
    high = (adv > 0) & (ratio > 1.0 + eps_high)
    low = (adv < 0) & (ratio < 1.0 - eps_low)
    loss = jnp.where(high, -adv * (1.0 + eps_high), -adv * ratio)
    loss = jnp.where(low, -adv * (1.0 - eps_low), loss)
    if dual_clip is None:
        return loss, high, low, jnp.zeros_like(high)
    dual = (adv < 0) & (ratio > dual_clip)
    return jnp.where(dual, -adv * dual_clip, loss), high, low, dual


def _clip_above(x, bound: float | None):
    return x if bound is None else jnp.minimum(x, bound)


def sequence_log_ratio(logprobs, old_logprobs, completion_mask):
    """log s_i = mean over the completion of (logπ - logπ_old) -> [n]."""
    mask = completion_mask.astype(jnp.float32)
    diff = jnp.where(mask > 0, logprobs - old_logprobs, 0.0)
    return jnp.sum(diff, axis=-1) / _safe(jnp.sum(mask, axis=-1))


def _ratio_and_surrogate(logprobs, old_logprobs, advantages, mask, cfg: PolicyLossConfig):
    """Per-token ratio [n,T] and surrogate pieces for the configured algorithm."""
    clip = (cfg.eps_low, cfg.eps_high, cfg.dual_clip)
    if cfg.algo == "ppo":
        c = cfg.ratio_log_clamp
        log_ratio = logprobs - old_logprobs
        ratio = jnp.exp(log_ratio if c is None else jnp.clip(log_ratio, -c, c))
        return (ratio,) + clipped_surrogate(ratio, advantages, *clip)
    log_s = sequence_log_ratio(logprobs, old_logprobs, mask)  # [n]
    if cfg.algo == "gspo":
        seq_adv = jnp.sum(advantages * mask, axis=-1) / _safe(jnp.sum(mask, axis=-1))
        seq_ratio = jnp.exp(_clip_above(log_s, cfg.seq_ratio_log_max))
        pieces = clipped_surrogate(seq_ratio, seq_adv, *clip)
        to_tokens = lambda x: jnp.broadcast_to(x[:, None], mask.shape)  # noqa: E731
        return (to_tokens(seq_ratio),) + tuple(to_tokens(p) for p in pieces)
    # gspo_token: value s_i, gradient of the token's own logprob (clamped as a whole, as verl)
    log_st = jax.lax.stop_gradient(log_s)[:, None] + logprobs - jax.lax.stop_gradient(logprobs)
    ratio = jnp.exp(_clip_above(log_st, cfg.seq_ratio_log_max))
    return (ratio,) + clipped_surrogate(ratio, advantages, *clip)


def mismatch_weights(old_logprobs, rollout_logprobs, completion_mask, cfg: PolicyLossConfig):
    """Detached per-token weight [n,T] correcting the train/rollout mismatch (module docstring)."""
    w = jnp.exp(jax.lax.stop_gradient(old_logprobs - rollout_logprobs))
    lo, hi = cfg.mismatch_band
    if cfg.mismatch == "tis":
        return jnp.clip(w, cfg.tis_floor, cfg.tis_cap)
    if cfg.mismatch == "icepop":
        return jnp.where((w >= lo) & (w <= hi), w, 0.0)
    if cfg.mismatch == "seq_mask_tis":
        seq_w = jnp.exp(sequence_log_ratio(old_logprobs, rollout_logprobs, completion_mask))
        keep = (seq_w >= lo) & (seq_w <= hi)
        return jax.lax.stop_gradient(w * keep[:, None])
    return jnp.ones_like(w)


def _token_mean(x, mask, den: LossDenominators):
    """Detached token-mean of x [n,T] over the mini-batch (a metric)."""
    return aggregate(jax.lax.stop_gradient(x).astype(jnp.float32), mask, den, "token_mean")


def _check_inputs(cfg: PolicyLossConfig, rollout_logprobs, ref_logprobs, entropy) -> None:
    """Name the missing argument a configured term needs."""
    if cfg.mismatch != "none" and rollout_logprobs is None:
        raise ValueError(f"loss.mismatch={cfg.mismatch!r} needs rollout_logprobs")
    if cfg.kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"loss.kl_coef={cfg.kl_coef} needs ref_logprobs from the reference model")
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError(f"loss.entropy_coef={cfg.entropy_coef} needs per-token entropy")


def _ratio_metrics(ratio, high, low, dual, logprobs, old_logprobs, advantages, mask, den):
    """Clip fractions, ratio mean, policy-change KLs and the share of sequences with signal."""
    tm = lambda x: _token_mean(x, mask, den)  # noqa: E731
    log_ratio = jax.lax.stop_gradient(logprobs - old_logprobs)
    has_signal = jnp.any((jnp.abs(advantages) > 0) & (mask > 0), axis=-1)
    return dict(
        clip_frac=tm(high | low), clip_frac_high=tm(high), clip_frac_low=tm(low),
        clip_frac_dual=tm(dual), ratio_mean=tm(ratio),
        ppo_kl=tm(-log_ratio),  # k1(π_old‖π), as verl/OpenRLHF log it
        approx_kl=tm(kl_lib.k3_value(-log_ratio, None, None)),  # k3(π_old‖π) on π_old's samples
        nonzero_adv_frac=jnp.sum(has_signal.astype(jnp.float32)) / _safe(den.num_seqs))


def _prefix_inputs(advantages, entropy, prefix_mask, mask, prefix_cfg, entropy_mask_ratio):
    """Prefix-RFT's loss inputs: advantages with the low-entropy prefix tokens zeroed, the prefix
    mask (bool, inside the completion) and the entropy-bonus mask -> three [n,T] arrays."""
    from moejax.rl import prefix as prefix_lib  # it imports this module

    if prefix_cfg is None or entropy is None or entropy_mask_ratio is None:
        raise ValueError("prefix_mask needs prefix_cfg, entropy and entropy_mask_ratio")
    pm = (prefix_mask > 0) & (mask > 0)
    keep = prefix_lib.entropy_prefix_mask(jax.lax.stop_gradient(entropy), pm, entropy_mask_ratio)
    bonus = prefix_lib.entropy_bonus_mask(mask, pm, prefix_cfg.entropy_bonus)
    return jnp.where(keep, advantages, 0.0), pm, bonus


def policy_loss(logprobs, old_logprobs, advantages, completion_mask, den: LossDenominators,
                cfg: PolicyLossConfig, *, rollout_logprobs=None, ref_logprobs=None, entropy=None,
                prefix_mask=None, prefix_cfg=None, entropy_mask_ratio=None):
    """This micro-batch's share of the mini-batch loss, and metrics -> (loss, dict of scalars).

    Shapes [n,T]: ``logprobs`` (live policy, differentiated), ``old_logprobs`` (π_old: the stored
    recompute, or the rollout's for bypass), ``advantages`` (token level, see
    ``advantages.token_advantages``), ``completion_mask``; optional ``rollout_logprobs`` (needed by
    a mismatch correction; logs ``mismatch_kl``), ``ref_logprobs`` (KL term; logs ``kl_ref``, the
    aggregated estimator, whenever given), ``entropy`` (bonus; logs ``entropy``). ``den`` comes
    from ``loss_denominators`` on the whole mini-batch. Use with ``jax.grad(..., has_aux=True)``.

    Prefix-RFT (``prefix_mask`` [n,T] and ``prefix_cfg``, a ``moejax.rl.prefix.PrefixConfig``;
    ``algo='ppo'``): the lowest-entropy ``entropy_mask_ratio`` of the prefix tokens lose their
    advantage, the surrogate is ``prefix.prefix_surrogate`` and the entropy bonus covers
    ``prefix_cfg.entropy_bonus``'s tokens; ``entropy`` is required.
    """
    _check_inputs(cfg, rollout_logprobs, ref_logprobs, entropy)
    mask = completion_mask.astype(jnp.float32)

    def clean(x):  # padding may hold anything (even -inf): no NaN may reach a value or a gradient
        return None if x is None else jnp.where(mask > 0, x.astype(jnp.float32), 0.0)

    logprobs, old_logprobs, advantages = clean(logprobs), clean(old_logprobs), clean(advantages)
    rollout_logprobs, ref_logprobs, entropy = map(clean, (rollout_logprobs, ref_logprobs, entropy))

    def agg(x):
        return aggregate(x, mask, den, cfg.agg, cfg.dr_grpo_form)

    bonus_mask = None
    if prefix_mask is not None:
        advantages, pm, bonus_mask = _prefix_inputs(advantages, entropy, prefix_mask, mask,
                                                    prefix_cfg, entropy_mask_ratio)
    ratio, pg_tokens, high, low, dual = _ratio_and_surrogate(
        logprobs, old_logprobs, advantages, mask, cfg)
    if prefix_mask is not None:
        from moejax.rl import prefix as prefix_lib  # it imports this module
        pg_tokens = prefix_lib.prefix_surrogate(logprobs, old_logprobs, advantages, mask, pm,
                                                prefix_cfg, cfg.eps_low, cfg.eps_high,
                                                cfg.dual_clip)
    metrics = {}
    if cfg.mismatch != "none":
        weights = mismatch_weights(old_logprobs, rollout_logprobs, mask, cfg)
        pg_tokens = pg_tokens * weights
        metrics["mismatch_weight_mean"] = _token_mean(weights, mask, den)
        metrics["mismatch_zeroed_frac"] = _token_mean(weights == 0, mask, den)
    total = pg_loss = agg(pg_tokens)
    metrics["pg_loss"] = jax.lax.stop_gradient(pg_loss)
    if ref_logprobs is not None:
        kl_loss = agg(kl_lib.kl_estimate(logprobs, ref_logprobs, cfg.kl_estimator,
                                         cfg.kl_input_clamp, cfg.kl_output_clamp))
        metrics["kl_ref"] = jax.lax.stop_gradient(kl_loss)
        total = total + cfg.kl_coef * kl_loss
    if entropy is not None:
        metrics["entropy"] = _token_mean(entropy, mask, den)
        bonus = entropy if bonus_mask is None else entropy * bonus_mask
        total = total - cfg.entropy_coef * agg(bonus)
    if rollout_logprobs is not None:  # k3 estimate of KL(π_rollout‖π_old) on the rollout's samples
        metrics["mismatch_kl"] = _token_mean(
            kl_lib.k3_value(rollout_logprobs - old_logprobs, None, None), mask, den)
    metrics.update(_ratio_metrics(ratio, high, low, dual, logprobs, old_logprobs, advantages,
                                  mask, den))
    metrics["loss"] = jax.lax.stop_gradient(total)
    return total, metrics
