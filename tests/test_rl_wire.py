"""The method switches wired into the RL loop (issue #14; methods B.1-B.4): each hook acts on a
short run of the tiny RL config (batches inspected through ``RLTrainer(on_batch=...)``), and
runs with Prefix-RFT + curriculum + calibration and with Knapsack + offline filtering +
calibration resume bit-identically after an interrupt (their state rides in the checkpoint's
metadata)."""

from __future__ import annotations

import dataclasses
import json
import zlib

import numpy as np
import pytest

from moejax.config import ConfigError, DataConfig, MeshConfig, TrainConfig
from moejax.data.tokenizer import ByteTokenizer
from moejax.rl import budget as budget_lib
from moejax.rl import calibration as calib_lib
from moejax.rl import rewards, tasks
from moejax.rl.config import (BudgetConfig, PrefixRFTConfig, RewardCalibrationConfig, RLConfig,
                              RLRunConfig, SFTConfig)
from moejax.rl.losses import PolicyLossConfig
from moejax.rl.prefix import ON_POLICY_UID, ScheduleConfig
from moejax.rl.rollout import RolloutConfig
from moejax.rl.trainer import RLTrainer
from moejax.testing import tiny_model

TASKS = tasks.TaskConfig(families=("add", "sub"), digits=(1,))
P, G = 4, 2
G4 = 4  # 16 rows: two mini-batches of 8 rows still split over the 8 emulated devices


def small_rl(steps: int = 3, **rl) -> RLRunConfig:
    """tests/test_rl_trainer.py's tiny RL run (same model, buckets and batch geometry)."""
    base = dict(tasks=TASKS, rollout=RolloutConfig(max_prompt_len=12, max_new_tokens=12),
                prompts_per_step=P, num_generations=G, mini_batches=1, eval_every=100,
                eval_items_per_tier=2, eval_samples=0,
                sft=SFTConfig(steps=2, batch_size=8, eval_items=8, scratchpad=False),
                loss=PolicyLossConfig(kl_coef=0.1, entropy_coef=0.01))
    base.update(rl)
    return RLRunConfig(model=tiny_model(vocab_size=259, max_seq_len=32), mesh=MeshConfig(),
                       data=DataConfig(seq_len=23),
                       train=TrainConfig(steps=steps, lr=1e-3, warmup_steps=0, log_every=1,
                                         ckpt_every=100, async_ckpt=False, batch_size=8),
                       rl=RLConfig(**base))


def planted_scores(items, completions, cfg=rewards.RewardConfig()):
    """Task scores made informative for a random tiny policy: 'correct' is a fixed pseudo-random
    bit of the completion text (so success rates sit inside (0, 1)), and the reward carries a
    planted length bias of +0.05 per character."""
    out = _REAL_SCORE(items, completions, cfg)
    correct = np.array([zlib.crc32(c.encode()) % 2 == 0 for c in completions])
    lengths = np.array([len(c) for c in completions], np.float32)
    out["correct"] = correct
    out["reward"] = correct.astype(np.float32) + 0.05 * lengths
    return out


_REAL_SCORE = rewards.score_batch


@pytest.fixture
def planted(monkeypatch):
    monkeypatch.setattr(rewards, "score_batch", planted_scores)


def _records(workdir) -> list[dict]:
    with open(workdir / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in recs]


def _run(cfg, workdir, **kw) -> tuple[dict, list[dict], RLTrainer]:
    batches = []
    trainer = RLTrainer(cfg, workdir, progress=False,
                        on_batch=lambda t, step, b: batches.append((step, b)), **kw)
    return trainer.run(), batches, trainer


def _straight_equals_resumed(cfg, tmp_path, stop_at: int):
    """Run straight and with an interrupt after ``stop_at``; assert identical records and final
    method state -> (straight batches, straight trainer)."""
    _, batches, straight = _run(cfg, tmp_path / "straight")

    def interrupt(trainer, step, metrics):  # as a SIGTERM would: finish, save, return
        if step == stop_at:
            trainer.stop.requested = True

    first = RLTrainer(cfg, tmp_path / "resumed", progress=False, on_step=interrupt).run()
    assert first["step"] == stop_at and first["preempted"]
    resumed = RLTrainer(cfg, tmp_path / "resumed", progress=False)
    assert resumed.run()["step"] == cfg.train.steps
    a, b = _records(tmp_path / "straight"), _records(tmp_path / "resumed")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(cfg.train.steps + 1))
    for ra, rb in zip(a, b):
        assert ra == rb, (ra["step"], {k: (ra.get(k), rb.get(k)) for k in ra
                                       if ra.get(k) != rb.get(k)})
    assert resumed.methods == straight.methods
    return batches, straight, a


