"""RL method cores of issue #14 (methods/rl-and-data.md B.1-B.4): Prefix-RFT, mini-batch samplers,
token flips, reward calibration, rollout budgets. Each rule against a hand-computed value or a
float64 loop / brute force written here, plus JSON state round-trips."""

from __future__ import annotations

import functools
import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax.config_checks import ConfigError
from moejax.rl import budget, calibration, flips, losses, minibatch, prefix
from moejax.rl.prefix import PrefixConfig, ScheduleConfig
from moejax.rl.rollout import result_masks

# -- B.1 Prefix-RFT: schedules and the ratio sampler -------------------------------------------


def test_linear_schedule_with_warmup_by_hand():
    cfg = ScheduleConfig(kind="linear", init=0.9, target=0.1, n_steps=10, warmup_ratio=0.2)
    # warm-up of 2 steps from 0 to init, then 10 steps of linear decay, then the target
    want = {0: 0.0, 1: 0.45, 2: 0.9, 7: 0.1 + 0.5 * 0.8, 11: 0.1 + 0.1 * 0.8, 12: 0.1, 50: 0.1}
    for step, value in want.items():
        assert prefix.schedule_value(cfg, step) == pytest.approx(value, abs=1e-12), step


def test_cosine_schedule_decay_rise_and_delay_by_hand():
    decay = ScheduleConfig(kind="cosine", init=0.95, target=0.05, n_steps=8)
    assert prefix.schedule_value(decay, 0) == pytest.approx(0.95)
    assert prefix.schedule_value(decay, 4) == pytest.approx(0.5)  # half-way: cos(π/2) = 0
    quarter = math.cos(math.pi / 4)
    assert prefix.schedule_value(decay, 2) == pytest.approx(0.05 + 0.9 * (1 + quarter) / 2)
    assert prefix.schedule_value(decay, 9) == pytest.approx(0.05)
    rise = ScheduleConfig(kind="cosine", init=0.1, target=0.7, n_steps=4)
    assert prefix.schedule_value(rise, 1) == pytest.approx(0.1 + 0.6 * (1 - quarter) / 2)
    delayed = ScheduleConfig(kind="cosine", init=0.95, target=0.05, n_steps=8, delay_steps=3,
                             delay_value=1.0)
    assert [prefix.schedule_value(delayed, s) for s in (0, 2)] == [1.0, 1.0]
    assert prefix.schedule_value(delayed, 3 + 4) == pytest.approx(0.5)
    const = ScheduleConfig(kind="const", init=0.3, warmup_ratio=0.5)
    assert prefix.schedule_value(const, 0) == 0.3  # the released const controller has no warm-up


def test_ratio_sampler_is_low_plus_span_times_beta():
    cfg = PrefixConfig(low=ScheduleConfig(init=0.7), high=ScheduleConfig(init=0.2), beta_a=2.0,
                       beta_b=5.0)
    assert prefix.ratio_bounds(cfg, 0) == (0.2, 0.7)  # the bounds are ordered
    got = [prefix.sample_ratio(cfg, 0, np.random.default_rng(7)) for _ in range(2)]
    beta = np.random.default_rng(7).beta(2.0, 5.0)
    assert got == [0.2 + (0.7 - 0.2) * beta] * 2
    draws = np.array([prefix.sample_ratio(cfg, 0, r) for r in [np.random.default_rng(1)] * 4000])
    assert draws.min() >= 0.2 and draws.max() <= 0.7
    assert draws.mean() == pytest.approx(0.2 + 0.5 * 2 / 7, abs=0.01)  # Beta(2,5) mean 2/7


def test_schedule_and_prefix_config_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"prefix\.schedule\.kind"):
        ScheduleConfig(kind="exp")
    with pytest.raises(ConfigError, match=r"prefix\.num_empty_prefix"):
        PrefixConfig(num_prefix=2, num_empty_prefix=0)
    with pytest.raises(ConfigError, match=r"prefix\.reshaper"):
        PrefixConfig(reshaper="silu")


# -- B.1 variants, lengths and the response layout ---------------------------------------------


@pytest.mark.parametrize("ratio,demo,min_len,want", [
    (0.5, 10, 1, 5), (0.01, 10, 3, 3), (0.99, 10, 1, 9), (1.0, 10, 1, 9), (0.0, 10, 1, 0),
    (0.5, 1, 1, 0), (0.37, 20, 1, 7)])
def test_prefix_length_floor_and_clamps(ratio, demo, min_len, want):
    assert prefix.prefix_length(ratio, demo, min_len) == want


