"""Train step on 8 CPU devices: sharded == single device and gradient accumulation is exact (raw
gradients, which Adam would hide a global scale of), no recompiles, replicated metrics, weight decay
by parameter role (the same with and without scan_layers), and non-finite steps never reach the
parameters."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import train as T
from moejax.config import Config, ConfigError, DataConfig, MeshConfig, TrainConfig
from moejax.model import Model
from moejax.data import prepare_data
from moejax.mesh import make_mesh
from moejax.testing import TOL_SHARDED_FP32, tiny_config, tiny_model
from moejax.trainer import NonFiniteLossError, Trainer

MESHES = {
    "single": (MeshConfig(data=1), 1),
    "data2_fsdp2_tensor2": (MeshConfig(data=2, fsdp=2, tensor=2), 8),
    "data8": (MeshConfig(data=8), 8),
}


@pytest.fixture(scope="module")
def batch(data_cache):
    cfg = tiny_config(data={"cache_dir": data_cache})
    data = prepare_data(cfg.data, vocab_size=cfg.model.vocab_size)
    it = data.train_iterator(global_batch=cfg.train.batch_size, process_index=0, process_count=1)
    return next(it)


def _run_steps(cfg, mesh_cfg, ndev, batch, steps=3):
    cfg = tiny_config(mesh=mesh_cfg, data={"cache_dir": cfg.data.cache_dir},
                      train={"grad_accum": cfg.train.grad_accum})
    mesh = make_mesh(mesh_cfg, jax.devices()[:ndev])
    s = T.setup(cfg, mesh)
    state = T.init_state(s)
    step = T.make_train_step(s, 3)
    ev = T.make_eval_step(s, 3)
    gb = T.global_batch(mesh, batch)
    eval0 = jax.device_get(ev(state, gb))
    losses = []
    for _ in range(steps):
        state, m = step(state, gb)
        losses.append(float(m["train/loss"]))
    params = jax.device_get(jax.tree.leaves(state.params))
    return dict(eval0=eval0, losses=losses, params=params, state=state, step=step, setup=s,
                metrics=m)


@pytest.fixture(scope="module")
def runs(batch, data_cache):
    base = tiny_config(data={"cache_dir": data_cache})
    return {name: _run_steps(base, m, n, batch) for name, (m, n) in MESHES.items()}


@pytest.mark.parametrize("name", ["data2_fsdp2_tensor2", "data8"])
def test_sharded_equals_single_device(runs, name):
    ref, got = runs["single"], runs[name]
    rtol, atol = TOL_SHARDED_FP32
    np.testing.assert_allclose(got["eval0"]["loss_sum"], ref["eval0"]["loss_sum"], rtol=rtol, atol=atol)
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=rtol, atol=atol)
    # Adam normalises each update, so near-zero gradients amplify reduction-order noise: params
    # after 3 steps agree to ~1e-5 absolute (the lr is 1.5e-3), not to the loss tolerance.
    for a, b in zip(got["params"], ref["params"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert ref["losses"][2] < ref["losses"][0]  # it trains (step 1 has lr 0: warmup starts at 0)


def test_params_and_optimizer_state_are_sharded(runs):
    state = runs["data2_fsdp2_tensor2"]["state"]
    specs = {jax.tree_util.keystr(p): x.sharding.spec
             for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
    assert any(s == jax.sharding.PartitionSpec("fsdp", "tensor") for s in specs.values()), specs
    mu = [x for x in jax.tree.leaves(state.opt_state) if x.ndim >= 2]
    p2 = [x for x in jax.tree.leaves(state.params) if x.ndim >= 2]
    assert sorted(str(x.sharding.spec) for x in mu) == sorted(str(x.sharding.spec) for x in p2 * 2)


def test_step_compiles_once(runs):
    for name, r in runs.items():
        assert r["step"]._cache_size() == 1, name


# (mesh, devices, grad_accum): every split of the batch must give the gradient of the whole batch
GRAD_SPLITS = {
    "accum2": (MeshConfig(data=1), 1, 2),
    "data2_accum4": (MeshConfig(data=2), 2, 4),
    "data2_fsdp2_tensor2": (MeshConfig(data=2, fsdp=2, tensor=2), 8, 1),
    "data8": (MeshConfig(data=8), 8, 1),
}


def _grads(mesh_cfg, ndev, accum, host_state, batch, data_cache):
    """(loss, raw accumulated gradients) of ``host_state`` on ``batch`` (host copies)."""
    cfg = tiny_config(mesh=mesh_cfg, data={"cache_dir": data_cache}, train={"grad_accum": accum})
    s = T.setup(cfg, make_mesh(mesh_cfg, jax.devices()[:ndev]))
    grad_fn = jax.jit(T.make_grad_fn(s, 3),
                      in_shardings=(s.state_shardings, T.batch_shardings(s.mesh)))
    loss, grads, _ = grad_fn(jax.device_put(host_state, s.state_shardings),
                             T.global_batch(s.mesh, batch))
    return float(loss), jax.device_get(grads)


@pytest.fixture(scope="module")
def initial_state(data_cache):
    """The initial train state (host copy): every gradient below is taken at it."""
    cfg = tiny_config(data={"cache_dir": data_cache})
    return jax.device_get(T.init_state(T.setup(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))))


@pytest.fixture(scope="module")
def reference_grads(initial_state, batch, data_cache):
    return _grads(MeshConfig(data=1), 1, 1, initial_state, batch, data_cache)


@pytest.mark.parametrize("name", list(GRAD_SPLITS))
def test_accumulated_and_sharded_gradients_equal_one_device(initial_state, reference_grads, batch,
                                                            data_cache, name):
    """Raw gradients (fp32), not post-Adam parameters: Adam is blind to a global gradient scale,
    so a sum of per-micro-batch means (accum x the gradient) would pass a parameter comparison."""
    loss, grads = _grads(*GRAD_SPLITS[name], initial_state, batch, data_cache)
    ref_loss, ref = reference_grads
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    leaves = jax.tree_util.tree_leaves_with_path(ref)
    for (path, r), g in zip(leaves, jax.tree.leaves(grads), strict=True):
        scale = float(np.abs(r).max())
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))


def test_train_step_applies_the_accumulated_gradient(runs, initial_state, reference_grads, batch):
    """The step's reported gradient norm is the norm of ``make_grad_fn``'s gradients."""
    _, ref = reference_grads
    s = runs["single"]["setup"]
    state = jax.device_put(initial_state, s.state_shardings)
    _, m = runs["single"]["step"](state, T.global_batch(s.mesh, batch))
    norm = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(ref)))
    np.testing.assert_allclose(float(m["train/grad_norm"]), norm, rtol=1e-5)


def _sharding_kind(attrs: str) -> str:
    """'replicated', 'sharded' or 'unspecified' (left to XLA) from one result's MLIR attributes
    (Shardy ``sdy.sharding`` or GSPMD ``mhlo.sharding``)."""
    sdy = re.search(r"sdy\.sharding = #sdy\.sharding<@\w+, \[([^\]]*)\]([^>]*)>", attrs)
    if sdy:
        dims = [d.strip() for d in sdy.group(1).split(",") if d.strip()]
        return "replicated" if all(d == "{}" for d in dims) else "sharded"
    hlo = re.search(r'mhlo\.sharding = "([^"]*)"', attrs)
    if hlo:
        return "replicated" if hlo.group(1) == "{replicated}" else "sharded"
    return "unspecified"


def _declared_metric_shardings(step, s: T.Setup, batch) -> dict[str, str]:
    """{metric: the kind of sharding the jitted step declares for it}, read from the lowered
    program's result attributes (no compile)."""
    gb = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=T.batch_shardings(s.mesh)[k])
          for k, v in batch.items()}
    main = next(line for line in step.lower(s.abstract_state, gb).as_text().splitlines()
                if "func.func public @main" in line)
    out = {}
    for piece in main[main.index("->"):].split("jax.result_info = ")[1:]:  # one per result
        name = re.match(r"\"result\[1\]\['([^']+)'\]\"", piece)
        if name:
            out[name.group(1)] = _sharding_kind(piece)
    assert out, main[-500:]
    return out


