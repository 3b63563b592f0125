"""Attention-sink and residual-sink probes (spec sections 2.4, 3 and 10) and their plots.

The per-layer numbers come out of the model's own forward: ``model(tokens, ..., probes=True)``
puts them into ``aux`` (see ``moejax.model.Model.__call__``), so no second pass is needed:

  attn/first_token_share [L]   mean over heads and queries i >= 1 of A[i, first], where "first"
                               is the first token of the query's segment (packing-aware)
  resid/max_abs [L]            massive activation: max |h| of the residual stream after each block
  resid/channel_median_abs [L,D]  median over tokens of |h| per channel (residual sinks)
  resid/sample_abs [L,n,D]     |h| of the first n tokens of batch row 0 (heatmap)
  attn/map [L,n,n]             attention probabilities of batch row 0, head 0
  attn/gate_mean, attn/gate_frac_below_0.1, attn/gate_mean_first, attn/gate_mean_rest [L]

This module holds the plain definitions (numpy, for tests and offline analysis), the
residual-sink detector, the probe forward an experiment runs at evaluation time, and plots.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from moejax.analysis import plots as _plots  # noqa: F401  (selects the Agg backend)

import matplotlib.pyplot as plt  # noqa: E402

SCALAR_KEYS = ("attn/first_token_share", "resid/max_abs", "attn/gate_mean",
               "attn/gate_frac_below_0.1", "attn/gate_mean_first", "attn/gate_mean_rest")


# -- definitions ----------------------------------------------------------------------------------

def first_token_share(probs: np.ndarray, segment_ids: np.ndarray | None = None) -> float:
    """Spec 2.4: mean over heads h and queries i >= 1 of A[h, i, 0], per segment when packed.

    probs [H,T,T] (or [B,H,T,T]) attention probabilities of a causal self-attention over T tokens;
    segment_ids [T] (or [B,T]) with 0 = padding (default: one segment). For each non-padding query
    that is not its segment's first token, read the probability on that first token.
    """
    p = np.asarray(probs, np.float64)
    if p.ndim == 3:
        p = p[None]
    B, H, T, _ = p.shape
    seg = np.ones((B, T), np.int64) if segment_ids is None else np.asarray(segment_ids).reshape(B, T)
    total, count = 0.0, 0
    for b in range(B):
        for i in range(T):
            if seg[b, i] == 0:
                continue
            first = int(np.argmax(seg[b] == seg[b, i]))  # segments are contiguous
            if first == i:
                continue
            total += p[b, :, i, first].sum()
            count += H
    return total / max(count, 1)


def massive_activation(h: np.ndarray) -> float:
    """max |h| over tokens and channels of one layer's residual stream h [..., D]."""
    return float(np.max(np.abs(h)))


def channel_median_abs(h: np.ndarray) -> np.ndarray:
    """Median over tokens of |h| per channel: h [..., D] -> [D]."""
    h = np.asarray(h)
    return np.median(np.abs(h.reshape(-1, h.shape[-1])), axis=0)


def residual_sink_dims(channel_median: np.ndarray, factor: float = 10.0) -> np.ndarray:
    """Channels whose median-over-tokens |h| exceeds ``factor`` x the median over channels
    (spec section 3, 'residual sinks': fixed dims large on most tokens). Returns sorted indices."""
    m = np.asarray(channel_median, np.float64)
    ref = max(float(np.median(m)), 1e-12)
    return np.flatnonzero(m > factor * ref)