# -- config --------------------------------------------------------------------------------------


def test_method_switches_default_off_and_validate():
    cfg = small_rl()
    rl = cfg.rl
    assert not rl.prefix.enabled and rl.minibatch_sampler == "shuffled" and not rl.positive_only
    assert not rl.reward_calibration.enabled and rl.budget.allocation == "fixed"
    assert rl.rows_per_step == P * G
    on = dataclasses.replace(rl, prefix=PrefixRFTConfig(enabled=True, num_prefix=3))
    assert on.rows_per_step == P * 3 * G
    assert RLRunConfig.from_dict(dataclasses.replace(cfg, rl=on).to_dict()).rl == on
    bad = [  # (field named, a config build that must fail)
        ("rl.mini_batches", lambda: small_rl(minibatch_sampler="query_preserved",
                                             prompts_per_step=6, mini_batches=4)),
        ("rl.minibatch_sampler", lambda: small_rl(minibatch_sampler="sorted")),
        ("rl.minibatch_sampler", lambda: small_rl(
            minibatch_sampler="reward_balanced", budget=BudgetConfig(
                allocation="knapsack", knapsack=budget_lib.KnapsackConfig(mean_n=G)))),
        ("rl.budget.knapsack.mean_n", lambda: small_rl(budget=BudgetConfig(
            allocation="knapsack"))),
        ("rl.budget.allocation", lambda: small_rl(dynamic_sampling=True, budget=BudgetConfig(
            allocation="knapsack", knapsack=budget_lib.KnapsackConfig(mean_n=G)))),
        ("rl.loss.algo", lambda: small_rl(prefix=PrefixRFTConfig(enabled=True),
                                          loss=PolicyLossConfig.gspo())),
        ("rl.prefix.enabled", lambda: small_rl(prefix=PrefixRFTConfig(enabled=True),
                                               dynamic_sampling=True)),
        ("rl.balanced_subsample", lambda: small_rl(prefix=PrefixRFTConfig(enabled=True),
                                                   balanced_subsample=True)),
        ("rl.reward_calibration.half_width",
         lambda: RewardCalibrationConfig(method="local_average")),
        ("rl.reward_calibration.method", lambda: RewardCalibrationConfig(method="isotonic")),
        ("rl.reward_calibration.buffer_size",
         lambda: RewardCalibrationConfig(method="lowess", buffer_size=0)),
        ("rl.budget.filter", lambda: BudgetConfig(filter="sometimes")),
        ("rl.budget.curriculum", lambda: small_rl(task_file="x.jsonl",
                                                  budget=BudgetConfig(curriculum=True))),
    ]
    for field, build in bad:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            build()


# -- the policy loss under Prefix-RFT ----------------------------------------------------------


