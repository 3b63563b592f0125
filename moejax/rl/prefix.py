"""Prefix-RFT (methods/rl-and-data.md B.1): a cut of a demonstration is given to the policy as the
start of its answer, the continuation is sampled, and the hybrid is scored and trained with one
clipped surrogate. Pure host/JAX functions; the trainer wires them (no state beyond the RL step).

Pieces, in the order the trainer uses them:
- ``schedule_value`` / ``sample_ratio``: r = low(t) + (high(t) - low(t))·Beta(a, b); low/high are
  const, linear or cosine schedules of the global step with warm-up (linear from 0 to ``init``)
  and a delay wrapper (``delay_value`` before ``delay_steps``), as the released scheduler [P2].
- ``prefix_length`` / ``build_variants``: ``num_prefix`` variants per prompt, the first
  ``num_empty_prefix`` on-policy (sentinel uid 0), the rest with their own uid, a fresh ratio and
  a random demonstration; floor(r·|demo|) clamped to [min_prefix_len, |demo| - 1] and trimmed to
  the prompt bucket [P1].
- ``move_prefix_to_response``: after generation the prefix tokens count as response tokens and
  ``prefix_mask`` marks them [P1][P5].
- ``prefix_advantages``: Dr.GRPO continuation advantages per (prompt, uid) group and prefix
  advantages (r_i - mean of the prompt's on-policy group) / n [P3].
- ``entropy_prefix_mask``: zero the advantage of the lowest-entropy share of the prefix tokens [P4].
- ``prefix_surrogate``: per-token clipped surrogate with the prefix reshapers and prefix clipping.

Every random draw takes an explicit ``np.random.Generator``; the trainer keys it by (seed, step)
(``np.random.default_rng([seed, step, PREFIX_SALT])``) so a resumed run draws the same prefixes.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from moejax.config_checks import _check_choice, _fail
from moejax.rl.losses import clipped_surrogate

SCHEDULE_KINDS = ("const", "linear", "cosine")
ADVANTAGE_FORMS = ("v1", "v2")
PREFIX_BASELINES = ("spec", "released")
RESHAPERS = ("identity", "importance_sampling", "luffy")
ENTROPY_BONUS_SCOPES = ("response_only", "all")
ON_POLICY_UID = 0  # the sentinel prefix uid every on-policy variant of a prompt shares
PREFIX_SALT = 0x9F1C  # prefix draws use default_rng([seed, step, PREFIX_SALT])


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """One scheduled value of the global step (the released ``global_step`` controllers [P2])."""

    kind: str = "const"
    init: float = 0.0  # const: the value; linear/cosine: the value after warm-up
    target: float = 0.0  # linear/cosine: the value from ``n_steps`` after warm-up on
    n_steps: int = 1000
    warmup_ratio: float = 0.0  # warm-up of int(n_steps * warmup_ratio) steps, linear from 0
    delay_steps: int = 0  # before this step the value is ``delay_value``; then the shifted schedule
    delay_value: float = 1.0

    def __post_init__(self):
        _check_choice("prefix.schedule.kind", self.kind, SCHEDULE_KINDS)
        for name in ("init", "target", "delay_value"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                _fail(f"prefix.schedule.{name}", getattr(self, name), "must be in [0, 1]")
        if self.n_steps < 1:
            _fail("prefix.schedule.n_steps", self.n_steps, "must be >= 1")
        if not 0.0 <= self.warmup_ratio < 1.0:
            _fail("prefix.schedule.warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        if self.delay_steps < 0:
            _fail("prefix.schedule.delay_steps", self.delay_steps, "must be >= 0")

    @property
    def warmup_steps(self) -> int:
        return int(self.n_steps * self.warmup_ratio)


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
    """Prefix-RFT switches; [verify]/[inferred] readings of the spec are choices here."""

    num_prefix: int = 2  # variants per prompt
    num_empty_prefix: int = 1  # of them on-policy (no prefix); >= 1 gives the prefix baseline
    min_prefix_len: int = 1
    low: ScheduleConfig = ScheduleConfig(kind="const", init=0.05)
    high: ScheduleConfig = ScheduleConfig(kind="cosine", init=0.95, target=0.05)  # OURS: decays
    beta_a: float = 1.0
    beta_b: float = 1.0  # Beta(1, 1) = uniform in [low, high]
    advantage_form: str = "v1"  # v1: a singleton group has mean 0; v2: its own value (A = 0)
    # spec: Â_pre = (r - mean_on) / n; released: the code subtracts mean_on from the already
    # group-centred score, (r - mean_uid - mean_on) / n [P3, in-place update of `scores`]
    prefix_baseline: str = "spec"
    entropy_mask: ScheduleConfig = ScheduleConfig(kind="const", init=0.8)  # share of prefix tokens
    reshaper: str = "identity"  # prefix ratio: π/π_old, π (importance_sampling), π/(π+0.1) (luffy)
    prefix_clip: bool = True  # False: prefix tokens unclipped, -Âρ (released enable_clip=False)
    eps_low_off: float | None = None  # prefix clip range; None = the policy loss's eps_low
    eps_high_off: float | None = None
    entropy_bonus: str = "response_only"  # the entropy bonus skips prefix tokens, or covers all

    def __post_init__(self):
        if self.num_prefix < 1:
            _fail("prefix.num_prefix", self.num_prefix, "must be >= 1")
        if not 1 <= self.num_empty_prefix <= self.num_prefix:
            _fail("prefix.num_empty_prefix", self.num_empty_prefix,
                  f"must be in [1, num_prefix={self.num_prefix}]: prefix advantages are baselined "
                  "on the prompt's on-policy group")
        if self.min_prefix_len < 1:
            _fail("prefix.min_prefix_len", self.min_prefix_len, "must be >= 1")
        for name in ("beta_a", "beta_b"):
            if not getattr(self, name) > 0:
                _fail(f"prefix.{name}", getattr(self, name), "must be > 0")
        _check_choice("prefix.advantage_form", self.advantage_form, ADVANTAGE_FORMS)
        _check_choice("prefix.prefix_baseline", self.prefix_baseline, PREFIX_BASELINES)
        _check_choice("prefix.reshaper", self.reshaper, RESHAPERS)
        _check_choice("prefix.entropy_bonus", self.entropy_bonus, ENTROPY_BONUS_SCOPES)
        for name in ("eps_low_off", "eps_high_off"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                _fail(f"prefix.{name}", value, "must be in [0, 1), or None for the loss's range")


# -- ratio schedule and sampler ----------------------------------------------------------------


def _base_value(cfg: ScheduleConfig, step: int) -> float:
    """The schedule without the delay wrapper (warm-up, then const/linear/cosine)."""
    if cfg.kind == "const":
        return cfg.init
    warm = cfg.warmup_steps
    if step < warm:
        return step / warm * cfg.init
    s = step - warm
    if s >= cfg.n_steps:
        return cfg.target
    if cfg.kind == "linear":
        return cfg.target + (1.0 - s / cfg.n_steps) * (cfg.init - cfg.target)
    decay = 0.5 * (1.0 + math.cos(math.pi * s / cfg.n_steps))  # 1 -> 0
    return cfg.target + decay * (cfg.init - cfg.target)


def schedule_value(cfg: ScheduleConfig, step: int) -> float:
    """The scheduled value at global ``step`` (delay wrapper around the base schedule)."""
    if step < cfg.delay_steps:
        return cfg.delay_value
    return _base_value(cfg, step - cfg.delay_steps)


def ratio_bounds(cfg: PrefixConfig, step: int) -> tuple[float, float]:
    """(lower, higher) of the prefix ratio at ``step`` (the two schedules, ordered)."""
    a, b = schedule_value(cfg.low, step), schedule_value(cfg.high, step)
    return min(a, b), max(a, b)


def sample_ratio(cfg: PrefixConfig, step: int, rng: np.random.Generator) -> float:
    """One prefix ratio: lower + (higher - lower) · Beta(a, b)."""
    lower, higher = ratio_bounds(cfg, step)
    return lower + (higher - lower) * float(rng.beta(cfg.beta_a, cfg.beta_b))


# -- variants and lengths ----------------------------------------------------------------------


def prefix_length(ratio: float, demo_len: int, min_prefix_len: int) -> int:
    """floor(ratio·|demo|) clamped to [min_prefix_len, |demo| - 1]; 0 for ratio 0 or |demo| <= 1."""
    if ratio <= 0 or demo_len <= 1:
        return 0
    k = max(int(ratio * demo_len), min_prefix_len)
    return min(k, demo_len - 1)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One rollout prompt of Prefix-RFT: a prompt, with or without a demonstration prefix."""

    prompt: int  # index of the prompt in the batch
    uid: int  # ON_POLICY_UID for on-policy variants, else unique within the prompt
    demo: int  # index of the demonstration cut, -1 on-policy
    prefix_len: int  # demonstration tokens given as the start of the answer (0 on-policy)
    ratio: float  # realised prefix_len / |demo| (0 on-policy)