def norm_weights(model, dims: Sequence[int]) -> dict[str, np.ndarray]:
    """The block norms' effective γ on ``dims``: ``attn_norm`` / ``mlp_norm`` [L, len(dims)] and
    ``final_norm`` [len(dims)] (the 1+w form for zero-centred norms). Works for unrolled and
    scanned layer stacks. A residual sink is typically suppressed downstream by γ ≈ 0 there."""
    dims = np.asarray(dims, np.int64)
    zc = model.cfg.norm == "rms_zero_centered"

    def gamma(norm):
        g = np.asarray(jax.device_get(norm.scale[...]), np.float64)
        return (1.0 + g if zc else g)[..., dims]

    if model.cfg.scan_layers:
        attn, mlp = gamma(model.layers.attn_norm), gamma(model.layers.mlp_norm)
    else:
        attn = np.stack([gamma(b.attn_norm) for b in model.layers])
        mlp = np.stack([gamma(b.mlp_norm) for b in model.layers])
    return {"attn_norm": attn, "mlp_norm": mlp, "final_norm": gamma(model.final_norm)}


# -- the probe forward ----------------------------------------------------------------------------

def probe_forward(model, tokens, segment_ids=None, positions=None) -> dict[str, np.ndarray]:
    """One jitted forward with ``probes=True``; returns the probe part of aux as numpy arrays
    (MoE statistics are dropped). Use it on a fixed validation batch at evaluation time."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens, segment_ids, positions):
        _, aux = nnx.merge(graphdef, state)(tokens, segment_ids, positions, probes=True)
        return {k: v for k, v in aux.items() if k.startswith(("attn/", "resid/"))}

    return {k: np.asarray(v) for k, v in jax.device_get(run(state, tokens, segment_ids,
                                                            positions)).items()}


def summarize(probes: Mapping[str, np.ndarray], factor: float = 10.0) -> dict:
    """Per-layer lists and layer summaries (mean share, max activation, sink dims) for a report."""
    out: dict = {k: np.asarray(probes[k]).tolist() for k in SCALAR_KEYS if k in probes}
    if "attn/first_token_share" in probes:
        out["first_token_share_mean"] = float(np.mean(probes["attn/first_token_share"]))
    if "resid/max_abs" in probes:
        out["max_abs_max"] = float(np.max(probes["resid/max_abs"]))
    for k in SCALAR_KEYS[2:]:
        if k in probes:
            out[k.replace("attn/", "") + "_avg"] = float(np.mean(probes[k]))
    if "resid/channel_median_abs" in probes:
        med = np.asarray(probes["resid/channel_median_abs"])
        out["sink_dims"] = [residual_sink_dims(m, factor).tolist() for m in med]
    return out


# -- plots ----------------------------------------------------------------------------------------

def _save(fig, out_png: str) -> str:
    fig.tight_layout()
    os.makedirs(os.path.dirname(out_png) or ".", exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_layer_curves(per_arm: Mapping[str, Mapping[str, Sequence[float]]], keys: Sequence[str],
                      out_png: str, *, title: str = "") -> str:
    """One panel per probe key, one line per arm over layers; ``per_arm[arm][key]`` is [L]."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for arm, probes in per_arm.items():
            if key in probes:
                ax.plot(range(len(probes[key])), probes[key], marker=".", label=arm)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out_png)


def plot_attention_map(probs: np.ndarray, out_png: str, *, title: str = "") -> str:
    """One head's attention probabilities [n, n] (queries x keys)."""
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    im = ax.imshow(np.asarray(probs), cmap="viridis", vmin=0.0, aspect="auto")
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    fig.colorbar(im, ax=ax, fraction=0.05)
    ax.set_title(title, fontsize=9)
    return _save(fig, out_png)


def plot_resid_heatmap(abs_h: np.ndarray, out_png: str, *, title: str = "") -> str:
    """|h| of one layer's residual stream [tokens, channels]: residual sinks are vertical stripes,
    massive activations isolated bright cells."""
    a = np.asarray(abs_h)
    fig, ax = plt.subplots(figsize=(7.0, 3.4))
    im = ax.imshow(a, cmap="magma", aspect="auto", vmin=0.0)
    ax.set_xlabel("channel")
    ax.set_ylabel("token")
    fig.colorbar(im, ax=ax, fraction=0.03)
    ax.set_title(title, fontsize=9)
    return _save(fig, out_png)
