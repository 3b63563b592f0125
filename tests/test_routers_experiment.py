"""The routers experiment's pieces: RMoE's no-recurrence control, the cross-layer routing metrics
(against planted counts and a loop), the drop-top probe, and the arms' compute matching. The
end-to-end smoke run is in tests/test_experiments_moe.py."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import routers
from moejax.analysis.routing_layers import (coselection_counts, consecutive_layer_mi,
                                            usage_entropy)
from moejax.config import ConfigError, MoEConfig, RouterConfig
from moejax.layers import router as R
from moejax.model import Model
from moejax.overrides import apply_overrides
from moejax.testing import tiny_model


# -- RMoE same-parameter control ----------------------------------------------------------------

def rmoe_cfg(reset: bool):
    router = RouterConfig(recurrent="gru", recurrent_dim=16, recurrent_reset=reset)
    return tiny_model(num_layers=3, moe=MoEConfig(num_experts=8, top_k=2, d_expert=32,
                                                  router=router))


def zero_state_forward(model: Model, tokens):
    """The plain RMoE's blocks with the router cell's input state zero at every layer: logits."""
    B, T = tokens.shape
    x = model.embed(tokens)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    seg = jnp.ones((B, T), jnp.int32)
    for block in model.layers:
        x, _, _, _ = block(x, pos, seg, None, tokens=tokens, cell=model.router_cell, state=None)
    h = model.final_norm(x)
    return model.embed.attend(h) if model.lm_head is None else model.lm_head(h)


def test_rmoe_reset_equals_zero_input_state_at_every_layer():
    """recurrent_reset=True is the RMoE whose GRU reads h = 0 at each layer (same parameters,
    same count); the plain RMoE differs (its state carries across layers), and the cell's
    recurrent weight w_h gets no gradient under the reset. The forwards and the gradient are one
    jitted program (eager, the three forwards and the backward dispatch op by op, each op its own
    compile); the reset model's logits are the primal of its loss's value-and-gradient."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 288, (2, 16)), jnp.int32)
    reset, plain = Model(rmoe_cfg(True), rngs=nnx.Rngs(3)), Model(rmoe_cfg(False), rngs=nnx.Rngs(3))
    p_reset, p_plain = nnx.state(reset, nnx.Param), nnx.state(plain, nnx.Param)
    assert jax.tree.structure(p_reset) == jax.tree.structure(p_plain)
    for a, b in zip(jax.tree.leaves(p_reset), jax.tree.leaves(p_plain)):
        np.testing.assert_array_equal(a, b)
    graph, params, rest = nnx.split(reset, nnx.Param, ...)
    plain_graph, plain_state = nnx.split(plain)

    @jax.jit
    def run(params, rest, plain_state, tokens):
        def loss(p):
            out = nnx.merge(graph, p, rest)(tokens)[0]
            return jnp.sum(out ** 2), out
        (_, out_reset), grads = jax.value_and_grad(loss, has_aux=True)(params)
        plain_model = nnx.merge(plain_graph, plain_state)
        return (out_reset, zero_state_forward(plain_model, tokens), plain_model(tokens)[0],
                grads["router_cell"])  # only the cell's gradients are read: XLA drops the rest

    out_reset, out_zero, out_plain, cell = jax.device_get(run(params, rest, plain_state, tokens))
    np.testing.assert_allclose(out_reset, out_zero, rtol=1e-5, atol=1e-5)
    assert np.abs(out_reset - out_plain).max() > 1e-4
    assert float(np.abs(cell["w_h"][...]).max()) == 0.0
    assert float(np.abs(cell["b_h"][...]).max()) > 0 and float(np.abs(cell["w_i"][...]).max()) > 0


def test_recurrent_reset_and_drop_top_config_validation():
    with pytest.raises(ConfigError, match="recurrent_reset"):
        RouterConfig(recurrent_reset=True)
    with pytest.raises(ConfigError, match="drop_top_experts"):
        RouterConfig(kind="topp", drop_top_experts=1)
    with pytest.raises(ConfigError, match="drop_top_experts"):
        RouterConfig(drop_top_experts=-1)


# -- drop-top probe ----------------------------------------------------------------------------

