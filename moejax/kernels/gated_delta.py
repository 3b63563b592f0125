"""The gated delta rule (Gated DeltaNet, Qwen3-Next; spec architecture.md section 9.2) in pure JAX.

Per head, with a state S [dk,dv] and per token q, k [dk], v [dv], decay g <= 0 and rate beta:

    S <- S * exp(g);   S <- S + k (beta (v - S^T k))^T;   o = S^T q / sqrt(dk)

Three forms with one signature ``(q, k, v, g, beta, *, initial_state, segment_ids) -> (o, state)``:
``chunked`` (WY/UT representation inside chunks of ``chunk`` tokens, a ``lax.scan`` over chunks;
training and prefill, O(T) memory and time), ``recurrent`` (a ``lax.scan`` over tokens; decoding)
and ``recurrent_step`` (one token). Shapes: q, k [B,T,H,dk], v [B,T,H,dv], g, beta [B,T,H],
segment_ids [B,T] int (0 = padding), state [B,H,dk,dv]. q and k are used as given (the layer
L2-normalises them); o has v's dtype, the state is fp32, and all arithmetic is fp32.

Packing and padding: a padding token (segment 0) leaves the state unchanged and outputs zeros. The
state is reset to zero at the first token of every segment except the row's first non-padding
token, which continues from ``initial_state`` (a decode step or a prefill continuing a row); a
segment's "previous token" is the last non-padding token before it, so right-, left- or inner
padding never breaks a document.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def segment_resets(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(reset, valid) [B,T] bool: ``valid`` marks non-padding tokens, ``reset`` the first token of
    a segment whose previous non-padding token in the row belongs to another segment."""
    valid = segment_ids != 0
    T = segment_ids.shape[1]
    idx = jnp.where(valid, jnp.arange(T)[None], -1)
    last = jax.lax.cummax(idx, axis=1)  # [B,T] index of the last valid token at or before t
    prev = jnp.pad(last[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    prev_seg = jnp.take_along_axis(segment_ids, jnp.maximum(prev, 0), axis=1)
    return valid & (prev >= 0) & (prev_seg != segment_ids), valid


def _prepare(q, k, v, g, beta, segment_ids):
    """fp32 inputs with padding tokens made inert (q, k, v, beta, g zero), and (reset, valid)
    [B,T]."""
    B, T = q.shape[:2]
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    reset, valid = segment_resets(segment_ids)
    m3, m4 = valid[..., None], valid[..., None, None]
    q = jnp.where(m4, q.astype(F32), 0.0)
    k = jnp.where(m4, k.astype(F32), 0.0)
    v = jnp.where(m4, v.astype(F32), 0.0)
    g = jnp.where(m3, g.astype(F32), 0.0)
    beta = jnp.where(m3, beta.astype(F32), 0.0)
    return q, k, v, g, beta, reset, valid


def _zero_state(q, v, initial_state):
    B, _, H, dk = q.shape
    if initial_state is None:
        return jnp.zeros((B, H, dk, v.shape[-1]), F32)
    return initial_state.astype(F32)


def recurrent_step(state, q, k, v, g, beta):
    """One token (decoding): state [B,H,dk,dv]; q, k [B,H,dk], v [B,H,dv], g, beta [B,H].
    Returns (o [B,H,dv], new state), both fp32."""
    q, k, v, g, beta = (x.astype(F32) for x in (q, k, v, g, beta))
    q = q * q.shape[-1] ** -0.5
    state = state.astype(F32) * jnp.exp(g)[..., None, None]
    kv_mem = jnp.einsum("bhkv,bhk->bhv", state, k)
    delta = beta[..., None] * (v - kv_mem)
    state = state + k[..., :, None] * delta[..., None, :]
    return jnp.einsum("bhkv,bhk->bhv", state, q), state


def recurrent(q, k, v, g, beta, *, initial_state=None, segment_ids=None):
    """The per-token form (decoding): a ``lax.scan`` of ``recurrent_step``. Returns (o [B,T,H,dv]
    in v's dtype, final state [B,H,dk,dv] fp32)."""
    out_dtype = v.dtype
    state = _zero_state(q, v, initial_state)
    q, k, v, g, beta, reset, valid = _prepare(q, k, v, g, beta, segment_ids)

    def body(s, xs):
        qt, kt, vt, gt, bt, rt = xs
        s = jnp.where(rt[:, None, None, None], 0.0, s)
        return recurrent_step(s, qt, kt, vt, gt, bt)[::-1]

    time_major = lambda x: jnp.moveaxis(x, 1, 0)  # noqa: E731
    state, o = jax.lax.scan(body, state, tuple(map(time_major, (q, k, v, g, beta, reset))))
    o = jnp.where(valid[..., None, None], jnp.moveaxis(o, 0, 1), 0.0)
    return o.astype(out_dtype), state


def _pad_time(x, pad):
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def _chunks(x, chunk):
    """[B,Tp,H,...] -> [N,B,H,C,...]: N chunks of C tokens, chunk-major for the scan."""
    B, T, H = x.shape[:3]
    x = x.reshape(B, T // chunk, chunk, H, *x.shape[3:])
    return jnp.moveaxis(jnp.moveaxis(x, 3, 2), 1, 0)


SOLVE_BLOCK = 16  # diagonal block of the chunk's triangular solve


def _series_powers(x: jax.Array) -> list[jax.Array]:
    """[x, x^2, x^4, ...] up to x^(2^(m-1)), m = ceil(log2 C): enough for a nilpotent [C,C] x."""
    powers = [x]
    for _ in range(max(0, (x.shape[-1] - 1).bit_length() - 1)):
        powers.append(powers[-1] @ powers[-1])
    return powers


def _apply_series(powers: list[jax.Array], r: jax.Array) -> jax.Array:
    """prod_j (I + powers[j]) r = sum_n x^n r (the factors commute)."""
    for p in powers:
        r = r + p @ r
    return r


def unit_lower_solve(a: jax.Array, r: jax.Array, block: int = SOLVE_BLOCK) -> jax.Array:
    """(I + A)^-1 r for strictly lower-triangular A [..., C, C], r [..., C, d], in matmuls only.

    A nilpotent A gives the finite series (I + A)^-1 = sum_{n<C} (-A)^n = prod_j (I + (-A)^(2^j)),
    j < ceil(log2 C). It runs on diagonal blocks of ``block`` rows, block forward substitution
    between them (C/block dependent steps): the series on the whole C x C is ~9x the flops at C=64,
    and XLA:CPU's batched triangular solve (C dependent row steps) made the chunked form ~24x
    slower."""
    C = a.shape[-1]
    if C <= block or C % block:
        return _apply_series(_series_powers(-a), r)
    nb = C // block
    diag = jnp.stack([a[..., i * block:(i + 1) * block, i * block:(i + 1) * block]
                      for i in range(nb)], axis=-3)  # [..., nb, b, b]
    powers = _series_powers(-diag)
    solved = []
    for i in range(nb):
        rows = slice(i * block, (i + 1) * block)
        ri = r[..., rows, :]
        if i:
            ri = ri - a[..., rows, :i * block] @ jnp.concatenate(solved, axis=-2)
        solved.append(_apply_series([p[..., i, :, :] for p in powers], ri))
    return jnp.concatenate(solved, axis=-2)


def _transposed(x):
    return jnp.swapaxes(x, -1, -2)


def chunk_step(s, xs):
    """One chunk of the chunked form. s [B,H,dk,dv] the state entering it; xs: q (scaled), k
    [B,H,C,dk], v [B,H,C,dv], beta, cum [B,H,C] (log decay from the chunk start, inclusive),
    doc [B,1,C] (document index in the row), doc_before [B,1,1] (the entering state's).
    Returns (the state leaving it, o [B,H,C,dv]).

    With S_i = G_i S + sum_{j<=i} (G_i/G_j) k_j u_j^T (G = exp(cum), u_j = the update token j
    writes), u = (I + A)^-1 (beta v - beta G K S), A[i,j] = beta_i k_i.k_j G_i/G_j for j < i: C
    sequential rank-1 updates become one unit-lower-triangular inverse (the UT transform) and
    matmuls. Pairs in different documents are masked, and so is the entering state for tokens
    after a reset."""
    q, k, v, beta, cum, doc, doc_before = xs
    C = q.shape[-2]
    causal = jnp.tril(jnp.ones((C, C), bool))
    same_doc = (doc[..., :, None] == doc[..., None, :]) & causal  # [B,1,C,C]
    decay = jnp.exp(jnp.where(same_doc, cum[..., :, None] - cum[..., None, :], -jnp.inf))
    sees_old = (doc == doc_before)[..., None]  # [B,1,C,1]: no reset since the chunk start
    doc_end = doc[..., -1:]
    k_beta = k * beta[..., None]
    a = jnp.where(jnp.tril(causal, -1), (k_beta @ _transposed(k)) * decay, 0.0)  # [B,H,C,C]
    old_keys = jnp.where(sees_old, k_beta * jnp.exp(cum)[..., None], 0.0)
    u = unit_lower_solve(a, v * beta[..., None] - old_keys @ s)  # [B,H,C,dv]
    q_old = jnp.where(sees_old, q * jnp.exp(cum)[..., None], 0.0)
    o = q_old @ s + ((q @ _transposed(k)) * decay) @ u  # carried state + in-chunk, diagonal incl.
    k_end = jnp.where((doc == doc_end)[..., None], k * jnp.exp(cum[..., -1:] - cum)[..., None], 0.0)
    keep = jnp.where(doc_end == doc_before, jnp.exp(cum[..., -1:]), 0.0)  # [B,H,1]
    return s * keep[..., None] + _transposed(k_end) @ u, o


def chunked(q, k, v, g, beta, *, chunk=64, initial_state=None, segment_ids=None):
    """The chunked form (training, prefill): a ``lax.scan`` of ``chunk_step`` over the T/C chunks,
    all C x C work inside the step so the working set stays one chunk's (on CPU, materialising
    every chunk's matrices first made time(32k)/time(2k) ~27x, not 16x). T is padded to a
    multiple of ``chunk``. Returns (o [B,T,H,dv] in v's dtype, final state [B,H,dk,dv] fp32)."""
    out_dtype = v.dtype
    B, T, H, _ = q.shape
    state = _zero_state(q, v, initial_state)
    q, k, v, g, beta, reset, valid = _prepare(q, k, v, g, beta, segment_ids)
    q = q * q.shape[-1] ** -0.5
    pad = (-T) % chunk
    q, k, v, g, beta, reset = (_pad_time(x, pad) for x in (q, k, v, g, beta, reset))
    N = (T + pad) // chunk
    doc = jnp.cumsum(reset.astype(jnp.int32), axis=1)  # [B,Tp]
    doc_before = (doc - reset).reshape(B, N, chunk)[..., :1]  # [B,N,1]
    chunk_major = lambda x: jnp.moveaxis(x.reshape(B, N, 1, -1), 1, 0)  # noqa: E731  [N,B,1,.]
    cum = jnp.cumsum(_chunks(g, chunk), axis=-1)  # [N,B,H,C]
    xs = (_chunks(q, chunk), _chunks(k, chunk), _chunks(v, chunk), _chunks(beta, chunk), cum,
          chunk_major(doc), chunk_major(doc_before))
    state, o = jax.lax.scan(chunk_step, state, xs)  # o [N,B,H,C,dv]
    o = jnp.moveaxis(jnp.moveaxis(o, 0, 1), 2, 3).reshape(B, N * chunk, H, -1)[:, :T]
    o = jnp.where(valid[..., None, None], o, 0.0)
    return o.astype(out_dtype), state


def gated_delta_rule(q, k, v, g, beta, *, impl="chunked", chunk=64, initial_state=None,
                     segment_ids=None):
    """The form ``impl`` names ('chunked' | 'recurrent'), same arguments and results."""
    kw = dict(initial_state=initial_state, segment_ids=segment_ids)
    if impl == "chunked":
        return chunked(q, k, v, g, beta, chunk=chunk, **kw)
    if impl == "recurrent":
        return recurrent(q, k, v, g, beta, **kw)
    raise ValueError(f"gated delta rule impl {impl!r} is unknown; choose 'chunked' or 'recurrent'")
