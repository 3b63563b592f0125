"""The Bradley-Terry reward model (moejax.rl.reward_model): its loss and gradient against a float64
numpy reference, sharded (8 devices) equal to one device, the head reading each row's last real
token, the preference pairs' verified sides and planted length bias, and the config switch."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from experiments import grpo
from moejax import train as T
from moejax.config import ConfigError, MeshConfig
from moejax.mesh import make_mesh
from moejax.overrides import apply_overrides
from moejax.rl import rewards
from moejax.rl import reward_model as R
from moejax.rl.run_inputs import rl_tokenizer

CFG = grpo.PRESETS["cpu-smoke"]  # grpo's smoke shapes: compiles shared with the RL tests
RM = R.RewardModelConfig(steps=1, batch_size=8)


@pytest.fixture(scope="module")
def rm():
    """(RMSetup on 8 devices, an RM state with a trained-looking head, 8 pairs)."""
    rs = R.rm_setup(CFG, make_mesh(CFG.mesh), RM)
    state = R.init_rm_state(rs, T.init_state(rs.policy), seed=3)
    return rs, state, R.train_pairs(CFG, RM, rl_tokenizer(CFG), 0)


def _hidden(rs, state, tokens, lengths):
    fn = jax.jit(lambda p, r, t, n: R.last_hidden(rs.policy.graphdef, p["backbone"], r, t, n))
    with T.tracing_mesh(rs.policy):
        return np.asarray(fn(state.params, state.rest, tokens, lengths), np.float64)


def _grads(rs, state, pairs):
    batch = R._rows_global(rs.policy.mesh, R.pair_batch(pairs))
    return jax.device_get(jax.jit(R.make_bt_grad(rs))(state, batch))


def test_bt_loss_and_head_grad_match_float64_reference(rm):
    """loss = -mean log σ(w·(h_c - h_r)), dL/dw = -mean (1 - σ(d)) (h_c - h_r), from the
    hidden states at the rows' last tokens in float64."""
    rs, state, p = rm
    hc = _hidden(rs, state, p.chosen, p.chosen_lengths)
    hr = _hidden(rs, state, p.rejected, p.rejected_lengths)
    w = np.asarray(state.params["head"]["w"], np.float64)
    d = (hc - hr) @ w
    loss = np.mean(np.log1p(np.exp(-d)))
    dw = -np.mean((1 - 1 / (1 + np.exp(-d)))[:, None] * (hc - hr), axis=0)
    grads, m = _grads(rs, state, p)
    assert float(m["bt_loss"]) == pytest.approx(loss, rel=1e-5, abs=1e-6)
    assert float(m["bt_accuracy"]) == pytest.approx(np.mean(d > 0))
    np.testing.assert_allclose(grads["head"]["w"], dw, rtol=1e-4, atol=1e-6)


def test_bt_grads_sharded_equal_one_device(rm):
    """Every gradient leaf (backbone and head) on the 8-device mesh equals one device's."""
    rs, state, p = rm
    one = R.rm_setup(dataclasses.replace(CFG, mesh=MeshConfig(data=1)),
                     make_mesh(MeshConfig(data=1), jax.devices()[:1]), RM)
    state1 = jax.device_put(jax.device_get(state), one.state_shardings)
    g8, _ = _grads(rs, state, p)
    g1, _ = _grads(one, state1, p)
    flat8, flat1 = jax.tree.leaves(g8), jax.tree.leaves(g1)
    assert len(flat8) == len(flat1) and any(np.abs(a).max() > 0 for a in flat8[:-1])
    for a, b in zip(flat8, flat1):
        # float32 sums in another order: relative to each leaf's scale
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def test_score_reads_the_last_real_token(rm):
    """Tokens after a row's length (padding or garbage) do not move its score; the token at
    length-1 does, and so does reading one position earlier."""
    rs, state, p = rm
    score = R.make_score_fn(rs)

    def run(tokens, lengths):
        return R.score_rows(score, rs.policy.mesh, state.params, state.rest, tokens, lengths, 8)
    base = run(p.chosen, p.chosen_lengths)
    rng = np.random.default_rng(0)
    noisy = p.chosen.copy()
    after = np.arange(noisy.shape[1])[None] >= p.chosen_lengths[:, None]
    noisy[after] = rng.integers(3, 250, after.sum())
    np.testing.assert_allclose(run(noisy, p.chosen_lengths), base, rtol=1e-5, atol=1e-6)
    last = p.chosen.copy()
    rows = np.arange(len(last))
    last[rows, p.chosen_lengths - 1] = 65  # 'A' instead of eos
    assert np.all(np.abs(run(last, p.chosen_lengths) - base) > 1e-6)
    # one token shorter reads another position
    assert np.all(np.abs(run(p.chosen, p.chosen_lengths - 1) - base) > 1e-6)


