"""TPU grouped matmul behind the ``kernels.gmm`` API: megablox (in jax) or tokamax (if importable).

``gmm(lhs [M,K], rhs [G,K,N], group_sizes [G], *, preferred_element_type=None) -> [M,N]``, rows
sorted by group, rows past sum(group_sizes) zero, differentiable in lhs and rhs (both libraries
ship their own custom_vjp: forward gmm, dlhs = gmm with rhs transposed, drhs = tgmm).

What the wrapper adds to megablox:
  * shapes: megablox needs M % tm == 0 and K, N divisible by its tiles; rows are zero-padded to
    a multiple of tm (the padding is outside every group) and K/N to a multiple of 128 when no
    tile divides them; the result is sliced back;
  * tail rows: megablox never visits tiles past the last group, so their output (and the
    matching dlhs rows) are left uninitialised; masking lhs and the output with ``where`` makes
    both exact zeros (``where`` also stops NaN garbage, which a multiply would not).
Tiles (tm, tk, tn) come from ``tiling`` or a heuristic (512-wide where the dims allow): not yet
measured on a TPU. On CPU only ``interpret=True`` runs (tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.kernels.gmm import have_tokamax

IMPLS = ("auto", "tokamax", "megablox")


def _tile(dim: int, prefs=(512, 256, 128)) -> tuple[int, int]:
    """(tile, padded dim): the largest preferred tile dividing ``dim``, else pad to 128s."""
    for t in prefs:
        if dim % t == 0:
            return t, dim
    padded = -(-dim // 128) * 128
    return max(t for t in prefs if padded % t == 0), padded


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, preferred_element_type=None,
        impl: str = "auto", tiling: tuple[int, int, int] | None = None,
        interpret: bool = False) -> jax.Array:
    """Grouped matmul on TPU: out[m] = lhs[m] @ rhs[g(m)]; see the module docstring.

    ``impl``: 'tokamax' (its ragged_dot), 'megablox' (jax.experimental.pallas.ops.tpu.megablox),
    or 'auto' (tokamax when importable). ``tiling`` = megablox (tm, tk, tn); ``interpret`` runs
    megablox in Pallas interpret mode (CPU tests)."""
    if impl not in IMPLS:
        raise ValueError(f"gmm_tpu impl={impl!r} is unknown; choose one of {IMPLS}")
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    gs = jnp.asarray(group_sizes).astype(jnp.int32)
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype))
    if impl == "tokamax" or (impl == "auto" and not interpret and have_tokamax()):
        import tokamax
        return tokamax.ragged_dot(lhs, rhs, gs, preferred_element_type=out_dtype)
    return _megablox(lhs, rhs, gs, out_dtype, tiling, interpret)


def _megablox(lhs, rhs, gs, out_dtype, tiling, interpret):
    from jax.experimental.pallas.ops.tpu.megablox import ops  # custom_vjp'd gmm

    (m, k), n = lhs.shape, rhs.shape[2]
    if tiling is None:
        tm = 512 if m >= 4096 else 128
        (tk, kp), (tn, np_) = _tile(k), _tile(n)
    else:
        tm, tk, tn = tiling
        kp, np_ = -(-k // tk) * tk, -(-n // tn) * tn
    mp = -(-m // tm) * tm
    rows = jnp.arange(mp, dtype=jnp.int32)[:, None]  # [Mp,1]
    keep = rows < jnp.sum(gs)  # rows of some group
    x = jnp.pad(lhs, ((0, mp - m), (0, kp - k)))
    x = jnp.where(keep, x, jnp.zeros_like(x))  # tail rows: zero in, zero gradient out
    w = jnp.pad(rhs, ((0, 0), (0, kp - k), (0, np_ - n)))
    # megablox's custom_vjp has non-differentiable arguments: pass everything positionally.
    out = ops.gmm(x, w, gs, out_dtype, (tm, tk, tn), None, None, False, interpret)
    return jnp.where(keep, out, jnp.zeros_like(out))[:m, :n]
