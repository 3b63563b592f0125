"""Abstract init, optimizer, and the jitted train / eval steps.

The train state is a plain pytree ``TrainState(step, params, rest, opt_state, rng)`` of sharded
arrays (``params``/``rest`` are NNX ``State``s split from the model), so one jitted step with
explicit in/out shardings and donation serves every mesh, and Orbax saves it as is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax.config import Config, ModelConfig, TrainConfig
from moejax.mesh import BATCH_AXES, use_mesh, rules_for
from moejax.layers import balance, mtp
from moejax.layers.router import maskmoe_mask, update_bias as balance_update_bias
from moejax.model import Model

BATCH_KEYS_2D = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a step reads and writes; checkpointed whole."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: nnx.State  # trainable parameters (nnx.Param)
    rest: nnx.State  # other model variables (e.g. router bias state); may be empty
    opt_state: Any
    rng: jax.Array  # uint32 key data; per-step keys are fold_in(rng, step)


def lr_schedule(t: TrainConfig) -> optax.Schedule:
    """Linear warmup to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup_steps,
        decay_steps=max(t.steps, t.warmup_steps + 1), end_value=t.lr * t.min_lr_ratio)


# Weight decay by parameter role (the parameter's own name, whatever module or layer stack holds
# it), so scanned and unrolled models decay the same leaves. Decayed: every matrix, i.e. embeddings,
# the LM head, attention/FFN/shared-expert projections and gates, routed experts, GatedNorm's
# low-rank gate and the router weights (w, w_null, RMoE proj/gate and GRU w_i/w_h). Router weights
# are decayed like any projection (Megatron-LM and OLMoE decay every matrix): it bounds the growth
# of router logits, the instability z-loss also targets. Never decayed: norm weights (unless
# zero-centred and switched on, below), biases and sink logits: gains and offsets, not weights
# whose size measures capacity (the usual "no decay on 1-D parameters", minus the layer axis).
# RMSNorm / GatedNorm gamma, PreAffine lambda, Gated DeltaNet's per-head gated RMSNorm weight
NORM_WEIGHTS = frozenset({"scale", "pre_scale", "norm"})
# sink/gate logits, biases; Gated DeltaNet's decay rate (A_log) and time-step bias (dt_bias)
NEVER_DECAYED = frozenset({"sink", "b", "b_i", "b_h", "bias", "gate_bias", "A_log", "dt_bias"})


def _param_name_and_stacked(path, model: ModelConfig) -> tuple[str, int]:
    """(the leaf's parameter name, 1 if it is stacked over scanned layers else 0)."""
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    name = [k for k in keys if isinstance(k, str)][-1]
    return name, int(model.scan_layers and keys[0] == "layers")


def decays(name: str, per_layer_ndim: int, *, decay_norms: bool) -> bool:
    """Whether AdamW decays parameter ``name`` (its rank without the stacked-layer axis). Norm
    weights only under ``decay_norms`` and only gamma (``scale``); an unknown vector is an error
    rather than a silent guess."""
    if name in NORM_WEIGHTS:
        return decay_norms and name == "scale"
    if name in NEVER_DECAYED:
        return False
    if per_layer_ndim < 2:
        raise ValueError(f"parameter {name!r} is a vector of no known role: add it to "
                         "moejax.train.NORM_WEIGHTS or NEVER_DECAYED")
    return True


def decay_mask(params, model: ModelConfig, t: TrainConfig):
    """The AdamW weight-decay mask (a bool per leaf of ``params``). Zero-centred norm weights
    (w in x*(1+w), decay pulls towards scale 1) are decayed only under
    ``train.decay_zero_centered_norms`` (Qwen3-Next does, spec section 9.2)."""
    decay_norms = t.decay_zero_centered_norms and model.norm == "rms_zero_centered"

    def leaf(path, x):
        name, stacked = _param_name_and_stacked(path, model)
        return decays(name, x.ndim - stacked, decay_norms=decay_norms)
    return jax.tree_util.tree_map_with_path(leaf, params)


def make_optimizer(t: TrainConfig, model: ModelConfig) -> optax.GradientTransformation:
    """AdamW (decay by parameter role, ``decay_mask``) after global-norm clipping."""
    adamw = optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                        mask=lambda params: decay_mask(params, model, t))
    return optax.chain(optax.clip_by_global_norm(t.clip_norm), adamw) if t.clip_norm > 0 else adamw


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch dim over every non-tensor axis, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
    """The sharding of every field of a global batch (rows over the batch axes)."""
    return {**{k: batch_sharding(mesh, 2) for k in BATCH_KEYS_2D},
            "domain": batch_sharding(mesh, 1)}


