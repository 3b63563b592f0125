"""Group advantages (GRPO, Dr.GRPO, RLOO), DAPO filtering and overlong shaping, KL in the reward:
each against a float64 loop written here, independent of moejax.rl.advantages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config_checks import ConfigError
from moejax.rl import advantages as adv
from moejax.rl.advantages import AdvantageConfig

SIZES = (4, 3, 5, 2, 4)  # variable group sizes, shuffled into a batch


def _batch(seed=0, sizes=SIZES, binary=False):
    rng = np.random.default_rng(seed)
    group = np.concatenate([np.full(n, g) for g, n in enumerate(sizes)])
    group = group[rng.permutation(len(group))]
    reward = (rng.integers(0, 2, len(group)) if binary else rng.normal(size=len(group)))
    return reward.astype(np.float32), group.astype(np.int32)


def _reference(reward, group, estimator, divide_by_std, ddof=1, eps=1e-6, singleton="zero"):
    """Loop reference: one group at a time, float64."""
    reward = reward.astype(np.float64)
    out = np.zeros_like(reward)
    for g in np.unique(group):
        idx = np.flatnonzero(group == g)
        r = reward[idx]
        n = len(r)
        if n == 1:
            if singleton == "verl":
                out[idx] = r / (1 + eps) if divide_by_std else r
            continue
        for k, i in enumerate(idx):
            if estimator == "rloo":
                others = [r[j] for j in range(n) if j != k]
                a = r[k] - sum(others) / (n - 1)
            else:
                a = r[k] - sum(r) / n
            if divide_by_std:
                mean = sum(r) / n
                std = (sum((x - mean) ** 2 for x in r) / (n - ddof)) ** 0.5
                a = a / (std + eps)
            out[i] = a
    return out


CASES = [("grpo", None, 1), ("grpo", None, 0), ("grpo", False, 1), ("dr_grpo", None, 1),
         ("rloo", None, 1), ("rloo", True, 1)]


@pytest.mark.parametrize("estimator,norm,ddof", CASES)
def test_advantages_match_loop_reference(estimator, norm, ddof):
    reward, group = _batch(seed=1)
    cfg = AdvantageConfig(estimator=estimator, norm_by_std=norm, std_ddof=ddof)
    got = adv.group_advantages(jnp.asarray(reward), jnp.asarray(group), len(SIZES), cfg)
    divide = estimator == "grpo" if norm is None else norm
    want = _reference(reward, group, estimator, divide, ddof)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_advantages_under_jit_equal_eager():
    reward, group = _batch(seed=2)
    cfg = AdvantageConfig()
    jitted = jax.jit(adv.group_advantages, static_argnums=(2, 3))
    got = jitted(jnp.asarray(reward), jnp.asarray(group), len(SIZES), cfg)
    np.testing.assert_allclose(np.asarray(got), _reference(reward, group, "grpo", True),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_advantages_sum_to_zero_per_group(estimator):
    reward, group = _batch(seed=3)
    got = np.asarray(adv.group_advantages(jnp.asarray(reward), jnp.asarray(group), len(SIZES),
                                          AdvantageConfig(estimator=estimator)), np.float64)
    sums = np.bincount(group, weights=got)
    np.testing.assert_allclose(sums, 0.0, atol=1e-5)
    assert np.abs(got).max() > 0.1  # not trivially zero


def test_dr_grpo_has_no_std_division():
    """Scaling rewards by 7 scales Dr.GRPO advantages by 7 and leaves GRPO's unchanged."""
    reward, group = _batch(seed=4)
    run = lambda r, e: np.asarray(adv.group_advantages(  # noqa: E731
        jnp.asarray(r), jnp.asarray(group), len(SIZES), AdvantageConfig(estimator=e)))
    np.testing.assert_allclose(run(7 * reward, "dr_grpo"), 7 * run(reward, "dr_grpo"), rtol=1e-5)
    np.testing.assert_allclose(run(7 * reward, "grpo"), run(reward, "grpo"), rtol=1e-4, atol=1e-5)
    means = {g: reward[group == g].mean() for g in set(group.tolist())}
    np.testing.assert_allclose(run(reward, "dr_grpo"), reward - np.array([means[g] for g in group]),
                               atol=1e-6)


def test_zero_variance_group_gets_zero_advantage():
    reward = np.array([1, 1, 1, 0, 1, 0], np.float32)
    group = np.array([0, 0, 0, 1, 1, 1], np.int32)
    got = np.asarray(adv.group_advantages(jnp.asarray(reward), jnp.asarray(group), 2))
    np.testing.assert_allclose(got[:3], 0.0)
    np.testing.assert_allclose(got[3:], _reference(reward, group, "grpo", True)[3:], rtol=1e-5)


def test_group_smaller_than_two_is_refused_naming_the_field():
    reward, group = _batch(seed=5, sizes=(3, 1, 2))
    with pytest.raises(ConfigError, match=r"rollout\.num_generations.*G >= 2"):
        adv.group_advantages(jnp.asarray(reward), jnp.asarray(group), 3)


