"""Routed experts given a routing decision: dropless (sort + grouped matmul) or capacity dispatch,
expert choice, and expert parallelism as one ``jax.shard_map`` region (``moe_ep.py``).

Routing contract (from the router): ``experts [T,S] int32`` expert id per slot, -1 = empty slot;
``weights [T,S] f32``, 0 on empty slots. Expert i is SwiGLU, ``down_i(silu(x @ gate_i) * (x @ up_i))``,
with ``w_gate, w_up [E,D,F]`` and ``w_down [E,F,D]``; ``y[t] = sum_s weights[t,s] * E_{experts[t,s]}(x[t])``.

Capacity (single device): C = ceil(capacity_factor * T * S / E) assignments per expert. An expert
takes its assignments in token order (flat (token, slot) order: earlier tokens win, then lower
slots); the rest are dropped and counted. Under EP the same rule is applied to each device's local
tokens (see ``moe_ep.py``).

Permutation VJPs: sorting into expert order and back are gathers whose default VJPs are
scatter-adds. ``permute_rows``/``dispatch_rows`` give them gather VJPs instead. Measured on the
2-core CPU (T=8192, S=4, E=64, D=512, fwd+bwd, median of 15, two runs): unsort 63-65 -> 29-43 ms,
dispatch 38-51 -> 33-35 ms. The whole dropless layer on CPU is dominated by ragged_dot (E x the
FLOPs; ~4-5 s fwd+bwd at T=8192,S=4,E=8,D=512,F=64) so there the difference is within noise;
``custom_perm_vjp=False`` turns them off.

Block layout (gmm_impl resolving to 'blocked', the CPU default): the dropless layer gathers tokens
straight into the block-padded layout of ``kernels.gmm.block_layout`` (each expert's rows padded to
a multiple of a row block), runs gate, up and down there, and gathers the rows back once: 2 row
gathers with gather-only VJPs instead of about 8 (three ``gmm`` calls each padding and unpadding,
plus the sort and unsort). On one CPU core the benchmark's MoE layer (T=4096, S=2, E=8, D=F=256)
fwd+bwd 237 -> 212 ms CPU, the ``benchmarks/step.py`` MoE step 1.93 -> 1.81 s (interleaved A/B,
median of 7). The experts there run in the form ``kernels.resolve_blocked_ffn`` picks: on CPU a
loop over the live blocks only (``kernels.expert_loop``: no weight gather, no worst-case padded
blocks; layer -20%, step 1.65 -> 1.39 CPU s; since 64-row blocks four to a dot, another -7 to
-10%), elsewhere batched einsums over all blocks. ``kernels.blocked_ffn_blocking`` sets the
layout's block and how many blocks of one expert share a dot.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax import kernels
from moejax.kernels import expert_loop
from moejax.kernels.gmm import BlockLayout, block_layout, take_rows


class SortPlan(NamedTuple):
    """Assignments sorted by expert (stable: token order kept inside an expert; empty slots last)."""

    order: jax.Array  # [A] flat assignment index (t*S + s) of each sorted position
    inverse: jax.Array  # [A] sorted position of each flat assignment
    key: jax.Array  # [A] expert id per flat assignment, E for empty slots
    sorted_key: jax.Array  # [A] key[order]
    group_sizes: jax.Array  # [E+1] assignments per expert; the last entry counts empty slots
    starts: jax.Array  # [E+1] first sorted position of each expert


def sort_plan(experts: jax.Array, num_experts: int) -> SortPlan:
    """Stable argsort of the flat (token, slot) assignments by expert; all integer work, no grads."""
    bad = (experts < 0) | (experts >= num_experts)  # -1 (and any id >= E, e.g. a null expert)
    key = jnp.where(bad, num_experts, experts).reshape(-1).astype(jnp.int32)  # [A]
    A = key.shape[0]
    order = jnp.argsort(key, stable=True).astype(jnp.int32)  # [A]
    inverse = jnp.zeros((A,), jnp.int32).at[order].set(jnp.arange(A, dtype=jnp.int32))
    group_sizes = jnp.bincount(key, length=num_experts + 1).astype(jnp.int32)  # [E+1]
    starts = (jnp.cumsum(group_sizes) - group_sizes).astype(jnp.int32)
    return SortPlan(order, inverse, key, key[order], group_sizes, starts)


def capacity_of(capacity_factor: float, tokens: int, slots: int, num_experts: int) -> int:
    """Per-expert capacity C = ceil(capacity_factor * T * S / E), at least 1."""
    return max(1, math.ceil(capacity_factor * tokens * slots / num_experts))


class CapacityPlan(NamedTuple):
    """Index arithmetic for capacity dispatch (no [T,E,C] one-hot)."""

    slot_src: jax.Array  # [E*C] flat assignment feeding buffer slot (e, c); A = empty slot
    dest: jax.Array  # [A] buffer slot of each flat assignment; E*C = dropped or empty
    kept: jax.Array  # [A] bool: a valid assignment that fits in its expert's capacity
    dropped: jax.Array  # [] int32: valid assignments beyond capacity
    expert_tokens: jax.Array  # [E] int32: kept assignments per expert


def capacity_plan(experts: jax.Array, num_experts: int, capacity: int) -> CapacityPlan:
    """Position-in-expert from the stable sort (equal to a cumsum over a token-order one-hot, so
    earlier tokens win); slots past ``capacity`` are dropped."""
    E, C = num_experts, capacity
    p = sort_plan(experts, E)
    A = p.key.shape[0]
    pos = p.inverse - p.starts[p.key]  # [A] rank inside its expert (sorted position - start)
    valid = p.key < E
    kept = valid & (pos < C)
    dest = jnp.where(kept, p.key * C + pos, E * C).astype(jnp.int32)  # [A]
    c = jnp.arange(C, dtype=jnp.int32)
    fill = c[None, :] < p.group_sizes[:E, None]  # [E,C]
    src_sorted = jnp.minimum(p.starts[:E, None] + c[None, :], A - 1)  # [E,C]
    slot_src = jnp.where(fill, p.order[src_sorted], A).reshape(E * C)  # [E*C]
    dropped = jnp.sum(valid & ~kept).astype(jnp.int32)
    expert_tokens = jnp.minimum(p.group_sizes[:E], C).astype(jnp.int32)
    return CapacityPlan(slot_src, dest, kept, dropped, expert_tokens)


@jax.custom_vjp
def permute_rows(a: jax.Array, perm: jax.Array, inv: jax.Array) -> jax.Array:
    """a[perm] for a permutation ``perm`` with inverse ``inv``; the VJP is the gather g[inv]
    instead of a scatter-add (fwd+bwd 55-65 -> 27-43 ms on CPU at [32768,512], see the module doc)."""
    return a[perm]


def _permute_fwd(a, perm, inv):
    return a[perm], (perm, inv)


def _permute_bwd(res, g):
    perm, inv = res
    return g[inv], None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


@jax.custom_vjp
def dispatch_rows(x: jax.Array, order: jax.Array, inverse: jax.Array) -> jax.Array:
    """x [T,D] -> [T*S,D] rows x[order // S] (token of each sorted assignment). The VJP gathers
    g[inverse] and sums each token's S slots (a reshape-sum) instead of scatter-adding."""
    return x[order // (order.shape[0] // x.shape[0])]


def _dispatch_fwd(x, order, inverse):
    return dispatch_rows(x, order, inverse), (order, inverse, x.shape[0])


def _dispatch_bwd(res, g):
    order, inverse, T = res
    return g[inverse].reshape(T, -1, g.shape[-1]).sum(axis=1), None, None


dispatch_rows.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def gather_rows(a: jax.Array, idx: jax.Array, inv: jax.Array) -> jax.Array:
    """a[idx] with zero rows where idx is out of range, for a partial permutation: ``inv`` maps
    back (inv[idx[i]] = i on valid rows, out of range elsewhere). The VJP is the gather g[inv]
    instead of a scatter-add. a [N,...], idx [M], inv [N] -> [M,...]."""
    return take_rows(a, idx)


def _gather_rows_fwd(a, idx, inv):
    return take_rows(a, idx), inv


def _gather_rows_bwd(inv, g):
    return take_rows(g, inv), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


@jax.custom_vjp
def gather_tokens(x: jax.Array, tok: jax.Array, back: jax.Array) -> jax.Array:
    """x [T,D] -> [P,D] rows x[tok] (tok out of range: zero row), where ``back`` [T*S] is the row
    of each flat (token, slot) assignment (out of range: none). The VJP gathers g[back] and sums
    each token's S slots instead of scatter-adding."""
    return take_rows(x, tok)


def _gather_tokens_fwd(x, tok, back):
    return take_rows(x, tok), (back, x.shape[0])


def _gather_tokens_bwd(res, g):
    back, T = res
    return take_rows(g, back).reshape(T, -1, g.shape[-1]).sum(axis=1), None, None


gather_tokens.defvjp(_gather_tokens_fwd, _gather_tokens_bwd)


def _pad_row(a: jax.Array) -> jax.Array:
    """[N,...] -> [N+1,...] with a trailing zero row (the target of empty/dropped indices)."""
    return jnp.concatenate([a, jnp.zeros((1,) + a.shape[1:], a.dtype)], axis=0)


def expert_ffn_blocks(xp: jax.Array, lay: BlockLayout, w_gate, w_up, w_down, *, dtype,
                      group: int = 1) -> jax.Array:
    """SwiGLU experts on the block-padded layout (``kernels.gmm.block_layout``): block n of rows
    goes through expert lay.block_group[n], in the form ``kernels.resolve_blocked_ffn`` picks
    (CPU: a loop over the live blocks only, ``group`` blocks of one expert per dot; the layout
    and ``group`` come from ``kernels.blocked_ffn_blocking``). xp [NB,b,D] -> [NB,b,D] f32."""
    if kernels.resolve_blocked_ffn() == "loop":
        return expert_loop.swiglu_blocks(xp, lay.block_group, lay.used, w_gate, w_up, w_down,
                                         dtype=dtype, group=group)
    if group != 1:
        raise ValueError(f"group={group}: the batched block form runs one block per expert slice")
    return _expert_ffn_blocks_batched(xp, lay.block_group, w_gate, w_up, w_down, dtype=dtype)


def _expert_ffn_blocks_batched(xp: jax.Array, block_expert: jax.Array, w_gate, w_up, w_down, *,
                               dtype) -> jax.Array:
    """All NB blocks in batched einsums against per-block weights w[block_expert] [NB,K,N].
    xp [NB,b,D], block_expert [NB] -> [NB,b,D] f32."""
    f32 = jnp.float32
    per_block = lambda w: w.astype(dtype)[block_expert]  # noqa: E731  [E,K,N] -> [NB,K,N]
    g = jnp.einsum("nbk,nkf->nbf", xp, per_block(w_gate), preferred_element_type=f32)
    u = jnp.einsum("nbk,nkf->nbf", xp, per_block(w_up), preferred_element_type=f32)
    h = (jax.nn.silu(g) * u).astype(dtype)  # [NB,b,F]
    return jnp.einsum("nbf,nfd->nbd", h, per_block(w_down), preferred_element_type=f32)


def expert_ffn_grouped(xs: jax.Array, group_sizes: jax.Array, w_gate, w_up, w_down, *,
                       gmm_impl: str, dtype) -> jax.Array:
    """SwiGLU experts on rows sorted by expert. xs [M,D], group_sizes [E] -> [M,D] f32.

    With gmm_impl resolving to 'blocked' the rows are padded into the block layout once for all
    three matmuls (not once per matmul, as three ``kernels.gmm`` calls would)."""
    f32 = jnp.float32
    if kernels.resolve_gmm_impl(gmm_impl) == "blocked":
        M, D = xs.shape
        block, group = kernels.blocked_ffn_blocking(M, group_sizes.shape[0])
        lay = block_layout(group_sizes, M, block)
        xp = gather_rows(xs, lay.src, lay.dest).reshape(lay.num_blocks, lay.block, D)
        y = expert_ffn_blocks(xp, lay, w_gate, w_up, w_down, dtype=dtype, group=group)
        return gather_rows(y.reshape(lay.num_blocks * lay.block, -1), lay.dest, lay.src)
    g = kernels.gmm(xs, w_gate.astype(dtype), group_sizes, impl=gmm_impl, preferred_element_type=f32)
    u = kernels.gmm(xs, w_up.astype(dtype), group_sizes, impl=gmm_impl, preferred_element_type=f32)
    h = (jax.nn.silu(g) * u).astype(dtype)  # [M,F]
    return kernels.gmm(h, w_down.astype(dtype), group_sizes, impl=gmm_impl, preferred_element_type=f32)


def expert_ffn_batched(xs: jax.Array, w_gate, w_up, w_down, *, dtype) -> jax.Array:
    """SwiGLU experts on equal-size per-expert buffers. xs [E,C,D] -> [E,C,D] f32."""
    f32 = jnp.float32
    g = jnp.einsum("ecd,edf->ecf", xs, w_gate.astype(dtype), preferred_element_type=f32)
    u = jnp.einsum("ecd,edf->ecf", xs, w_up.astype(dtype), preferred_element_type=f32)
    h = (jax.nn.silu(g) * u).astype(dtype)
    return jnp.einsum("ecf,efd->ecd", h, w_down.astype(dtype), preferred_element_type=f32)


def combine(out_flat: jax.Array, weights: jax.Array) -> jax.Array:
    """out_flat [T*S,D] per flat assignment, weights [T,S] -> y [T,D] f32 (sum over slots)."""
    T, S = weights.shape
    return jnp.einsum("tsd,ts->td", out_flat.reshape(T, S, -1), weights.astype(jnp.float32))


def dropless_local(x, experts, weights, w_gate, w_up, w_down, *, gmm_impl: str, dtype,
                   custom_perm_vjp: bool = True):
    """Exactly dropless: sort assignments by expert, 3 grouped matmuls, unsort, weighted sum.

    x [T,D], experts/weights [T,S] -> (y [T,D] f32, expert_tokens [E] int32).
    """
    T, S = experts.shape
    E = w_gate.shape[0]
    p = sort_plan(experts, E)
    valid = (p.sorted_key < E)[:, None]  # [A,1]
    if custom_perm_vjp:
        xs = dispatch_rows(x.astype(dtype), p.order, p.inverse)  # [A,D] sorted by expert
    else:
        xs = x.astype(dtype)[p.order // S]
    xs = jnp.where(valid, xs, 0)  # empty slots: zero rows in the trailing sentinel group
    out = expert_ffn_grouped(xs, p.group_sizes[:E], w_gate, w_up, w_down, gmm_impl=gmm_impl,
                             dtype=dtype)  # [A,D]; the sentinel group is never computed (zeros)
    out = permute_rows(out, p.inverse, p.order) if custom_perm_vjp else out[p.inverse]  # unsort
    return combine(out, weights), p.group_sizes[:E]


class BlockedDispatch(NamedTuple):
    """Flat (token, slot) assignments <-> the block-padded expert layout, composed from the sort
    (``SortPlan``) and ``kernels.gmm.block_layout`` so that one gather goes each way."""

    layout: BlockLayout  # padded layout of the A sorted assignments, groups = experts
    tok: jax.Array  # [NB*b] token of each padded row; T = padding
    assignment: jax.Array  # [NB*b] flat assignment of each padded row; A = padding
    row: jax.Array  # [A] padded row of each flat assignment; NB*b = empty slot


def blocked_dispatch(p: SortPlan, num_experts: int, slots: int,
                     block: int | None = None) -> BlockedDispatch:
    """Compose sorted -> padded (``block_layout`` over the experts' group sizes, ``block`` rows
    per block, default ``gmm.default_block``; the sentinel group of empty slots is left out) with
    flat -> sorted (``p.inverse``). Integer work only."""
    A = p.order.shape[0]
    lay = block_layout(p.group_sizes[:num_experts], A, block)
    assignment = p.order.at[lay.src].get(mode="fill", fill_value=A)  # [NB*b]
    tok = jnp.where(assignment < A, assignment // slots, A // slots).astype(jnp.int32)
    return BlockedDispatch(lay, tok, assignment, lay.dest[p.inverse])


def dropless_blocked_local(x, experts, weights, w_gate, w_up, w_down, *, dtype):
    """``dropless_local`` for gmm_impl 'blocked', fused: tokens are gathered straight into the
    block-padded layout, the whole SwiGLU runs there, and one gather brings the rows back to
    (token, slot) order; both gathers have gather-only VJPs. Same outputs and gradients (each
    element's products and sums are the same ones); 2 row gathers instead of about 8.

    x [T,D], experts/weights [T,S] -> (y [T,D] f32, expert_tokens [E] int32).
    """
    T, S = experts.shape
    E, D = w_gate.shape[0], x.shape[1]
    p = sort_plan(experts, E)
    block, group = kernels.blocked_ffn_blocking(T * S, E)
    bd = blocked_dispatch(p, E, S, block)
    lay = bd.layout
    xp = gather_tokens(x.astype(dtype), bd.tok, bd.row).reshape(lay.num_blocks, lay.block, D)
    y = expert_ffn_blocks(xp, lay, w_gate, w_up, w_down, dtype=dtype, group=group)  # [NB,b,D]
    out = gather_rows(y.reshape(lay.num_blocks * lay.block, D), bd.row, bd.assignment)  # [A,D]
    return combine(out, weights), p.group_sizes[:E]


def capacity_local(x, experts, weights, w_gate, w_up, w_down, *, capacity: int, dtype):
    """Capacity dispatch: gather into [E,C,D], batched matmul, gather back, weighted sum.

    x [T,D], experts/weights [T,S] -> (y [T,D] f32, CapacityPlan).
    """
    T, S = experts.shape
    E = w_gate.shape[0]
    plan = capacity_plan(experts, E, capacity)
    xs = _pad_row(x.astype(dtype))[plan.slot_src // S].reshape(E, capacity, -1)  # [E,C,D]
    out = expert_ffn_batched(xs, w_gate, w_up, w_down, dtype=dtype)  # [E,C,D]
    out_flat = _pad_row(out.reshape(E * capacity, -1))[plan.dest]  # [A,D]; dropped -> zero row
    return combine(out_flat, weights), plan


def routed_experts(x: jax.Array, experts: jax.Array, weights: jax.Array, w_gate: jax.Array,
                   w_up: jax.Array, w_down: jax.Array, *, dispatch: str = "dropless",
                   capacity_factor: float = 1.25, gmm_impl: str = "auto", dtype=None):
    """Single-device routed experts. x [T,D], experts [T,S] int32 (-1 empty), weights [T,S].

    Returns (y [T,D] in ``dtype`` (default x.dtype), stats) with stats = {'dropped': int32 []
    assignments not computed, 'expert_tokens': int32 [E] assignments processed per expert}.
    Expert ids outside [0, E) (-1, null experts) are empty slots: no compute, no output.
    """
    dtype = jnp.dtype(x.dtype if dtype is None else dtype)
    if dispatch == "dropless" and kernels.resolve_gmm_impl(gmm_impl) == "blocked":
        y, counts = dropless_blocked_local(x, experts, weights, w_gate, w_up, w_down, dtype=dtype)
        stats = {"dropped": jnp.zeros((), jnp.int32), "expert_tokens": counts}
    elif dispatch == "dropless":
        y, counts = dropless_local(x, experts, weights, w_gate, w_up, w_down, gmm_impl=gmm_impl,
                                   dtype=dtype)
        stats = {"dropped": jnp.zeros((), jnp.int32), "expert_tokens": counts}
    elif dispatch == "capacity":
        T, S = experts.shape
        C = capacity_of(capacity_factor, T, S, w_gate.shape[0])
        y, plan = capacity_local(x, experts, weights, w_gate, w_up, w_down, capacity=C, dtype=dtype)
        stats = {"dropped": plan.dropped, "expert_tokens": plan.expert_tokens}
    else:
        raise ValueError(f"dispatch={dispatch!r} is unknown; choose 'dropless' or 'capacity'")
    return y.astype(dtype), stats


def expert_choice_experts(x: jax.Array, tokens: jax.Array, weights: jax.Array, w_gate: jax.Array,
                          w_up: jax.Array, w_down: jax.Array, *, dtype=None) -> jax.Array:
    """Expert choice: expert e processes its chosen tokens[e] (C of them; -1 = unused slot).

    x [T,D], tokens [E,C] int32, weights [E,C] -> y [T,D]: y[t] = sum_{e,c: tokens[e,c]=t}
    weights[e,c] * E_e(x[t]). Gather, batched matmul, weighted scatter-add. Compute in ``dtype``
    (default x.dtype), accumulate in f32.
    """
    dtype = jnp.dtype(x.dtype if dtype is None else dtype)
    T = x.shape[0]
    E, C = tokens.shape
    idx = jnp.where(tokens < 0, T, tokens)  # [E,C]; T = zero row / dropped on scatter
    xs = _pad_row(x.astype(dtype))[idx]  # [E,C,D]
    out = expert_ffn_batched(xs, w_gate, w_up, w_down, dtype=dtype)  # [E,C,D] f32
    out = out * weights.astype(jnp.float32)[..., None]
    y = jnp.zeros((T, x.shape[1]), jnp.float32).at[idx.reshape(-1)].add(
        out.reshape(E * C, -1), mode="drop")
    return y.astype(dtype)


def moe_ffn(x: jax.Array, experts: jax.Array, weights: jax.Array, w_gate: jax.Array,
            w_up: jax.Array, w_down: jax.Array, *, cfg, dtype=None):
    """Routed experts for ``cfg: MoEConfig``. Under any multi-device mesh this is the shard_map
    path (expert-parallel when expert > 1; with expert == 1 every device dispatches its own tokens
    to its full set of experts, so no global sort); without a mesh the single-device layer.
    Capacity is per device-local tokens under a mesh (see ``moe_ep``); the EP exchange is
    ``cfg.ep_exchange`` with ``cfg.ep_buffer_factor``.

    x [T,D] (T batch-major flattened, sharded over the batch axes), experts/weights [T,S],
    w_* [E,...] sharded over 'expert'. Returns (y [T,D], stats) as ``routed_experts``.
    Raises ``ConfigError`` when num_experts is not divisible by the mesh's expert axis.
    """
    from moejax.config import ConfigError
    from moejax.layers import moe_ep

    E = w_gate.shape[0]
    if cfg.num_experts and cfg.num_experts != E:
        raise ConfigError(f"model.moe.num_experts={cfg.num_experts} does not match the expert "
                          f"weights' leading dim {E}")
    mesh = jax.sharding.get_abstract_mesh()
    ep = 0 if mesh.empty or "expert" not in mesh.axis_names else mesh.shape["expert"]
    if ep >= 1 and mesh.size > 1:
        if E % ep:
            raise ConfigError(f"model.moe.num_experts={E} is invalid: must be divisible by "
                              f"mesh.expert={ep} (experts are split evenly over it)")
        return moe_ep.routed_experts_ep(
            x, experts, weights, w_gate, w_up, w_down, dispatch=cfg.dispatch,
            capacity_factor=cfg.capacity_factor, ep_buffer_factor=cfg.ep_buffer_factor,
            gmm_impl=cfg.gmm_impl, dtype=dtype, mesh=mesh, exchange=cfg.ep_exchange)
    return routed_experts(x, experts, weights, w_gate, w_up, w_down, dispatch=cfg.dispatch,
                          capacity_factor=cfg.capacity_factor, gmm_impl=cfg.gmm_impl, dtype=dtype)
