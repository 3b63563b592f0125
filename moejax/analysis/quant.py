"""W4A4 fake quantisation, the outlier paper's headline metric (spec section 3.4): the PPL increase
of a trained model when every dense projection of its decoder blocks sees INT4 inputs and weights.

* activations: per token (one scale per row of the projection's [tokens, K] input);
* weights: per group of ``group_size`` (128) consecutive input channels, per output column
  (a last group shorter than 128 when K is not a multiple);
* round to nearest (half to even), clip to the integer range, dequantise (``fake_quant``).
  Symmetric: ``s = max|x| / (2^(b-1) - 1)``, ``q = clip(round(x/s), -2^(b-1), 2^(b-1) - 1)``.
  Asymmetric (GPTQ's range, zero always representable): ``lo = min(x, 0)``, ``hi = max(x, 0)``,
  ``s = (hi - lo) / (2^b - 1)``, ``z = round(-lo / s)``, ``q = clip(round(x/s) + z, 0, 2^b - 1)``,
  ``x̂ = (q - z) s``. An all-zero row or group (s = 0) stays zero.

Which projections: ``fake_quant_linears`` swaps the ``linear`` of ``moejax.layers.attention``,
``moejax.layers.mlp`` and ``moejax.layers.deltanet`` (q, k, v, o and the attention gate's W_θ; the
MLP's gate, up, down; Gated DeltaNet's in_proj_qkvz, in_proj_ba and out_proj) for the quantised
one while the block is open, so only functions *traced* inside it are affected (a new jit each
time); the model code is unchanged. The token embedding, the LM head, norms (GatedNorm's low-rank
gate included), the softmax and the attention score/value products, DeltaNet's depthwise conv,
decay and delta-rule state stay in full precision, as in the W4A4 literature. MoE expert FFNs
(``gmm``) have no hook: ``evaluate_w4a4`` refuses MoE models rather than report a partly quantised
one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config_checks import _fail


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Bits and scheme of the fake quantiser: W4A4 with per-token activations and g128 weights,
    both symmetric, by default."""

    act_bits: int = 4
    weight_bits: int = 4
    group_size: int = 128  # weight input channels per scale
    act_symmetric: bool = True
    weight_symmetric: bool = True

    def __post_init__(self):
        for name in ("act_bits", "weight_bits"):
            if not 2 <= getattr(self, name) <= 16:
                _fail(f"quant.{name}", getattr(self, name), "must lie in [2, 16]")
        if self.group_size < 1:
            _fail("quant.group_size", self.group_size, "must be >= 1 (input channels per scale)")

    @property
    def label(self) -> str:
        """E.g. 'W4A4 (g128, sym/sym)'."""
        sym = lambda s: "sym" if s else "asym"  # noqa: E731
        return (f"W{self.weight_bits}A{self.act_bits} (g{self.group_size}, "
                f"w {sym(self.weight_symmetric)} / a {sym(self.act_symmetric)})")


# -- the quantisers -------------------------------------------------------------------------------

