"""Dense -> MoE upcycling (moejax.upcycle): copy, fine-grained, EMoE, DSMoE; BAM's branch phase
and mixing inside a grow run (moejax.bam_run)."""

import dataclasses
import functools
import itertools
import os

import jax
import numpy as np
import pytest

from moejax import bam_run, grow_run
from moejax.growth import source_config
from moejax import train as T
from moejax import upcycle as U
from moejax.config import (Config, ConfigError, DataConfig, GrowthConfig, MeshConfig, MoEConfig,
                           RouterConfig, TrainConfig, VariantConfig)
from moejax.testing import logits_of as _logits
from moejax.testing import setup_for as _setup
from moejax.testing import tiny_model


@pytest.fixture(scope="module")
def dense():
    s = _setup(tiny_model())  # d_ff = 128
    state = T.init_state(s)
    return s, state, _logits(s, state)


def _planted_blobs(k: int, per: int, dim: int, seed: int):
    """k well-separated Gaussian blobs of ``per`` points each, shuffled: (x [k*per, dim],
    planted labels [k*per])."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim)) * 20.0
    planted = np.repeat(np.arange(k), per)
    order = rng.permutation(k * per)
    return centers[planted[order]] + rng.normal(size=(k * per, dim)), planted[order]


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Labels ``a`` and ``b`` are the same partition up to renaming the clusters."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("k,per,seed", [(4, 16, 0), (8, 8, 1), (16, 4, 2)])
def test_balanced_kmeans_recovers_planted_clusters(k, per, seed):
    x, planted = _planted_blobs(k, per, dim=8, seed=seed)
    labels = U.balanced_kmeans(x, k, seed=seed)
    assert np.bincount(labels, minlength=k).tolist() == [per] * k
    assert _same_partition(labels, planted)
    assert not _same_partition(np.roll(labels, 1), planted)  # the check can fail


def _sq_cost(x, centers, labels) -> float:
    return float(((x - centers[labels]) ** 2).sum())


def _greedy_labels(x, centers) -> np.ndarray:
    """The old greedy step: (point, cluster) pairs by increasing distance, capacity n/k each."""
    n, k = len(x), len(centers)
    d = ((x[:, None] - centers[None]) ** 2).sum(-1)
    labels, fill = np.full(n, -1), np.zeros(k, int)
    for flat in np.argsort(d, axis=None, kind="stable"):
        i, j = divmod(int(flat), k)
        if labels[i] < 0 and fill[j] < n // k:
            labels[i], fill[j] = j, fill[j] + 1
    return labels


@functools.cache
def _balanced_labellings(n: int, k: int) -> np.ndarray:
    """Every labelling of n points with exactly n/k per cluster: [count, n]."""
    return np.array(sorted(set(itertools.permutations(np.repeat(np.arange(k), n // k)))))


def _brute_force_cost(x, centers) -> float:
    """Minimum assignment cost over every labelling with exactly n/k points per cluster."""
    d = ((x[:, None] - centers[None]) ** 2).sum(-1)  # [n,k]
    return float(d[np.arange(len(x)), _balanced_labellings(len(x), len(centers))].sum(1).min())


def test_balanced_assignment_is_optimal_where_greedy_is_not():
    """1-D: point 1 is nearest to centre 0 and the greedy step takes that pair first, pushing -5 to
    centre 10 (cost 1 + 225); the optimum swaps them (81 + 25)."""
    x, c = np.array([[1.0], [-5.0]]), np.array([[0.0], [10.0]])
    assert _sq_cost(x, c, _greedy_labels(x, c)) == 226.0
    assert _sq_cost(x, c, U.balanced_assignment(x, c)) == 106.0 == _brute_force_cost(x, c)
    rng = np.random.default_rng(0)
    worse = 0
    for _ in range(20):  # random tiny instances: 8 points, 4 clusters of 2 (2520 labellings)
        x, c = rng.normal(size=(8, 2)), rng.normal(size=(4, 2))
        best = _brute_force_cost(x, c)
        labels = U.balanced_assignment(x, c)
        assert np.bincount(labels, minlength=4).tolist() == [2] * 4
        np.testing.assert_allclose(_sq_cost(x, c, labels), best, rtol=1e-12)
        worse += _sq_cost(x, c, _greedy_labels(x, c)) > best + 1e-9
    assert worse >= 3  # instances where greedy is suboptimal are common, not a corner case


def test_balanced_kmeans_labels_are_optimal_for_their_centroids():
    """At convergence the labels are the best balanced assignment to their own centroids (the
    greedy step stopped at labels it could not improve but an exact step can)."""
    for seed in range(12):  # 8 points, 4 clusters of 2
        x = np.random.default_rng(seed).normal(size=(8, 2))
        labels = U.balanced_kmeans(x, 4, seed=0)
        centroids = np.stack([x[labels == j].mean(0) for j in range(4)])
        np.testing.assert_allclose(_sq_cost(x, centroids, labels),
                                   _brute_force_cost(x, centroids), rtol=1e-12, err_msg=seed)


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
    # DSMoE with every gate open (tau = 0, output weight 1): the sum of all blocks = the FFN
    ("dsmoe", MoEConfig(num_experts=4, top_k=4, d_expert=32, variant=VariantConfig(
        kind="dsmoe", dsmoe_threshold=0.0, dsmoe_scale="one")), {}),
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


@pytest.mark.parametrize("L,choice,layers", [
    (32, "last_half", [16, 20, 24, 28]), (32, "last_quarter", [24, 26, 28, 30]),
    (4, "last_half", [2]), (4, "last_quarter", [3]), (2, "last_half", [1]),
    (12, "last_quarter", [9, 11])])
def test_emoe_layer_choice_masks(L, choice, layers):
    """EMoE's layer choice (every 4th layer of the last half / every 2nd of the last quarter) as
    the MoE-layer mask of the resolved config, against lists written by hand."""
    cfg = Config(model=tiny_model(num_layers=L, moe=MoEConfig(num_experts=4, d_expert=32)),
                 data=DataConfig(seq_len=64),
                 growth=GrowthConfig(op="emoe", source_steps=1, moe_layers=choice))
    moe = U.apply_moe_layers(cfg).model.moe
    assert [l for l in range(L) if moe.is_moe_layer(l)] == layers
    assert U.apply_moe_layers(U.apply_moe_layers(cfg)) == U.apply_moe_layers(cfg)  # idempotent
    all_layers = dataclasses.replace(cfg, growth=GrowthConfig(op="emoe", source_steps=1))
    assert U.apply_moe_layers(all_layers) == all_layers


def test_emoe_layer_choice_errors():
    with pytest.raises(ConfigError, match="moe_layers"):
        GrowthConfig(op="stack", source_steps=1, moe_layers="last_half")
    scanned = Config(model=tiny_model(num_layers=4, scan_layers=True,
                                      moe=MoEConfig(num_experts=4, d_expert=32)),
                     data=DataConfig(seq_len=64),
                     growth=GrowthConfig(op="emoe", source_steps=1, moe_layers="last_half"))
    with pytest.raises(ConfigError, match="scan_layers"):
        U.apply_moe_layers(scanned)


def test_emoe_on_chosen_layers_keeps_the_others_dense(dense):
    """EMoE on the last half only (2 layers: layer 1): layer 0 stays the source's dense FFN, layer
    1 becomes blocks; with top_k = E the model is the dense model's function."""
    s, state, ref = dense
    first, every = U.moe_layer_choice(2, "last_half")
    moe = MoEConfig(num_experts=4, top_k=4, d_expert=32, first_dense_layers=first,
                    moe_every=every, router=RouterConfig(gating="avg_key"))
    d = _setup(tiny_model(moe=moe))
    up = U.upcycle(state, s, d, "emoe")
    np.testing.assert_allclose(_logits(d, up), ref, rtol=1e-5, atol=1e-5)
    src = jax.device_get(state.params.to_pure_dict())["layers"]
    dst = jax.device_get(up.params.to_pure_dict())["layers"]
    np.testing.assert_array_equal(dst[0]["mlp"]["gate"], src[0]["mlp"]["gate"])
    assert "gate" not in dst[1]["mlp"] and dst[1]["mlp"]["w_gate"].shape == (4, 64, 32)


