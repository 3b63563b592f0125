"""Per-token KL estimators between the policy and a frozen reference, and token entropy.

With Δ = log π(y_t) - log π_ref(y_t) on the sampled token (spec A.1, verl ``kl_penalty``):
- ``k1`` = Δ;  ``k2`` = ½ Δ²;  ``k3`` = e^{-Δ} + Δ - 1 (low-variance, >= 0);
- ``k3+`` = the k3 value with the k2 gradient (straight-through: k2 + sg(k3 - k2)).
verl's clamps apply to k3 (and k3+'s value) only: Δ clipped to ±``input_clamp`` before the
formula, the result to ±``output_clamp``; None turns a clamp off. k1 as a *loss* has zero expected
gradient on-policy (A.1 note 3): prefer k3 or k2 there, k1 in the reward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ESTIMATORS = ("k1", "k2", "k3", "k3+")


def _clip(x, bound):
    return x if bound is None else jnp.clip(x, -bound, bound)


def k3_value(delta, input_clamp: float | None = 20.0, output_clamp: float | None = 10.0):
    """k3 = e^{-Δ} + Δ - 1 with verl's optional input/output clamps."""
    delta = _clip(delta, input_clamp)
    # e^{-d} + d - 1 cancels in float32 near d = 0 (it even goes negative): the Taylor series
    # there (its next term, d^5/120, is 1e-8 of the value at |d| = 1e-2), expm1 elsewhere
    series = delta**2 * (0.5 - delta / 6.0 + delta**2 / 24.0)
    value = jnp.where(jnp.abs(delta) < 1e-2, series, jnp.expm1(-delta) + delta)
    return _clip(value, output_clamp)


def kl_estimate(logprobs, ref_logprobs, estimator: str = "k3",
                input_clamp: float | None = 20.0, output_clamp: float | None = 10.0):
    """Per-token KL estimate [N,T] of π against π_ref from sampled-token logprobs [N,T]."""
    delta = logprobs - ref_logprobs
    if estimator == "k1":
        return delta
    if estimator == "k2":
        return 0.5 * delta**2
    if estimator == "k3":
        return k3_value(delta, input_clamp, output_clamp)
    if estimator == "k3+":
        k2 = 0.5 * delta**2
        return k2 + jax.lax.stop_gradient(k3_value(delta, input_clamp, output_clamp) - k2)
    raise ValueError(f"kl estimator {estimator!r} is not one of {ESTIMATORS}")


def entropy_from_logits(logits):
    """Per-position entropy [..] of softmax(logits [.., V]) in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
