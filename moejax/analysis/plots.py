"""Matplotlib plots for run reports (headless: the Agg backend, PNG files)."""

from __future__ import annotations

import io
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from moejax.metrics import read_metrics  # noqa: E402
from moejax.paths import as_path  # noqa: E402


def _save_png(fig, out_png: str) -> str:
    """Save ``fig`` as a PNG at ``out_png`` (a local path or a gs:// URI) and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path = as_path(out_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return out_png


def plot_curves(runs: dict[str, str], keys: Sequence[str], out_png: str, *,
                x: str = "step", title: str = "", logy: bool = False) -> str:
    """One panel per metric key, one line per run; ``runs`` maps a label to a workdir."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, workdir in runs.items():
            recs = [r for r in read_metrics(as_path(workdir) / "metrics.jsonl") if key in r]
            if recs:
                ax.plot([r[x] for r in recs], [r[key] for r in recs], label=label, marker=".")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(x)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save_png(fig, out_png)


def plot_domain_heatmaps(freq, out_png: str, *, title: str = "",
                         domains: Sequence[str] = ()) -> str:
    """One heatmap per layer of ``freq [L, D, E]`` (domains x experts), shared colour scale."""
    import numpy as np

    freq = np.asarray(freq)
    L = freq.shape[0]
    fig, axes = plt.subplots(L, 1, figsize=(max(6, 0.35 * freq.shape[2]), 1.1 * L + 1.2),
                             squeeze=False)
    vmax = max(float(freq.max()), 1.0)
    for layer, ax in enumerate(axes[:, 0]):
        im = ax.imshow(freq[layer], aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_yticks(range(freq.shape[1]), list(domains) or range(freq.shape[1]), fontsize=7)
        ax.set_ylabel(f"layer {layer}", fontsize=7)
        ax.set_xticks([])
    axes[-1, 0].set_xticks(range(freq.shape[2]), range(freq.shape[2]), fontsize=6)
    axes[-1, 0].set_xlabel("expert")
    fig.colorbar(im, ax=axes[:, 0].tolist(), fraction=0.03)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save_png(fig, out_png)
