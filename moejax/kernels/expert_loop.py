"""SwiGLU experts on the block-padded layout as a loop over the *live* row blocks (the CPU form of
the MoE layer's 'blocked' experts; ``kernels.resolve_blocked_ffn`` picks it).

The batched form (``moe_dispatch.expert_ffn_blocks``) multiplies all NB = rows/b + E blocks, the
static worst case, against per-block copies of the weights ``w[block_expert]`` [NB,D,F], and its
backward scatter-adds NB per-block weight gradients. Here a ``fori_loop`` runs only over the
U = sum_e ceil(gs_e / b) blocks in use (known at run time); each iteration takes its expert's
weights by a dynamic slice of w [E,...] (2-D dots [b,D]x[D,2F], gate and up fused into one) and
writes its rows into a static [NB,b,.] buffer in place. The custom VJP loops the same way and
adds each block's weight gradient into an [E,...] loop carry in place. Blocks n >= U are never
computed: their outputs and input gradients are zero.
Measured on one core (T=4096 tokens, top-2, E=8, D=F=256, the whole layer with its dispatch, CPU
time, interleaved, medians of 9-15 under load 1-4): fwd+bwd batched 250-272 -> loop 196-217 ms
(-20%; block 128: another -4%, 64 and 192 the same as 256, 512 worse), forward alone 109 -> 56 ms,
and at decode sizes (128 / 1024 rows) 5.6 -> 2.2 / 30 -> 8.7 ms. Per row the loop runs at the
rate of one 2-D SwiGLU over all rows (the kernel on 9216 rows 192 ms vs 2-D 8192 rows 181 ms); the
``benchmarks/step.py`` MoE step on one core went 1.65 -> 1.39 CPU s/step.
"""

from __future__ import annotations

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


def _forward(xp, block_expert, used, w_gu, w_down):
    """y [NB,b,D] f32 and the pre-activations [g,u] [NB,b,2F] f32 of the first ``used`` blocks."""
    NB, b, D = xp.shape
    F = w_down.shape[1]

    def body(n, carry):
        y, gu = carry
        e = block_expert[n]
        a = jnp.dot(_block(xp, n), _block(w_gu, e), preferred_element_type=F32)  # [b,2F]
        h = (jax.nn.silu(a[:, :F]) * a[:, F:]).astype(xp.dtype)  # [b,F]
        y = _put(y, n, jnp.dot(h, _block(w_down, e), preferred_element_type=F32))
        return y, _put(gu, n, a)

    init = (_zeros_varying((NB, b, D), F32, xp, w_gu, w_down, block_expert, used),
            _zeros_varying((NB, b, 2 * F), F32, xp, w_gu, block_expert, used))
    return lax.fori_loop(0, used, body, init)


@jax.custom_vjp
def _swiglu_loop(xp, block_expert, used, w_gu, w_down):
    """xp [NB,b,D] (dtype), block_expert [NB], used [], w_gu [E,D,2F], w_down [E,F,D]
    -> y [NB,b,D] f32."""
    return _forward(xp, block_expert, used, w_gu, w_down)[0]


def _swiglu_loop_fwd(xp, block_expert, used, w_gu, w_down):
    y, gu = _forward(xp, block_expert, used, w_gu, w_down)
    return y, (xp, block_expert, used, w_gu, w_down, gu)


def _swiglu_loop_bwd(res, dy):
    """Per live block: dW_down[e] += h^T dy, d[g,u] from dh = dy W_down^T, dW_gu[e] += x^T d[g,u],
    dx = d[g,u] W_gu^T; weight gradients accumulate in [E,...] carries, never per block."""
    xp, block_expert, used, w_gu, w_down, gu = res
    F = w_down.shape[1]
    dt = xp.dtype

    def body(n, carry):
        dx, dw_gu, dw_down = carry
        e = block_expert[n]
        x, a, d = _block(xp, n), _block(gu, n), _block(dy, n)  # [b,D] [b,2F] [b,D] f32 cotangent
        h = (jax.nn.silu(a[:, :F]) * a[:, F:]).astype(dt)
        dw_down = _accumulate(dw_down, e, jnp.dot(h.T, d, preferred_element_type=F32))
        dh = jnp.dot(d, _block(w_down, e).T, preferred_element_type=F32)  # [b,F]
        da = _swiglu_grads(a, dh, F)  # [b,2F] f32 (mixed dots below, as autodiff's transposes)
        dw_gu = _accumulate(dw_gu, e, jnp.dot(x.T, da, preferred_element_type=F32))
        dx = _put(dx, n, jnp.dot(da, _block(w_gu, e).T, preferred_element_type=F32))
        return dx, dw_gu, dw_down

    like = (xp, dy, gu, w_gu, w_down, block_expert, used)
    init = (_zeros_varying(xp.shape, dt, *like), _zeros_varying(w_gu.shape, F32, *like),
            _zeros_varying(w_down.shape, F32, *like))
    dx, dw_gu, dw_down = lax.fori_loop(0, used, body, init)
    return (_sum_to_type(dx, xp), None, None, _sum_to_type(dw_gu.astype(w_gu.dtype), w_gu),
            _sum_to_type(dw_down.astype(w_down.dtype), w_down))


_swiglu_loop.defvjp(_swiglu_loop_fwd, _swiglu_loop_bwd)


def swiglu_blocks(xp: jax.Array, block_expert: jax.Array, used: jax.Array, w_gate, w_up, w_down,
                  *, dtype) -> jax.Array:
    """SwiGLU experts on the block layout, looping over its ``used`` live blocks: block n < used
    goes through expert block_expert[n], blocks past it give zeros.
    xp [NB,b,D], block_expert [NB] int32, used [] int32, w_gate/w_up [E,D,F], w_down [E,F,D]
    -> [NB,b,D] f32."""
    w_gu = jnp.concatenate([w_gate, w_up], axis=-1).astype(dtype)  # [E,D,2F]: one dot for both
    return _swiglu_loop(xp.astype(dtype), block_expert.astype(jnp.int32),
                        jnp.asarray(used, jnp.int32), w_gu, w_down.astype(dtype))