def build_variants(demo_lengths: list[list[int]], prompt_lengths, cfg: PrefixConfig, step: int,
                   rng: np.random.Generator, max_prompt_len: int) -> list[Variant]:
    """``cfg.num_prefix`` variants of each prompt (prompt-major). ``demo_lengths[b]``: token lengths
    of prompt b's demonstrations; ``prompt_lengths[b]``: its encoded length (template included).
    A prefix that would overflow ``max_prompt_len`` is trimmed; a prefix of length 0 (a one-token
    demonstration, or a prompt without demonstrations) makes the variant on-policy."""
    out = []
    for b, demos in enumerate(demo_lengths):
        for v in range(cfg.num_prefix):
            if v < cfg.num_empty_prefix or not demos:
                out.append(Variant(b, ON_POLICY_UID, -1, 0, 0.0))
                continue
            ratio = sample_ratio(cfg, step, rng)
            d = int(rng.integers(len(demos)))
            k = prefix_length(ratio, demos[d], cfg.min_prefix_len)
            k = _trim_to_bucket(k, int(prompt_lengths[b]), max_prompt_len, cfg.min_prefix_len)
            if k == 0:
                out.append(Variant(b, ON_POLICY_UID, -1, 0, 0.0))
            else:
                out.append(Variant(b, v, d, k, k / demos[d]))
    return out