def test_prefix_policy_loss_matches_a_numpy_reference():
    """policy_loss with a prefix mask: low-entropy prefix tokens lose their advantage, prefix
    tokens use their own clip range, the entropy bonus skips them (numpy float64 by hand)."""
    import jax
    import jax.numpy as jnp

    from moejax.rl.losses import loss_denominators, policy_loss

    rng = np.random.default_rng(3)
    n, T = 3, 7
    cm = np.zeros((n, T), bool)
    cm[0, 1:6], cm[1, 2:7], cm[2, 0:4] = True, True, True
    pm = np.zeros((n, T), bool)
    pm[0, 1:4], pm[2, 0:2] = True, True  # row 1 is on-policy
    lp, old = rng.normal(-1.5, 0.5, (n, T)), rng.normal(-1.5, 0.5, (n, T))
    adv, ent = rng.normal(size=(n, T)) * cm, rng.uniform(0.1, 2.0, (n, T))
    cfg = PolicyLossConfig(eps_low=0.2, eps_high=0.28, entropy_coef=0.05)
    pcfg = PrefixRFTConfig(enabled=True, eps_low_off=0.1, eps_high_off=0.5)
    den = loss_denominators(jnp.asarray(cm, jnp.float32))

    def loss(lp_):
        return policy_loss(lp_, jnp.asarray(old), jnp.asarray(adv, jnp.float32),
                           jnp.asarray(cm, jnp.float32), den, cfg, entropy=jnp.asarray(ent),
                           prefix_mask=jnp.asarray(pm, jnp.float32), prefix_cfg=pcfg,
                           entropy_mask_ratio=jnp.float32(0.5))[0]

    got, grad = jax.value_and_grad(loss)(jnp.asarray(lp, jnp.float32))
    # reference: floor(0.5 * 5 prefix tokens) = 2 lowest-entropy prefix tokens lose Â
    a = adv.copy()
    order = sorted(zip(ent[pm], np.argwhere(pm).tolist()))
    for _, (i, t) in order[:2]:
        a[i, t] = 0.0
    ratio = np.exp(lp - old)

    def clip_loss(lo, hi):
        return -np.minimum(ratio * a, np.clip(ratio, 1 - lo, 1 + hi) * a)

    tok = np.where(pm, clip_loss(0.1, 0.5), clip_loss(0.2, 0.28))
    want = (tok * cm).sum() / cm.sum() - 0.05 * (ent * (cm & ~pm)).sum() / cm.sum()
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    for _, (i, t) in order[:2]:  # no policy gradient through the masked prefix tokens
        assert float(grad[i, t]) == 0.0
    assert float(np.abs(np.asarray(grad)[cm & ~pm]).max()) > 0


# -- mini-batch samplers -------------------------------------------------------------------------


def test_query_preserved_minibatches_balanced_subsample_and_positive_only(tmp_path, planted):
    cfg = small_rl(2, minibatch_sampler="query_preserved", mini_batches=2, positive_only=True,
                   balanced_subsample=True, num_generations=G4)
    _, batches, _ = _run(cfg, tmp_path)
    assert [s for s, _ in batches] == [0, 1]
    for _, b in batches:
        r = b["rollouts"]
        group, correct = r.group, r.correct
        (split,) = b["minibatches"]
        assert sorted(np.concatenate(split).tolist()) == list(range(P * G4))
        for idx in split:  # every group inside a mini-batch is whole: P / M prompts of G rows
            assert len(idx) == P * G4 // 2
            assert all(np.sum(group == g) == np.sum(group[idx] == g) for g in set(group[idx]))
        # balanced subsample: the trained rows of a group hold as many correct as wrong rows
        kept = b["rows"]["completion_mask"].any(1)
        for g in range(P):
            rows = kept & (group == g)
            n_pos, n_neg = int(correct[group == g].sum()), int((~correct[group == g]).sum())
            assert correct[rows].sum() == (~correct[rows]).sum() == min(n_pos, n_neg)
        # advantages by hand over the kept rows (grpo, unbiased std), then the positive part
        reward = b["reward"].astype(np.float64)
        want = np.zeros(P * G4)
        for g in range(P):
            rows = kept & (group == g)
            if rows.any():
                x = reward[rows]
                want[rows] = (x - x.mean()) / (x.std(ddof=1) + 1e-6)
        np.testing.assert_allclose(b["advantages"], np.maximum(want, 0), rtol=1e-5, atol=1e-6)
        assert b["rows"]["advantages"].min() >= 0
        assert np.any(want < 0) and not kept.all()  # both controls removed something


def test_reward_balanced_minibatches_balance_positive_and_negative_rows(tmp_path, planted):
    cfg = small_rl(1, minibatch_sampler="reward_balanced", mini_batches=2, num_generations=G4)
    _, batches, _ = _run(cfg, tmp_path)
    ((_, b),) = batches
    group, correct = b["rollouts"].group, b["rollouts"].correct
    (split,) = b["minibatches"]
    imbalance = [abs(2 * int(correct[idx].sum()) - len(idx)) for idx in split]
    # brute force over every way to put 2 of the 4 groups in the first mini-batch
    d = np.array([2 * int(correct[group == g].sum()) - G4 for g in range(P)])
    best = min(abs(d[[a, c]].sum()) + abs(d.sum() - d[[a, c]].sum())
               for a in range(P) for c in range(a + 1, P))
    assert sum(imbalance) == best
    for idx in split:
        assert all(np.sum(group == g) == np.sum(group[idx] == g) for g in set(group[idx]))