def test_build_variants_uids_lengths_and_trimming():
    cfg = PrefixConfig(num_prefix=3, num_empty_prefix=1,
                       low=ScheduleConfig(init=0.5), high=ScheduleConfig(init=0.5))
    demos = [[10, 20], [40]]
    out = prefix.build_variants(demos, [5, 30], cfg, 0, np.random.default_rng(0), max_prompt_len=40)
    assert [(v.prompt, v.uid) for v in out] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert [v.prefix_len for v in out if v.prompt == 0 and v.uid] == [
        demos[0][v.demo] // 2 for v in out if v.prompt == 0 and v.uid]
    assert [v.prefix_len for v in out if v.prompt == 1] == [0, 10, 10]  # 20 trimmed to 40 - 30
    assert out[4].ratio == pytest.approx(10 / 40)
    with pytest.raises(ValueError, match=r"rl\.rollout\.max_prompt_len"):
        prefix.build_variants([[40]], [39], PrefixConfig(
            num_prefix=2, min_prefix_len=4, low=ScheduleConfig(init=0.5),
            high=ScheduleConfig(init=0.5)), 0, np.random.default_rng(0), max_prompt_len=40)
    rows = prefix.variant_arrays(out, n=2)
    np.testing.assert_array_equal(rows["uid"], [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(rows["prompt"], [0] * 6 + [1] * 6)


def test_build_variants_resume_draws_identical_prefixes():
    """The draws are a function of the (seed, step)-keyed generator: a restart recomputes them."""
    cfg = PrefixConfig(num_prefix=4, num_empty_prefix=1)
    demos, plen = [[30, 50, 12], [25]], [6, 9]

    def at(step):
        rng = np.random.default_rng([3, step, prefix.PREFIX_SALT])
        return prefix.build_variants(demos, plen, cfg, step, rng, max_prompt_len=64)

    assert at(5) == at(5)
    assert at(5) != at(6)


def test_move_prefix_to_response_by_hand_and_against_rollout_masks():
    # row 0: prompt 3 tokens + prefix 2 given to the rollout (length 5), 3 sampled tokens
    # row 1: an on-policy row (no prefix): prompt 4, 2 sampled tokens
    plen, clen, width = np.array([5, 4]), np.array([3, 2]), 12
    p, c, cm, pm = prefix.move_prefix_to_response(plen, clen, np.array([2, 0]), width)
    np.testing.assert_array_equal(p, [3, 4])
    np.testing.assert_array_equal(c, [5, 2])
    # target t predicts token t+1: row 0's response is tokens 3..7 -> t in [2, 7),
    # its prefix t in [2, 4)
    np.testing.assert_array_equal(np.flatnonzero(cm[0]), [2, 3, 4, 5, 6])
    np.testing.assert_array_equal(np.flatnonzero(pm[0]), [2, 3])
    assert not pm[1].any()
    ref, _ = result_masks(jnp.asarray(p), jnp.asarray(c), width)
    np.testing.assert_array_equal(cm, np.asarray(ref))


# -- B.1 advantages ----------------------------------------------------------------------------


def _prefix_adv_loop(reward, prompt, uid, cmask, pmask, n, form="v1", baseline="spec"):
    """float64 loop reference of the released Dr.GRPO prefix advantage (spec B.1)."""
    R, T = cmask.shape
    groups = {}
    for i in range(R):
        groups.setdefault((prompt[i], uid[i]), []).append(reward[i])

    def mean(key):
        vals = groups[key]
        if len(vals) == 1 and form == "v1":
            return 0.0
        return sum(vals) / len(vals)

    out = np.zeros((R, T))
    for i in range(R):
        cont = reward[i] - mean((prompt[i], uid[i]))
        scored = cont if baseline == "released" else reward[i]
        pre = 0.0 if uid[i] == 0 else (scored - mean((prompt[i], 0))) / n
        for t in range(T):
            if cmask[i, t]:
                out[i, t] = pre if pmask[i, t] else cont
    return out


def test_prefix_advantages_by_hand():
    # one prompt, n = 2: on-policy rewards [1, 0] (mean 0.5), one prefix group [1, 1] (mean 1)
    reward = np.array([1.0, 0.0, 1.0, 1.0])
    prompt, uid = np.zeros(4, int), np.array([0, 0, 1, 1])
    cmask = np.ones((4, 4), bool)
    pmask = np.zeros((4, 4), bool)
    pmask[2:, :2] = True  # the prefixed rows start with 2 prefix tokens
    got = prefix.prefix_advantages(reward, prompt, uid, cmask, pmask, n=2)
    np.testing.assert_allclose(got[0], 0.5)
    np.testing.assert_allclose(got[1], -0.5)
    np.testing.assert_allclose(got[2:, 2:], 0.0)  # continuation: 1 - mean(1, 1)
    np.testing.assert_allclose(got[2:, :2], (1.0 - 0.5) / 2)  # prefix: on-policy baseline / n
    released = prefix.prefix_advantages(reward, prompt, uid, cmask, pmask, 2,
                                        PrefixConfig(prefix_baseline="released"))
    np.testing.assert_allclose(released[2:, :2], ((1.0 - 1.0) - 0.5) / 2)


@pytest.mark.parametrize("form,baseline", [("v1", "spec"), ("v2", "spec"), ("v1", "released")])
def test_prefix_advantages_match_loop_on_random_batches(form, baseline):
    rng = np.random.default_rng(11)
    # 3 prompts; uid 0 on-policy (n rows each), prefixed uids with n rows, one singleton group
    prompt = np.array([0] * 4 + [0] * 4 + [1] * 4 + [1] * 4 + [1] * 4 + [2] * 4 + [2])
    uid = np.array([0] * 4 + [1] * 4 + [0] * 4 + [1] * 4 + [2] * 4 + [0] * 4 + [3])
    R, T = len(prompt), 9
    reward = rng.normal(size=R)
    lengths = rng.integers(2, T + 1, R)
    cmask = np.arange(T)[None] < lengths[:, None]
    k = np.where(uid > 0, rng.integers(1, 3, R), 0)
    pmask = np.arange(T)[None] < k[:, None]
    cfg = PrefixConfig(advantage_form=form, prefix_baseline=baseline)
    got = prefix.prefix_advantages(reward, prompt, uid, cmask, pmask, 4, cfg)
    want = _prefix_adv_loop(reward, prompt, uid, cmask, pmask, 4, form, baseline)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    singleton = np.flatnonzero(uid == 3)[0]
    if form == "v2":
        np.testing.assert_allclose(got[singleton][cmask[singleton] & ~pmask[singleton]], 0.0)


def test_prefix_advantages_need_an_on_policy_group():
    with pytest.raises(ValueError, match="on-policy"):
        prefix.prefix_advantages(np.ones(2), np.zeros(2, int), np.array([1, 1]),
                                 np.ones((2, 2), bool), np.zeros((2, 2), bool), 2)


# -- B.1 loss-side pieces ----------------------------------------------------------------------


def test_entropy_prefix_mask_drops_the_lowest_entropy_share():
    entropy = np.array([[0.5, 0.1, 0.9, 2.0], [0.3, 0.7, 0.05, 3.0]])
    pm = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)  # 5 prefix tokens
    keep = np.asarray(prefix.entropy_prefix_mask(entropy, pm, 0.8))  # floor(4.0) lowest dropped
    np.testing.assert_array_equal(keep, [[False, False, True, True], [False, False, True, True]])
    keep = np.asarray(jax.jit(prefix.entropy_prefix_mask)(entropy, pm, jnp.float32(0.5)))
    np.testing.assert_array_equal(keep, [[True, False, True, True], [False, True, True, True]])
    assert np.asarray(prefix.entropy_prefix_mask(entropy, pm, 0.0)).all()


def test_prefix_surrogate_reshapers_and_prefix_clip_by_hand():
    lp = jnp.log(jnp.array([[0.5, 0.5, 0.9]]))
    old = jnp.log(jnp.array([[0.25, 0.25, 0.5]]))  # ρ = 2, 2, 1.8
    adv = jnp.array([[1.0, 1.0, -1.0]])
    pm = jnp.array([[True, False, False]])
    cm3 = jnp.ones((1, 3), bool)
    base = dict(eps_low=0.2, eps_high=0.2, dual_clip=None)

    def loss(cfg):
        return np.asarray(prefix.prefix_surrogate(lp, old, adv, cm3, pm, cfg, **base))

    np.testing.assert_allclose(loss(PrefixConfig()), [[-1.2, -1.2, 1.8]], rtol=1e-6)  # clip 1.2
    np.testing.assert_allclose(loss(PrefixConfig(eps_high_off=0.5)), [[-1.5, -1.2, 1.8]], rtol=1e-6)
    np.testing.assert_allclose(loss(PrefixConfig(prefix_clip=False)), [[-2.0, -1.2, 1.8]],
                               rtol=1e-6)
    # importance_sampling: ρ_prefix = π = 0.5; luffy: ρ_prefix = π / (π + 0.1)
    np.testing.assert_allclose(loss(PrefixConfig(reshaper="importance_sampling")),
                               [[-0.5, -1.2, 1.8]], rtol=1e-6)
    luffy = PrefixConfig(reshaper="luffy")
    np.testing.assert_allclose(loss(luffy), [[-0.5 / 0.6, -1.2, 1.8]], rtol=1e-6)
    # luffy's gradient: d/dlogπ of -π/(π+0.1) = -0.1π/(π+0.1)^2
    g = jax.grad(lambda x: prefix.prefix_surrogate(x, old, adv, cm3, pm, luffy, **base)[0, 0])(lp)
    np.testing.assert_allclose(float(g[0, 0]), -0.1 * 0.5 / 0.6 ** 2, rtol=1e-5)


def _prefix_loss_batch(seed=0, n=16, T=10):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, T + 1, n)
    cm = np.arange(T)[None] < lengths[:, None]
    pm = cm & (np.arange(T)[None] < rng.integers(0, 3, n)[:, None])
    old = np.log(rng.uniform(0.05, 1.0, (n, T)))
    batch = {"lp": old + rng.normal(scale=0.3, size=(n, T)), "old": old,
             "adv": rng.normal(size=(n, T)), "entropy": rng.uniform(0, 2, (n, T)), "cm": cm,
             "pm": pm}
    return {k: np.where(cm, v, -np.inf) if k in ("lp", "old") else v for k, v in batch.items()}


@functools.partial(jax.jit, static_argnums=(1, 2))
def _prefix_loss_grad(data, cfg, mask_ratio):
    """dr_grpo (verl form) loss of the prefix surrogate with entropy-masked prefix advantages."""
    keep = prefix.entropy_prefix_mask(data["entropy"], data["pm"], mask_ratio)
    adv = jnp.where(keep, data["adv"], 0.0)
    den = losses.loss_denominators(data["cm"])

    def loss(lp):
        tokens = prefix.prefix_surrogate(lp, data["old"], adv, data["cm"], data["pm"], cfg,
                                         0.2, 0.28, 3.0)
        return losses.aggregate(tokens, data["cm"], den, "dr_grpo", "verl")

    return jax.value_and_grad(loss)(data["lp"]), keep


@pytest.mark.parametrize("reshaper", ["identity", "luffy"])
def test_prefix_loss_sharded_over_8_devices_equals_single_device(reshaper):
    """The entropy cut is global over the (sharded) micro-batch; loss and gradient as one device."""
    batch = _prefix_loss_batch()
    cfg = PrefixConfig(reshaper=reshaper, eps_high_off=0.5)
    single = {k: jax.device_put(v, jax.devices()[0]) for k, v in batch.items()}
    (v1, g1), k1 = _prefix_loss_grad(single, cfg, 0.5)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharded = {k: jax.device_put(v, NamedSharding(mesh, P("data"))) for k, v in batch.items()}
    (v8, g8), k8 = _prefix_loss_grad(sharded, cfg, 0.5)
    assert len(g8.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(k8), np.asarray(k1))
    assert np.isfinite(float(v1)) and float(v8) == pytest.approx(float(v1), rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), rtol=1e-6, atol=1e-9)
    assert np.all(np.asarray(g1)[~batch["cm"]] == 0) and np.abs(np.asarray(g1)).max() > 0
    n_pre = int(batch["pm"].sum())
    assert int((~np.asarray(k1) & batch["pm"]).sum()) == n_pre // 2  # floor(0.5 · #prefix)