@pytest.mark.parametrize("name", ["data2_fsdp2_tensor2", "data8"])
def test_step_metrics_are_replicated(runs, batch, name):
    """Every metric is declared and comes back fully replicated, so each host of a multi-host run
    can ``device_get`` it whole (e.g. MoE [L, E] counts); XLA's own choice is not a contract."""
    declared = _declared_metric_shardings(runs[name]["step"], runs[name]["setup"], batch)
    assert set(declared) == set(runs[name]["metrics"])
    assert all(v == "replicated" for v in declared.values()), declared
    for key, v in runs[name]["metrics"].items():
        assert v.sharding.is_fully_replicated, (key, v.sharding)


# -- weight decay by parameter role ----------------------------------------------------------------
# Every norm kind (PreAffine attention norm, GatedNorm FFN and final norms, QK-norm), sink logits, an
# attention gate, an untied head; the MoE adds experts, a shared expert with its gate, a null expert
# and the RMoE GRU (matrices and biases).
EVERY_NORM = dict(norm_variant_attn="preaffine", norm_variant_ffn="gated", norm_variant_final="gated",
                  attention=dict(sink=True, gate="g1"), tie_embeddings=False)
EVERY_PARAM_MOE = dict(num_experts=4, top_k=2, d_expert=32, num_shared_experts=1, shared_gate=True,
                       router={"num_null_experts": 1, "recurrent": "gru", "recurrent_dim": 8})
