"""Dense -> MoE upcycling (moejax.upcycle): copy, fine-grained, EMoE."""

import jax
import numpy as np
import pytest

from moejax import train as T
from moejax import upcycle as U
from moejax.config import MeshConfig, MoEConfig, RouterConfig
from moejax.testing import logits_of as _logits
from moejax.testing import setup_for as _setup
from moejax.testing import tiny_model



@pytest.fixture(scope="module")
def dense():
    s = _setup(tiny_model())  # d_ff = 128
    state = T.init_state(s)
    return s, state, _logits(s, state)


def test_balanced_kmeans_equal_sizes():
    rng = np.random.RandomState(0)
    centers = rng.randn(4, 8) * 5
    x = np.concatenate([centers[i] + rng.randn(n, 8) for i, n in enumerate((40, 8, 8, 8))])
    labels = U.balanced_kmeans(x, 4, iters=20)
    assert np.bincount(labels, minlength=4).tolist() == [16, 16, 16, 16]
    perm, avg = U.emoe_permutation(x.T, 4)  # x.T plays gate [D, F]
    assert sorted(perm.tolist()) == list(range(64))
    np.testing.assert_allclose(avg[:, 0], x[perm[:16]].mean(0), rtol=1e-5)


@pytest.mark.parametrize("method,moe,kw", [
    ("copy", MoEConfig(num_experts=4, top_k=2, d_expert=128,
                       router=RouterConfig(norm_topk_prob=True)), {}),
    ("copy", MoEConfig(num_experts=4, top_k=1, d_expert=128, num_shared_experts=1,
                       router=RouterConfig(norm_topk_prob=True)), {"router_init": "zero"}),
    ("fine", MoEConfig(num_experts=4, top_k=4, d_expert=32,
                       router=RouterConfig(norm_topk_prob=True)), {"router_init": "zero"}),
    ("emoe", MoEConfig(num_experts=4, top_k=4, d_expert=32,
                       router=RouterConfig(gating="avg_key")), {}),
])
def test_upcycling_preserves_dense_function(dense, method, moe, kw):
    s, state, ref = dense
    d = _setup(tiny_model(moe=moe))
    up = U.upcycle(state, s, d, method, **kw)
    np.testing.assert_allclose(_logits(d, up), ref, rtol=1e-5, atol=1e-5)
    assert int(up.step) == 0


def test_emoe_experts_are_permuted_blocks_and_route_by_average_key(dense):
    s, state, ref = dense
    moe = MoEConfig(num_experts=4, top_k=2, d_expert=32, router=RouterConfig(gating="avg_key"))
    d = _setup(tiny_model(moe=moe))
    up = U.upcycle(state, s, d, "emoe")
    src = jax.device_get(state.params.to_pure_dict())["layers"][0]["mlp"]
    dst = jax.device_get(up.params.to_pure_dict())["layers"][0]["mlp"]
    keys = dst["w_gate"].mean(-1).T  # [D,E]: what the MoE block routes by
    assert "router" not in dst or "w" not in dst.get("router", {})  # no router parameters
    perm, avg = U.emoe_permutation(src["gate"], 4, iters=30, seed=0)
    np.testing.assert_array_equal(dst["w_gate"][1], src["gate"][:, perm[32:64]])
    np.testing.assert_array_equal(dst["w_down"][3], src["down"][perm[96:]])
    np.testing.assert_allclose(keys, avg, rtol=1e-5, atol=1e-8)  # fp32 mean vs fp64 centroids
    np.testing.assert_allclose(keys[:, 2], dst["w_gate"][2].mean(-1), rtol=1e-5, atol=1e-7)
    assert np.abs(_logits(d, up) - ref).max() > 1e-6  # top-2 of 4 blocks: not the dense FFN
    learn = _setup(tiny_model(moe=MoEConfig(num_experts=4, top_k=2, d_expert=32)))
    w = jax.device_get(U.upcycle(state, s, learn, "emoe_learn").params.to_pure_dict())
    np.testing.assert_allclose(w["layers"][0]["mlp"]["router"]["w"], avg, rtol=1e-6)


def test_upcycle_sharded_matches_unsharded(dense):
    s, state, _ = dense
    moe = MoEConfig(num_experts=4, top_k=2, d_expert=64, router=RouterConfig(norm_topk_prob=True))
    mesh8 = MeshConfig(data=2, expert=2, tensor=2)
    s8 = _setup(s.cfg.model, mesh8, devices=8)
    d1, d8 = _setup(tiny_model(moe=moe)), _setup(tiny_model(moe=moe), mesh8, devices=8)
    a = U.upcycle(state, s, d1, "fine", noise=0.01)
    b = U.upcycle(jax.device_put(state, s8.state_shardings), s8, d8, "fine", noise=0.01)
    for x, y, sh in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                        jax.tree.leaves(d8.state_shardings), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
        assert y.sharding.is_equivalent_to(sh, y.ndim)


def test_config_errors(dense):
    s, state, _ = dense
    bad = _setup(tiny_model(moe=MoEConfig(num_experts=4, top_k=2, d_expert=48)))
    with pytest.raises(ValueError, match="must divide"):
        U.upcycle(state, s, bad, "fine")
    with pytest.raises(ValueError, match="avg_key"):
        U.upcycle(state, s, _setup(tiny_model(moe=MoEConfig(num_experts=4, d_expert=32))), "emoe")