@dataclasses.dataclass
class Setup:
    """The pieces a run needs, computed abstractly first and then created sharded."""

    cfg: Config
    mesh: Mesh
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    state_shardings: TrainState
    abstract_state: TrainState  # ShapeDtypeStructs with shardings: the Orbax restore target

    def model(self, state: TrainState) -> Model:
        return nnx.merge(self.graphdef, state.params, state.rest)


def setup(cfg: Config, mesh: Mesh) -> Setup:
    """Shapes and shardings of the whole train state, before allocating anything."""
    rules = rules_for(cfg.mesh)
    cfg.check_mesh_divisibility(dict(mesh.shape))
    tx = make_optimizer(cfg.train, cfg.model)
    with use_mesh(mesh, rules):
        abstract_model = nnx.eval_shape(lambda: Model(cfg.model, rngs=nnx.Rngs(0)))
        graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
        p_sh = nnx.get_named_sharding(params, mesh)
        r_sh = nnx.get_named_sharding(rest, mesh)
    replicated = NamedSharding(mesh, P())
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, p_sh,
                                   transform_non_params=lambda _: replicated)
    shardings = TrainState(step=replicated, params=p_sh, rest=r_sh, opt_state=opt_sh, rng=replicated)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, rest=rest,
                          opt_state=abstract_opt,
                          rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return Setup(cfg=cfg, mesh=mesh, graphdef=graphdef, tx=tx, state_shardings=shardings,
                 abstract_state=abstract)


@contextlib.contextmanager
def tracing_mesh(s: Setup):
    """The setup's mesh (abstract) and logical rules while a step is traced: ``jax.set_mesh`` is
    not allowed inside ``jit``, and without a mesh in context MoE layers would take the
    single-device path (no expert parallelism, global instead of per-device capacity) and
    ``constrain`` would be a no-op."""
    with jax.sharding.use_abstract_mesh(s.mesh.abstract_mesh), \
            nnx.logical_axis_rules(rules_for(s.cfg.mesh)):
        yield


def init_state(s: Setup) -> TrainState:
    """Create the model and optimizer state directly sharded (one jit, no host copy)."""
    cfg = s.cfg

    def init() -> TrainState:
        model = Model(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                          opt_state=s.tx.init(params),
                          rng=jax.random.key_data(jax.random.key(cfg.train.seed + 1)))

    with use_mesh(s.mesh, rules_for(cfg.mesh)):
        return jax.jit(init, out_shardings=s.state_shardings)()


def _split_microbatches(batch: dict, accum: int) -> dict:
    """[B, ...] -> [accum, B/accum, ...]: micro-step a takes rows a, a+accum, ... so every
    micro-batch stays evenly sharded over the batch axes (no data movement)."""
    def split(x):
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


def token_losses(model: Model, batch: dict, *, train: bool = False,
                 rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Per-token cross entropy [b, T] (fp32) and the model's aux statistics."""
    logits, aux = model(batch["inputs"], segment_ids=batch["segment_ids"],
                        positions=batch["positions"], train=train, rng=rng)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         batch["targets"])
    return ce, aux


def _domain_sums(ce: jax.Array, batch: dict, num_domains: int) -> tuple[jax.Array, jax.Array]:
    """Masked loss sum and token count per domain: [D], [D]."""
    mask = batch["loss_mask"]
    onehot = jax.nn.one_hot(batch["domain"], num_domains, dtype=jnp.float32)  # [b, D]
    return jnp.einsum("bt,bd->d", ce * mask, onehot), jnp.einsum("bt,bd->d", mask, onehot)


