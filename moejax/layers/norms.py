"""RMSNorm in its Qwen3 (``x * w``, w=1) and Qwen3-Next zero-centred (``x * (1 + w)``, w=0) forms,
and the two variants that absorb residual sinks (spec section 3.3):

* PreAffine RMSNorm: ``γ ⊙ RMSNorm(λ ⊙ x)``, a learnable per-channel λ (init 1) before the norm;
* GatedNorm: ``y = RMSNorm(x)·γ; y' = y ⊙ σ(W_up SiLU(W_down y))``, rank r (16), no biases;
  ``double_gate`` uses ``2σ(·)`` so the gain starts at ≈1 instead of ≈0.5.

``make_block_norm(cfg, variant)`` builds the variant a ModelConfig selects for a block norm
(``norm_variant_attn`` / ``_ffn`` / ``_final``); ``γ`` keeps the ``cfg.norm`` form throughout.
"""

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


class PreAffineRMSNorm(nnx.Module):
    """``γ ⊙ RMSNorm(λ ⊙ x)``: ``pre_scale`` λ [D] (init 1) lets the model rescale channels before
    the normaliser instead of growing residual-stream outliers (the ``scale`` γ as in RMSNorm)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, zero_centered: bool = False,
                 names: Sequence[str | None] = ("embed",), param_dtype="float32"):
        self.eps, self.zero_centered = eps, zero_centered
        self.pre_scale = param(ones_init, None, (dim,), param_dtype, names)
        self.scale = param(zeros_init if zero_centered else ones_init, None, (dim,), param_dtype,
                           names)

    def __call__(self, x: jax.Array) -> jax.Array:
        xs = x.astype(jnp.float32) * self.pre_scale[...].astype(jnp.float32)
        return rms_norm(xs, self.scale[...], eps=self.eps,
                        zero_centered=self.zero_centered).astype(x.dtype)


class GatedNorm(nnx.Module):
    """``y = RMSNorm(x)·γ``, then ``y ⊙ σ(W_up SiLU(W_down y))``: a low-rank (``rank``) per-token,
    per-channel gated rescaling. ``down`` [D,r] and ``up`` [r,D] have no biases; the gate MLP runs
    in the compute ``dtype``, the sigmoid in fp32. ``double_gate``: ``2σ(·)``, gain ≈1 at init
    (W_up, W_down ~ N(0, init_std) make the logits ≈0)."""

    def __init__(self, dim: int, *, rank: int = 16, eps: float = 1e-6, zero_centered: bool = False,
                 init_std: float = 0.02, dtype="float32", param_dtype="float32",
                 names: Sequence[str | None] = ("embed",), double_gate: bool = False,
                 rngs: nnx.Rngs):
        self.eps, self.zero_centered, self.dtype = eps, zero_centered, jnp.dtype(dtype)
        self.gate_scale = 2.0 if double_gate else 1.0
        self.scale = param(zeros_init if zero_centered else ones_init, None, (dim,), param_dtype,
                           names)
        init = jax.nn.initializers.truncated_normal(init_std)
        self.down = param(init, rngs.params(), (dim, rank), param_dtype, (*names, None))
        self.up = param(init, rngs.params(), (rank, dim), param_dtype, (None, *names))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = rms_norm(x, self.scale[...], eps=self.eps, zero_centered=self.zero_centered)
        dt = self.dtype
        h = jax.nn.silu(jnp.einsum("...d,dr->...r", y.astype(dt), self.down[...].astype(dt)))
        g = jnp.einsum("...r,rd->...d", h, self.up[...].astype(dt))
        gain = self.gate_scale * jax.nn.sigmoid(g.astype(jnp.float32))
        return (y.astype(jnp.float32) * gain).astype(x.dtype)


def make_block_norm(cfg, variant: str, *, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """The d_model norm of ``variant`` ('rms' | 'preaffine' | 'gated') for a ModelConfig; 'gated'
    needs ``rngs`` (its low-rank gate is random-initialised)."""
    zc = cfg.norm == "rms_zero_centered"
    if variant == "rms":
        return make_norm(cfg, cfg.d_model)
    if variant == "preaffine":
        return PreAffineRMSNorm(cfg.d_model, eps=cfg.norm_eps, zero_centered=zc,
                                param_dtype=cfg.param_dtype)
    if variant == "gated":
        return GatedNorm(cfg.d_model, rank=cfg.gated_norm_rank, eps=cfg.norm_eps, zero_centered=zc,
                         init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         double_gate=cfg.gated_norm_double_gate, rngs=rngs)
    raise ValueError(f"norm variant {variant!r} is unknown; choose 'rms', 'preaffine' or 'gated'")