@pytest.mark.parametrize("singleton", ["zero", "verl"])
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_singleton_group_rules(singleton, estimator):
    reward, group = _batch(seed=6, sizes=(3, 1, 2))
    cfg = AdvantageConfig(estimator=estimator, singleton=singleton)
    got = adv.group_advantages(jnp.asarray(reward), jnp.asarray(group), 3, cfg)
    want = _reference(reward, group, estimator, estimator == "grpo", singleton=singleton)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,field", [
    ({"estimator": "ppo"}, "advantage.estimator"), ({"std_ddof": 2}, "advantage.std_ddof"),
    ({"estimator": "dr_grpo", "norm_by_std": True}, "advantage.norm_by_std"),
    ({"eps": -1.0}, "advantage.eps"), ({"singleton": "drop"}, "advantage.singleton")])
def test_advantage_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        AdvantageConfig(**kwargs)


def test_token_advantages_broadcast_under_completion_mask():
    seq = np.array([0.5, -2.0], np.float32)
    mask = np.array([[0, 1, 1, 0], [0, 0, 1, 1]], np.float32)
    got = np.asarray(adv.token_advantages(jnp.asarray(seq), jnp.asarray(mask)))
    np.testing.assert_array_equal(got, [[0, 0.5, 0.5, 0], [0, 0, -2.0, -2.0]])


# -- DAPO ----------------------------------------------------------------------------------------


def test_dynamic_sampling_mask_and_effective_gradient_ratio():
    reward, group = _batch(seed=7, sizes=(4, 4, 4, 4, 4, 4), binary=True)
    reward[group == 0] = 1.0  # all solved: no signal
    reward[group == 1] = 0.0  # all failed: no signal
    reward[np.flatnonzero(group == 2)[:2]] = [0.0, 1.0]  # mixed
    got = np.asarray(adv.group_signal_mask(jnp.asarray(reward), jnp.asarray(group), 7))
    want = [len(set(reward[group == g].tolist())) > 1 for g in range(6)] + [False]  # 6: empty
    np.testing.assert_array_equal(got, want)
    assert not got[0] and not got[1] and got[2]
    np.testing.assert_array_equal(np.asarray(adv.kept_completions(jnp.asarray(got), group)),
                                  [want[g] for g in group])
    np.testing.assert_array_equal(adv.kept_group_indices(got), np.flatnonzero(want))
    ratio = float(adv.effective_gradient_ratio(jnp.asarray(reward), jnp.asarray(group), 7))
    assert ratio == pytest.approx(sum(want) / 6)


def test_mean_in_range_filter_is_strict():
    reward = np.array([1, 1, 0, 1, 0, 0, 0.5, 0.5], np.float32)
    group = np.array([0, 0, 1, 1, 2, 2, 3, 3], np.int32)
    got = adv.group_signal_mask(jnp.asarray(reward), jnp.asarray(group), 4, "mean_in_range",
                                (0.0, 1.0))
    np.testing.assert_array_equal(np.asarray(got), [False, True, False, True])


def test_overlong_penalty_matches_dapo_formula():
    max_len, cache = 20, 8
    lengths = np.arange(0, 26)
    got = np.asarray(adv.overlong_penalty(jnp.asarray(lengths), max_len, cache, factor=0.5))
    want = []
    for n in lengths:
        if n <= max_len - cache:
            want.append(0.0)
        elif n <= max_len:
            want.append(0.5 * ((max_len - cache) - n) / cache)
        else:
            want.append(-0.5)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert got[max_len] == pytest.approx(-0.5) and got[max_len - cache] == 0.0
    with pytest.raises(ConfigError, match="overlong_cache_len"):
        adv.overlong_penalty(jnp.asarray(lengths), 4, 8)


def test_kl_folded_into_reward_sequence_and_token_forms():
    rng = np.random.default_rng(8)
    reward = rng.normal(size=3).astype(np.float32)
    kl = rng.normal(size=(3, 5)).astype(np.float32)
    mask = np.array([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 0]], np.float32)
    seq = np.asarray(adv.kl_penalized_reward(jnp.asarray(reward), jnp.asarray(kl),
                                             jnp.asarray(mask), 0.1))
    want = [reward[i] - 0.1 * sum(kl[i, t] for t in range(5) if mask[i, t]) for i in range(3)]
    np.testing.assert_allclose(seq, want, rtol=1e-6)
    tok = np.asarray(adv.kl_penalized_token_rewards(jnp.asarray(reward), jnp.asarray(kl),
                                                    jnp.asarray(mask), 0.1))
    assert tok[0, 3] == pytest.approx(reward[0] - 0.1 * kl[0, 3]) and tok[0, 4] == 0.0
    np.testing.assert_allclose(tok.sum(-1), want, rtol=1e-5, atol=1e-6)


def test_dense_group_ids_map_arbitrary_prompt_ids():
    dense, num_groups = adv.dense_group_ids(np.array([70, 3, 70, 12, 3, 12]))
    np.testing.assert_array_equal(dense, [2, 0, 2, 1, 0, 1])
    assert num_groups == 3