def _trim_to_bucket(k: int, prompt_len: int, max_prompt_len: int, min_prefix_len: int) -> int:
    """Shorten a prefix so prompt + prefix fits the prompt bucket (the released code asserts the
    trimmed prefix stays >= min_prefix_len; here it is an error naming the bucket)."""
    over = prompt_len + k - max_prompt_len
    if k == 0 or over <= 0:
        return k
    if k - over < min_prefix_len:
        raise ValueError(
            f"rl.rollout.max_prompt_len={max_prompt_len}: a prompt of {prompt_len} tokens leaves "
            f"{max(k - over, 0)} prefix tokens (< prefix.min_prefix_len={min_prefix_len}); raise "
            "max_prompt_len or lower min_prefix_len")
    return k - over


def variant_arrays(variants: list[Variant], n: int) -> dict[str, np.ndarray]:
    """Per-rollout rows (n continuations per variant, variant-major): prompt [R], uid [R],
    prefix_len [R], ratio [R]; R = len(variants) · n."""
    rep = lambda xs, dt: np.repeat(np.asarray(xs, dt), n)  # noqa: E731
    return {"prompt": rep([v.prompt for v in variants], np.int32),
            "uid": rep([v.uid for v in variants], np.int32),
            "prefix_len": rep([v.prefix_len for v in variants], np.int32),
            "ratio": rep([v.ratio for v in variants], np.float32)}