def batch_shards(mesh: Mesh) -> int:
    """Number of batch shards (data * fsdp * expert): the groups of 'micro' balance scope."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def make_grad_fn(s: Setup, num_domains: int) -> Callable[[TrainState, dict], tuple]:
    """``(state, batch) -> (loss, grads, sums)`` (traceable; the train step's gradient): the raw
    gradient of the whole batch, accumulated over ``train.grad_accum`` micro-steps. The LM loss is
    the masked token mean over the *whole* batch (each micro-step divides by the batch's token
    count, and micro-gradients are summed), so accumulation is exact; MoE balance losses are
    averaged over micro-steps, with the global scope's count buffer carried across them.
    ``sums``: ``domain_loss_sum``/``domain_tokens`` [D] and the summed MoE ``stats``."""
    cfg, graphdef = s.cfg, s.graphdef
    moe = cfg.model.moe
    accum = cfg.train.grad_accum
    groups = batch_shards(s.mesh)
    n_moe = num_moe_layers(cfg.model)
    e_all = moe.num_experts + moe.router.num_null_experts

    def grad_fn(state: TrainState, batch: dict):
        with tracing_mesh(s):
            return _grads(state, batch)

    def _grads(state: TrainState, batch: dict):
        total_tokens = jnp.maximum(batch["loss_mask"].sum(), 1.0)
        key = step_key(state)
        rows, seq_len = batch["inputs"].shape
        n_groups = balance.num_pooled_groups(moe.balance.scope, moe.balance.group_size, rows,
                                             accum, groups) if moe.enabled else 0
        if n_groups:  # pooled balance groups: fresh per step, from the step key
            batch = {**batch, "balance_group": balance.balance_group_ids(
                moe.balance.scope, jax.random.fold_in(key, balance.GROUP_KEY_SALT), rows, seq_len,
                n_groups)}
        micro = _split_microbatches(batch, accum)
        totals = _pooled_group_totals(state, micro, key, n_groups) if n_groups else None

        def micro_loss(params, mb, buffer, k):
            # re-create the non-trainable variables at this trace level (the jit level's objects
            # cannot be extracted by nnx.scan inside value_and_grad)
            rest = jax.tree.map(lambda x: x, state.rest)
            model = nnx.merge(graphdef, params, rest)
            ce, aux = token_losses(model, mb, train=True, rng=k)
            lm = (ce * mb["loss_mask"]).sum() / total_tokens
            aux, mtp_loss = mtp.mtp_loss_term(aux, mb, cfg.model.mtp_loss_weight)
            lm_mtp = lm + mtp_loss / total_tokens  # the reported loss stays the LM loss
            if not moe.enabled:
                return lm_mtp, (ce, lm, {}, buffer)
            pooled = None if totals is None else balance.PooledGroups(
                mb["balance_group"], *totals, accum)
            aux_loss, buffer, stats = balance.moe_aux_loss(aux, moe, micro_groups=groups,
                                                           count_buffer=buffer, step=state.step,
                                                           pooled=pooled)
            return lm_mtp + aux_loss / accum, (ce, lm, stats, buffer)

        value_and_grad = jax.value_and_grad(micro_loss, has_aux=True)

        def body(carry, xs):
            mb, i = xs
            grads, loss, dsum, dcount, buffer, stats = carry
            (_, (ce, lm, st, buffer)), g = value_and_grad(state.params, mb, buffer,
                                                          jax.random.fold_in(key, i))
            ds, dc = _domain_sums(ce, mb, num_domains)
            stats = jax.tree.map(jnp.add, stats, st)
            return (jax.tree.map(jnp.add, grads, g), loss + lm, dsum + ds, dcount + dc, buffer,
                    stats), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        stats0 = balance.zero_stats(n_moe, e_all) if moe.enabled else {}
        buffer0 = jnp.zeros((n_moe, e_all), jnp.float32)
        init = (zeros, jnp.zeros(()), jnp.zeros((num_domains,)), jnp.zeros((num_domains,)),
                buffer0, stats0)
        (grads, loss, dsum, dcount, _, stats), _ = jax.lax.scan(
            body, init, (micro, jnp.arange(accum)))
        return loss, grads, {"domain_loss_sum": dsum, "domain_tokens": dcount, "stats": stats}

    def _pooled_group_totals(state: TrainState, micro: dict, key, n_groups: int):
        """Selections [L,G,E_all] and valid tokens [G] of each pooled balance group over the
        whole global batch: a forward without gradient over every micro-step (same keys as the
        gradient pass, so the same routing) before any balance loss can use them."""
        def body(counts, xs):
            mb, i = xs
            params, rest = jax.tree.map(lambda x: x, (state.params, state.rest))
            _, aux = token_losses(nnx.merge(graphdef, params, rest), mb, train=True,
                                  rng=jax.random.fold_in(key, i))
            return counts + balance.group_token_pool(aux["router/token_selected"],
                                                     mb["balance_group"], n_groups), None

        counts = jax.lax.scan(body, jnp.zeros((n_moe, n_groups, e_all), jnp.float32),
                              (micro, jnp.arange(accum)))[0]
        valid = (micro["segment_ids"] != 0).astype(jnp.float32)[..., None]  # [accum,b,T,1]
        tokens = jnp.sum(jax.vmap(lambda v, ids: balance.group_token_pool(v, ids, n_groups))(
            valid, micro["balance_group"]), axis=(0, 2))  # [G]
        return counts, tokens

    return grad_fn


def make_train_step(s: Setup, num_domains: int) -> Callable[[TrainState, dict], tuple]:
    """Jitted ``(state, batch) -> (state, metrics)``: ``make_grad_fn``'s gradient, then the
    optimizer. A non-finite loss or gradient never reaches the parameters: the update is dropped
    on device and ``metrics['nonfinite']`` tells the host. The aux-loss-free router bias is
    updated after the optimizer from the step's global counts. Metrics come back replicated (every
    host of a multi-host run can read them whole)."""
    cfg, tx, graphdef = s.cfg, s.tx, s.graphdef
    moe = cfg.model.moe
    accum = cfg.train.grad_accum
    schedule = lr_schedule(cfg.train)
    grad_fn = make_grad_fn(s, num_domains)

    def step_fn(state: TrainState, batch: dict):
        loss, grads, sums = grad_fn(state, batch)
        with tracing_mesh(s):
            return _apply(state, batch, loss, grads, sums)

    def _apply(state: TrainState, batch: dict, loss, grads, sums):
        stats = sums["stats"]
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        new_rest = state.rest
        if moe.enabled and moe.router.aux_free_bias:
            new_rest = update_router_biases(graphdef, new_params, state.rest, stats["counts"], cfg)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = TrainState(step=state.step + finite.astype(jnp.int32),
                               params=keep(new_params, state.params),
                               rest=keep(new_rest, state.rest),
                               opt_state=keep(new_opt, state.opt_state), rng=state.rng)
        metrics = {"train/loss": loss, "train/grad_norm": grad_norm,
                   "train/lr": schedule(state.step), "nonfinite": ~finite,
                   "train/tokens": batch["loss_mask"].sum(),
                   "domain_loss_sum": sums["domain_loss_sum"],
                   "domain_tokens": sums["domain_tokens"],
                   **{f"moe/{k}": v / (1 if k == "counts" else accum) for k, v in stats.items()}}
        return new_state, metrics

    replicated = NamedSharding(s.mesh, P())
    return jax.jit(step_fn, in_shardings=(s.state_shardings, batch_shardings(s.mesh)),
                   out_shardings=(s.state_shardings, replicated), donate_argnums=(0,))


def num_moe_layers(m) -> int:
    return sum(m.moe.is_moe_layer(i) for i in range(m.num_layers))


def update_router_biases(graphdef, params, rest, counts: jax.Array, cfg: Config) -> nnx.State:
    """DeepSeek-V3 aux-loss-free bias step for every MoE layer from the step's global selection
    counts [L_moe, E_all] (summed over all data shards and micro-steps); outside the optimizer."""
    r, E = cfg.model.moe.router, cfg.model.moe.num_experts
    model = nnx.merge(graphdef, params, rest)
    routers = moe_routers(model)
    for i, router in enumerate(routers):
        c = counts[:, :E] if len(routers) == 1 and cfg.model.scan_layers else counts[i, :E]
        update = lambda b, c: balance_update_bias(b, c, r.bias_update_rate, r.bias_update)  # noqa: E731
        b = router.bias[...]
        router.bias[...] = jax.vmap(update)(b, c) if b.ndim == 2 else update(b, c)
    return nnx.split(model, nnx.Param, ...)[2]


def set_token_masks(s: Setup, state: TrainState, token_counts) -> TrainState:
    """MaskMoE (section 8.3): rebuild every MoE layer's fixed token-id -> visible-experts mask
    from corpus token frequencies (the model's init mask has no frequencies); once, before
    training. Layer l draws its visible sets from seed (train.seed, l)."""
    r, E = s.cfg.model.moe.router, s.cfg.model.moe.num_experts
    model = s.model(state)
    key = jax.random.key(s.cfg.train.seed)

    def mask(layer):
        return maskmoe_mask(token_counts, E, frequent_fraction=r.maskmoe_frequent_fraction,
                            frequent_visible=r.maskmoe_frequent_visible,
                            seed=jax.random.fold_in(key, layer))

    for i, router in enumerate(moe_routers(model)):
        old = router.token_mask[...]
        router.token_mask[...] = (jnp.stack([mask(l) for l in range(old.shape[0])])
                                  if old.ndim == 3 else mask(i))
    rest = jax.device_put(nnx.split(model, nnx.Param, ...)[2], s.state_shardings.rest)
    return dataclasses.replace(state, rest=rest)


def moe_routers(model: Model) -> list:
    """The Router of every MoE layer (one stacked Router when layers are scanned)."""
    if model.cfg.scan_layers:
        return [model.layers.mlp.router] if model.cfg.moe.enabled else []
    return [blk.mlp.router for blk in model.layers if blk.is_moe]


def make_eval_step(s: Setup, num_domains: int) -> Callable[[TrainState, dict], dict]:
    """Jitted ``(state, batch) -> sums`` for validation. Every statistic is a sum over tokens, so
    the caller adds batches up and divides once (token-weighted): ``loss_sum``/``tokens`` [D];
    with MoE also ``domain_counts`` [L_moe, D, E_all] (selections per domain), ``topk_score_sum``
    [L_moe] (summed over the router's tokens) and ``router_tokens`` (non-padding tokens). The
    forward runs in ``train.grad_accum`` micro-batches, so it needs no more memory than training.
    Outputs are replicated."""
    graphdef = s.graphdef
    accum = s.cfg.train.grad_accum

    def eval_fn(state: TrainState, batch: dict):
        with tracing_mesh(s):
            micro = _split_microbatches(batch, accum)
            sums = jax.lax.scan(lambda c, mb: (c, _eval(state, mb)), None, micro)[1]
            return jax.tree.map(lambda x: x.sum(0), sums)  # [accum, ...] -> [...]

    def _eval(state: TrainState, batch: dict):
        # fresh variables at the scan's trace level (as in make_grad_fn)
        params, rest = jax.tree.map(lambda x: x, (state.params, state.rest))
        ce, aux = token_losses(nnx.merge(graphdef, params, rest), batch)
        dsum, dcount = _domain_sums(ce, batch, num_domains)
        out = {"loss_sum": dsum, "tokens": dcount}
        if "router/seq_counts" in aux:  # expert selections per domain [L_moe, D, E_all]
            onehot = jax.nn.one_hot(batch["domain"], num_domains, dtype=jnp.float32)
            out["domain_counts"] = jnp.einsum("lbe,bd->lde", aux["router/seq_counts"], onehot)
            routed = (batch["segment_ids"] != 0).sum().astype(jnp.float32)
            # the router's mean over its (non-padding) tokens -> a sum over them
            out["topk_score_sum"] = aux["router/topk_score_sum"] * routed
            out["router_tokens"] = routed
        return out

    return jax.jit(eval_fn, in_shardings=(s.state_shardings, batch_shardings(s.mesh)),
                   out_shardings=NamedSharding(s.mesh, P()))


def global_batch(mesh: Mesh, local: dict) -> dict:
    """Assemble this process's rows into global arrays sharded over the batch axes."""
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
    return out


def to_host(x) -> np.ndarray:
    """A (possibly sharded, multi-process) array as a whole numpy array on every process: the
    inverse of ``global_batch``."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# Peak dense bf16 FLOP/s per GPU, for MFU (vendor spec sheets); TPU chips: moejax.tpu_specs.
GPU_PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "b200": 2250e12}


def peak_flops_for_kind(kind: str) -> float | None:
    """Peak bf16 FLOP/s of a device kind ('TPU v5' is v5p, 'TPU v5 lite' v5e: TPU kinds match
    exactly, since one is a prefix of the other); None where unknown (CPU)."""
    from moejax.tpu_specs import chip_for_device_kind

    try:
        return chip_for_device_kind(kind).peak_bf16_flops
    except ValueError:
        pass
    return next((f for name, f in GPU_PEAK_FLOPS.items() if name in kind.lower()), None)


def peak_flops_per_device(t: TrainConfig) -> float | None:
    """Configured peak, else a lookup by device kind; None where unknown (CPU)."""
    if t.peak_flops > 0:
        return t.peak_flops
    return peak_flops_for_kind(jax.devices()[0].device_kind)


def mfu(cfg: Config, tokens_per_s: float) -> float | None:
    peak = peak_flops_per_device(cfg.train)
    if peak is None:
        return None
    return cfg.model.flops_per_token(cfg.data.seq_len) * tokens_per_s / (peak * jax.device_count())


def step_key(state: TrainState) -> jax.Array:
    """This step's PRNG key (deterministic in the saved rng and the step: resume-exact)."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def num_params(state: TrainState) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)))
