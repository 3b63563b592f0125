"""SwiGLU experts on the block-padded layout as a loop over the *live* row blocks (the CPU form of
the MoE layer's 'blocked' experts; ``kernels.resolve_blocked_ffn`` picks it).

The batched form (``moe_dispatch.expert_ffn_blocks``) multiplies all NB = rows/b + E blocks, the
static worst case, against per-block copies of the weights ``w[block_expert]`` [NB,D,F], and its
backward scatter-adds NB per-block weight gradients. Here ``fori_loop``s run only over the blocks in
use (U = sum_e ceil(gs_e / b), known at run time); each iteration takes its expert's weights by a
dynamic slice of w [E,...] (2-D dots, gate and up fused into one [D,2F]) and writes its rows into
a static buffer in place. The custom VJP loops the same way and adds each iteration's weight
gradient into an [E,...] loop carry in place. Blocks n >= U are never computed: their outputs and
input gradients are zero.

Grouped blocks (``group`` g > 1): the layout's blocks are small (b = 64 for 8192 rows over 8
experts, so an expert's rows are padded by < 64, not < 256) and g consecutive blocks of one expert
run as one [g*b]-row dot; an expert's last nb_e mod g blocks run one at a time. This keeps the
dots as large as the b*g-row layout's with the padding of the b-row one (``loop_blocking``).
Measured (T=4096 tokens, top-2, E=8, D=F=256, the whole layer with its dispatch, fwd+bwd, medians
of 11-15, interleaved, 2026-12-02 on an AVX2 host): two threads 247 -> 227 ms and 223 -> 208 ms
(two runs), one core 423 -> 381 ms (256-row blocks vs 64-row blocks in groups of 4; 32 x 8 the
same, 128 x 2 in between).
Earlier, on one core: loop vs batched 250-272 -> 196-217 ms, forward alone 109 -> 56 ms, decode
sizes (128 / 1024 rows) 5.6 -> 2.2 / 30 -> 8.7 ms; the ``benchmarks/step.py`` MoE step on one
core went 1.65 -> 1.39 CPU s/step.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def _block(a: jax.Array, n: jax.Array) -> jax.Array:
    """a[n] for a traced index n (a dynamic slice, no gather)."""
    return lax.dynamic_index_in_dim(a, n, 0, keepdims=False)


def _put(buf: jax.Array, n: jax.Array, value: jax.Array) -> jax.Array:
    """buf with buf[n] = value (in place on a loop carry)."""
    return lax.dynamic_update_index_in_dim(buf, value.astype(buf.dtype), n, 0)


def _accumulate(buf: jax.Array, e: jax.Array, value: jax.Array) -> jax.Array:
    """buf with buf[e] += value (in place on a loop carry)."""
    return _put(buf, e, _block(buf, e) + value)


def _zeros_varying(shape, dtype, *like: jax.Array) -> jax.Array:
    """Zeros that vary over the mesh axes any of ``like`` varies over (a loop carry inside
    ``shard_map`` with the vma check must keep one type across iterations)."""
    axes = set()
    for a in like:
        axes |= jax.typeof(a).manual_axis_type.varying
    z = jnp.zeros(shape, dtype)
    return lax.pcast(z, tuple(sorted(axes)), to="varying") if axes else z


def _sum_to_type(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """Psum a cotangent over the mesh axes it varies over and its primal does not (the transpose
    of the implicit broadcast autodiff would insert: e.g. dW summed over the batch shards, dx
    over a 'tensor' split of the experts' hidden dim)."""
    extra = jax.typeof(ct).manual_axis_type.varying - jax.typeof(primal).manual_axis_type.varying
    return lax.psum(ct, tuple(sorted(extra))) if extra else ct


def _swiglu_grads(a: jax.Array, dh: jax.Array, F: int) -> jax.Array:
    """d/d[g,u] of h = silu(g) * u, with a = [g,u] [b,2F] and dh [b,F] -> [b,2F] f32."""
    g, u = a[:, :F], a[:, F:]
    sg = jax.nn.sigmoid(g)
    return jnp.concatenate([dh * u * (sg * (1 + g * (1 - sg))), dh * g * sg], axis=-1)


LOOP_GROUP = 4  # blocks of one expert per dot in the CPU loop (64 x 4 at the benchmark's size)
MIN_LOOP_BLOCK = 32  # grouping never makes blocks below 32 rows; dots of <= 32 rows stay single


def loop_blocking(rows: int, groups: int) -> tuple[int, int]:
    """(layout block b, blocks per dot g) for the loop over ``rows`` rows in ``groups`` experts:
    dots of d = ``gmm.default_block`` rows, b = max(d // LOOP_GROUP, min(d, MIN_LOOP_BLOCK)),
    g = d // b (256 -> 64 x 4, 64 -> 32 x 2, 32 -> 32 x 1)."""
    from moejax.kernels.gmm import default_block

    big = default_block(rows, groups)
    block = max(big // LOOP_GROUP, min(big, MIN_LOOP_BLOCK))
    return block, big // block


class Items(NamedTuple):
    """The loop's iterations: ``big[i]`` (i < n_big) is the first of g consecutive blocks of one
    expert, ``small[j]`` (j < n_small) a single block (an expert's last nb_e mod g blocks)."""

    big: jax.Array  # [NB // g] int32 first block of each g-block item
    n_big: jax.Array  # [] int32
    small: jax.Array  # [min(NB, E*(g-1))] int32 block of each single-block item
    n_small: jax.Array  # [] int32


def loop_items(block_expert: jax.Array, used: jax.Array, num_experts: int, group: int) -> Items:
    """Items for live blocks sorted by expert (blocks n < used; the layout's order). Integer work:
    per expert nb_e live blocks from first block s_e; q_e = nb_e // g items of g blocks, then
    nb_e mod g single blocks."""
    NB, E, g = block_expert.shape[0], num_experts, group
    live = (jnp.arange(NB) < used).astype(jnp.int32)
    nb = jnp.zeros((E,), jnp.int32).at[block_expert].add(live, mode="drop")  # [E]
    first = jnp.cumsum(nb) - nb
    q, r = nb // g, nb % g

    def expand(per_expert, size):  # item k -> (expert, rank among that expert's items)
        k = jnp.arange(size, dtype=jnp.int32)
        ends = jnp.cumsum(per_expert)
        e = jnp.minimum(jnp.searchsorted(ends, k, side="right"), E - 1).astype(jnp.int32)
        return e, k - (ends - per_expert)[e], ends[-1].astype(jnp.int32)

    e, rank, n_big = expand(q, NB // g)
    big = (first[e] + g * rank).astype(jnp.int32)
    e, rank, n_small = expand(r, min(NB, E * (g - 1)))
    small = (first[e] + g * q[e] + rank).astype(jnp.int32)
    return Items(big, n_big, small, n_small)


def _rows(a: jax.Array, start: jax.Array, size: int) -> jax.Array:
    """a[start:start+size] for a traced start (a dynamic slice)."""
    return lax.dynamic_slice_in_dim(a, start, size, 0)


def _put_rows(a: jax.Array, start: jax.Array, value: jax.Array) -> jax.Array:
    """a with a[start:start+len(value)] = value (in place on a loop carry)."""
    return lax.dynamic_update_slice_in_dim(a, value.astype(a.dtype), start, 0)


def _each_item(block: int, group: int, items: Items, body, carry):
    """``body(first row, rows, expert-block n, carry)`` over the g-block items, then the single
    blocks (a static no-op when g == 1)."""
    carry = lax.fori_loop(0, items.n_big, lambda i, c: body(items.big[i] * block, group * block,
                                                             items.big[i], c), carry)
    if group > 1:
        carry = lax.fori_loop(0, items.n_small, lambda j, c: body(items.small[j] * block, block,
                                                                   items.small[j], c), carry)
    return carry


def _forward(xf, block_expert, items, w_gu, w_down, block, group):
    """y [R,D] f32 and the pre-activations [g,u] [R,2F] f32 of the live rows (R = NB*b)."""
    R, D = xf.shape
    F = w_down.shape[1]

    def body(r0, size, n, carry):
        y, gu = carry
        e = block_expert[n]
        a = jnp.dot(_rows(xf, r0, size), _block(w_gu, e), preferred_element_type=F32)  # [s,2F]
        h = (jax.nn.silu(a[:, :F]) * a[:, F:]).astype(xf.dtype)  # [s,F]
        y = _put_rows(y, r0, jnp.dot(h, _block(w_down, e), preferred_element_type=F32))
        return y, _put_rows(gu, r0, a)

    like = (xf, w_gu, w_down, block_expert, *items)
    init = (_zeros_varying((R, D), F32, *like), _zeros_varying((R, 2 * F), F32, *like))
    return _each_item(block, group, items, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _swiglu_loop(xf, block_expert, items, w_gu, w_down, block, group):
    """xf [R,D] (dtype), block_expert [NB], items (``loop_items``), w_gu [E,D,2F], w_down [E,F,D]
    -> y [R,D] f32."""
    return _forward(xf, block_expert, items, w_gu, w_down, block, group)[0]


def _swiglu_loop_fwd(xf, block_expert, items, w_gu, w_down, block, group):
    y, gu = _forward(xf, block_expert, items, w_gu, w_down, block, group)
    return y, (xf, block_expert, items, w_gu, w_down, gu)


def _swiglu_loop_bwd(block, group, res, dy):
    """Per item: dW_down[e] += h^T dy, d[g,u] from dh = dy W_down^T, dW_gu[e] += x^T d[g,u],
    dx = d[g,u] W_gu^T; weight gradients accumulate in [E,...] carries, never per item."""
    xf, block_expert, items, w_gu, w_down, gu = res
    F = w_down.shape[1]
    dt = xf.dtype

    def body(r0, size, n, carry):
        dx, dw_gu, dw_down = carry
        e = block_expert[n]
        x, a, d = _rows(xf, r0, size), _rows(gu, r0, size), _rows(dy, r0, size)  # f32 a, d
        h = (jax.nn.silu(a[:, :F]) * a[:, F:]).astype(dt)
        dw_down = _accumulate(dw_down, e, jnp.dot(h.T, d, preferred_element_type=F32))
        dh = jnp.dot(d, _block(w_down, e).T, preferred_element_type=F32)  # [s,F]
        da = _swiglu_grads(a, dh, F)  # [s,2F] f32 (mixed dots below, as autodiff's transposes)
        dw_gu = _accumulate(dw_gu, e, jnp.dot(x.T, da, preferred_element_type=F32))
        dx = _put_rows(dx, r0, jnp.dot(da, _block(w_gu, e).T, preferred_element_type=F32))
        return dx, dw_gu, dw_down

    like = (xf, dy, gu, w_gu, w_down, block_expert, *items)
    init = (_zeros_varying(xf.shape, dt, *like), _zeros_varying(w_gu.shape, F32, *like),
            _zeros_varying(w_down.shape, F32, *like))
    dx, dw_gu, dw_down = _each_item(block, group, items, body, init)
    return (_sum_to_type(dx, xf), None, None, _sum_to_type(dw_gu.astype(w_gu.dtype), w_gu),
            _sum_to_type(dw_down.astype(w_down.dtype), w_down))


_swiglu_loop.defvjp(_swiglu_loop_fwd, _swiglu_loop_bwd)


def swiglu_blocks(xp: jax.Array, block_expert: jax.Array, used: jax.Array, w_gate, w_up, w_down,
                  *, dtype, group: int = 1) -> jax.Array:
    """SwiGLU experts on the block layout, looping over its ``used`` live blocks: block n < used
    goes through expert block_expert[n], blocks past it give zeros; ``group`` consecutive blocks
    of one expert share one dot (``loop_blocking`` picks it with the layout's block; for
    group > 1 the live blocks must be sorted by expert and contiguous, as ``block_layout``'s are).
    xp [NB,b,D], block_expert [NB] int32, used [] int32, w_gate/w_up [E,D,F], w_down [E,F,D]
    -> [NB,b,D] f32."""
    NB, b, D = xp.shape
    if group < 1:
        raise ValueError(f"group={group} must be >= 1")
    block_expert = block_expert.astype(jnp.int32)
    items = loop_items(block_expert, jnp.asarray(used, jnp.int32), w_gate.shape[0], group)
    w_gu = jnp.concatenate([w_gate, w_up], axis=-1).astype(dtype)  # [E,D,2F]: one dot for both
    y = _swiglu_loop(xp.astype(dtype).reshape(NB * b, D), block_expert, items, w_gu,
                     w_down.astype(dtype), b, group)
    return y.reshape(NB, b, D)
