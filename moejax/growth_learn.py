"""G_learn (depth, LiGO-style; spec: shared/methods/architecture.md section 5): every per-layer
tensor of the target is a learned mix of the source's layers, target layer l = sum_j M[l, j] *
source layer j, with M [L_t, L_s] per tensor name initialised to G_stack's map and fitted by Adam
on the target's LM loss for a few batches. Unlike the other operators (``moejax.growth``: fixed
maps of the source), it trains before it returns."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moejax import train as T
from moejax.growth import (Options, _check_layer_types, _replace, grow, join_layers, split_layers,
                           stack_plan)
from moejax.mesh import rules_for, use_mesh


def learn_depth(state: T.TrainState, src: T.Setup, dst: T.Setup, batches: list[dict], *,
                lr: float = 1e-2, stack_mode: str = "block") -> tuple[T.TrainState, list[float]]:
    """G_learn (depth, LiGO-style): target layer l = sum_j M[l, j] * source layer j, one M per
    per-layer tensor, initialised to the G_stack map and fitted by Adam (``lr``) on the target's
    LM loss, one step per batch of ``batches`` (global batches on ``dst.mesh``). Returns the grown
    state (fresh optimizer) and the fitting losses. Router state follows the G_stack map."""
    sm, dm = src.cfg.model, dst.cfg.model
    plan = stack_plan(sm.num_layers, dm.num_layers, stack_mode)
    _check_layer_types(sm, dm, plan)
    onehot = jnp.asarray(np.eye(sm.num_layers, dtype=np.float32)[plan])  # [L_t, L_s]
    params = state.params.to_pure_dict()
    top, src_layers = split_layers(params, sm)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *src_layers)  # [L_s, ...] per tensor
    m0 = jax.tree.map(lambda _: onehot, stacked)
    graphdef = dst.graphdef
    grown = grow(state, src, dst, "stack", options=Options(stack_mode=stack_mode))

    def build(m, stacked, top, like):
        layers = [jax.tree.map(lambda mm, s, l=l: jnp.tensordot(mm[l], s, axes=1), m, stacked)
                  for l in range(dm.num_layers)]
        return _replace(like, join_layers(top, layers, dm))

    def loss_fn(m, stacked, top, grown, batch):
        params = build(m, stacked, top, grown.params)
        model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, grown.rest))
        ce, _ = T.token_losses(model, batch)
        return (ce * batch["loss_mask"]).sum() / jnp.maximum(batch["loss_mask"].sum(), 1.0)

    tx = optax.adam(lr)

    @jax.jit
    def step(m, opt, stacked, top, grown, batch):
        with T.tracing_mesh(dst):
            loss, g = jax.value_and_grad(loss_fn)(m, stacked, top, grown, batch)
        upd, opt = tx.update(g, opt, m)
        return optax.apply_updates(m, upd), opt, loss

    m, opt, losses = m0, tx.init(m0), []
    for b in batches:
        m, opt, loss = step(m, opt, stacked, top, grown, b)
        losses.append(float(loss))

    def final(m, stacked, top, grown):
        with T.tracing_mesh(dst):
            p = build(m, stacked, top, grown.params)
        return dataclasses.replace(grown, params=p, opt_state=dst.tx.init(p))

    with use_mesh(dst.mesh, rules_for(dst.cfg.mesh)):
        out = jax.jit(final, out_shardings=dst.state_shardings)(m, stacked, top, grown)
    return out, losses