def move_prefix_to_response(prompt_lengths, completion_lengths, prefix_lengths, width: int):
    """Rows generated from prompt+prefix (``prompt_lengths`` include the prefix) re-read with the
    prefix as the start of the response -> (prompt_lengths [R], completion_lengths [R],
    completion_mask [R, width-1], prefix_mask [R, width-1]), masks aligned with tokens[:, 1:] as
    the rollout's (target t is token t+1). Tokens themselves do not move."""
    k = np.asarray(prefix_lengths, np.int64)
    prompt = np.asarray(prompt_lengths, np.int64) - k
    if np.any(prompt < 1):
        raise ValueError("prefix_lengths exceed prompt_lengths: prompt_lengths must include the "
                         "prefix the rollout was given")
    completion = np.asarray(completion_lengths, np.int64) + k
    token = np.arange(1, width)[None, :]  # the token index each target position predicts
    start = prompt[:, None]
    completion_mask = (token >= start) & (token < start + completion[:, None])
    prefix_mask = (token >= start) & (token < start + k[:, None])
    return prompt.astype(np.int32), completion.astype(np.int32), completion_mask, prefix_mask


# -- advantages --------------------------------------------------------------------------------


def _group_means(reward: np.ndarray, keys: np.ndarray, singleton_own: bool) -> np.ndarray:
    """Mean reward of each row's group (rows sharing ``keys``) -> [R]; a singleton group's mean is
    0 (v1, verl) or its own reward (v2)."""
    _, inv, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    sums = np.bincount(inv, weights=reward)
    means = sums / counts
    if not singleton_own:
        means = np.where(counts > 1, means, 0.0)
    return means[inv]


def prefix_advantages(reward, prompt, uid, completion_mask, prefix_mask, n: int,
                      cfg: PrefixConfig = PrefixConfig()) -> np.ndarray:
    """Token advantages [R,T] (float32). Continuation tokens: r_i - mean over the rows with the
    same (prompt, uid). Prefix tokens of a prefixed row: (r_i - mean of the prompt's on-policy
    group) / n (``prefix_baseline='spec'``; 'released' subtracts the on-policy mean from the
    group-centred score instead). ``n`` = continuations per prefix."""
    reward = np.asarray(reward, np.float64)
    prompt, uid = np.asarray(prompt), np.asarray(uid)
    own = _group_means(reward, np.stack([prompt, uid], 1), cfg.advantage_form == "v2")
    cont = reward - own
    on = uid == ON_POLICY_UID
    on_means = {}
    for p in np.unique(prompt):
        rows = on & (prompt == p)
        if not rows.any():
            raise ValueError(f"prompt {int(p)} has no on-policy rollouts; prefix advantages are "
                             "baselined on them (prefix.num_empty_prefix >= 1)")
        r = reward[rows]
        singleton_zero = cfg.advantage_form == "v1" and len(r) == 1
        on_means[int(p)] = 0.0 if singleton_zero else float(r.mean())
    base = np.array([on_means[int(p)] for p in prompt])
    scored = cont if cfg.prefix_baseline == "released" else reward
    pre = np.where(on, 0.0, (scored - base) / n)
    cmask = np.asarray(completion_mask, bool)
    pmask = np.asarray(prefix_mask, bool) & cmask
    out = np.where(pmask, pre[:, None], np.where(cmask, cont[:, None], 0.0))
    return out.astype(np.float32)


# -- loss-side pieces (inside the update step) -------------------------------------------------