def test_dsmoe_blocks_are_the_dense_ffn_in_order(dense):
    """DSMoE's block i = hidden units i*F/E .. (i+1)*F/E - 1 of the dense FFN (sliced by hand);
    the gate is the fresh init ('random': tau = 1/2 then switches blocks off, so the function
    changes) or zeros ('zero')."""
    s, state, ref = dense
    moe = MoEConfig(num_experts=4, top_k=4, d_expert=32, variant=VariantConfig(kind="dsmoe"))
    d = _setup(tiny_model(moe=moe))
    up = U.upcycle(state, s, d, "dsmoe")
    src = jax.device_get(state.params.to_pure_dict())["layers"][1]["mlp"]
    dst = jax.device_get(up.params.to_pure_dict())["layers"][1]["mlp"]
    for i in range(4):
        cols = slice(32 * i, 32 * (i + 1))
        np.testing.assert_array_equal(dst["experts"]["w_gate"][i], src["gate"][:, cols])
        np.testing.assert_array_equal(dst["experts"]["w_up"][i], src["up"][:, cols])
        np.testing.assert_array_equal(dst["experts"]["w_down"][i], src["down"][cols])
    assert np.abs(dst["gate"]).max() > 0
    assert np.abs(_logits(d, up) - ref).max() > 1e-4  # about half the blocks off per token
    zero = jax.device_get(U.upcycle(state, s, d, "dsmoe", router_init="zero").params.to_pure_dict())
    assert not np.any(zero["layers"][0]["mlp"]["gate"])
    with pytest.raises(ValueError, match="noise"):
        U.upcycle(state, s, d, "dsmoe", noise=0.01)
    with pytest.raises(ValueError, match="dsmoe"):  # the method needs the DSMoE layer
        U.upcycle(state, s, _setup(tiny_model(moe=dataclasses.replace(
            moe, variant=VariantConfig()))), "dsmoe")