def test_entropy_bonus_mask_and_prefix_old_logprobs():
    cm = np.array([[0, 1, 1, 1]], bool)
    pm = np.array([[0, 1, 0, 0]], bool)
    np.testing.assert_array_equal(np.asarray(prefix.entropy_bonus_mask(cm, pm, "response_only")),
                                  [[0, 0, 1, 1]])
    np.testing.assert_array_equal(np.asarray(prefix.entropy_bonus_mask(cm, pm, "all")),
                                  [[0, 1, 1, 1]])
    np.testing.assert_array_equal(prefix.prefix_old_logprobs(np.zeros((1, 4)), np.ones((1, 4)), pm),
                                  [[0, 1, 0, 0]])
    assert prefix.prefix_metrics(pm, cm)["prefix/token_share"] == pytest.approx(1 / 3)


# -- B.2 mini-batch samplers -------------------------------------------------------------------


def test_shuffled_minibatches_equal_the_trainers_split():
    rng_args = [0, 3, 1]  # (seed, step, epoch) as the trainer keys it
    got = minibatch.shuffled_minibatches(24, 4, np.random.default_rng(rng_args))
    perm = np.random.default_rng(rng_args).permutation(24)
    for j, mb in enumerate(got):
        np.testing.assert_array_equal(mb, perm[j * 6:(j + 1) * 6])