def test_drop_top_empties_the_best_pick_and_renormalises_the_rest():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(32, 8)).astype(np.float32)
    # both routings in one jitted program (eager, each op of the two would compile on its own)
    full, dropped = jax.jit(lambda x: (R.topk_route(x, 3), R.topk_route(x, 3, drop_top=1)))(
        jnp.asarray(logits))
    z = np.exp(logits - logits.max(-1, keepdims=True))
    p = z / z.sum(-1, keepdims=True)
    order = np.argsort(-p, axis=-1, kind="stable")[:, :3]
    np.testing.assert_array_equal(np.asarray(full.experts), order)
    want_e = np.concatenate([-np.ones((32, 1), int), order[:, 1:]], 1)
    np.testing.assert_array_equal(np.asarray(dropped.experts), want_e)
    kept = np.take_along_axis(p, order[:, 1:], 1)
    want_w = np.concatenate([np.zeros((32, 1)), kept / kept.sum(-1, keepdims=True)], 1)
    np.testing.assert_allclose(np.asarray(dropped.weights), want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(dropped.selected).sum(-1), 2)


# -- cross-layer metrics -----------------------------------------------------------------------

def coselection_loop(experts, E, valid):
    """Pair counts by a plain loop over tokens and slot pairs."""
    L, N, k = experts.shape
    out = np.zeros((L - 1, E, E))
    for l in range(L - 1):
        for t in range(N):
            if not valid[t]:
                continue
            a = {int(e) for e in experts[l, t] if 0 <= e < E}
            b = {int(e) for e in experts[l + 1, t] if 0 <= e < E}
            for i in a:
                for j in b:
                    out[l, i, j] += 1
    return out


def test_coselection_counts_vs_loop():
    rng = np.random.default_rng(2)
    E = 6
    ex = rng.integers(-1, E + 2, size=(3, 50, 2))  # -1 empty, >= E null experts: both ignored
    valid = rng.random(50) > 0.2
    np.testing.assert_array_equal(coselection_counts(ex, E, valid), coselection_loop(ex, E, valid))


def test_consecutive_layer_mi_on_planted_counts():
    """A deterministic map l -> l+1 over 4 equally used experts: MI = log 4; independent
    choices (outer product counts): 0; a hand-computed 2x2 joint."""
    perm = np.eye(4)[[2, 0, 3, 1]] * 25
    indep = np.outer([1, 2, 3, 4], [4, 1, 1, 2]).astype(float)
    joint = np.array([[30.0, 10.0], [20.0, 40.0]])
    mi = consecutive_layer_mi(np.stack([perm, indep]))
    np.testing.assert_allclose(mi, [np.log(4), 0.0], atol=1e-12)
    p = joint / joint.sum()
    pa, pb = p.sum(1), p.sum(0)
    want = sum(p[i, j] * np.log(p[i, j] / (pa[i] * pb[j])) for i in range(2) for j in range(2))
    np.testing.assert_allclose(consecutive_layer_mi(joint[None]), [want], rtol=1e-12)
    # from per-token choices: layer 1 copies layer 0's single choice -> MI = H(layer 0 usage)
    choice = np.random.default_rng(3).integers(0, 5, 400)
    cooc = coselection_counts(np.stack([choice, choice])[..., None], 5)
    freq = np.bincount(choice, minlength=5) / 400
    np.testing.assert_allclose(consecutive_layer_mi(cooc), [-(freq * np.log(freq)).sum()],
                               rtol=1e-12)


def test_usage_entropy_on_planted_counts():
    np.testing.assert_allclose(usage_entropy([[5, 5, 5, 5], [8, 0, 0, 0], [1, 3, 0, 0]]),
                               [np.log(4), 0.0, -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))],
                               atol=1e-12)


# -- arms -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_arms_are_matched_in_active_compute(preset):
    """CoE and CartesianMoE use exactly top-k's expert FLOPs and parameters (plus routers);
    HyperMoE's top-(k-1) + an adapter of 0.8-1 expert stays at most top-k's layer FLOPs; null
    experts' expected real experts equal k at balance; top-p has no slot cap; RMoE's p is 256
    on gpu."""
    arms = routers.arms_for(preset)
    cfg = lambda a: apply_overrides(routers.PRESETS[preset], arms[a]).model  # noqa: E731
    base = cfg("topk")
    k = base.moe.top_k
    expert = routers.expert_macs(base)
    for arm in ("coe", "cartesian"):
        m = cfg(arm)
        assert routers.nominal_active_experts(m) * routers.expert_macs(m) == k * expert, arm
        assert m.moe.num_experts * routers.expert_macs(m) * (2 if arm == "cartesian" else 1) \
            == base.moe.num_experts * expert, arm  # same expert parameters
    hyper = cfg("hyper")
    assert hyper.moe.top_k == k - 1
    adapter = routers.hyper_adapter_macs(hyper)
    assert 0.8 * expert <= adapter <= expert
    assert routers.moe_flops(hyper) <= routers.moe_flops(base)
    null = cfg("null_experts")
    assert routers.nominal_active_experts(null) == k
    assert cfg("topp").moe.router.max_experts_per_token == 0
    assert cfg("rmoe").moe.router.recurrent_dim == (256 if preset == "gpu" else 64)
    assert cfg("rmoe_reset").moe.router.recurrent_reset
    assert cfg("rmoe_normal").moe.router.recurrent_init == "normal"
    assert routers.DEFAULT_ARMS[preset] == tuple(
        f"{a}{s}" for a in ("topk", "rmoe", "rmoe_reset") for s in ("", "-s2"))
    assert all(f"{a}-s2" in arms for a in routers.BASE_ARMS)


