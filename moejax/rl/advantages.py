"""Critic-free advantages from outcome rewards, as pure JAX functions of the rollout pytree's
``reward [N]`` and ``group [N]`` (dense prompt ids in ``[0, num_groups)``), plus DAPO's
dynamic-sampling filter and overlong shaping, and KL folded into the reward.

Estimators (spec ../shared/methods/rl-and-data.md A.1; ``n_g`` = size of completion i's group):
- ``grpo``:    A_i = (r_i - mean_g) / (std_g + eps); std with ``ddof`` (1 = unbiased, tunix/verl).
- ``dr_grpo``: A_i = r_i - mean_g (no std division).
- ``rloo``:    A_i = r_i - (sum_g - r_i) / (n_g - 1)  (leave-one-out mean;
               = n_g/(n_g-1) (r_i - mean_g)).
``norm_by_std`` divides grpo/rloo by (std_g + eps) (verl's ``norm_adv_by_std_in_grpo``).
Groups may have different sizes: every statistic is a segment sum over ``group``.

A singleton group has no baseline. ``singleton="error"`` (default) refuses it on concrete inputs
(under tracing it falls back to "zero"); ``"zero"`` gives advantage 0 (no signal); ``"verl"`` uses
verl's mean 0, std 1, i.e. A = r / (1 + eps) with std on (r without it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config_checks import ConfigError, _check_choice, _check_positive, _fail

ESTIMATORS = ("grpo", "dr_grpo", "rloo")
SINGLETON_RULES = ("error", "zero", "verl")
FILTER_RULES = ("nonzero_std", "mean_in_range")


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
    """How group advantages are computed (see the module docstring for the formulas)."""

    estimator: str = "grpo"
    norm_by_std: bool | None = None  # None: True for grpo, False for dr_grpo and rloo
    std_ddof: int = 1  # 1 = unbiased std (tunix, verl); 0 = population std
    eps: float = 1e-6
    singleton: str = "error"

    def __post_init__(self):
        _check_choice("advantage.estimator", self.estimator, ESTIMATORS)
        _check_choice("advantage.singleton", self.singleton, SINGLETON_RULES)
        if self.std_ddof not in (0, 1):
            _fail("advantage.std_ddof", self.std_ddof,
                  "use 1 (unbiased, tunix/verl) or 0 (population)")
        if not self.eps >= 0:
            _fail("advantage.eps", self.eps, "must be >= 0")
        if self.estimator == "dr_grpo" and self.norm_by_std:
            _fail("advantage.norm_by_std", self.norm_by_std,
                  "dr_grpo means no std division; use estimator='grpo' to divide by the std")

    @property
    def divides_by_std(self) -> bool:
        """Whether advantages are divided by the group std."""
        return self.estimator == "grpo" if self.norm_by_std is None else bool(self.norm_by_std)


def check_group_sizes(group, num_groups: int, field: str = "rollout.num_generations") -> None:
    """Raise ConfigError naming ``field`` when a group has fewer than 2 completions (host check)."""
    sizes = np.bincount(np.asarray(group).reshape(-1), minlength=num_groups)
    small = np.flatnonzero(sizes < 2)
    if small.size:
        raise ConfigError(
            f"{field}: group {int(small[0])} has {int(sizes[small[0]])} completion(s); group "
            f"advantages need G >= 2 completions per prompt (set {field} >= 2)")


def dense_group_ids(prompt_ids) -> tuple[np.ndarray, int]:
    """Host-side map of arbitrary prompt ids [N] to dense ids in [0, num_groups) and num_groups."""
    _, dense = np.unique(np.asarray(prompt_ids).reshape(-1), return_inverse=True)
    return dense.astype(np.int32), int(dense.max()) + 1 if dense.size else 0


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def group_stats(reward, group, num_groups: int, ddof: int = 1):
    """Per-group size, sum, mean and std of ``reward [N]`` -> four [num_groups] arrays."""
    reward = reward.astype(jnp.float32)
    size = jax.ops.segment_sum(jnp.ones_like(reward), group, num_groups)
    total = jax.ops.segment_sum(reward, group, num_groups)
    mean = total / jnp.maximum(size, 1.0)
    sq_dev = jax.ops.segment_sum((reward - mean[group]) ** 2, group, num_groups)
    std = jnp.sqrt(sq_dev / jnp.maximum(size - ddof, 1.0))
    return size, total, mean, std


def group_advantages(reward, group, num_groups: int, cfg: AdvantageConfig = AdvantageConfig()):
    """Sequence advantages [N] from ``reward [N]`` and dense group ids ``group [N]``."""
    if cfg.singleton == "error" and _is_concrete(group):
        check_group_sizes(group, num_groups)
    size, total, mean, std = group_stats(reward, group, num_groups, cfg.std_ddof)
    reward = reward.astype(jnp.float32)
    n = size[group]
    if cfg.estimator == "rloo":
        adv = reward - (total[group] - reward) / jnp.maximum(n - 1.0, 1.0)
    else:
        adv = reward - mean[group]
    if cfg.divides_by_std:
        adv = adv / (std[group] + cfg.eps)
    singleton = n < 2
    if cfg.singleton == "verl":
        verl_value = reward / (1.0 + cfg.eps) if cfg.divides_by_std else reward
        return jnp.where(singleton, verl_value, adv)
    return jnp.where(singleton, 0.0, adv)


def token_advantages(seq_advantages, completion_mask):
    """Broadcast sequence advantages [N] to tokens [N,T], zero outside the completion."""
    return seq_advantages[:, None] * completion_mask.astype(jnp.float32)


# -- DAPO ----------------------------------------------------------------------------------------


def group_signal_mask(reward, group, num_groups: int, rule: str = "nonzero_std",
                      mean_range: tuple[float, float] = (0.0, 1.0), tol: float = 0.0):
    """Which groups carry a learning signal -> bool [num_groups] (DAPO dynamic sampling).

    ``nonzero_std`` (DAPO, verl ``filter_groups``): rewards not all equal (max - min > tol).
    ``mean_in_range`` (OpenRLHF): group mean strictly inside ``mean_range``. Empty groups are False.
    The refill loop (sample more prompts until the batch is full) is the trainer's job.
    """
    _check_choice("dapo.filter_rule", rule, FILTER_RULES)
    reward = reward.astype(jnp.float32)
    size = jax.ops.segment_sum(jnp.ones_like(reward), group, num_groups)
    present = size > 0
    if rule == "nonzero_std":
        hi = jax.ops.segment_max(reward, group, num_groups)
        lo = jax.ops.segment_min(reward, group, num_groups)
        return present & (hi - lo > tol)
    mean = jax.ops.segment_sum(reward, group, num_groups) / jnp.maximum(size, 1.0)
    return present & (mean > mean_range[0]) & (mean < mean_range[1])


def kept_completions(group_mask, group):
    """Per-completion keep mask [N] from a group mask [num_groups]."""
    return group_mask[group]


def kept_group_indices(group_mask) -> np.ndarray:
    """Host-side indices of the kept groups (for the trainer's refill loop)."""
    return np.flatnonzero(np.asarray(group_mask))


def effective_gradient_ratio(reward, group, num_groups: int):
    """Share of present groups with non-zero reward variance (D.3 metric), a scalar."""
    signal = group_signal_mask(reward, group, num_groups, "nonzero_std")
    present = jax.ops.segment_sum(jnp.ones_like(reward, jnp.float32), group, num_groups) > 0
    return jnp.sum(signal) / jnp.maximum(jnp.sum(present), 1)


def overlong_penalty(length, max_len: int, cache_len: int, factor: float = 1.0):
    """DAPO soft overlong punishment added to the reward, by *token* length [N] -> [N].

    0 for len <= L_max - L_cache; factor * ((L_max - L_cache) - len) / L_cache in between
    (falls linearly to -factor at L_max); -factor beyond L_max. Token counts, not characters as in
    tunix (A.1 note 5).
    """
    _check_positive("dapo.overlong_cache_len", cache_len)
    if cache_len > max_len:
        _fail("dapo.overlong_cache_len", cache_len, f"must be <= max_len={max_len}")
    length = jnp.asarray(length, jnp.float32)
    start = max_len - cache_len
    soft = (start - length) / cache_len
    penalty = jnp.where(length <= start, 0.0, jnp.where(length <= max_len, soft, -1.0))
    return factor * penalty


# -- KL folded into the reward -------------------------------------------------------------------


def kl_penalized_reward(reward, kl_tokens, completion_mask, coef: float):
    """Sequence reward minus the summed per-token KL: r_i - coef * sum_t m k_t -> [N].

    Use before group advantages (KL in reward, verl ``use_kl_in_reward``). ``kl_tokens`` come from
    ``moejax.rl.kl.kl_estimate`` against the frozen reference and carry no gradient here.
    """
    kl = jax.lax.stop_gradient(kl_tokens) * completion_mask
    return reward - coef * jnp.sum(kl, axis=-1)


def kl_penalized_token_rewards(reward, kl_tokens, completion_mask, coef: float):
    """Per-token rewards [N,T]: -coef * k_t on every completion token, r_i added on the last one.

    The token form of ``kl_penalized_reward`` (verl's ``apply_kl_penalty``); its sum over t is the
    sequence form, which is what the group estimators above consume.
    """
    mask = completion_mask.astype(jnp.float32)
    t = jnp.arange(mask.shape[-1])
    last = jnp.max(jnp.where(mask > 0, t, -1), axis=-1)  # [N]; -1 for an empty completion
    at_last = (t[None, :] == last[:, None]).astype(jnp.float32)
    return at_last * reward[:, None] - coef * jax.lax.stop_gradient(kl_tokens) * mask