def _groups(sizes):
    return np.concatenate([np.full(n, g) for g, n in enumerate(sizes)])


@pytest.mark.parametrize("num_prompts,m", [(8, 4), (8, 3), (5, 5), (6, 1)])
def test_query_preserved_minibatches_keep_each_prompt_in_one(num_prompts, m):
    group = _groups([4] * num_prompts)[np.random.default_rng(0).permutation(4 * num_prompts)]
    mbs = minibatch.query_preserved_minibatches(group, m, np.random.default_rng(2))
    assert len(mbs) == m
    all_rows = np.sort(np.concatenate(mbs))
    np.testing.assert_array_equal(all_rows, np.arange(len(group)))  # every row exactly once
    owner = {}
    for j, mb in enumerate(mbs):
        for g in set(group[mb].tolist()):
            assert g not in owner  # no group split across mini-batches
            owner[g] = j
            assert (group[mb] == g).sum() == 4
        assert len(set(group[mb].tolist())) in (num_prompts // m, -(-num_prompts // m))


def test_query_preserved_shuffles_prompts_never_rows():
    group = _groups([3] * 6)
    seen = set()
    for seed in range(6):
        mbs = minibatch.query_preserved_minibatches(group, 3, np.random.default_rng(seed))
        seen.add(tuple(tuple(sorted(set(group[mb].tolist()))) for mb in mbs))
        for mb in mbs:  # each group's rows stay together in row order
            for g in set(group[mb].tolist()):
                rows = mb[group[mb] == g]
                np.testing.assert_array_equal(rows, np.flatnonzero(group == g))
    assert len(seen) > 1  # the prompt order is shuffled


def _best_imbalance(d, m):
    """Brute force: min over equal-capacity assignments of Σ_m |Σ d| (as minibatch's capacities)."""
    caps = [len(d) // m + (j < len(d) % m) for j in range(m)]
    best = math.inf
    for labels in itertools.product(range(m), repeat=len(d)):
        if [labels.count(j) for j in range(m)] != caps:
            continue
        sums = [sum(x for x, lab in zip(d, labels) if lab == j) for j in range(m)]
        best = min(best, sum(abs(s) for s in sums))
    return best


def test_reward_balanced_minibatches_reach_equal_counts_when_possible():
    # mirrored groups (pass rates p and 1-p) with G = 8: perfect balance exists for every m
    rng = np.random.default_rng(5)
    for trial in range(6):
        m = [2, 3][trial % 2]
        passes = rng.integers(0, 9, m * int(rng.integers(1, 3)))  # K = 2 or 4 groups each
        passes = np.concatenate([passes, 8 - passes])
        positive = np.concatenate([np.arange(8) < k for k in passes])
        group = _groups([8] * len(passes))
        mbs = minibatch.reward_balanced_minibatches(group, positive, m, rng)
        np.testing.assert_array_equal(np.sort(np.concatenate(mbs)), np.arange(len(group)))
        for mb in mbs:  # whole groups only
            for g in set(group[mb].tolist()):
                assert (group[mb] == g).sum() == 8
        assert minibatch.minibatch_imbalance(mbs, positive) == [0] * m


@pytest.mark.parametrize("seed", range(8))
def test_reward_balanced_equals_brute_force_optimum(seed):
    rng = np.random.default_rng(100 + seed)
    num_groups, m, G = int(rng.integers(4, 8)), int(rng.integers(2, 4)), 6
    passes = rng.integers(0, G + 1, num_groups)
    positive = np.concatenate([rng.permutation(np.arange(G) < k) for k in passes])
    group = _groups([G] * num_groups)
    mbs = minibatch.reward_balanced_minibatches(group, positive, m, np.random.default_rng(seed))
    got = sum(abs(x) for x in minibatch.minibatch_imbalance(mbs, positive))
    assert got == _best_imbalance([2 * k - G for k in passes], m)
    assert sorted(len(mb) // G for mb in mbs) == sorted(
        num_groups // m + (j < num_groups % m) for j in range(m))


def test_balanced_subsample_and_positive_only():
    group = _groups([5, 4, 3])
    positive = np.array([1, 1, 1, 0, 0, 1, 0, 0, 0, 1, 1, 1], bool)  # 3/2, 1/3, 3/0
    kept = minibatch.balanced_subsample(group, positive, np.random.default_rng(0))
    for g, k in [(0, 2), (1, 1)]:
        rows = kept[group[kept] == g]
        assert positive[rows].sum() == k and (~positive[rows]).sum() == k
    assert not np.any(group[kept] == 2)  # one-sided group dropped
    whole = minibatch.balanced_subsample(group, positive, np.random.default_rng(0), False)
    np.testing.assert_array_equal(whole[group[whole] == 2], [9, 10, 11])
    np.testing.assert_array_equal(minibatch.positive_only_advantages(np.array([0.5, -0.2, 0.0])),
                                  [0.5, 0.0, 0.0])


def test_make_minibatches_dispatch_and_errors():
    group, positive = _groups([2] * 4), np.array([1, 0] * 4, bool)
    for s in minibatch.SAMPLERS:
        mbs = minibatch.make_minibatches(s, group, positive, 2, np.random.default_rng(0))
        np.testing.assert_array_equal(np.sort(np.concatenate(mbs)), np.arange(8))
    with pytest.raises(ConfigError, match="rl.minibatch_sampler"):
        minibatch.make_minibatches("random", group, positive, 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="rl.mini_batches"):
        minibatch.query_preserved_minibatches(group, 5, np.random.default_rng(0))


# -- B.2 flips and coupling --------------------------------------------------------------------


def test_token_flip_stats_by_hand():
    before = np.zeros((3, 4))
    after = np.array([[0.1, -0.1, 0.0, 0.2],  # Â > 0: boosted, suppressed, unchanged, boosted
                      [0.1, 0.1, -0.1, 5.0],  # Â < 0: boosted, boosted, suppressed, (masked)
                      [1.0, 1.0, 1.0, 1.0]])  # Â = 0: not counted
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], bool)
    s = flips.token_flip_stats(before, after, np.array([1.0, -2.0, 0.0]), mask)
    assert (s["n+"], s["n-"]) == (4, 3)
    assert (s["B+"], s["S+"]) == (0.5, 0.25)
    assert s["B-"] == pytest.approx(2 / 3) and s["S-"] == pytest.approx(1 / 3)
    assert s["F"] == pytest.approx((1 + 2) / 7)  # one suppressed positive, two boosted negatives
    tok = flips.token_flip_stats(before, after, np.broadcast_to([[1.0], [-2.0], [0.0]], (3, 4)),
                                 mask)
    assert tok == s
    classes = np.array([[0, 1, 1, 0]] * 3)
    table = flips.flip_table_by_class(before, after, np.array([1.0, -2.0, 0.0]), mask, classes,
                                      {0: "template", 1: "digits"})
    assert table["all"] == s
    # template tokens (columns 0, 3): Â>0 boosted .1, boosted .2; Â<0 boosted .1 (col 3 masked)
    t = table["template"]  # one flipped (the boosted negative) of three
    assert (t["B+"], t["B-"], t["F"]) == (1.0, 1.0, pytest.approx(1 / 3))
    assert (table["digits"]["S+"], table["digits"]["S-"]) == (0.5, 0.5)
    share = flips.update_share_by_class(before, after, mask, np.array([[0, 1, 1, 0]] * 3), 2)
    # |Δ| on masked tokens: class 0 (columns 0, 3) .1+.2 + .1 + 1+1; class 1 .1+0 + .1+.1 + 1+1
    np.testing.assert_allclose(share, [2.4 / 4.7, 2.3 / 4.7])


def test_coupling_by_confidence_by_hand():
    ids = np.array([7, 7, 3, 7])
    probs = np.array([0.05, 0.2, 0.6, 0.95])
    grads = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [-3.0, 0.0]])
    out = flips.coupling_by_confidence(ids, probs, grads, edges=(0.0, 0.5, 1.0))
    s2 = 1 / math.sqrt(2)
    # same-id pairs: (0,1) min p .05 cos s2; (0,3) .05 cos -1; (1,3) .2 cos -s2 -> all bucket 0
    np.testing.assert_array_equal(out["same"]["count"], [3, 0])
    np.testing.assert_allclose(out["same"]["mean_cos"][0], (s2 - 1 - s2) / 3)
    np.testing.assert_allclose(out["same"]["mean_abs_cos"][0], (s2 + 1 + s2) / 3)
    assert np.isnan(out["same"]["mean_cos"][1])
    # different-id pairs: (0,2) .05 cos 0; (1,2) .2 cos s2; (2,3) .6 cos 0
    np.testing.assert_array_equal(out["different"]["count"], [2, 1])
    np.testing.assert_allclose(out["different"]["mean_cos"], [s2 / 2, 0.0], atol=1e-12)