def test_bam_mix_of_identical_branches_is_the_dense_source(dense):
    """The grow run's BAM init (``bam_run.mixed_state``) from N copies of the source state
    (branch_steps = 0) is the source's function on the BAM model's sharded state, with random
    routers and a fresh optimizer."""
    s, state, ref = dense
    moe = MoEConfig(num_experts=2, top_k=2, d_expert=128, variant=VariantConfig(kind="bam"))
    d = _setup(tiny_model(moe=moe))
    host = jax.device_get(state.params.to_pure_dict())
    up = bam_run.mixed_state([host, host], state, s, d)
    np.testing.assert_allclose(_logits(d, up), ref, rtol=1e-5, atol=1e-5)
    mixed = jax.device_get(up.params.to_pure_dict())["layers"][0]
    assert np.abs(mixed["attn"]["router"]).max() > 0
    assert np.abs(mixed["mlp"]["router"]["w"]).max() > 0
    assert int(up.step) == 0 and all(not np.any(np.asarray(x)) for x in jax.tree.leaves(
        up.opt_state) if np.ndim(x) > 0)  # fresh Adam moments
    other = jax.tree.map(lambda a: a * 1.5, host)  # a different second branch changes the mix
    assert np.abs(_logits(d, bam_run.mixed_state([host, other], state, s, d)) - ref).max() > 1e-3


def _bam_config(**growth) -> Config:
    moe = MoEConfig(num_experts=2, top_k=2, d_expert=128, variant=VariantConfig(kind="bam"))
    return Config(model=tiny_model(moe=moe),
                  data=DataConfig(seq_len=64, mixture=(1.0, 1.0, 0.0)),
                  train=TrainConfig(steps=4, batch_size=8, warmup_steps=2),
                  growth=GrowthConfig(**{"op": "bam", "source_steps": 2, "branch_steps": 3,
                                         "source_mixture": (1.0, 1.0, 1.0), **growth}))


def _branch_dirs(cfg: Config, root) -> list[str]:
    src_cfg = source_config(cfg)
    return [wd for _, wd in bam_run.branches(cfg, src_cfg, grow_run.source_workdir_for(cfg, root))]


def test_bam_branches_one_per_trained_domain_beside_the_source(tmp_path):
    cfg = _bam_config()
    src_cfg = source_config(cfg)
    assert src_cfg.model == tiny_model() and src_cfg.train.steps == 2  # the dense source (d_ff)
    assert src_cfg.data.mixture == (1.0, 1.0, 1.0)
    src_wd = grow_run.source_workdir_for(cfg, str(tmp_path))
    runs = bam_run.branches(cfg, src_cfg, src_wd)
    assert [b.data.mixture for b, _ in runs] == [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0)]  # math held out
    for b, wd in runs:
        assert (b.model, b.train.steps, b.train.warmup_steps, b.growth.op) == (
            src_cfg.model, 3, 2, "none")
        assert os.path.dirname(wd) == os.path.dirname(src_wd)
    assert [os.path.basename(wd).rsplit("-", 1)[0] for _, wd in runs] == [
        "_branch-code", "_branch-prose"]
    assert bam_run.branches(_bam_config(branch_steps=0), src_cfg, src_wd) == []
    with pytest.raises(ConfigError, match="num_experts"):  # one expert per trained domain
        bam_run.check(dataclasses.replace(cfg, data=DataConfig(seq_len=64)))
    with pytest.raises(ConfigError, match="branch_steps"):
        GrowthConfig(op="bam", source_steps=1, branch_steps=-1)