# -- Prefix-RFT + curriculum + calibration ------------------------------------------------------


PREFIX = PrefixRFTConfig(enabled=True, num_prefix=2, num_empty_prefix=1,
                         entropy_mask=ScheduleConfig(kind="const", init=0.5))


def _check_prefix_batch(b, tok):
    r, rows = b["rollouts"], b["rows"]
    pm, cm = r.prefix_mask.astype(bool), r.completion_mask.astype(bool)
    prefixed = r.uid != ON_POLICY_UID
    assert prefixed.sum() == P * G and (~prefixed).sum() == P * G  # one of two variants each
    np.testing.assert_array_equal(rows["prefix_mask"], pm.astype(np.float32))
    assert not pm[~prefixed].any() and pm[prefixed].any(1).all() and not (pm & ~cm).any()
    for i in np.flatnonzero(prefixed):  # the response starts with the demonstration's tokens
        k = int(pm[i].sum())
        start = int(r.prompt_lengths[i])
        demo = tok.encode(tasks.demonstration(r.items[i], False)) + [tok.eos_id]
        np.testing.assert_array_equal(r.tokens[i, start:start + k], demo[:k])
        assert np.flatnonzero(pm[i]).tolist() == list(range(start - 1, start - 1 + k))
    # pi_old and the rollout logprobs at prefix tokens come from the trainer's recompute
    assert np.all(rows["rollout_logprobs"][pm] < 0)
    np.testing.assert_array_equal(rows["rollout_logprobs"][pm], rows["old_logprobs"][pm])
    # advantages by hand: continuation r - mean(prompt, uid); prefix (r - mean on-policy) / G
    reward = b["reward"].astype(np.float64)
    want = np.zeros(cm.shape)
    for i in range(len(reward)):
        same = (r.group == r.group[i]) & (r.uid == r.uid[i])
        on = (r.group == r.group[i]) & (r.uid == ON_POLICY_UID)
        want[i, cm[i]] = reward[i] - reward[same].mean()
        want[i, pm[i]] = (reward[i] - reward[on].mean()) / G
    np.testing.assert_allclose(rows["advantages"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(rows["entropy_mask_ratio"], 0.5)


def test_prefix_curriculum_calibration_act_and_resume_bit_identically(tmp_path, planted):
    cal = RewardCalibrationConfig(method="lowess", buffer_size=64)
    cfg = small_rl(3, prefix=PREFIX, reward_calibration=cal, budget=BudgetConfig(curriculum=True),
                   loss=PolicyLossConfig(kl_coef=0.1, entropy_coef=0.01, agg="dr_grpo",
                                         dr_grpo_form="verl"))
    batches, trainer, recs = _straight_equals_resumed(cfg, tmp_path, stop_at=1)
    tok = ByteTokenizer()
    lengths, raw = [], []
    for step, b in batches:
        _check_prefix_batch(b, tok)
        r = b["rollouts"]
        lengths.append(r.completion_lengths)
        raw.append(r.rewards)
        # calibration: this batch's reward = raw - LOWESS fit of the buffer (every batch so far)
        fitted = calib_lib.fit(np.concatenate(lengths), np.concatenate(raw), cal)
        np.testing.assert_allclose(b["reward"], calib_lib.apply(fitted, r.completion_lengths,
                                                                r.rewards), rtol=1e-6, atol=1e-6)
        assert not np.allclose(b["reward"], r.rewards)
    for rec in recs[1:]:
        assert -1 <= rec["calib/length_corr"] <= 1 and -1 <= rec["calib/length_corr_raw"] <= 1
        assert rec["prefix/token_share"] > 0 and rec["rl/grad_norm"] > 0
    # the curriculum moved Q off its start and drew from both families, by per-family cursors
    q = trainer.methods["curriculum"]["q"]
    assert set(q) == {"add", "sub"} and any(v != 0 for v in q.values())
    cursors = trainer.methods["curriculum"]["cursors"]
    assert sum(cursors.values()) == 3 * P
    families = [it.family for _, b in batches for it in b["rollouts"].items[::2 * G]]
    assert [families.count(f) for f in ("add", "sub")] == [cursors["add"], cursors["sub"]]
    assert len(trainer.methods["calibration"]["lengths"]) == 3 * P * 2 * G


# -- Knapsack + offline filtering + calibration -------------------------------------------------


def test_knapsack_offline_filter_calibration_act_and_resume_bit_identically(tmp_path, planted):
    rows = [{"prompt": f"Q: {a}+{b}=", "answer": a + b} for a in range(3) for b in range(3)]
    path = tmp_path / "few.jsonl"  # few prompts: they come back, so the success buffer fills
    path.write_text("\n".join(json.dumps(r) for r in rows))
    n_bar = G4  # rollouts per prompt on average: Knapsack moves them between prompts
    knap = budget_lib.KnapsackConfig(mean_n=n_bar, min_n=2, max_n=8)
    cal = RewardCalibrationConfig(method="local_average", half_width=2.0, min_neighbours=2,
                                  buffer_size=16)
    budget = BudgetConfig(allocation="knapsack", knapsack=knap, filter="offline",
                          difficulty=budget_lib.DifficultyFilterConfig(rule="open"),
                          buffer_window=4, buffer_min_count=1)
    cfg = small_rl(4, task_file=str(path), tasks=tasks.TaskConfig(eval_fraction=0.25),
                   num_generations=n_bar, budget=budget, reward_calibration=cal)
    batches, trainer, recs = _straight_equals_resumed(cfg, tmp_path, stop_at=2)
    sizes = []
    for step, b in batches:
        r = b["rollouts"]
        n = np.bincount(r.group)
        sizes.append(n.tolist())
        assert len(n) == P and n.sum() == P * n_bar and n.min() >= 2 and n.max() <= 8
        for g in range(P):  # a group is one prompt's rollouts
            assert len({it.prompt for it, gg in zip(r.items, r.group) if gg == g}) == 1
    assert any(len(set(s)) > 1 for s in sizes), sizes  # Knapsack gave different G per prompt
    assert any(rec.get("budget/effective_prompts", 0) > 0 for rec in recs)
    hist = trainer.methods["success"]["history"]
    assert hist and all(1 <= len(h) <= 4 for h in hist.values())
    assert len(trainer.methods["calibration"]["lengths"]) == 16


def test_lowess_calibration_with_tied_lengths_uses_their_mean():
    """Rollouts often share a length (the max_new_tokens cap): statsmodels' LOWESS returns 0 where
    a neighbourhood has zero width (k = int(frac·n) tied points); the fit is their mean there."""
    rng = np.random.default_rng(0)
    lengths = np.array([12.0] * 14 + [5.0, 13.0])
    reward = rng.normal(size=16) + 3.0
    state = calib_lib.fit(lengths, reward, calib_lib.CalibrationConfig(method="lowess"))
    b = calib_lib.bias(state, lengths)
    assert np.isfinite(b).all()
    np.testing.assert_allclose(b[:14], reward[:14].mean(), rtol=1e-9)
    # a pool of one length is its mean
    one = calib_lib.fit(np.full(5, 7.0), reward[:5], calib_lib.CalibrationConfig(method="lowess"))
    np.testing.assert_allclose(calib_lib.apply(one, np.full(5, 7.0), reward[:5]),
                               reward[:5] - reward[:5].mean(), rtol=1e-9)


def test_a_run_saved_before_an_rl_field_existed_resumes():
    """resume_conflicts fills fields a saved config predates with the run config's own defaults
    (an RL run's rl.* included), so adding a switch does not strand older RL workdirs."""
    import json

    from moejax.rl.config import RLRunConfig
    from moejax.trainer import resume_conflicts

    cfg = RLRunConfig()
    saved = json.loads(cfg.to_json())
    del saved["rl"]["minibatch_sampler"], saved["rl"]["rollout_dtype"]
    assert resume_conflicts(saved, cfg) == {}
    saved["rl"]["num_generations"] = cfg.rl.num_generations + 1
    assert set(resume_conflicts(saved, cfg)) == {"rl.num_generations"}
