"""RMSNorm in its Qwen3 (``x * w``, w=1) and Qwen3-Next zero-centred (``x * (1 + w)``, w=0) forms."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.layers import ones_init, param, zeros_init


def rms_norm(x: jax.Array, scale: jax.Array, *, eps: float, zero_centered: bool = False) -> jax.Array:
    """Normalise the last axis by its root mean square (statistics in fp32), then scale.

    x: [..., D] any float dtype; scale: [D]. Returns x's dtype.
    """
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    w = scale.astype(jnp.float32)
    w = 1.0 + w if zero_centered else w
    return (y * w).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned scale; ``names`` is the scale's logical axis."""

    def __init__(self, dim: int, *, eps: float = 1e-6, zero_centered: bool = False,
                 names: Sequence[str | None] = ("embed",), param_dtype="float32",
                 rngs: nnx.Rngs | None = None):
        del rngs  # deterministic init
        self.eps = eps
        self.zero_centered = zero_centered
        init = zeros_init if zero_centered else ones_init
        self.scale = param(init, None, (dim,), param_dtype, names)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], eps=self.eps, zero_centered=self.zero_centered)


def make_norm(cfg, dim: int, names: Sequence[str | None] = ("embed",)) -> RMSNorm:
    """The norm ``cfg.norm`` selects (``'rms'`` or ``'rms_zero_centered'``) for a ModelConfig."""
    return RMSNorm(dim, eps=cfg.norm_eps, zero_centered=cfg.norm == "rms_zero_centered",
                   names=names, param_dtype=cfg.param_dtype)