def entropy_prefix_mask(entropy, prefix_mask, mask_ratio):
    """Which tokens keep their advantage [n,T] (bool): all but the floor(ratio · #prefix) prefix
    tokens of lowest entropy (stable order on ties). ``mask_ratio`` may be a traced scalar (the
    scheduled ``cfg.entropy_mask`` value), so a new ratio does not recompile. JAX."""
    pm = jnp.asarray(prefix_mask, bool)
    flat_pm = pm.reshape(-1)
    key = jnp.where(flat_pm, jnp.asarray(entropy, jnp.float32).reshape(-1), jnp.inf)
    order = jnp.argsort(key, stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
    cut = jnp.floor(jnp.sum(flat_pm) * jnp.asarray(mask_ratio, jnp.float32)).astype(rank.dtype)
    dropped = flat_pm & (rank < cut)
    return ~dropped.reshape(pm.shape)


def prefix_log_ratio(logprobs, old_logprobs, prefix_mask, reshaper: str):
    """log ρ per token [n,T]: log π - log π_old, except on prefix tokens under a reshaper:
    ``importance_sampling`` log π (ρ = π), ``luffy`` log π - log(π + 0.1) (ρ = π/(π+0.1))."""
    log_ratio = logprobs - old_logprobs
    if reshaper == "identity":
        return log_ratio
    shaped = logprobs if reshaper == "importance_sampling" else (
        logprobs - jnp.log(jnp.exp(logprobs) + 0.1))
    return jnp.where(prefix_mask, shaped, log_ratio)


def prefix_surrogate(logprobs, old_logprobs, advantages, completion_mask, prefix_mask,
                     cfg: PrefixConfig, eps_low: float, eps_high: float, dual_clip: float | None):
    """Per-token loss [n,T] of the one clipped surrogate over continuation and prefix tokens:
    continuation tokens with (eps_low, eps_high, dual_clip); prefix tokens with the reshaped
    ratio and their own range (``eps_*_off``, defaulting to the same) or unclipped; 0 outside
    ``completion_mask`` (padding values, even -inf, reach no value or gradient). Aggregate with
    ``moejax.rl.losses.aggregate`` (the paper: ``dr_grpo`` with ``dr_grpo_form='verl'``)."""
    cm = jnp.asarray(completion_mask, bool)
    clean = lambda x: jnp.where(cm, jnp.asarray(x, jnp.float32), 0.0)  # noqa: E731
    logprobs, old_logprobs, advantages = clean(logprobs), clean(old_logprobs), clean(advantages)
    pm = jnp.asarray(prefix_mask, bool) & cm
    ratio = jnp.exp(prefix_log_ratio(logprobs, old_logprobs, pm, cfg.reshaper))
    on_loss = clipped_surrogate(ratio, advantages, eps_low, eps_high, dual_clip)[0]
    if cfg.prefix_clip:
        lo = eps_low if cfg.eps_low_off is None else cfg.eps_low_off
        hi = eps_high if cfg.eps_high_off is None else cfg.eps_high_off
        off_loss = clipped_surrogate(ratio, advantages, lo, hi, dual_clip)[0]
    else:
        off_loss = -advantages * ratio
    return jnp.where(cm, jnp.where(pm, off_loss, on_loss), 0.0)


def entropy_bonus_mask(completion_mask, prefix_mask, scope: str):
    """Tokens the entropy bonus covers [n,T]: the continuation only, or every response token."""
    cm = jnp.asarray(completion_mask, jnp.float32)
    if scope == "all":
        return cm
    return cm * (1.0 - jnp.asarray(prefix_mask, jnp.float32))


def prefix_old_logprobs(old_logprobs, recomputed, prefix_mask):
    """π_old with the prefix tokens' values from the trainer's recompute (the rollout never
    sampled them, so a bypass π_old has no value there) -> [n,T]."""
    return np.where(np.asarray(prefix_mask, bool), recomputed, old_logprobs)


def prefix_metrics(prefix_mask, completion_mask) -> dict[str, float]:
    """Prefix-token share of the response tokens ("off_ratio", logged every step)."""
    pm = np.asarray(prefix_mask, bool) & np.asarray(completion_mask, bool)
    return {"prefix/token_share": float(pm.sum() / max(np.asarray(completion_mask).sum(), 1))}

