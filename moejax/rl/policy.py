"""The policy's compiled programs for RL: teacher-forced token logprobs (pi_old recompute, the
reference, routing records) and the update step (policy loss over micro-batches -> optimizer).

An RL batch is a dict of rows [n, ...] built from a rollout (``moejax.rl.rows.rl_batch``):
``inputs``/``targets`` [n,T] (T = prompt + new tokens - 1: inputs = tokens[:, :-1]),
``positions``, ``segment_ids`` (0 on padding), ``completion_mask`` [n,T] (targets that were
generated), ``advantages`` [n,T], ``old_logprobs`` / ``rollout_logprobs`` / ``ref_logprobs`` [n,T]
and, under routing replay, ``forced_experts`` [n, L_moe, T, k] (row-major so micro-batches split
it like every other field; the model takes [L_moe, n, T, k]). Under Prefix-RFT (``rl.prefix``)
also ``prefix_mask`` [n,T] (response tokens copied from a demonstration) and
``entropy_mask_ratio`` [n] (the step's scheduled share of low-entropy prefix tokens left
without advantage; a row so micro-batches split it and a new value does not recompile).

Logprobs are of softmax(logits / temperature) (the rollout's "policy" logprobs; verl divides by
the rollout temperature too). Forwards run with ``train=False``: the pi_old recompute and the
update see the same routing function (no router jitter), so their ratio is exactly 1 at the first
update of an on-policy batch.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import train as T
from moejax.layers import balance
from moejax.rl import kl as kl_lib
from moejax.rl.config import RLRunConfig
from moejax.rl.losses import loss_denominators, policy_loss

ROW_KEYS = ("inputs", "targets", "positions", "segment_ids", "completion_mask", "advantages",
            "old_logprobs", "rollout_logprobs", "ref_logprobs", "forced_experts", "prefix_mask",
            "entropy_mask_ratio")


def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: float) -> tuple:
    """log softmax(logits / temperature) at ``targets`` and the entropy of that distribution:
    logits [n,T,V], targets [n,T] -> ([n,T], [n,T]) float32."""
    scaled = logits.astype(jnp.float32) / temperature
    logp = jax.nn.log_softmax(scaled, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, kl_lib.entropy_from_logits(scaled)


def _forced(batch: dict):
    """[n, L, T, k] rows -> the model's [L, n, T, k] (None without replay)."""
    f = batch.get("forced_experts")
    return None if f is None else jnp.swapaxes(f, 0, 1)


def forward(model, batch: dict, temperature: float):
    """Teacher-forced (logprobs [n,T], entropy [n,T], aux) of the batch's targets."""
    logits, aux = model(batch["inputs"], segment_ids=batch["segment_ids"],
                        positions=batch["positions"], forced_experts=_forced(batch))
    lp, ent = token_logprobs(logits, batch["targets"], temperature)
    return lp, ent, aux


def make_logprob_fn(s: T.Setup, temperature: float) -> Callable:
    """Jitted ``(params, rest, batch) -> {"logprobs" [n,T], "entropy" [n,T] and, for an MoE
    model, "experts" [n, L_moe, T, k]}`` (the routing this forward used: R2's record)."""
    graphdef = s.graphdef

    def fn(params, rest, batch):
        with T.tracing_mesh(s):
            model = nnx.merge(graphdef, params, rest)
            lp, ent, aux = forward(model, batch, temperature)
            out = {"logprobs": lp, "entropy": ent}
            if "router/experts" in aux:
                out["experts"] = jnp.swapaxes(aux["router/experts"], 0, 1)
            return out

    return jax.jit(fn)