def test_cpu_preset_has_its_own_shapes():
    """The cpu preset pins its batch (no lbl_scope accumulation contrast needed)."""
    t = routers.PRESETS["cpu"].train
    assert (t.batch_size, t.grad_accum, t.steps) == (32, 1, 100)
    assert routers.PRESETS["cpu"].model == routers.lbl_scope.PRESETS["cpu"].model
    assert set(routers.DEFAULT_ARMS["cpu-smoke"]) == set(routers.BASE_ARMS)


def test_hyper_matched_dims_pick_the_largest_adapter_within_one_expert():
    model = routers.PRESETS["cpu"].model
    width, r = routers.hyper_matched_dims(model)

    def cost(rr):
        v = dataclasses.replace(model.moe.variant, kind="hyper", hyper_embed_dim=width,
                                hyper_bottleneck=width, hyper_adapter_dim=rr)
        return routers.hyper_adapter_macs(dataclasses.replace(
            model, moe=dataclasses.replace(model.moe, variant=v)))
    assert cost(r) <= routers.expert_macs(model) < cost(r + 1)


def test_collect_routing_sums_match_a_plain_forward():
    """``collect_routing``'s device-side sums (two batches, padding included) equal the plain
    forward's per-token choices counted in numpy: co-selection pairs, selections per domain,
    router tokens per domain, and the token-weighted router entropy."""
    from moejax import train as T
    from moejax.analysis.routing_layers import collect_routing
    from moejax.testing import setup_for

    model = tiny_model(num_layers=3, moe=MoEConfig(num_experts=8, top_k=2, d_expert=32))
    s = setup_for(model)
    state = T.init_state(s)
    rng = np.random.default_rng(4)
    batches = []
    for _ in range(2):
        seg = np.ones((8, 64), np.int32)
        seg[:, 50:] = np.where(rng.random((8, 1)) < 0.5, 0, 1)  # some rows right-padded
        toks = rng.integers(0, 288, (8, 64)).astype(np.int32)
        batches.append({"inputs": toks, "targets": toks, "segment_ids": seg,
                        "positions": np.broadcast_to(np.arange(64, dtype=np.int32), (8, 64)).copy(),
                        "loss_mask": (seg != 0).astype(np.float32),
                        "domain": rng.integers(0, 3, 8).astype(np.int32)})
    got = collect_routing(s, state, batches, 3)
    cooc, counts, tokens, ent = np.zeros((2, 8, 8)), np.zeros((3, 3, 8)), np.zeros(3), 0.0
    fwd = jax.jit(lambda st, b: s.model(st)(b["inputs"], b["segment_ids"], b["positions"])[1])
    for b in batches:
        aux = jax.device_get(fwd(state, b))
        ex = np.asarray(aux["router/experts"]).reshape(3, -1, 2)  # [L, N, k]
        valid = (b["segment_ids"] != 0).reshape(-1)
        cooc += coselection_loop(ex, 8, valid)
        dom = np.repeat(b["domain"], 64)
        for l in range(3):
            for t in np.nonzero(valid)[0]:
                for e in ex[l, t]:
                    counts[l, dom[t], e] += 1
        tokens += np.bincount(dom[valid], minlength=3)
        ent += np.asarray(aux["router/entropy"]) * valid.sum()
    np.testing.assert_array_equal(got["cooc"], cooc)
    np.testing.assert_array_equal(got["domain_counts"], counts)
    np.testing.assert_array_equal(got["tokens"], tokens)
    np.testing.assert_allclose(got["entropy"], ent / tokens.sum(), rtol=1e-5)