def fake_quant(x: jax.Array, bits: int, *, symmetric: bool, axis: int = -1) -> jax.Array:
    """Quantise-dequantise ``x`` with one scale (and zero point) per slice along ``axis``: the
    reduction axis of the range. Computed in fp32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    if symmetric:
        qmax = 2.0 ** (bits - 1) - 1
        scale = jnp.max(jnp.abs(xf), axis=axis, keepdims=True) / qmax
        safe = jnp.where(scale > 0, scale, 1.0)  # all-zero slice: q = 0, x̂ = 0
        q = jnp.clip(jnp.round(xf / safe), -qmax - 1, qmax)
        return (q * scale).astype(x.dtype)
    levels = 2.0 ** bits - 1
    lo = jnp.minimum(jnp.min(xf, axis=axis, keepdims=True), 0.0)
    hi = jnp.maximum(jnp.max(xf, axis=axis, keepdims=True), 0.0)
    scale = (hi - lo) / levels
    safe = jnp.where(scale > 0, scale, 1.0)
    zero = jnp.round(-lo / safe)
    q = jnp.clip(jnp.round(xf / safe) + zero, 0.0, levels)
    return ((q - zero) * scale).astype(x.dtype)


def quantize_tokens(x: jax.Array, n_in: int, spec: QuantSpec) -> jax.Array:
    """Per-token activations: x [..., *K] (the last ``n_in`` axes contracted) gets one scale per
    leading index over all K channels."""
    lead = x.shape[:x.ndim - n_in]
    flat = x.reshape(*lead, math.prod(x.shape[x.ndim - n_in:]))
    return fake_quant(flat, spec.act_bits, symmetric=spec.act_symmetric).reshape(x.shape)


def quantize_weight_groups(w: jax.Array, n_in: int, spec: QuantSpec) -> jax.Array:
    """Group-wise weights: w [*K, *N] viewed as [K, N]; each column's K inputs split into groups of
    ``group_size`` (the last one shorter when it does not divide K), one scale per (group, column).
    Zero padding up to a whole group leaves every group's range unchanged."""
    K, N = math.prod(w.shape[:n_in]), math.prod(w.shape[n_in:])
    g = spec.group_size
    groups = -(-K // g)
    flat = jnp.pad(w.reshape(K, N), ((0, groups * g - K), (0, 0)))
    q = fake_quant(flat.reshape(groups, g, N), spec.weight_bits, symmetric=spec.weight_symmetric,
                   axis=1)
    return q.reshape(groups * g, N)[:K].reshape(w.shape)


# -- the hook -------------------------------------------------------------------------------------

@dataclasses.dataclass
class QuantTrace:
    """The projections quantised while tracing: one (K, N) per ``linear`` call traced."""

    shapes: list[tuple[int, int]] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def fake_quant_linears(spec: QuantSpec) -> Iterator[QuantTrace]:
    """While open, the decoder blocks' dense projections (attention, DeltaNet, MLP ``linear`` calls)
    quantise their input per token and their weight per group; only functions traced inside the
    block see it. Yields the record of what was quantised (to check that the hook took)."""
    from moejax.layers import attention, deltanet, mlp

    original = mlp.linear
    assert attention.linear is deltanet.linear is original, "the mixers and mlp share one linear"
    trace = QuantTrace()

    def quantised(x, w, *, n_in: int = 1, preferred_element_type=None):
        trace.shapes.append((math.prod(w.shape[:n_in]), math.prod(w.shape[n_in:])))
        return original(quantize_tokens(x, n_in, spec), quantize_weight_groups(w, n_in, spec),
                        n_in=n_in, preferred_element_type=preferred_element_type)

    attention.linear = mlp.linear = deltanet.linear = quantised
    try:
        yield trace
    finally:
        attention.linear = mlp.linear = deltanet.linear = original


# -- the evaluation -------------------------------------------------------------------------------

def evaluate_w4a4(trainer, state, spec: QuantSpec = QuantSpec()) -> dict:
    """Validation loss and PPL of ``state`` plain and fake-quantised, on the trainer's fixed
    validation set (``Trainer.evaluate``, token-weighted): ``val_loss``, ``ppl``,
    ``val_loss_quant``, ``ppl_quant``, ``delta_ppl`` (quantised minus plain), ``quant`` (the
    scheme) and ``quantised_linears`` (projections hooked per forward)."""
    from moejax import train as T

    if trainer.cfg.model.moe.enabled:
        raise ValueError("evaluate_w4a4 covers dense models only: MoE expert FFNs (gmm) are not "
                         "hooked, so the result would be a partly quantised model")
    plain = trainer.evaluate(state)["val/loss"]
    saved = trainer.eval_step
    with fake_quant_linears(spec) as trace:
        trainer.eval_step = T.make_eval_step(trainer.setup, len(trainer.domains))  # traced here
        try:
            quant = trainer.evaluate(state)["val/loss"]
        finally:
            trainer.eval_step = saved
    if not trace.shapes:
        raise RuntimeError("the fake-quant hook saw no projection: was the eval step traced "
                           "outside fake_quant_linears?")
    return {"val_loss": plain, "ppl": float(np.exp(plain)), "val_loss_quant": quant,
            "ppl_quant": float(np.exp(quant)), "delta_ppl": float(np.exp(quant) - np.exp(plain)),
            "quant": spec.label, "quantised_linears": len(trace.shapes)}
