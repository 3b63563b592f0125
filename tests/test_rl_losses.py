"""Policy losses: every algorithm x aggregation x correction against a float64 loop written here;
clip boundaries; GSPO by hand; KL closed forms; and the gradient of a toy linear policy being the
same for 1, 2 or 4 micro-batches and on 8 sharded devices (global denominators)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax.config_checks import ConfigError
from moejax.rl import kl as kl_lib
from moejax.rl import losses
from moejax.rl.losses import PolicyLossConfig

N, T, D, V = 8, 6, 5, 7


def _mask(rng, n=N, t=T):
    """Completion masks of varied lengths after a prompt of 1-2 tokens; row 3 is empty."""
    mask = np.zeros((n, t), np.float32)
    for i in range(n):
        start = int(rng.integers(1, 3))
        mask[i, start:start + int(rng.integers(1, t - start + 1))] = 1.0
    mask[3] = 0.0
    return mask


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s, scale=1.0: (scale * rng.normal(size=s)).astype(np.float32)  # noqa: E731
    lp = f(N, T, scale=0.5) - 1.0
    old = lp + f(N, T, scale=0.5)
    adv = np.repeat(f(N, 1), T, 1) + f(N, T, scale=0.1)
    return dict(logprobs=lp, old=old, adv=adv,
                mask=_mask(rng), rollout=lp + f(N, T, scale=0.6), ref=lp + f(N, T, scale=0.5),
                entropy=np.abs(f(N, T)))


# -- float64 loop reference -----------------------------------------------------------------------


def _ref_kl(d, estimator, cin=20.0, cout=10.0):
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    d = max(-cin, min(cin, d))
    return max(-cout, min(cout, math.exp(-d) + d - 1))


def _ref_surrogate(r, a, el, eh, c):
    loss = -min(r * a, min(max(r, 1 - el), 1 + eh) * a)
    if c is not None and a < 0:
        loss = min(loss, -c * a)
    return loss


def _ref_weight(i, t, x, mismatch, band, cap, floor, mask):
    if mismatch == "none":
        return 1.0
    w = math.exp(float(x["old"][i, t]) - float(x["rollout"][i, t]))
    if mismatch == "tis":
        return min(max(w, floor), cap)
    if mismatch == "icepop":
        return w if band[0] <= w <= band[1] else 0.0
    ts = [s for s in range(T) if mask[i, s]]
    if not ts:  # an empty completion contributes nothing whatever its weight
        return 0.0
    g = math.exp(sum(float(x["old"][i, s]) - float(x["rollout"][i, s]) for s in ts) / len(ts))
    return w if band[0] <= g <= band[1] else 0.0


def _ref_agg(per_token, mask, mode, form, num_tokens, num_seqs, lmax):
    total = 0.0
    for i in range(len(mask)):
        ts = [t for t in range(T) if mask[i, t]]
        s = sum(per_token[i][t] for t in ts)
        if mode == "seq_mean_token_mean":
            total += s / len(ts) / num_seqs if ts else 0.0
        else:
            total += s
    if mode == "token_mean":
        return total / num_tokens
    if mode == "seq_mean_token_sum":
        return total / num_seqs
    if mode == "dr_grpo":
        return total / (num_seqs * lmax if form == "tunix" else lmax)
    return total


def _reference_loss(x, cfg: PolicyLossConfig, rows=None, full_mask=None):
    """Loss and clip fractions of ``rows`` of the batch, denominators from ``full_mask``."""
    full_mask = x["mask"] if full_mask is None else full_mask
    rows = range(N) if rows is None else rows
    lengths = full_mask.sum(1)
    num_tokens, num_seqs, lmax = lengths.sum(), (lengths > 0).sum(), T
    mask = x["mask"][list(rows)]
    pg, kl, ent, clip = [], [], [], [0, 0, 0]
    for i in rows:
        ts = [t for t in range(T) if x["mask"][i, t]]
        d = [float(x["logprobs"][i, t]) - float(x["old"][i, t]) for t in range(T)]
        log_s = min(sum(d[t] for t in ts) / max(len(ts), 1), 10.0)
        a_seq = sum(float(x["adv"][i, t]) for t in ts) / max(len(ts), 1)
        row = []
        for t in range(T):
            a = float(x["adv"][i, t])
            if cfg.algo == "ppo":
                r = math.exp(max(-20, min(20, d[t])))
            else:
                r = math.exp(log_s)
                a = a_seq if cfg.algo == "gspo" else a
            loss = _ref_surrogate(r, a, cfg.eps_low, cfg.eps_high, cfg.dual_clip)
            w = _ref_weight(i, t, x, cfg.mismatch, cfg.mismatch_band, cfg.tis_cap, cfg.tis_floor,
                            x["mask"])
            row.append(loss * w)
            if x["mask"][i, t]:
                clip[0] += a > 0 and r > 1 + cfg.eps_high
                clip[1] += a < 0 and r < 1 - cfg.eps_low
                clip[2] += cfg.dual_clip is not None and a < 0 and r > cfg.dual_clip
        pg.append(row)
        kl.append([_ref_kl(float(x["logprobs"][i, t]) - float(x["ref"][i, t]), cfg.kl_estimator)
                   for t in range(T)])
        ent.append([float(x["entropy"][i, t]) for t in range(T)])
    agg = lambda m: _ref_agg(m, mask, cfg.agg, cfg.dr_grpo_form, num_tokens, num_seqs, lmax)  # noqa
    total = agg(pg) + cfg.kl_coef * agg(kl) - cfg.entropy_coef * agg(ent)
    return total, agg(pg), [c / num_tokens for c in clip]


def _call(x, cfg, rows=slice(None), den=None):
    den = losses.loss_denominators(jnp.asarray(x["mask"])) if den is None else den
    j = lambda k: jnp.asarray(x[k][rows])  # noqa: E731
    return losses.policy_loss(j("logprobs"), j("old"), j("adv"), j("mask"), den, cfg,
                              rollout_logprobs=j("rollout"), ref_logprobs=j("ref"),
                              entropy=j("entropy"))


CONFIGS = [PolicyLossConfig(agg=a) for a in losses.AGG_MODES] + [
    PolicyLossConfig(agg="dr_grpo", dr_grpo_form="verl"),
    PolicyLossConfig.dapo(dual_clip=1.5),
    PolicyLossConfig(eps_low=0.1, eps_high=0.3, dual_clip=2.0, agg="seq_mean_token_mean",
                     kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01),
    PolicyLossConfig(kl_coef=0.2, kl_estimator="k2", agg="seq_mean_token_sum"),
    PolicyLossConfig(kl_coef=0.2, kl_estimator="k1", mismatch="tis"),
    PolicyLossConfig(kl_coef=0.2, kl_estimator="k3+", mismatch="tis", tis_floor=0.8, tis_cap=1.2),
    PolicyLossConfig(mismatch="icepop", mismatch_band=(0.8, 1.25)),
    PolicyLossConfig(mismatch="seq_mask_tis", mismatch_band=(0.8, 1.25), agg="dr_grpo"),
    PolicyLossConfig.gspo(),
    PolicyLossConfig.gspo(eps_low=0.05, eps_high=0.1, agg="token_mean", kl_coef=0.1),
    PolicyLossConfig.gspo(algo="gspo_token", eps_low=0.05, eps_high=0.1),
    PolicyLossConfig.gspo(algo="gspo_token", agg="dr_grpo", mismatch="tis", entropy_coef=0.1),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.algo}-{c.agg}-{c.mismatch}")
def test_loss_matches_loop_reference(cfg):
    x = _inputs(seed=2)
    total, metrics = _call(x, cfg)
    want_total, want_pg, want_clip = _reference_loss(x, cfg)
    np.testing.assert_allclose(float(total), want_total, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(float(metrics["pg_loss"]), want_pg, rtol=2e-5, atol=1e-7)
    got_clip = [float(metrics[k]) for k in ("clip_frac_high", "clip_frac_low", "clip_frac_dual")]
    np.testing.assert_allclose(got_clip, want_clip, atol=1e-7)


def test_reference_inputs_exercise_every_clip():
    x = _inputs(seed=2)
    _, _, clip = _reference_loss(x, PolicyLossConfig.dapo(dual_clip=1.5))
    assert all(c > 0 for c in clip), clip
    _, metrics = _call(x, PolicyLossConfig.gspo())
    assert float(metrics["clip_frac"]) > 0.3  # GSPO's tiny ranges clip most sequences


@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=lambda c: c.agg)
def test_micro_batch_losses_sum_to_the_full_loss(cfg):
    x = _inputs(seed=2)
    full, full_metrics = _call(x, cfg)
    calls = [_call(x, cfg, slice(k, k + 2)) for k in range(0, N, 2)]
    np.testing.assert_allclose(sum(float(c[0]) for c in calls), float(full), rtol=1e-6)
    for key, value in full_metrics.items():  # metrics add up over micro-batches too
        np.testing.assert_allclose(sum(float(c[1][key]) for c in calls), float(value),
                                   rtol=1e-5, atol=1e-7, err_msg=key)
    want, _, _ = _reference_loss(x, cfg, rows=range(0, 2))
    np.testing.assert_allclose(float(_call(x, cfg, slice(0, 2))[0]), want, rtol=2e-5)


# -- clipping at the boundaries -------------------------------------------------------------------


def test_clip_boundaries_and_dual_clip_only_for_negative_advantages():
    el, eh, c = np.float32(0.2), np.float32(0.28), 3.0
    hi, lo = np.float32(1) + eh, np.float32(1) - el
    ratio = jnp.asarray([hi, np.nextafter(hi, 2), lo, np.nextafter(lo, 0), 3.0, 3.5, 3.5])
    a = jnp.asarray([1.0, 1.0, -1.0, -1.0, -2.0, -2.0, 2.0])
    surrogate = lambda r: losses.clipped_surrogate(r, a, float(el), float(eh), c)  # noqa: E731
    loss, high, low, dual = surrogate(ratio)
    np.testing.assert_array_equal(np.asarray(high), [0, 1, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(np.asarray(low), [0, 0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(dual), [0, 0, 0, 0, 0, 1, 0])  # A>0 never dual
    grad = np.asarray(jax.grad(lambda r: jnp.sum(surrogate(r)[0]))(ratio))
    # exactly on a bound the clip is inactive: full gradient -A; past it, zero
    np.testing.assert_allclose(grad, [-1, 0, 1, 0, 2, 0, 0])
    np.testing.assert_allclose(np.asarray(loss)[[1, 3, 5, 6]],
                               [-(1 + eh), 1 - el, 2 * c, -2 * (1 + eh)], rtol=1e-6)


# -- GSPO -----------------------------------------------------------------------------------------


def test_gspo_sequence_ratio_and_gradient_by_hand():
    lp = np.array([[-1.0, -0.5, -2.0, 0.0]], np.float32)
    old = np.array([[-1.1, -0.4, -2.3, 5.0]], np.float32)  # last token masked out
    mask = np.array([[1, 1, 1, 0]], np.float32)
    adv = np.full((1, 4), 0.7, np.float32)
    cfg = PolicyLossConfig.gspo(eps_low=0.5, eps_high=0.5)
    den = losses.loss_denominators(mask)
    s = math.exp(((-1.0 + 1.1) + (-0.5 + 0.4) + (-2.0 + 2.3)) / 3)
    assert float(jnp.exp(losses.sequence_log_ratio(lp, old, mask))[0]) == pytest.approx(s, 1e-6)
    fn = lambda l, c: losses.policy_loss(l, old, adv, mask, den, c)  # noqa: E731
    total, metrics = fn(jnp.asarray(lp), cfg)
    assert float(total) == pytest.approx(-0.7 * s, rel=1e-6)
    assert float(metrics["ratio_mean"]) == pytest.approx(s, rel=1e-6)
    grad = np.asarray(jax.grad(lambda l: fn(l, cfg)[0])(jnp.asarray(lp)))
    np.testing.assert_allclose(grad, [[-0.7 * s / 3] * 3 + [0.0]], rtol=1e-6)
    # GSPO-token with a per-sequence advantage has the same value and gradient
    tok = PolicyLossConfig.gspo(algo="gspo_token", eps_low=0.5, eps_high=0.5)
    grad_tok = np.asarray(jax.grad(lambda l: fn(l, tok)[0])(jnp.asarray(lp)))
    np.testing.assert_allclose(grad_tok, grad, rtol=1e-6)
    assert float(fn(jnp.asarray(lp), tok)[0]) == pytest.approx(float(total), rel=1e-6)


# -- KL --------------------------------------------------------------------------------------------


def test_kl_estimators_match_closed_forms_and_clamps():
    rng = np.random.default_rng(3)
    logits, ref_logits = rng.normal(size=(2, 16, V)), rng.normal(size=(2, 16, V))
    tokens = rng.integers(0, V, (2, 16))
    gather = lambda z: np.take_along_axis(  # noqa: E731
        z - np.log(np.exp(z).sum(-1, keepdims=True)), tokens[..., None], -1)[..., 0]
    lp, rp = gather(logits), gather(ref_logits)
    d = lp - rp
    k3 = np.exp(rp - lp) - (rp - lp) - 1
    assert k3.max() > 10  # the output clamp matters on these inputs
    closed = {"k1": (d, None), "k2": (0.5 * d**2, None), "k3": (k3, None),
              "k3 clamped": (np.minimum(k3, 10.0), 10.0)}
    for name, (want, out_clamp) in closed.items():
        got = kl_lib.kl_estimate(jnp.asarray(lp, jnp.float32), jnp.asarray(rp, jnp.float32),
                                 name.split()[0], 20.0, out_clamp)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    big = jnp.asarray([-30.0, -5.0, 25.0])
    np.testing.assert_allclose(np.asarray(kl_lib.kl_estimate(big, 0.0 * big, "k3")),
                               [10.0, 10.0, 10.0])  # input ±20 then output ±10
    np.testing.assert_allclose(np.asarray(kl_lib.kl_estimate(big[1:2], 0.0, "k3", None, None)),
                               [math.exp(5) - 6], rtol=1e-6)
    assert float(kl_lib.kl_estimate(jnp.asarray(25.0), 0.0, "k3", 20.0, None)) == \
        pytest.approx(math.exp(-20) + 19, rel=1e-6)


def test_k3_plus_has_k3_value_and_k2_gradient():
    lp = jnp.asarray([-1.0, -0.2, -3.0, -0.7])
    ref = jnp.asarray([-1.5, -0.1, -1.0, -0.7])
    plus = lambda l: jnp.sum(kl_lib.kl_estimate(l, ref, "k3+"))  # noqa: E731
    k2 = lambda l: jnp.sum(kl_lib.kl_estimate(l, ref, "k2"))  # noqa: E731
    k3 = lambda l: jnp.sum(kl_lib.kl_estimate(l, ref, "k3"))  # noqa: E731
    assert float(plus(lp)) == pytest.approx(float(k3(lp)), rel=1e-6)
    np.testing.assert_allclose(np.asarray(jax.grad(plus)(lp)), np.asarray(jax.grad(k2)(lp)),
                               rtol=1e-6)
    assert not np.allclose(np.asarray(jax.grad(k3)(lp)), np.asarray(jax.grad(k2)(lp)))


def test_entropy_from_logits_matches_numpy():
    z = np.random.default_rng(4).normal(size=(3, 4, V))
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(kl_lib.entropy_from_logits(jnp.asarray(z))),
                               -(p * np.log(p)).sum(-1), rtol=1e-5)


# -- config and argument errors --------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    ({"algo": "grpo"}, "loss.algo"), ({"agg": "mean"}, "loss.agg"),
    ({"eps_low": 1.0}, "loss.eps_low"), ({"dual_clip": 1.1}, "loss.dual_clip"),
    ({"kl_estimator": "k4"}, "loss.kl_estimator"), ({"mismatch": "is"}, "loss.mismatch"),
    ({"tis_floor": 3.0}, "loss.tis_floor"), ({"mismatch_band": (2.0, 1.0)}, "loss.mismatch_band"),
    ({"kl_coef": -1.0}, "loss.kl_coef"), ({"dr_grpo_form": "x"}, "loss.dr_grpo_form")])
def test_loss_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        PolicyLossConfig(**kwargs)


def test_missing_inputs_are_named():
    x = _inputs()
    den = losses.loss_denominators(jnp.asarray(x["mask"]))
    args = [jnp.asarray(x[k]) for k in ("logprobs", "old", "adv", "mask")]
    with pytest.raises(ValueError, match="rollout_logprobs"):
        losses.policy_loss(*args, den, PolicyLossConfig(mismatch="tis"))
    with pytest.raises(ValueError, match="ref_logprobs"):
        losses.policy_loss(*args, den, PolicyLossConfig(kl_coef=0.1))


def test_bypass_uses_rollout_logprobs_as_old():
    """Bypass = rollout logprobs passed as π_old: identical to TIS whose weights are all 1."""
    x = _inputs(seed=5)
    x_bypass = dict(x, old=x["rollout"])
    loss_bypass = _call(x_bypass, PolicyLossConfig())[0]
    loss_tis = _call(x_bypass, PolicyLossConfig(mismatch="tis"))[0]
    assert float(loss_bypass) == pytest.approx(float(loss_tis), rel=1e-6)
    assert float(loss_bypass) != pytest.approx(float(_call(x, PolicyLossConfig())[0]), rel=1e-3)


# -- gradients: micro-batches and sharding --------------------------------------------------------

GRAD_CONFIGS = {
    "token_mean": PolicyLossConfig.dapo(dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01,
                                        mismatch="tis"),
    "seq_mean_token_mean": PolicyLossConfig(agg="seq_mean_token_mean", kl_coef=0.1,
                                            kl_estimator="k3+"),
    "seq_mean_token_sum": PolicyLossConfig(agg="seq_mean_token_sum", entropy_coef=0.01),
    "dr_grpo": PolicyLossConfig(agg="dr_grpo", mismatch="icepop", mismatch_band=(0.8, 1.25)),
    "gspo": PolicyLossConfig.gspo(eps_low=0.05, eps_high=0.1, kl_coef=0.1),
}
NB = 16  # batch rows for the gradient tests: 2 per device on 8 devices


def _policy_batch(seed=6):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(D, V)).astype(np.float32)
    batch = dict(x=rng.normal(size=(NB, T, D)).astype(np.float32),
                 tokens=rng.integers(0, V, (NB, T)).astype(np.int32), mask=_mask(rng, NB),
                 adv=np.repeat(rng.normal(size=(NB, 1)), T, 1).astype(np.float32))

    def logprobs(weights):
        logp = jax.nn.log_softmax(jnp.asarray(batch["x"]) @ weights, -1)
        return np.asarray(jnp.take_along_axis(logp, batch["tokens"][..., None], -1)[..., 0])

    batch["old"] = logprobs(w + 0.3 * rng.normal(size=w.shape).astype(np.float32))
    batch["ref"] = logprobs(w + 0.3 * rng.normal(size=w.shape).astype(np.float32))
    batch["rollout"] = batch["old"] + (0.2 * rng.normal(size=(NB, T))).astype(np.float32)
    return jnp.asarray(w), {k: jnp.asarray(v) for k, v in batch.items()}


def _toy_loss(w, batch, den, cfg):
    """A tiny linear policy: logits = x @ W; per-token logprobs and entropies of the tokens."""
    logits = batch["x"] @ w  # [n,T,V]
    logp = jax.nn.log_softmax(logits, -1)
    lp = jnp.take_along_axis(logp, batch["tokens"][..., None], -1)[..., 0]
    return losses.policy_loss(lp, batch["old"], batch["adv"], batch["mask"], den, cfg,
                              rollout_logprobs=batch["rollout"], ref_logprobs=batch["ref"],
                              entropy=kl_lib.entropy_from_logits(logits))[0]


@functools.lru_cache(maxsize=None)
def _grad_fn(cfg):
    return jax.jit(jax.grad(_toy_loss), static_argnums=3)


def _split_grad(w, batch, cfg, parts, local_denominators=False):
    """Sum of the micro-batch gradients, denominators global (or, to show the bug, per part)."""
    den = losses.loss_denominators(batch["mask"])
    size = NB // parts
    total = 0.0
    for k in range(parts):
        part = {key: v[k * size:(k + 1) * size] for key, v in batch.items()}
        part_den = losses.loss_denominators(part["mask"]) if local_denominators else den
        total = total + _grad_fn(cfg)(w, part, part_den, cfg)
    return np.asarray(total)


def _assert_same_gradient(got, want):
    scale = np.abs(want).max()
    assert scale > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * scale)


@pytest.fixture(scope="module")
def policy_batch():
    return _policy_batch()


@pytest.mark.parametrize("name", list(GRAD_CONFIGS))
def test_gradient_is_the_same_for_1_2_4_micro_batches(policy_batch, name):
    w, batch = policy_batch
    cfg = GRAD_CONFIGS[name]
    full = _split_grad(w, batch, cfg, 1)
    for parts in (2, 4):
        _assert_same_gradient(_split_grad(w, batch, cfg, parts), full)


@pytest.mark.parametrize("name", ["token_mean", "seq_mean_token_mean"])
def test_per_micro_batch_denominators_change_the_gradient(policy_batch, name):
    """The check above can fail: normalising each micro-batch by its own counts (verl #5625)."""
    w, batch = policy_batch
    cfg = GRAD_CONFIGS[name]
    full = _split_grad(w, batch, cfg, 1)
    local = _split_grad(w, batch, cfg, 4, local_denominators=True)
    assert np.abs(local - full).max() > 1e-3 * np.abs(full).max()


@pytest.mark.parametrize("name", ["token_mean", "seq_mean_token_mean", "dr_grpo", "gspo"])
def test_gradient_sharded_over_8_devices_equals_single_device(policy_batch, name):
    w, batch = policy_batch
    cfg = GRAD_CONFIGS[name]
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    sharded = {k: jax.device_put(v, rows) for k, v in batch.items()}
    assert len(sharded["x"].sharding.device_set) == 8

    @functools.partial(jax.jit, static_argnums=2)
    def grad_with_global_denominators(weights, data, config):
        den = losses.loss_denominators(data["mask"])  # a global sum over the sharded batch
        return jax.grad(_toy_loss)(weights, data, den, config)

    got = grad_with_global_denominators(jax.device_put(w, replicated), sharded, cfg)
    _assert_same_gradient(np.asarray(got), _split_grad(w, batch, cfg, 1))


def test_padding_values_never_reach_loss_or_gradient():
    """-inf / NaN logprobs on padding (outside the completion) change nothing."""
    x = _inputs(seed=3)
    cfg = PolicyLossConfig(kl_coef=0.1, entropy_coef=0.01, mismatch="tis")
    dirty = {k: np.where(x["mask"] > 0, v, np.float32(-np.inf if k != "adv" else np.nan))
             for k, v in x.items() if k != "mask"}
    dirty["mask"] = x["mask"]
    den = losses.loss_denominators(jnp.asarray(x["mask"]))

    def grad(inputs):
        rest = {k: jnp.asarray(v) for k, v in inputs.items()}
        fn = lambda lp: losses.policy_loss(  # noqa: E731
            lp, rest["old"], rest["adv"], rest["mask"], den, cfg, rollout_logprobs=rest["rollout"],
            ref_logprobs=rest["ref"], entropy=rest["entropy"])[0]
        return jax.value_and_grad(fn)(rest["logprobs"])

    (v_clean, g_clean), (v_dirty, g_dirty) = grad(x), grad(dirty)
    assert float(v_dirty) == pytest.approx(float(v_clean), rel=1e-6)
    np.testing.assert_allclose(np.asarray(g_dirty), np.asarray(g_clean), rtol=1e-6)


@pytest.mark.parametrize("algo", ["gspo", "gspo_token"])
def test_gspo_log_ratio_is_clamped_above_at_10(algo):
    lp = jnp.zeros((1, 3))
    mask = jnp.ones((1, 3))
    cfg = PolicyLossConfig.gspo(algo=algo)
    args = (lp - 15.0, -jnp.ones((1, 3)), mask, losses.loss_denominators(mask), cfg)
    _, metrics = losses.policy_loss(lp, *args)
    assert float(metrics["ratio_mean"]) == pytest.approx(math.exp(10.0), rel=1e-5)
    grad = jax.grad(lambda l: losses.policy_loss(l, *args)[0])(lp)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)  # past the clamp: no gradient


def test_k3_is_accurate_and_nonnegative_for_tiny_log_ratios():
    """exp(-d) + d - 1 cancels catastrophically in fp32 near d = 0 (it went negative); the value
    must match float64 to a few ulp-relative and never be negative."""
    from moejax.rl.kl import k3_value

    d = np.concatenate([np.geomspace(1e-7, 1e-2, 50), -np.geomspace(1e-7, 1e-2, 50)])
    got = np.asarray(k3_value(jnp.asarray(d, jnp.float32), None, None), np.float64)
    d32 = d.astype(np.float32).astype(np.float64)
    want = np.expm1(-d32) + d32
    assert (got >= 0).all()
    np.testing.assert_allclose(got, want, rtol=2e-3)
