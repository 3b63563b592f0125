"""Expert parallelism: routed experts as one ``jax.shard_map`` over the whole mesh.

Tokens enter sharded over the batch axes ('data','fsdp','expert'), padded with empty rows (expert
-1: routed nowhere, counted nowhere) to a multiple of the batch shards so any token count works
(decode steps, odd eval batches). Expert weights enter with their experts over 'expert' and their
hidden dim F over 'tensor' (w_gate/w_up P('expert', None, 'tensor'), w_down P('expert', 'tensor',
None); replicated over fsdp: XLA gathers them on entry). Inside, each device routes its local
assignments to the owner of the expert (owner = e // (E/ep)), exchanges over 'expert', computes its
local experts on its F slice, exchanges back and combines; the partial outputs of the F slices are
summed over 'tensor' (one psum of y), so tensor ranks split the expert work instead of repeating it.

Capacity under EP: the single-device rule applied to each device's local tokens, i.e.
C_local = ceil(capacity_factor * T_local * S / E) per (expert, source device), earlier local tokens
first. It equals ``routed_experts(dispatch='capacity')`` run separately on each batch-shard chunk of
T_local tokens (chunks in (data, fsdp, expert) row-major order), and each expert sees at most
n_batch_shards * C_local ~= capacity_factor * T * S / E assignments in total.

Dropless under EP: ``exchange='padded'`` (default) is a fixed-size ``all_to_all`` of
per-destination chunks of B rows padded with zeros (plus the local expert id of every row);
``exchange='ragged'`` sends only the true rows with ``ragged_all_to_all`` into the same [ep*B]
receive buffer (GPU/TPU only: XLA:CPU has no ragged-all-to-all, so it is refused there with a
ConfigError). ``ep_buffer_factor=0`` gives B = T_local*S (the worst case: exactly dropless, an
ep-times larger receive buffer than the mean load); a positive factor gives
B = ceil(factor * T_local * S / ep) (at least ``MIN_BUFFER_ROWS``), and the assignments past B in a destination's chunk (sorted by
expert, then token: the highest expert ids of that destination lose first) are dropped and counted
exactly (``dropped``; the MoE block adds it to ``router/dropped``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax import kernels
from moejax.config import ConfigError
from moejax.layers import moe_dispatch as md
from moejax.mesh import BATCH_AXES

AXIS = "expert"
TENSOR = "tensor"
EXCHANGES = ("padded", "ragged")


# Floor of the finite buffer: chunks this small cost nothing to send whole, and small local
# batches (decode steps, eval tails) are where the per-destination load varies most, so they never
# drop (a decode token whose top-k experts share one device would otherwise lose some).
MIN_BUFFER_ROWS = 128


def buffer_rows(ep_buffer_factor: float, local_assignments: int, ep: int) -> int:
    """Rows per destination chunk B of the padded dropless exchange: ceil(factor * A / ep) for the
    A = T_local * S local assignments, at least MIN_BUFFER_ROWS, at most A (0 = A: exact)."""
    if ep_buffer_factor <= 0:
        return local_assignments
    return min(local_assignments,
               max(MIN_BUFFER_ROWS, math.ceil(ep_buffer_factor * local_assignments / ep)))


def _exchange_plan(p: md.SortPlan, E: int, ep: int, B: int):
    """Per destination device j: sorted positions start_j + r (r < min(cnt_j, B)) go in its chunk.

    Returns src [ep,B] (sorted position or A = pad), lid [ep,B] local expert id (E/ep = pad),
    back [A] flat row in the returned [ep*B] buffer per sorted position (ep*B = dropped/empty),
    kept [A] bool per sorted position, cnt [ep], start [ep].
    """
    A = p.key.shape[0]
    El = E // ep
    cnt = p.group_sizes[:E].reshape(ep, El).sum(axis=1)  # [ep] assignments per destination
    start = jnp.cumsum(cnt) - cnt  # [ep]; sorted by expert => chunks are contiguous
    r = jnp.arange(B, dtype=jnp.int32)
    fill = r[None, :] < jnp.minimum(cnt, B)[:, None]  # [ep,B]
    src = jnp.where(fill, start[:, None] + r[None, :], A)  # [ep,B]
    lid_sorted = jnp.concatenate([p.sorted_key, jnp.array([E], jnp.int32)])[jnp.minimum(src, A)]
    lid = jnp.where(fill, lid_sorted - jnp.arange(ep, dtype=jnp.int32)[:, None] * El, El)
    dest = p.sorted_key // El  # [A] owner device of each sorted assignment; ep for empty slots
    rank = jnp.arange(A, dtype=jnp.int32) - start[jnp.minimum(dest, ep - 1)]
    kept = (dest < ep) & (rank < B)
    back = jnp.where(kept, dest * B + rank, ep * B).astype(jnp.int32)
    return src, lid.astype(jnp.int32), back, kept, cnt.astype(jnp.int32), start.astype(jnp.int32)


def _local_experts(recv, recv_lid, w_gate, w_up, w_down, *, gmm_impl, dtype):
    """Received rows [N,D] with local expert ids [N] (El = pad) -> outputs [N,D] f32, same order."""
    El = w_gate.shape[0]
    q = md.sort_plan(recv_lid[:, None], El)  # one "slot" per row: sort rows by local expert
    xs = md.permute_rows(recv.astype(dtype), q.order, q.inverse)  # [N,D] sorted by local expert
    out = md.expert_ffn_grouped(xs, q.group_sizes[:El], w_gate, w_up, w_down, gmm_impl=gmm_impl,
                                dtype=dtype)  # [N,D]; pad rows (sentinel group) are zero
    return md.permute_rows(out, q.inverse, q.order)


def _dropless_padded(x, experts, weights, w_gate, w_up, w_down, *, E, ep, B, gmm_impl, dtype):
    """Per device: x [Tl,D], experts/weights [Tl,S] (A = Tl*S assignments), local w_* [El,...]
    -> (y, dropped, counts [E])."""
    Tl, S = experts.shape
    D = x.shape[1]
    p = md.sort_plan(experts, E)
    src, lid, back, kept, _, _ = _exchange_plan(p, E, ep, B)
    tok = jnp.where(p.sorted_key < E, p.order // S, Tl)  # [A] source token per sorted position
    xs = md._pad_row(md._pad_row(x.astype(dtype))[tok])  # [Tl*S+1,D]; the last row is the zero pad
    send = xs[src]  # [ep,B,D]: chunk j goes to the device owning experts [j*El, (j+1)*El)
    recv = jax.lax.all_to_all(send, AXIS, 0, 0)  # [ep,B,D]: recv[s] came from source s
    recv_lid = jax.lax.all_to_all(lid, AXIS, 0, 0)  # [ep,B]
    out = _local_experts(recv.reshape(ep * B, D), recv_lid.reshape(ep * B), w_gate, w_up, w_down,
                         gmm_impl=gmm_impl, dtype=dtype)
    ret = jax.lax.all_to_all(out.reshape(ep, B, D), AXIS, 0, 0)  # [ep,B,D]: ret[j] from device j
    out_sorted = md._pad_row(ret.reshape(ep * B, D))[back]  # [A,D]; dropped/empty -> zero row
    y = md.combine(md.permute_rows(out_sorted, p.inverse, p.order), weights)
    valid = p.sorted_key < E
    dropped = jnp.sum(valid & ~kept).astype(jnp.int32)
    counts = jnp.zeros((E + 1,), jnp.int32).at[p.sorted_key].add(kept.astype(jnp.int32))[:E]
    return y, dropped, counts


def _dropless_ragged(x, experts, weights, w_gate, w_up, w_down, *, E, ep, B, gmm_impl, dtype):
    """As ``_dropless_padded`` but sends only the true rows with ``ragged_all_to_all`` (GPU/TPU;
    ``model.moe.ep_exchange='ragged'``).

    Not run on CPU (XLA:CPU has no ragged-all-to-all thunk: ``routed_experts_ep`` refuses it there);
    it compiles for TPU (shared/notes/tpu-aot.md). Same drop rule and same [ep*B] receive buffer as
    the padded path; only the bytes on the wire shrink.
    """
    Tl, S = experts.shape
    D = x.shape[1]
    El = E // ep
    p = md.sort_plan(experts, E)
    A = Tl * S
    _, _, _, kept, cnt, start = _exchange_plan(p, E, ep, B)
    send_sizes = jnp.minimum(cnt, B)  # [ep]
    tok = jnp.where(p.sorted_key < E, p.order // S, Tl)
    xs = md._pad_row(x.astype(dtype))[tok]  # [A,D] sorted by expert
    dest = jnp.minimum(p.sorted_key // El, ep - 1)
    lid = jnp.where(p.sorted_key < E, p.sorted_key - dest * El, El).astype(jnp.int32)  # [A]
    recv_sizes = jax.lax.all_to_all(send_sizes, AXIS, 0, 0, tiled=True)  # [ep] from each source
    # My chunk for device j lands at j's offset j * B + (row block of my index): receive buffers
    # keep one B-row block per source, so the layout matches the padded path.
    me = jax.lax.axis_index(AXIS)
    out_offsets = jnp.full((ep,), me * B, jnp.int32)
    recv = jax.lax.ragged_all_to_all(xs, jnp.zeros((ep * B, D), xs.dtype), start, send_sizes,
                                     out_offsets, recv_sizes, axis_name=AXIS)  # [ep*B,D]
    recv_lid = jax.lax.ragged_all_to_all(lid, jnp.full((ep * B,), El, jnp.int32), start,
                                         send_sizes, out_offsets, recv_sizes, axis_name=AXIS)
    out = _local_experts(recv, recv_lid, w_gate, w_up, w_down, gmm_impl=gmm_impl, dtype=dtype)
    src_offsets = jnp.arange(ep, dtype=jnp.int32) * B  # where each source's block starts here
    start_at_src = jax.lax.all_to_all(start, AXIS, 0, 0, tiled=True)  # [ep] src's start for me
    ret = jax.lax.ragged_all_to_all(out, jnp.zeros((A, D), out.dtype), src_offsets, recv_sizes,
                                    start_at_src, send_sizes, axis_name=AXIS)  # [A,D] sorted order
    ret = jnp.where(kept[:, None], ret, 0)  # rows never written are zero already; be explicit
    y = md.combine(md.permute_rows(ret, p.inverse, p.order), weights)
    valid = p.sorted_key < E
    dropped = jnp.sum(valid & ~kept).astype(jnp.int32)
    counts = jnp.zeros((E + 1,), jnp.int32).at[p.sorted_key].add(kept.astype(jnp.int32))[:E]
    return y, dropped, counts


def _capacity(x, experts, weights, w_gate, w_up, w_down, *, E, ep, capacity_factor, dtype):
    """Per device capacity dispatch; the [E*C_local] buffer is exchanged with a tiled all_to_all."""
    Tl, S = experts.shape
    D = x.shape[1]
    El = E // ep
    C = md.capacity_of(capacity_factor, Tl, S, E)
    plan = md.capacity_plan(experts, E, C)
    xs = md._pad_row(x.astype(dtype))[plan.slot_src // S]  # [E*C,D], expert-major
    recv = jax.lax.all_to_all(xs, AXIS, 0, 0, tiled=True)  # [ep*El*C,D], source-major
    h = recv.reshape(ep, El, C, D).transpose(1, 0, 2, 3).reshape(El, ep * C, D)
    out = md.expert_ffn_batched(h, w_gate, w_up, w_down, dtype=dtype)  # [El,ep*C,D]
    out = out.reshape(El, ep, C, D).transpose(1, 0, 2, 3).reshape(ep * El * C, D)
    ret = jax.lax.all_to_all(out, AXIS, 0, 0, tiled=True)  # [E*C,D] back in my expert-major order
    y = md.combine(md._pad_row(ret)[plan.dest], weights)
    return y, plan.dropped, plan.expert_tokens


def _platform(mesh) -> str | None:
    """The device platform of ``mesh`` (a Mesh or AbstractMesh; 'tpu' for an AOT TPU topology)."""
    amesh = getattr(mesh, "abstract_mesh", mesh)
    return getattr(getattr(amesh, "abstract_device", None), "platform", None)


def _check_layout(amesh, E: int, F: int, dispatch: str, exchange: str) -> None:
    """ConfigErrors naming the field for what the EP layout cannot split or run."""
    ep = amesh.shape[AXIS]
    tensor = amesh.shape.get(TENSOR, 1)
    if E % ep:
        raise ConfigError(f"model.moe.num_experts={E} is invalid: must be divisible by "
                          f"mesh.expert={ep} (experts are split evenly over it)")
    if F % tensor:
        raise ConfigError(f"model.moe.d_expert={F} is invalid: must be divisible by "
                          f"mesh.tensor={tensor} (each expert's FFN is split over it)")
    if exchange not in EXCHANGES:
        raise ConfigError(f"model.moe.ep_exchange={exchange!r} is invalid: choose one of {EXCHANGES}")
    if dispatch == "dropless" and exchange == "ragged" and _platform(amesh) == "cpu":
        raise ConfigError("model.moe.ep_exchange='ragged' is invalid on CPU: XLA:CPU cannot run "
                          "ragged-all-to-all; use model.moe.ep_exchange='padded' (ragged is for "
                          "GPU/TPU)")


def _pad_tokens(x, experts, weights, shards: int):
    """Pad T to a multiple of ``shards`` with empty rows (expert -1, weight 0, x 0) -> (x, e, w)."""
    T = experts.shape[0]
    n = -T % shards
    if n == 0:
        return x, experts, weights
    rows = lambda a, v: jnp.pad(a, ((0, n), (0, 0)), constant_values=v)  # noqa: E731
    return rows(x, 0), rows(experts, -1), rows(weights, 0)


def routed_experts_ep(x: jax.Array, experts: jax.Array, weights: jax.Array, w_gate: jax.Array,
                      w_up: jax.Array, w_down: jax.Array, *, dispatch: str = "dropless",
                      capacity_factor: float = 1.25, ep_buffer_factor: float = 0.0,
                      gmm_impl: str = "auto", dtype=None, mesh=None,
                      exchange: str = "padded", check_vma: bool | None = None):
    """Expert-parallel ``routed_experts``: same inputs and outputs, one shard_map over the mesh.

    x [T,D], experts/weights [T,S] (any T: padded inside to the batch shards) sharded (or
    reshardable) over the batch axes; w_* [E,...] over 'expert' (F over 'tensor'). ``mesh``:
    default the active mesh. ``ep_buffer_factor``: dropless exchange rows per destination over the
    mean (0 = worst case, exact). ``exchange``: 'padded' or 'ragged' (GPU/TPU). ``check_vma``:
    default True for the jnp/XLA kernels, False for Pallas/tokamax kernels (which cannot carry
    varying-axis types). Returns (y [T,D] in ``dtype`` (default x.dtype), {'dropped': int32 [],
    'expert_tokens': int32 [E]}), both global (summed over the batch shards).
    """
    dtype = jnp.dtype(x.dtype if dtype is None else dtype)
    amesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    names = amesh.axis_names
    if AXIS not in names:
        raise ValueError(f"routed_experts_ep needs a mesh with an {AXIS!r} axis; got {names}")
    ep = amesh.shape[AXIS]
    E, F = w_gate.shape[0], w_gate.shape[2]
    _check_layout(amesh, E, F, dispatch, exchange)
    tensor = amesh.shape.get(TENSOR, 1)
    batch_axes = tuple(a for a in BATCH_AXES if a in names)
    shards = math.prod(amesh.shape[a] for a in batch_axes)
    T, S = experts.shape
    x, experts, weights = _pad_tokens(x, experts, weights, shards)
    Tl = experts.shape[0] // shards
    if dispatch == "capacity":
        local = lambda *a: _capacity(*a, E=E, ep=ep, capacity_factor=capacity_factor, dtype=dtype)
    elif dispatch == "dropless":
        fn = _dropless_ragged if exchange == "ragged" else _dropless_padded
        B = buffer_rows(ep_buffer_factor, Tl * S, ep)
        local = lambda *a: fn(*a, E=E, ep=ep, B=B, gmm_impl=gmm_impl, dtype=dtype)
    else:
        raise ValueError(f"dispatch={dispatch!r} is unknown; choose 'dropless' or 'capacity'")
    if check_vma is None:
        check_vma = kernels.resolve_gmm_impl(gmm_impl) in ("reference", "xla", "blocked")
    split_f = tensor > 1

    def body(x, experts, weights, w_gate, w_up, w_down):
        y, dropped, counts = local(x, experts, weights, w_gate, w_up, w_down)
        if split_f:  # each tensor rank computed its F slice: sum the partial outputs
            y = jax.lax.psum(y, TENSOR) if check_vma else _psum_unchecked(y, tensor)
        stats = {"dropped": jax.lax.psum(dropped, batch_axes),
                 "expert_tokens": jax.lax.psum(counts, batch_axes)}
        return y.astype(dtype), stats

    ft = TENSOR if split_f else None
    tok, w_in, w_out = P(batch_axes, None), P(AXIS, None, ft), P(AXIS, ft, None)
    f = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out),
                      out_specs=(tok, {"dropped": P(), "expert_tokens": P()}), check_vma=check_vma)
    y, stats = f(x, experts, weights, w_gate, w_up, w_down)
    return y[:T], stats


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _psum_unchecked(y: jax.Array, n: int) -> jax.Array:
    """psum over 'tensor' of the F-slice partial outputs when varying-axis checks are off (Pallas
    kernels). Unchecked, shard_map hands an output replicated over 'tensor' the cotangent / n and
    sums the cotangents of inputs replicated over it; the backward undoes the 1/n, so every rank's
    F slice sees the full cotangent and x / routing-weight gradients sum over the slices."""
    return jax.lax.psum(y, TENSOR)


def _psum_unchecked_fwd(y, n):
    return jax.lax.psum(y, TENSOR), None


def _psum_unchecked_bwd(n, _, g):
    return (g * n,)


_psum_unchecked.defvjp(_psum_unchecked_fwd, _psum_unchecked_bwd)