# -- B.3 calibration ---------------------------------------------------------------------------


def _biased_pool(seed=0, n=600):
    rng = np.random.default_rng(seed)
    length = rng.integers(5, 200, n).astype(np.float64)
    correct = rng.random(n) < 0.5
    reward = correct + 0.02 * length + rng.normal(scale=0.1, size=n)
    return length, correct, reward


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_lowess_removes_a_planted_linear_length_bias():
    length, correct, reward = _biased_pool()
    state = calibration.fit(length, reward, calibration.CalibrationConfig(frac=0.5))
    calibrated = calibration.apply(state, length, reward)
    slope = lambda y: np.polyfit(length, y, 1)[0]  # noqa: E731
    assert slope(reward) == pytest.approx(0.02, abs=0.002)  # the planted bias
    assert abs(slope(calibrated)) < 0.002  # removed (to a tenth of the plant)
    assert abs(np.corrcoef(length, calibrated)[0, 1]) < 0.03
    # ranks: what is left is the sample's chance length-correctness correlation (pool-estimated b̂)
    assert _spearman(length, reward) > 0.9 and abs(_spearman(length, calibrated)) < 0.15
    fitted = calibration.bias(state, [40.0, 160.0])
    assert (fitted[1] - fitted[0]) / 120.0 == pytest.approx(0.02, abs=0.002)
    gap = calibrated[correct].mean() - calibrated[~correct].mean()
    assert gap == pytest.approx(1.0, abs=0.1)  # the true quality signal survives


