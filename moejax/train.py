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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax.config import Config, TrainConfig
from moejax.mesh import BATCH_AXES, use_mesh, rules_for
from moejax.layers import balance
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


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
    """AdamW (decay on matrices only) after global-norm clipping."""
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    adamw = optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps,
                        weight_decay=t.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(t.clip_norm), adamw) if t.clip_norm > 0 else adamw


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch dim over every non-tensor axis, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


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
    tx = make_optimizer(cfg.train)
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


def make_train_step(s: Setup, num_domains: int) -> Callable[[TrainState, dict], tuple]:
    """Jitted ``(state, batch) -> (state, metrics)`` with gradient accumulation over
    ``train.grad_accum`` micro-steps. The LM loss is the masked token mean over the *whole* batch,
    so accumulation is exact; MoE balance losses are averaged over micro-steps, with the global
    scope's count buffer carried across them. A non-finite loss or gradient never reaches the
    parameters: the update is dropped on device and ``metrics['nonfinite']`` tells the host.
    The aux-loss-free router bias is updated after the optimizer from the step's global counts."""
    cfg, tx, graphdef = s.cfg, s.tx, s.graphdef
    moe = cfg.model.moe
    accum = cfg.train.grad_accum
    schedule = lr_schedule(cfg.train)
    groups = batch_shards(s.mesh)
    n_moe = num_moe_layers(cfg.model)
    e_all = moe.num_experts + moe.router.num_null_experts

    def step_fn(state: TrainState, batch: dict):
        with tracing_mesh(s):
            return _step(state, batch)

    def _step(state: TrainState, batch: dict):
        total_tokens = jnp.maximum(batch["loss_mask"].sum(), 1.0)
        micro = _split_microbatches(batch, accum)
        key = step_key(state)

        def micro_loss(params, mb, buffer, k):
            # re-create the non-trainable variables at this trace level (the jit level's objects
            # cannot be extracted by nnx.scan inside value_and_grad)
            rest = jax.tree.map(lambda x: x, state.rest)
            model = nnx.merge(graphdef, params, rest)
            ce, aux = token_losses(model, mb, train=True, rng=k)
            lm = (ce * mb["loss_mask"]).sum() / total_tokens
            if not moe.enabled:
                return lm, (ce, lm, {}, buffer)
            aux_loss, buffer, stats = balance.moe_aux_loss(aux, moe, micro_groups=groups,
                                                           count_buffer=buffer)
            return lm + aux_loss / accum, (ce, lm, stats, buffer)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def body(carry, xs):
            mb, i = xs
            grads, loss, dsum, dcount, buffer, stats = carry
            (_, (ce, lm, st, buffer)), g = grad_fn(state.params, mb, buffer,
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
                   "domain_loss_sum": dsum, "domain_tokens": dcount,
                   **{f"moe/{k}": v / (1 if k == "counts" else accum) for k, v in stats.items()}}
        return new_state, metrics

    batch_sh = {k: batch_sharding(s.mesh, 2) for k in BATCH_KEYS_2D}
    batch_sh["domain"] = batch_sharding(s.mesh, 1)
    return jax.jit(step_fn, in_shardings=(s.state_shardings, batch_sh),
                   out_shardings=(s.state_shardings, None), donate_argnums=(0,))


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
    """Jitted ``(state, batch) -> {loss_sum [D], tokens [D]}`` for validation."""
    graphdef = s.graphdef

    def eval_fn(state: TrainState, batch: dict):
        with tracing_mesh(s):
            return _eval(state, batch)

    def _eval(state: TrainState, batch: dict):
        model = nnx.merge(graphdef, state.params, state.rest)
        ce, aux = token_losses(model, batch)
        dsum, dcount = _domain_sums(ce, batch, num_domains)
        out = {"loss_sum": dsum, "tokens": dcount}
        if "router/seq_counts" in aux:  # expert selections per domain [L_moe, D, E_all]
            onehot = jax.nn.one_hot(batch["domain"], num_domains, dtype=jnp.float32)
            out["domain_counts"] = jnp.einsum("lbe,bd->lde", aux["router/seq_counts"], onehot)
            out["topk_score_sum"] = aux["router/topk_score_sum"]
        return out

    batch_sh = {k: batch_sharding(s.mesh, 2) for k in BATCH_KEYS_2D}
    batch_sh["domain"] = batch_sharding(s.mesh, 1)
    return jax.jit(eval_fn, in_shardings=(s.state_shardings, batch_sh))


def global_batch(mesh: Mesh, local: dict) -> dict:
    """Assemble this process's rows into global arrays sharded over the batch axes."""
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
    return out


# Peak dense bf16 FLOP/s per device, for MFU (sources: vendor spec sheets).
PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "a100": 312e12, "b200": 2250e12,
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12,
}


def peak_flops_per_device(t: TrainConfig) -> float | None:
    """Configured peak, else a lookup by device kind; None where unknown (CPU)."""
    if t.peak_flops > 0:
        return t.peak_flops
    kind = jax.devices()[0].device_kind.lower()
    for name, flops in PEAK_FLOPS.items():
        if name in kind:
            return flops
    return None


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