@pytest.mark.parametrize("change", [
    {"growth": {"branch_steps": 4}}, {"growth": {"source_steps": 3}},
    {"growth": {"source_mixture": (1.0, 1.0, 0.5)}}, {"train": {"lr": 1e-3}},
    {"data": {"seq_len": 32}}])
def test_bam_branch_dirs_change_with_the_branch_or_source_config(tmp_path, change):
    """A finished branch is reused only when its whole run (and its source's) matches: any change
    to either names a new directory; a change to the grown phase alone keeps the branches."""
    cfg = _bam_config()
    sections = {k: dataclasses.replace(getattr(cfg, k), **v) for k, v in change.items()}
    changed = dataclasses.replace(cfg, **sections)
    base = _branch_dirs(cfg, tmp_path)
    assert base == _branch_dirs(cfg, tmp_path)
    assert not set(base) & set(_branch_dirs(changed, tmp_path))
    grown_only = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, moe=dataclasses.replace(cfg.model.moe, top_k=1)))
    assert _branch_dirs(grown_only, tmp_path) == base


def test_bam_refused_before_the_source_trains(tmp_path):
    """A BAM arm whose experts do not match its trained domains fails before any phase runs."""
    cfg = dataclasses.replace(_bam_config(), data=DataConfig(seq_len=64))  # 3 domains, 2 experts
    with pytest.raises(ConfigError, match="num_experts"):
        grow_run.run(cfg, str(tmp_path / "arm"), progress=False)
    assert not os.path.exists(tmp_path / "arm")


def test_phase_run_digest_ignores_execution_only_fields():
    """Shared source/branch directories are named by what the run computes: remat, dtype, kernels
    and cadences keep the name; the step budget, the data and the math change it."""
    cfg = _bam_config()
    same = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat="full"),
                               train=dataclasses.replace(cfg.train, log_every=7, eval_every=3))
    assert grow_run.run_digest(a=cfg) == grow_run.run_digest(a=same)
    for other in (dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=5)),
                  dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=1e-3)),
                  dataclasses.replace(cfg, data=DataConfig(seq_len=32, mixture=(1.0, 1.0, 0.0)))):
        assert grow_run.run_digest(a=cfg) != grow_run.run_digest(a=other)
    assert grow_run.run_digest(a=cfg) != grow_run.run_digest(b=cfg)  # the role is named


def test_a_phase_continues_the_stream_of_the_same_rows():
    """The next phase continues the previous one's data stream when only the mixture weights or
    execution-only data fields differ; other rows or another global batch start their own."""
    cfg = _bam_config()
    data = lambda **kw: dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **kw))  # noqa: E731
    for same in (data(mixture=(0.0, 1.0, 0.0)), data(cache_dir="/elsewhere", prefetch_threads=3)):
        assert grow_run.continues_stream(cfg, same)
    for other in (data(seq_len=32), data(seed=1),
                  dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=16))):
        assert not grow_run.continues_stream(cfg, other)


def test_dsmoe_zero_router_refused():
    """sigmoid(0) = 1/2 is not above the default threshold: a zero DSMoE gate turns every block
    off; refused, allowed below that threshold."""
    moe = MoEConfig(num_experts=4, top_k=4, d_expert=128, variant=VariantConfig(kind="dsmoe"))
    growth = GrowthConfig(op="dsmoe", source_steps=2, router_init="zero")
    with pytest.raises(ConfigError, match="router_init"):
        Config(model=tiny_model(moe=moe), data=DataConfig(seq_len=64), growth=growth)
    low = dataclasses.replace(moe, variant=VariantConfig(kind="dsmoe", dsmoe_threshold=0.4))
    Config(model=tiny_model(moe=low), data=DataConfig(seq_len=64), growth=growth)
