"""Sampler: greedy/temperature/top-k/top-p by hand; generate() against the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.model import Model
from moejax.sampling import _generate, generate, sample_logits, top_p_mask, truncation_mask
from moejax.testing import BATCH, tiny_model

B = BATCH
PROBS = np.array([0.05, 0.3, 0.1, 0.4, 0.02, 0.08, 0.03, 0.02])  # sorted: 3, 1, 2, 5, 0, 6, 4|7


@jax.jit
def sample_many(logits, keys, temperature, top_p, greedy, top_k=0):
    """[K] keys -> [K, B] samples, one compile for every knob value (knobs are traced)."""
    return jax.vmap(lambda k: sample_logits(logits, k, temperature, top_p, greedy, top_k))(keys)


KEYS = jax.random.split(jax.random.key(0), 500)


def test_greedy_and_zero_temperature_equal_argmax():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(B, 288)), jnp.float32)
    best = np.argmax(np.asarray(logits), -1)
    np.testing.assert_array_equal(sample_logits(logits, KEYS[0], greedy=True), best)
    for temperature, greedy in ((1.0, True), (0.0, False), (1e-4, False)):  # temperature -> 0 limit
        got = np.asarray(sample_many(logits, KEYS[:50], temperature, 1.0, greedy))
        np.testing.assert_array_equal(got, np.broadcast_to(best, got.shape))
    hot = np.asarray(sample_many(logits, KEYS[:50], 1.0, 1.0, False))
    assert (hot != best).mean() > 0.5  # at temperature 1 over 288 tokens most draws differ


@pytest.mark.parametrize("top_p,kept", [(0.3, {3}), (0.5, {3, 1}), (0.75, {3, 1, 2}),
                                         (0.85, {3, 1, 2, 5}), (1.0, set(range(8)))])
def test_top_p_keeps_smallest_set_including_crossing_token(top_p, kept):
    probs = jnp.asarray(np.tile(PROBS, (B, 1)), jnp.float32)
    mask = np.asarray(top_p_mask(probs, top_p))
    expect = np.isin(np.arange(8), list(kept))
    np.testing.assert_array_equal(mask, np.broadcast_to(expect, mask.shape))
    assert PROBS[expect].sum() >= top_p - 1e-6
    assert PROBS[expect].sum() - PROBS[expect].min() < top_p  # smallest: dropping one falls short


def test_top_p_sampling_distribution():
    logits = jnp.asarray(np.log(np.tile(PROBS, (B, 1))), jnp.float32)
    draws = np.asarray(sample_many(logits, KEYS, 1.0, 0.75, False)).ravel()  # 4000 draws
    assert set(np.unique(draws)) == {1, 2, 3}
    freq = np.bincount(draws, minlength=8)[[3, 1, 2]] / draws.size
    np.testing.assert_allclose(freq, np.array([0.4, 0.3, 0.1]) / 0.8, atol=0.03)
    # temperature 0.5 sharpens: p ~ p^2 renormalised, top-p applied afterwards
    draws = np.asarray(sample_many(logits, KEYS, 0.5, 1.0, False)).ravel()
    sharp = PROBS**2 / (PROBS**2).sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=8) / draws.size, sharp, atol=0.03)


def truncation_reference(logits, k, p):
    """The kept set by hand (float64 loop): the k largest (ties by index), renormalised, then
    tokens in descending order while the mass before them is < p (p >= 1 keeps all k)."""
    order = np.argsort(-logits, kind="stable")[:k or len(logits)]
    probs = np.exp(logits[order] - logits[order].max())
    probs /= probs.sum()
    keep, mass = np.zeros(len(logits), bool), 0.0
    for tok, q in zip(order, probs):
        if p < 1.0 and mass >= p:
            break
        keep[tok] = True
        mass += q
    return keep


@pytest.mark.parametrize("top_k,top_p,kept", [
    (2, 1.0, {3, 1}), (1, 1.0, {3}), (8, 1.0, set(range(8))),
    (2, 0.5, {3}),  # token 1 is kept by top-p alone (mass before 0.4) but not after renormalising
    (4, 0.8, {3, 1, 2}), (3, 0.75, {3, 1})])
def test_top_k_then_top_p_keeps_by_hand_set(top_k, top_p, kept):
    mask = np.asarray(truncation_mask(jnp.asarray(np.log(np.tile(PROBS, (B, 1))), jnp.float32),
                                      top_k, top_p))
    expect = np.isin(np.arange(8), list(kept))
    np.testing.assert_array_equal(mask, np.broadcast_to(expect, mask.shape))
    np.testing.assert_array_equal(expect, truncation_reference(np.log(PROBS), top_k, top_p))


def test_truncation_mask_matches_reference_on_random_logits():
    logits = np.random.default_rng(3).normal(size=(B, 288)) * 2
    for top_k, top_p in ((0, 1.0), (1, 1.0), (5, 1.0), (40, 0.9), (0, 0.3), (288, 0.95)):
        mask = np.asarray(jax.jit(truncation_mask)(jnp.asarray(logits, jnp.float32), top_k, top_p))
        for b in range(B):
            np.testing.assert_array_equal(mask[b], truncation_reference(logits[b], top_k, top_p))


def test_top_k_sampling_distribution():
    logits = jnp.asarray(np.log(np.tile(PROBS, (B, 1))), jnp.float32)
    draws = np.asarray(sample_many(logits, KEYS, 1.0, 1.0, False, 3)).ravel()  # 4000 draws
    assert set(np.unique(draws)) == {3, 1, 2}  # never outside the top 3
    freq = np.bincount(draws, minlength=8)[[3, 1, 2]] / draws.size
    np.testing.assert_allclose(freq, np.array([0.4, 0.3, 0.1]) / 0.8, atol=0.03)
    # top-k before top-p: top 2 renormalised = (4/7, 3/7), so top_p=0.5 keeps token 3 only
    draws = np.asarray(sample_many(logits, KEYS[:50], 1.0, 0.5, False, 2))
    assert (draws == 3).all()
    # temperature before top-k: 0.5 sharpens p -> p^2 within the same top 3
    draws = np.asarray(sample_many(logits, KEYS, 0.5, 1.0, False, 3)).ravel()
    sharp = PROBS[[3, 1, 2]] ** 2 / (PROBS[[3, 1, 2]] ** 2).sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=8)[[3, 1, 2]] / draws.size, sharp,
                               atol=0.03)


P, NEW = 24, 16
LENS = np.array([24, 3, 10, 1, 17, 24, 8, 12], np.int32)


@pytest.fixture(scope="module")
def setup():
    # scan_layers: the harder case (nnx.scan inside the decode while_loop)
    model = nnx.jit(lambda: Model(tiny_model(scan_layers=True), rngs=nnx.Rngs(0)))()
    prompt = np.random.default_rng(1).integers(1, 288, size=(B, P)).astype(np.int32)
    prompt[np.arange(P)[None] >= LENS[:, None]] = 0
    greedy = np.asarray(generate(model, prompt, LENS, NEW, rng=jax.random.key(0), greedy=True))
    return model, prompt, greedy


def test_generate_greedy_matches_full_forward_argmax(setup):
    model, prompt, out = setup
    assert out.shape == (B, P + NEW)
    logits, _ = nnx.jit(lambda m, t: m(t))(model, out)  # causal: padding after a row's end is harmless
    pred = np.argmax(np.asarray(logits), -1)
    for b in range(B):
        n = LENS[b]
        np.testing.assert_array_equal(out[b, :n], prompt[b, :n])
        np.testing.assert_array_equal(out[b, n:n + NEW], pred[b, n - 1:n - 1 + NEW])
        np.testing.assert_array_equal(out[b, n + NEW:], 0)


def test_generate_stops_at_eos_and_pads(setup):
    model, prompt, out = setup
    eos = int(out[1, LENS[1] + 3])  # row 1's 4th generated token
    got = np.asarray(generate(model, prompt, LENS, NEW, rng=jax.random.key(0), greedy=True,
                              eos_id=eos, pad_id=0))
    stopped = 0
    for b in range(B):
        gen = out[b, LENS[b]:LENS[b] + NEW]
        hits = np.flatnonzero(gen == eos)
        stop = LENS[b] + (hits[0] + 1 if hits.size else NEW)
        np.testing.assert_array_equal(got[b, :stop], out[b, :stop])
        np.testing.assert_array_equal(got[b, stop:], 0)
        stopped += bool(hits.size)
    assert stopped >= 1 and (got != out).any()  # some row was cut short after its eos


def test_generate_sampling_is_seeded_and_respects_top_p(setup):
    model, prompt, greedy = setup
    compiled = _generate._cache_size()
    a = np.asarray(generate(model, prompt, LENS, NEW, rng=jax.random.key(5), temperature=1.0, top_p=0.9))
    b = np.asarray(generate(model, prompt, LENS, NEW, rng=jax.random.key(5), temperature=1.0, top_p=0.9))
    c = np.asarray(generate(model, prompt, LENS, NEW, rng=jax.random.key(6), temperature=1.0, top_p=0.9))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy).any()
    for b_ in range(B):
        np.testing.assert_array_equal(a[b_, :LENS[b_]], prompt[b_, :LENS[b_]])
    assert a.min() >= 0 and a.max() < 288
    assert _generate._cache_size() == compiled  # new knob values and seeds reuse the one program