def test_lowess_state_is_statsmodels_fit_with_lookup_at_or_above():
    from statsmodels.nonparametric.smoothers_lowess import lowess

    length, _, reward = _biased_pool(1, 80)
    state = calibration.fit(length, reward, calibration.CalibrationConfig(frac=0.3))
    curve = lowess(reward, length, frac=0.3, it=3, delta=0.0)
    np.testing.assert_array_equal(state["x"], curve[:, 0])
    np.testing.assert_array_equal(state["y"], curve[:, 1])
    x, y = curve[:, 0], curve[:, 1]
    query = np.array([x[3], x[3] + 0.5, x.min() - 10, x.max() + 10])
    want = [y[np.flatnonzero(x >= q)[0]] if (x >= q).any() else y[-1] for q in query]
    np.testing.assert_array_equal(calibration.bias(state, query), want)


def test_local_average_matches_loop_with_window_from_pairs():
    length, _, reward = _biased_pool(2, 120)
    chosen, rejected = length[:60], length[60:]
    cfg = calibration.CalibrationConfig(method="local_average", window_ratio=4.0, min_neighbours=20)
    state = calibration.fit(length, reward, cfg, pairs=(chosen, rejected))
    d = np.abs(chosen - rejected).mean() / 4.0
    query = np.array([5.0, 50.0, 120.0, 199.0, 400.0])
    got = calibration.apply(state, query, np.ones(len(query)))
    for q, g in zip(query, got):
        near = reward[np.abs(length - q) <= d]
        want = 1.0 - near.mean() if len(near) >= 20 else 1.0
        assert g == pytest.approx(want, abs=1e-9)
    assert got[-1] == 1.0  # no neighbours: unchanged
    with pytest.raises(ValueError, match=r"calibration\.half_width"):
        calibration.fit(length, reward, cfg)


def test_local_average_pairs_calibrate_only_when_both_sides_have_neighbours():
    c = np.array([1.0, 2.0, 3.0, 10.0])
    state = calibration.fit(c, [1.0, 2.0, 3.0, 7.0], calibration.CalibrationConfig(
        method="local_average", half_width=1.0, min_neighbours=2, alpha=0.5))
    # b̂(2) = mean(1, 2, 3) = 2; b̂(1) = mean(1, 2) = 1.5; b̂(10) undefined (1 neighbour)
    np.testing.assert_allclose(calibration.bias(state, [2.0, 1.0, 10.0]), [2.0, 1.5, np.nan])
    chosen, rejected = calibration.apply_pairs(state, [2.0, 2.0], [5.0, 5.0], [1.0, 10.0],
                                               [4.0, 4.0])
    np.testing.assert_allclose(chosen, [5.0 - 0.5 * 2.0, 5.0])  # pair 2 left whole
    np.testing.assert_allclose(rejected, [4.0 - 0.5 * 1.5, 4.0])
    np.testing.assert_allclose(calibration.apply(state, [10.0], [4.0]), [4.0])