NOT_DECAYED = {"attn_norm/pre_scale", "attn_norm/scale", "mlp_norm/scale", "final_norm/scale",
               "attn/q_norm/scale", "attn/k_norm/scale", "attn/sink", "router_cell/b_i",
               "router_cell/b_h"}
DECAYED = {"embed/embedding", "lm_head/kernel", "attn/q", "attn/k", "attn/v", "attn/o", "attn/gate",
           "mlp_norm/down", "mlp_norm/up", "final_norm/down", "final_norm/up", "mlp/w_gate",
           "mlp/w_up", "mlp/w_down", "mlp/router/proj", "mlp/router/gate", "mlp/router/w_null",
           "mlp/shared/gate", "mlp/shared/up", "mlp/shared/down", "mlp/shared_gate",
           "router_cell/w_i", "router_cell/w_h"}


def _wd_config(scan: bool, norm: str = "rms", moe: bool = False, **train) -> Config:
    from moejax.config_moe import MoEConfig, RouterConfig
    moe_cfg = MoEConfig()
    if moe:
        kw = dict(EVERY_PARAM_MOE)
        moe_cfg = MoEConfig(**{**kw, "router": RouterConfig(**kw["router"])})
    model = tiny_model(scan_layers=scan, norm=norm, moe=moe_cfg, **EVERY_NORM)
    t = dict(steps=10, batch_size=8, warmup_steps=0, lr=1e-2, weight_decay=0.5, **train)
    return Config(model=model, mesh=MeshConfig(data=1), data=DataConfig(seq_len=64),
                  train=TrainConfig(**t))


def _role_names(path) -> str:
    """'attn/q_norm/scale' for a leaf path, with the layer index / stacked 'layers' dropped."""
    keys = [getattr(k, "key", None) for k in path]
    return "/".join(k for k in keys if isinstance(k, str) and k not in ("layers", "value"))


def _decayed(cfg: Config) -> dict[str, bool]:
    """{role path: decayed?} from the optimizer's mask over the abstract parameters."""
    abstract = nnx.eval_shape(lambda: Model(cfg.model, rngs=nnx.Rngs(0)))
    params = nnx.split(abstract, nnx.Param, ...)[1]
    out: dict[str, set] = {}
    for path, d in jax.tree_util.tree_leaves_with_path(T.decay_mask(params, cfg.model, cfg.train)):
        out.setdefault(_role_names(path), set()).add(bool(d))
    assert all(len(v) == 1 for v in out.values()), out  # every layer alike
    return {k: v.pop() for k, v in out.items()}


@pytest.mark.parametrize("scan", [False, True])
def test_decay_mask_by_parameter_role(scan):
    got = _decayed(_wd_config(scan, moe=True))
    assert {k for k, d in got.items() if not d} == NOT_DECAYED
    assert {k for k, d in got.items() if d} == DECAYED


@pytest.mark.parametrize("granularity", ["headwise", "elementwise"])
def test_constant_gate_logits_are_never_decayed(granularity):
    """The input-independent gate's learned logits (``gate_bias``, a vector per head or a matrix
    per head x dim) are offsets like the sink: not decayed, whatever their rank."""
    cfg = _wd_config(False)
    attn = dataclasses.replace(cfg.model.attention, gate="g1", gate_input="constant",
                               gate_granularity=granularity)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=attn))
    got = _decayed(cfg)
    assert got["attn/gate_bias"] is False


def test_zero_centred_norm_decay_is_an_explicit_switch():
    """Qwen3-Next decays its zero-centred norm weights (w in x*(1+w), pulled towards scale 1):
    only with train.decay_zero_centered_norms; PreAffine's lambda (init 1) never."""
    off = _decayed(_wd_config(True, norm="rms_zero_centered"))
    assert {k for k, d in off.items() if not d} == {n for n in NOT_DECAYED if "router_cell" not in n}
    on = _decayed(_wd_config(True, norm="rms_zero_centered", decay_zero_centered_norms=True))
    assert {k for k, d in on.items() if not d} == {"attn_norm/pre_scale", "attn/sink"}
    with pytest.raises(ConfigError, match="decay_zero_centered_norms"):  # at construction
        _wd_config(True, decay_zero_centered_norms=True)