def make_policy_grad(s: T.Setup, cfg: RLRunConfig) -> Callable:
    """Traceable ``(state, batch) -> (grads, metrics)``: the gradient of one mini-batch's policy
    loss, summed over ``rl.micro_batches`` micro-steps.

    The loss is ``moejax.rl.losses.policy_loss`` with denominators of the *whole* mini-batch
    (every micro-batch and data shard), so the summed micro-gradients equal the gradient of the
    mini-batch loss whatever ``rl.micro_batches`` and the mesh. Optional MoE balance loss from
    live scores (``rl.replay.balance_loss='live'``, averaged over micro-steps). Metrics are the
    mini-batch's (each micro-step's share summed)."""
    rl, moe = cfg.rl, cfg.model.moe
    graphdef, accum = s.graphdef, rl.micro_batches
    temperature = rl.rollout.temperature
    groups = T.batch_shards(s.mesh)
    live_balance = moe.enabled and rl.replay.balance_loss == "live"
    n_moe = T.num_moe_layers(cfg.model)
    e_all = moe.num_experts + moe.router.num_null_experts
    # dr_grpo's L_max: the generation cap, or under Prefix-RFT the row width (prefix + new tokens)
    max_response_len = (None if rl.prefix.enabled else rl.rollout.max_new_tokens)

    def prefix_args(mb) -> dict:
        if "prefix_mask" not in mb:
            return {}
        return {"prefix_mask": mb["prefix_mask"], "prefix_cfg": rl.prefix,
                "entropy_mask_ratio": mb["entropy_mask_ratio"][0]}

    def micro_loss(params, rest, mb, den):
        model = nnx.merge(graphdef, params, rest)
        lp, ent, aux = forward(model, mb, temperature)
        loss, metrics = policy_loss(
            lp, mb["old_logprobs"], mb["advantages"], mb["completion_mask"], den, rl.loss,
            rollout_logprobs=mb.get("rollout_logprobs"), ref_logprobs=mb.get("ref_logprobs"),
            entropy=ent, **prefix_args(mb))
        if live_balance:
            aux_loss, _, _ = balance.moe_aux_loss(aux, moe, micro_groups=groups,
                                                  count_buffer=jnp.zeros((n_moe, e_all)))
            metrics["moe_aux_loss"] = jax.lax.stop_gradient(aux_loss) / accum
            loss = loss + aux_loss / accum
        return loss, metrics

    def grad_fn(state: T.TrainState, batch: dict):
        with T.tracing_mesh(s):
            den = loss_denominators(batch["completion_mask"], max_len=max_response_len)
            micro = T._split_microbatches(batch, accum)
            grad = jax.grad(micro_loss, has_aux=True)

            def body(grads, mb):
                rest = jax.tree.map(lambda x: x, state.rest)  # this trace level's variables
                g, m = grad(state.params, rest, mb, den)
                return jax.tree.map(jnp.add, grads, g), m

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grads, per_micro = jax.lax.scan(body, zeros, micro)
            metrics = jax.tree.map(lambda x: x.sum(0), per_micro)  # shares of the mini-batch
            return grads, metrics

    return grad_fn


def make_update_step(s: T.Setup, cfg: RLRunConfig) -> Callable:
    """Jitted ``(state, batch) -> (state, metrics)``: one optimizer step on one mini-batch with
    ``make_policy_grad``'s gradient. A non-finite loss or gradient drops the update (as in
    pretraining). Metrics come back replicated."""
    tx = s.tx
    grad_fn = make_policy_grad(s, cfg)

    def step_fn(state: T.TrainState, batch: dict):
        grads, metrics = grad_fn(state, batch)
        with T.tracing_mesh(s):
            return _apply(state, grads, metrics)

    def _apply(state, grads, metrics):
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = T.TrainState(step=state.step + finite.astype(jnp.int32),
                                 params=keep(new_params, state.params), rest=state.rest,
                                 opt_state=keep(new_opt, state.opt_state), rng=state.rng)
        metrics = {**metrics, "grad_norm": grad_norm, "nonfinite": ~finite,
                   "lr": T.lr_schedule(s.cfg.train)(state.step)}
        return new_state, metrics

    replicated = NamedSharding(s.mesh, P())
    return jax.jit(step_fn, out_shardings=(s.state_shardings, replicated), donate_argnums=(0,))