def test_calibration_state_json_round_trip_is_bit_identical():
    length, _, reward = _biased_pool(3, 200)
    for cfg in (calibration.CalibrationConfig(),
                calibration.CalibrationConfig(method="local_average", half_width=10.0)):
        state = calibration.fit(length, reward, cfg)
        restored = json.loads(json.dumps(state))
        a = calibration.apply(state, length, reward)
        b = calibration.apply(restored, length, reward)
        assert a.tobytes() == b.tobytes()
    buf = None
    for i in range(4):
        buf = calibration.buffer_append(buf, [i, i + 0.5], [10 * i, 10 * i + 1], capacity=5)
        buf = json.loads(json.dumps(buf))
    assert buf == {"lengths": [1.5, 2.0, 2.5, 3.0, 3.5], "rewards": [11.0, 20.0, 21.0, 30.0, 31.0]}


def test_bradley_terry_loss_and_gradient_by_hand():
    rc, rr = np.array([2.0, -1.0, 0.5]), np.array([1.0, 0.0, 0.5])
    loss, m = calibration.bradley_terry_loss(rc, rr)
    diff = rc - rr
    want = np.mean(np.log1p(np.exp(-diff)))  # -log σ(x) = log(1 + e^-x)
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(m["bt_accuracy"]) == pytest.approx(1 / 3)
    g = np.asarray(jax.grad(lambda a: calibration.bradley_terry_loss(a, rr)[0])(jnp.asarray(rc)))
    np.testing.assert_allclose(g, -(1 - 1 / (1 + np.exp(-diff))) / 3, rtol=1e-5)


# -- B.4 buffers, filtering, curriculum --------------------------------------------------------


def test_success_buffer_window_min_count_and_round_trip():
    buf = budget.success_buffer(window=4, min_count=3)
    buf = budget.record_outcomes(buf, ["a", "a", "b"], [1, 0, 1])
    p, valid = budget.success_rates(buf, ["a", "b", "c"])
    np.testing.assert_allclose(p, [0.5, 1.0, 0.0])
    np.testing.assert_array_equal(valid, [False, False, False])
    buf = budget.record_outcomes(json.loads(json.dumps(buf)), ["a"] * 4, [1, 1, 1, 0])
    assert buf["history"]["a"] == [1.0, 1.0, 1.0, 0.0]  # the last 4 only
    p, valid = budget.success_rates(buf, ["a", "b"])
    np.testing.assert_allclose(p, [0.75, 1.0])
    np.testing.assert_array_equal(valid, [True, False])


def test_difficulty_filter_rules_by_hand():
    p = np.array([0.0, 0.125, 0.25, 0.5, 0.75, 0.875, 1.0])
    band = budget.DifficultyFilterConfig()
    np.testing.assert_array_equal(budget.difficulty_keep(p, band), [0, 0, 1, 1, 1, 0, 0])
    open_ = budget.DifficultyFilterConfig(rule="open")
    np.testing.assert_array_equal(budget.difficulty_keep(p, open_), [0, 1, 1, 1, 1, 1, 0])
    assert budget.difficulty_keep(p, budget.DifficultyFilterConfig(rule="none")).all()
    rates = budget.group_success_rates([1, 0, 1, 1, 0, 0], [0, 0, 1, 1, 2, 2], 3)
    np.testing.assert_allclose(rates, [0.5, 1.0, 0.0])
    buf = budget.record_outcomes(budget.success_buffer(4, 2), ["x", "x", "y", "y"], [1, 1, 1, 0])
    np.testing.assert_array_equal(budget.offline_keep(buf, ["x", "y", "new"], band),
                                  [False, True, True])
    with pytest.raises(ConfigError, match=r"budget\.filter\.low"):
        budget.DifficultyFilterConfig(low=0.8, high=0.2)


def test_curriculum_update_probs_by_hand():
    cfg = budget.CurriculumConfig(alpha=0.5, tau=0.5)
    state = budget.curriculum_init(["add", "mul", "sub"], cfg)
    rewards = budget.arm_rewards(["add", "add", "mul", "mul"], [0.5, -1.5, 0.2, -0.2])
    assert rewards == {"add": 1.0, "mul": pytest.approx(0.2)}
    state = budget.curriculum_update(state, rewards, cfg)
    assert state["q"] == {"add": 0.5, "mul": pytest.approx(0.1), "sub": 0.0}
    state = budget.curriculum_update(state, {"add": 0.0}, cfg)
    assert state["q"]["add"] == 0.25
    probs = budget.curriculum_probs(state, cfg)
    w = np.exp(np.array([0.25, 0.1, 0.0]) / 0.5)
    np.testing.assert_allclose(list(probs.values()), w / w.sum())
    draws = budget.curriculum_sample(state, 6000, cfg, np.random.default_rng(0))
    freq = [draws.count(a) / 6000 for a in probs]
    np.testing.assert_allclose(freq, w / w.sum(), atol=0.02)


def test_curriculum_resume_from_json_continues_identically():
    cfg = budget.CurriculumConfig(alpha=0.3, tau=0.2)
    seed = 9

    def step(state, t):
        rng = np.random.default_rng([seed, t, budget.BUDGET_SALT])
        arms = budget.curriculum_sample(state, 16, cfg, rng)
        adv = rng.normal(size=16) * np.array([1.0 + len(a) for a in arms])  # arm-dependent |Â|
        return budget.curriculum_update(state, budget.arm_rewards(arms, adv), cfg), arms

    straight, trace = budget.curriculum_init(["a", "bb", "ccc"], cfg), []
    for t in range(6):
        straight, arms = step(straight, t)
        trace.append(arms)
    resumed = budget.curriculum_init(["a", "bb", "ccc"], cfg)
    for t in range(3):
        resumed, _ = step(resumed, t)
    resumed = json.loads(json.dumps(resumed))  # checkpoint mid-run
    for t in range(3, 6):
        resumed, arms = step(resumed, t)
        assert arms == trace[t]
    assert resumed == straight