# -- every smoke arm's router, forward only ------------------------------------------------------

# routings per router token of the fixed-k arms: null experts take some of the null arm's 3
# slots (real experts per token < 3); CoE counts both iterations' picks (2 + 2 of 16 half-width
# experts), CartesianMoE both sub-layers' (2 + 2), HyperMoE top-1
# (rmoe_normal is rmoe with another GRU initialisation: the same routing program, so no case
# here; its config is test_arms_are_matched_in_active_compute's and it builds in
# test_every_arm_of_every_preset_builds)
FIXED_K = {"topk": 2, "rmoe": 2, "rmoe_reset": 2, "moge": 2,
           "null_experts": 3, "coe": 4, "cartesian": 4, "hyper": 1}
NO_TOKEN_CHOICES = ("cartesian", "expert_choice", "topp")  # no per-token picks: no layer MI


def smoke_batches(pad: bool, rows=8, seq=64, batches=2):
    """Random eval-like global batches; with ``pad`` the second right-pads some rows (padding
    tokens count nowhere)."""
    rng = np.random.default_rng(5)
    out = []
    for i in range(batches):
        seg = np.ones((rows, seq), np.int32)
        if pad and i:
            seg[:, 40:] = np.where(rng.random((rows, 1)) < 0.5, 0, 1)
        toks = rng.integers(0, 320, (rows, seq)).astype(np.int32)
        out.append({"inputs": toks, "targets": toks, "segment_ids": seg,
                    "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy(),
                    "loss_mask": (seg != 0).astype(np.float32),
                    "domain": rng.integers(0, 3, rows).astype(np.int32)})
    return out


@pytest.mark.parametrize("arm", [*FIXED_K, "expert_choice"])
def test_smoke_arm_routes_each_token_its_fixed_k(arm):
    """The cpu-smoke model with each arm's router at init (one forward compile, no training):
    ``collect_routing`` counts each non-padding token exactly k times per MoE layer (null columns
    included); null experts leave fewer than 3 real experts per token; expert choice fills each of
    its 8 experts to C = ceil(capacity * n * k / E) tokens per batch; the consecutive-layer MI
    exists exactly for the arms with per-token choices."""
    from moejax import train as T
    from moejax.analysis.routing_layers import collect_routing
    from moejax.experiment import build_config
    from moejax.testing import setup_for

    cfg = build_config(routers.PRESETS, routers.arms_for("cpu-smoke"), "cpu-smoke", arm, [])
    s = setup_for(cfg.model)
    batches = smoke_batches(pad=arm != "expert_choice")  # C assumes full batches
    sums = collect_routing(s, T.init_state(s), batches, 3)
    per_layer = np.asarray(sums["domain_counts"]).sum(axis=(1, 2))  # [L]
    valid = sum(float((b["segment_ids"] != 0).sum()) for b in batches)
    np.testing.assert_array_equal(sums["tokens"].sum(), valid)
    summary = routers.routing_summary(sums, cfg.model.moe.num_experts)
    if arm == "expert_choice":
        rows = 8 * 64
        np.testing.assert_array_equal(per_layer, [len(batches) * 8 * math.ceil(rows * 2 / 8)] * 2)
    else:
        k = FIXED_K[arm]
        np.testing.assert_array_equal(per_layer / k, [valid] * 2)
        if arm == "null_experts":
            assert 0 < summary["active_experts"] < 3.0
        else:
            assert summary["active_experts"] == k
    assert ("cooc" in sums) == (arm not in NO_TOKEN_CHOICES)
    mi = summary["layer_mi"]
    assert mi is None or (len(mi) == 1 and 0 <= mi[0] <= np.log(8) + 1e-9)


def test_every_arm_of_every_preset_builds():
    """Each arm (seed replicas included) of each preset builds and validates (cpu-smoke's
    models initialise for real above); the drop-top-1 probe applies exactly to the ranked top-k
    routers and its config validates."""
    from moejax.experiment import build_config

    for preset in routers.PRESETS:
        arms = routers.arms_for(preset)
        assert set(routers.DEFAULT_ARMS[preset]) <= set(arms), preset
        for arm in arms:
            cfg = build_config(routers.PRESETS, arms, preset, arm, [])
            if arm.endswith("-s2"):
                continue
            applies = routers.probe_applies(cfg)
            assert applies == (arm not in ("topp", "expert_choice", "moge")), (preset, arm)
            if applies:
                apply_overrides(cfg, ["model.moe.router.drop_top_experts=1"])