def _completion(tok, row, length, prompt_len):
    ids = row[prompt_len:length - 1].tolist()  # without eos
    return tok.decode(ids)


@pytest.mark.parametrize("bias", [0.8, 0.5, 0.0])
def test_pairs_are_verified_and_plant_the_length_bias(bias):
    """The chosen side is verified correct, the rejected one wrong; among pairs of unequal
    completion lengths the chosen side is longer at the planted rate (4-sigma binomial band)."""
    cfg = dataclasses.replace(RM, batch_size=300, length_bias=bias, max_extra_lines=2)
    tok = rl_tokenizer(CFG)
    p = R.train_pairs(CFG, cfg, tok, 0)
    from moejax.rl import tasks
    items = [tasks.train_item(CFG.rl.tasks, R.RM_STREAM_OFFSET + i) for i in range(300)]
    for i, it in enumerate(items[:60]):
        plen = p.chosen_lengths[i] - p.chosen_completion[i]
        assert rewards.verdict(it, _completion(tok, p.chosen[i], p.chosen_lengths[i], plen)).correct
        assert not rewards.verdict(it, _completion(tok, p.rejected[i], p.rejected_lengths[i],
                                                   plen)).correct
    unequal = p.chosen_completion != p.rejected_completion
    assert unequal.sum() > 150
    rate = np.mean(p.chosen_completion[unequal] > p.rejected_completion[unequal])
    # the answer digits move lengths by one where the extra lines tie, so the band is widened
    # by the share of equal-line pairs; bias 0 / 1 stay exact up to those
    sigma = np.sqrt(max(bias * (1 - bias), 0.01) / unequal.sum())
    assert abs(rate - bias) < 4 * sigma + 0.05, (bias, rate)


def test_verbose_repeats_lines_in_place():
    assert R.verbose("\n1+2+0=3\n12+21=33", 0) == "\n1+2+0=3\n12+21=33"
    assert R.verbose("\n1+2+0=3\n12+21=33", 2) == "\n1+2+0=3\n1+2+0=3\n1+2+0=3\n12+21=33"
    assert R.verbose("12+21=33", 1) == "12+21=33\n12+21=33"


def test_reward_source_is_validated():
    assert apply_overrides(CFG, []).rl.reward_source == "verifier"
    with pytest.raises(ConfigError, match="rl.reward_source"):
        apply_overrides(CFG, ["rl.reward_source=critic"])
    with pytest.raises(ConfigError, match="rl.reward_model_dir"):
        apply_overrides(CFG, ["rl.reward_source=reward_model"])
    with pytest.raises(ConfigError, match="rl.reward_model_dir"):
        apply_overrides(CFG, ["rl.reward_model_dir=/tmp/rm"])
    with pytest.raises(ConfigError, match="rl.dynamic_sampling"):
        apply_overrides(CFG, ["rl.reward_source=reward_model", "rl.reward_model_dir=/tmp/rm",
                              "rl.dynamic_sampling=true"])
    with pytest.raises(ConfigError, match="reward_model.length_bias"):
        R.RewardModelConfig(length_bias=1.5)


def test_score_program_lowers_from_abstract_rows(rm):
    """The AOT row of the RM scoring program (moejax.aot): it lowers from the abstract state
    and rows alone, with the scores replicated."""
    rs, _, _ = rm
    lowered = R.make_score_fn(rs).lower(rs.abstract_state.params, rs.abstract_state.rest,
                                        *R.abstract_score_rows(rs.policy.mesh, 16, 64))
    out = lowered.out_info
    assert out.shape == (16,) and out.sharding.is_fully_replicated