# -- B.4 Knapsack ------------------------------------------------------------------------------


def _brute_force(p, total, cfg):
    """max Σ value over all N in [min_n, max_n]^n with Σ N = total (float64)."""
    best = -math.inf
    for ns in itertools.product(range(cfg.min_n, cfg.max_n + 1), repeat=len(p)):
        if sum(ns) != total:
            continue
        vals = [(1 - q ** n - (1 - q) ** n) * q * (1 - q) ** 2 for n, q in zip(ns, p)]
        if cfg.base_value == "released":
            vals = [v if n > cfg.min_n else 0.0 for v, n in zip(vals, ns)]
        best = max(best, sum(vals))
    return best


@pytest.mark.parametrize("base_value", ["counted", "released"])
@pytest.mark.parametrize("seed", range(6))
def test_knapsack_allocation_equals_brute_force(seed, base_value):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 5))
    cfg = budget.KnapsackConfig(mean_n=4, min_n=1, max_n=9, fallback=False, base_value=base_value)
    p = rng.choice([0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.97], n)
    total = int(rng.integers(n * cfg.min_n, n * cfg.max_n + 1))
    alloc, info = budget.knapsack_allocate(p, np.ones(n, bool), cfg, total=total)
    assert alloc.sum() == total and alloc.min() >= cfg.min_n and alloc.max() <= cfg.max_n
    vals = budget.knapsack_value(alloc, p)
    if base_value == "released":
        vals = np.where(alloc > cfg.min_n, vals, 0.0)
    assert float(vals.sum()) == pytest.approx(_brute_force(p, total, cfg), rel=1e-12, abs=1e-15)


def test_knapsack_special_cases_and_fallback_by_hand():
    cfg = budget.KnapsackConfig(mean_n=8, min_n=2, max_n=128, negative_n=3, positive_n=1)
    # p = 0 -> negative_n, p = 1 -> positive_n, no estimate -> mean_n, the rest by the DP
    alloc, info = budget.knapsack_allocate([0.0, 1.0, 0.5, 0.2], [True, True, True, False], cfg,
                                           total=40)
    assert alloc[3] == 8 and alloc[1] == 1
    # remaining 40 - (3 + 1 + 2 + 8) = 26 > cost(0.5) = int(log .1 / log .5) = 3: fallback
    assert info["fallback"]
    assert budget.knapsack_cost(0.5, 0.9, 128) == 3
    assert budget.knapsack_cost(0.05, 0.9, 128) == 44  # ~45 rollouts (spec)
    assert budget.knapsack_cost(0.3, 0.9, 128) == 6
    # the surplus 26 - 3 = 23 goes to the p = 0 prompt ... then 3 extra units to p = 0.5
    np.testing.assert_array_equal(alloc, [3 + 23, 1, 2 + 3, 8])
    assert alloc.sum() == 40


def test_knapsack_budget_moves_to_informative_prompts():
    p = np.array([0.95, 0.95, 0.5, 0.1, 0.5, 0.05])
    cfg = budget.KnapsackConfig(mean_n=8, min_n=2, max_n=64, fallback=False)
    alloc, _ = budget.knapsack_allocate(p, np.ones(6, bool), cfg)
    assert alloc.sum() == 48
    uniform = budget.knapsack_value(np.full(6, 8), p).sum()
    assert budget.knapsack_value(alloc, p).sum() > uniform  # better than fixed G = 8
    with pytest.raises(ValueError, match=r"budget\.knapsack"):
        budget.knapsack_allocate(p, np.ones(6, bool), cfg, total=5)


def test_knapsack_with_success_buffer_resumes_identically():
    """Buffer -> p̂ -> allocation -> outcomes -> buffer, 6 steps straight vs. a JSON checkpoint
    after step 3: the same allocations and the same final buffer."""
    keys, true_p = [f"q{i}" for i in range(5)], np.array([0.05, 0.3, 0.5, 0.8, 1.0])
    cfg = budget.KnapsackConfig(mean_n=4, min_n=2, max_n=16)

    def step(buf, t):
        p, valid = budget.success_rates(buf, keys)
        alloc, _ = budget.knapsack_allocate(p, valid, cfg)
        rng = np.random.default_rng([4, t, budget.BUDGET_SALT])
        rows = np.repeat(np.arange(len(keys)), alloc)
        outcomes = rng.random(len(rows)) < true_p[rows]
        return budget.record_outcomes(buf, [keys[i] for i in rows], outcomes), alloc.tolist()

    straight, trace = budget.success_buffer(16, 8), []
    for t in range(6):
        straight, alloc = step(straight, t)
        trace.append(alloc)
    assert trace[0] == [4] * 5 and trace[-1] != trace[0]  # estimates kick in, budget moves
    resumed = budget.success_buffer(16, 8)
    for t in range(3):
        resumed, _ = step(resumed, t)
    resumed = json.loads(json.dumps(resumed))
    for t in range(3, 6):
        resumed, alloc = step(resumed, t)
        assert alloc == trace[t]
    assert resumed == straight