def _stacked(s: T.Setup, unrolled: T.TrainState) -> T.TrainState:
    """``unrolled``'s parameters in the scanned layout of ``s`` (layers stacked on a new axis 0)."""
    pure = nnx.to_pure_dict(unrolled.params)
    layers = [pure["layers"][i] for i in range(s.cfg.model.num_layers)]
    pure["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    _, params, rest = nnx.split(nnx.eval_shape(lambda: Model(s.cfg.model, rngs=nnx.Rngs(0))),
                                nnx.Param, ...)
    nnx.replace_by_pure_dict(params, pure)
    params = jax.tree.map(jnp.asarray, params)
    state = T.TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                         opt_state=s.tx.init(params), rng=unrolled.rng)
    return jax.device_put(state, s.state_shardings)


def test_weight_decay_same_with_and_without_scan(batch):
    """Two AdamW steps (weight decay 0.5, lr 1e-2 from step 1) from the same initial weights give
    the same parameters with layers unrolled and scanned: under scan the stacked [L, d] norm
    scales and [L, H] sink logits are not mistaken for matrices."""
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    unrolled, scanned = (T.setup(_wd_config(scan), mesh) for scan in (False, True))
    state_u = T.init_state(unrolled)
    state_s = _stacked(scanned, jax.device_get(state_u))
    step_u, step_s = T.make_train_step(unrolled, 3), T.make_train_step(scanned, 3)
    gb = T.global_batch(mesh, batch)
    for _ in range(2):
        state_u, _ = step_u(state_u, gb)
        state_s, _ = step_s(state_s, gb)
    got = nnx.to_pure_dict(jax.device_get(state_s.params))
    ref = nnx.to_pure_dict(jax.device_get(state_u.params))
    ref["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *[ref["layers"][i] for i in range(2)])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref),
                            strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_nonfinite_step_is_dropped_on_device(runs, batch):
    r = runs["data8"]
    s, step = r["setup"], r["step"]
    state = r["state"]
    before = jax.device_get(jax.tree.leaves(state.params))
    before_step = int(state.step)
    leaves, treedef = jax.tree.flatten(state.params)
    poisoned = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
    bad = T.TrainState(step=state.step, params=jax.tree.unflatten(treedef, [poisoned, *leaves[1:]]),
                       rest=state.rest, opt_state=state.opt_state, rng=state.rng)
    new, m = step(bad, T.global_batch(s.mesh, batch))
    assert bool(m["nonfinite"])
    assert int(new.step) == before_step  # no update counted
    after = jax.device_get(jax.tree.leaves(new.params))
    np.testing.assert_array_equal(after[1], before[1])  # untouched leaves unchanged
    assert np.isnan(after[0].reshape(-1)[0])  # the poisoned value was not "updated"
    np.testing.assert_array_equal(after[0].reshape(-1)[1:], before[0].reshape(-1)[1:])


def test_nan_policy_stop_raises_and_skip_counts(data_cache, tmp_path):
    cfg = tiny_config(data={"cache_dir": data_cache}, train={"nan_policy": "stop"})
    tr = Trainer.__new__(Trainer)  # only the policy logic; no model needed
    tr.cfg = cfg
    metrics = {"nonfinite": np.bool_(True), "train/loss": np.float32(np.nan),
               "train/grad_norm": np.float32(np.inf)}
    with pytest.raises(NonFiniteLossError, match="step 7: non-finite"):
        tr._check_finite(7, metrics)
    tr.cfg = tiny_config(data={"cache_dir": data_cache}, train={"nan_policy": "skip"})
    assert tr._check_finite(7, metrics) == 1
    assert tr._check_finite(8, {**metrics, "nonfinite": np.bool_(False)}) == 0


@pytest.mark.parametrize("kind,peak", [("TPU v5", 459e12), ("TPU v5 lite", 197e12),
                                       ("TPU v4", 275e12), ("TPU v6 lite", 918e12),
                                       ("NVIDIA H100 80GB HBM3", 989e12), ("cpu", None)])
def test_peak_flops_by_device_kind(kind, peak):
    """MFU's peak per device kind: v5p reports itself as 'TPU v5' (a prefix of v5e's kind)."""
    assert T.peak_flops_for_kind(kind) == peak
