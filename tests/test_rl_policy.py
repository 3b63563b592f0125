"""RL policy programs: the update gradient is the same for 1, 2 or 4 micro-batches and on 8
devices (global denominators), equals a float64-free by-hand recomputation of the loss; the
rollout rows -> batch layout; routing disagreement; config errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import train as T
from moejax.config import ConfigError, DataConfig, MeshConfig, TrainConfig
from moejax.mesh import make_mesh
from moejax.rl.config import RLConfig, RLRunConfig
from moejax.rl.losses import PolicyLossConfig
from moejax.rl.policy import make_policy_grad, token_logprobs
from moejax.rl.rollout import RolloutConfig
from moejax.rl.rows import Rollouts, rl_batch, routing_disagreement
from moejax.testing import tiny_model

N_ROWS, WIDTH = 8, 12  # rows of a mini-batch, positions per row (S - 1)


def rl_config(micro: int = 1, mesh: MeshConfig = MeshConfig(data=1), **rl) -> RLRunConfig:
    base = dict(rollout=RolloutConfig(max_prompt_len=6, max_new_tokens=7), prompts_per_step=2,
                num_generations=4, micro_batches=micro, loss=PolicyLossConfig(
                    eps_low=0.2, eps_high=0.28, agg="seq_mean_token_mean", kl_coef=0.05,
                    entropy_coef=0.01))
    base.update(rl)
    return RLRunConfig(model=tiny_model(vocab_size=259), mesh=mesh, data=DataConfig(seq_len=16),
                       train=TrainConfig(steps=2, batch_size=8, warmup_steps=0),
                       rl=RLConfig(**base))


def random_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Rows with prompts of 2..5 tokens, completions of 0..(WIDTH - prompt) tokens, random
    advantages and logprobs near the policy's."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 259, (N_ROWS, WIDTH + 1)).astype(np.int32)
    plen = rng.integers(2, 6, N_ROWS)
    clen = np.array([rng.integers(0, WIDTH + 1 - p) for p in plen])
    clen[0] = 0  # an empty completion: no tokens, no loss
    t = np.arange(WIDTH)[None]
    mask = ((t + 1 >= plen[:, None]) & (t + 1 < (plen + clen)[:, None])).astype(np.float32)
    adv = rng.normal(size=N_ROWS).astype(np.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.broadcast_to(t, (N_ROWS, WIDTH)).astype(np.int32),
            "segment_ids": (t < (plen + clen)[:, None]).astype(np.int32),
            "completion_mask": mask, "advantages": adv[:, None] * mask,
            "old_logprobs": (-5.5 + 0.3 * rng.normal(size=(N_ROWS, WIDTH))).astype(np.float32),
            "rollout_logprobs": (-5.5 + 0.3 * rng.normal(size=(N_ROWS, WIDTH))).astype(np.float32),
            "ref_logprobs": (-5.5 + 0.3 * rng.normal(size=(N_ROWS, WIDTH))).astype(np.float32)}


@pytest.fixture(scope="module")
def state_and_batch():
    cfg = rl_config()
    setup = T.setup(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    return jax.device_get(T.init_state(setup)), random_batch()


def grads_of(cfg: RLRunConfig, devices: int, state, batch):
    setup = T.setup(cfg, make_mesh(cfg.mesh, jax.devices()[:devices]))
    state = jax.device_put(state, setup.state_shardings)
    rows = {k: jax.device_put(v, T.batch_sharding(setup.mesh, v.ndim)) for k, v in batch.items()}
    grads, metrics = jax.jit(make_policy_grad(setup, cfg))(state, rows)
    return jax.device_get(grads), jax.device_get(metrics)


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)]).astype(np.float64)


def reference_loss(cfg: RLRunConfig, graphdef, state, batch) -> jax.Array:
    """The mini-batch loss written out by hand for seq_mean_token_mean + k3 KL + entropy."""
    L = cfg.rl.loss
    model = nnx.merge(graphdef, state.params, state.rest)
    logits, _ = model(batch["inputs"], segment_ids=batch["segment_ids"],
                      positions=batch["positions"])
    lp, ent = token_logprobs(logits, batch["targets"], 1.0)
    m = batch["completion_mask"]
    ratio = jnp.exp(lp - batch["old_logprobs"])
    a = batch["advantages"]
    pg = -jnp.minimum(ratio * a, jnp.clip(ratio, 1 - L.eps_low, 1 + L.eps_high) * a)
    d = batch["ref_logprobs"] - lp
    k3 = jnp.exp(d) - d - 1
    per_tok = pg + L.kl_coef * k3 - L.entropy_coef * ent
    lengths = m.sum(-1)
    per_seq = jnp.where(lengths > 0, (per_tok * m).sum(-1) / jnp.maximum(lengths, 1), 0.0)
    return per_seq.sum() / (lengths > 0).sum()


def test_policy_gradient_matches_the_hand_written_loss(state_and_batch):
    state, batch = state_and_batch
    cfg = rl_config()
    g, metrics = grads_of(cfg, 1, state, batch)
    graphdef = T.setup(cfg, make_mesh(cfg.mesh, jax.devices()[:1])).graphdef
    want = jax.grad(lambda p: reference_loss(cfg, graphdef, dataclasses.replace(state, params=p),
                                             batch))(state.params)
    np.testing.assert_allclose(flat(g), flat(want), rtol=1e-5, atol=1e-7)
    assert float(np.abs(flat(g)).max()) > 0


@pytest.mark.parametrize("micro,devices", [(2, 1), (4, 1), (1, 8), (2, 8)])
def test_policy_gradient_same_for_micro_batches_and_devices(state_and_batch, micro, devices):
    state, batch = state_and_batch
    base, base_m = grads_of(rl_config(), 1, state, batch)
    mesh = MeshConfig(data=devices if devices == 8 else 1)
    if devices == 8 and micro == 2:
        mesh = MeshConfig(data=4)  # 8 rows / 2 micro-batches = 4 rows: one per data shard
        devices = 4
    got, got_m = grads_of(rl_config(micro, mesh), devices, state, batch)
    a, b = flat(got), flat(base)
    assert np.linalg.norm(a - b) <= 1e-6 * np.linalg.norm(b) + 1e-12
    for k in ("loss", "pg_loss", "clip_frac", "entropy", "kl_ref"):
        np.testing.assert_allclose(got_m[k], base_m[k], rtol=1e-5, atol=1e-7)


def test_rl_batch_aligns_targets_masks_and_advantages():
    S = 8
    tokens = np.arange(2 * S, dtype=np.int32).reshape(2, S) + 10
    cmask = np.zeros((2, S - 1), bool)
    cmask[0, 2:5] = True  # prompt of 3 tokens, 3 generated tokens (targets 3, 4, 5)
    cmask[1, 1:2] = True  # prompt of 2 tokens, 1 generated token
    routing = np.full((2, 1, S, 2), -1, np.int32)
    r = Rollouts(tokens=tokens, prompt_lengths=np.array([3, 2]), completion_lengths=np.array([3, 1]),
                 finished=np.array([True, False]), completion_mask=cmask,
                 logprobs=np.where(cmask, -1.0, 0.0), routing=routing, routing_valid=None,
                 rewards=np.array([1.0, 0.0]), correct=np.array([True, False]), tiers=["a", "b"])
    rows = rl_batch(r, np.array([0.5, -2.0]), np.full((2, S - 1), -3.0), None, routing)
    np.testing.assert_array_equal(rows["inputs"], tokens[:, :-1])
    np.testing.assert_array_equal(rows["targets"], tokens[:, 1:])
    np.testing.assert_array_equal(rows["segment_ids"][0], [1] * 6 + [0])
    np.testing.assert_array_equal(rows["segment_ids"][1], [1] * 3 + [0] * 4)
    np.testing.assert_array_equal(rows["advantages"][0], [0, 0, .5, .5, .5, 0, 0])
    np.testing.assert_array_equal(rows["advantages"][1], [0, -2, 0, 0, 0, 0, 0])
    assert rows["forced_experts"].shape == (2, 1, S - 1, 2)


def test_routing_disagreement_counts_sets_not_order():
    a = np.array([[[[0, 1], [2, 3], [1, 0]]]])  # [B=1, L=1, T=3, k=2]
    b = np.array([[[[1, 0], [2, 4], [5, 6]]]])
    valid = np.array([[True, True, False]])
    np.testing.assert_allclose(routing_disagreement(a, b, valid), [0.5])


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="rl.num_generations"):
        rl_config(num_generations=1)
    with pytest.raises(ConfigError, match="rl.replay.mode"):
        rl_config(replay=dataclasses.replace(RLConfig().replay, mode="r3"))  # dense model
    with pytest.raises(ConfigError, match="rl.micro_batches"):
        rl_config(micro=3)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        RLRunConfig(model=tiny_model(vocab_size=259, max_seq_len=16), data=DataConfig(seq_len=8),
                    rl=RLConfig(rollout=RolloutConfig(max_prompt_len=8, max_new_tokens=12)))
