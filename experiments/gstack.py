"""Depthwise model growth at matched FLOPs: scratch vs G_stack vs G_zero vs G_random
("Stacking Your Transformers", Du et al., NeurIPS 2024; shared/methods/architecture.md section 5).

Question: does training a small model (depth L/g, g=4) first and growing it to the target depth
reach the scratch model's loss with fewer total FLOPs? Arms (same target model, data, seed):

    scratch   the target trained from scratch for ``train.steps`` steps
    gstack    G_stack: a depth-L/4 model for ``growth.source_steps`` steps, stacked [0..L/4-1] x 4
    gzero     G_zero depth: the same source, new layers (after each old one) with zero output
              projections (function preserving at growth)
    grandom   G_random depth: the same source, new layers randomly initialised

Every growth arm continues with a fresh AdamW and a new LR schedule (warmup + cosine) for as many
steps as keep its total FLOPs (source FLOPs counted) equal to scratch's; the three growth arms share
one source run (``workdir/_source-<hash>``). FLOPs are training FLOPs (6 x active params +
attention, ``ModelConfig.flops_per_token``) x tokens.

Expected (the paper's direction): gstack starts above scratch's initial loss, drops fast and
crosses below scratch's curve at matched FLOPs before the end; gzero/grandom gain less. The report
plots validation loss vs FLOPs and gives the FLOPs-to-reach-scratch-final-loss speedup
(1 - FLOPs_arm / FLOPs_scratch; the paper's 7B figure is 54.6%).

Command:
    python -m experiments.gstack --preset cpu --workdir runs/gstack

Presets and runtime (2 shared CPU cores): cpu-smoke (CI; ~1.5 min for all arms), cpu (target
8 layers d=128, 160 scratch-equivalent steps of 16 x 128 tokens, source 40 steps of the 2-layer
model; measured 8:10 wall for all four arms incl. the corpus build, quiet machine, 2026-11-23),
gpu (24 layers d=1024 grown from 6, one H100; not run), tpu-v5p-64 (1.5B target, 24 layers
d=2048 grown from 6, FSDP over 32 chips; compiles and fits per ``python -m moejax.aot``).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from moejax import experiment, grow_run
from moejax.analysis.plots import plt
from moejax.config import (AttentionConfig, Config, DataConfig, GrowthConfig, MeshConfig,
                           ModelConfig, TrainConfig)
from moejax.metrics import read_metrics
from moejax.paths import as_path


def _model(d, layers, heads, kv, hd, seq, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=kw.pop("vocab_size", 320), d_model=d, num_layers=layers,
                       d_ff=4 * d, max_seq_len=seq, dtype=kw.pop("dtype", "float32"),
                       attention=AttentionConfig(num_heads=heads, num_kv_heads=kv, head_dim=hd),
                       **kw)


PRESETS: dict[str, Config] = {
    "cpu-smoke": Config(
        model=_model(64, 4, 4, 2, 16, 64),
        data=DataConfig(seq_len=64, corpus_bytes_per_domain=300_000),
        train=TrainConfig(steps=4, batch_size=8, warmup_steps=1, log_every=1, eval_every=2,
                          eval_batches=1, ckpt_every=2, async_ckpt=False),
        growth=GrowthConfig(factor=4, source_steps=2)),
    "cpu": Config(
        model=_model(128, 8, 4, 2, 32, 128),
        data=DataConfig(seq_len=128, corpus_bytes_per_domain=2_000_000),
        train=TrainConfig(steps=160, batch_size=16, lr=3e-3, warmup_steps=16, log_every=10,
                          eval_every=20, eval_batches=2, ckpt_every=80),
        growth=GrowthConfig(factor=4, source_steps=40)),
    "gpu": Config(
        model=_model(1024, 24, 16, 4, 64, 1024, vocab_size=8192, dtype="bfloat16", remat="dots"),
        data=DataConfig(seq_len=1024, tokenizer="bpe", bpe_vocab_size=8192,
                        corpus_bytes_per_domain=12_000_000, prefetch_threads=4),
        train=TrainConfig(steps=6000, batch_size=64, lr=3e-4, min_lr_ratio=0.1,
                          warmup_steps=200, log_every=20, eval_every=250, eval_batches=8,
                          ckpt_every=1000),
        growth=GrowthConfig(factor=4, source_steps=1200)),
    "tpu-v5p-64": Config(
        model=_model(2048, 24, 16, 8, 128, 2048, vocab_size=8192, dtype="bfloat16",
                     scan_layers=True, remat="full"),
        mesh=MeshConfig(data=1, fsdp=-1),
        data=DataConfig(seq_len=2048, tokenizer="bpe", bpe_vocab_size=8192,
                        corpus_bytes_per_domain=12_000_000, prefetch_threads=8),
        train=TrainConfig(steps=20000, batch_size=256, lr=6e-4, min_lr_ratio=0.1,
                          warmup_steps=1000, log_every=50, eval_every=500, eval_batches=8,
                          ckpt_every=1000),
        growth=GrowthConfig(factor=4, source_steps=4000)),
}

ARMS: dict[str, tuple[str, ...]] = {
    "scratch": ("growth.op=none",),
    "gstack": ("growth.op=stack",),
    "gzero": ("growth.op=zero_depth",),
    "grandom": ("growth.op=random_depth",),
}


def matched_steps(cfg: Config) -> int:
    """Grown-phase steps that make source + grown FLOPs equal scratch's ``train.steps``."""
    from moejax.growth import source_config
    src = source_config(cfg)
    f_dst = cfg.model.flops_per_token(cfg.data.seq_len)
    f_src = src.model.flops_per_token(src.data.seq_len)
    return max(1, round(cfg.train.steps - src.train.steps * f_src / f_dst))


def run_arm(cfg: Config, workdir: str) -> dict:
    if cfg.growth.op == "none":
        return grow_run.run(cfg, workdir)
    steps = matched_steps(cfg)
    grown = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, steps=steps, warmup_steps=min(cfg.train.warmup_steps, steps)))
    root = os.fspath(as_path(workdir).parent)  # local or gs://
    summary = grow_run.run(grown, workdir, source_workdir=grow_run.source_workdir_for(grown, root))
    if not summary.get("preempted"):
        summary["step"] = cfg.train.steps  # the scratch-equivalent budget is done
    return summary


def curve(workdir: str) -> tuple[np.ndarray, np.ndarray, float | None]:
    """(FLOPs, val loss) at every evaluation, and the FLOPs of the growth event (or None)."""
    recs = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    with open(os.path.join(workdir, "config.json")) as f:
        cfg = Config.from_dict(json.load(f))
    fpt = cfg.model.flops_per_token(cfg.data.seq_len)
    pts = [(r.get("flops", r.get("tokens", 0) * fpt), r["val/loss"]) for r in recs
           if "val/loss" in r]
    event = next((r["flops"] for r in recs if r.get("event") == "grow"), None)
    x, y = (np.array(v, np.float64) for v in zip(*pts))
    return x, y, event


def flops_to_reach(x: np.ndarray, y: np.ndarray, target: float) -> float | None:
    """First FLOPs at which the (linearly interpolated) loss curve reaches ``target``."""
    for i in range(1, len(x)):
        if y[i] <= target < y[i - 1] or (y[i] <= target and y[i - 1] <= target):
            if y[i - 1] <= target:
                return float(x[i - 1])
            t = (y[i - 1] - target) / (y[i - 1] - y[i])
            return float(x[i - 1] + t * (x[i] - x[i - 1]))
    return None


def report(workdirs: dict[str, str], out_dir: str) -> str:
    plots = os.path.join(out_dir, "plots")
    os.makedirs(plots, exist_ok=True)
    curves = {arm: curve(wd) for arm, wd in workdirs.items()}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for arm, (x, y, ev) in curves.items():
        ax.plot(x, y, marker=".", label=arm)
        if ev is not None:
            ax.axvline(ev, color="gray", ls=":", lw=0.8)
    ax.set_xlabel("training FLOPs (source model counted)")
    ax.set_ylabel("val loss")
    ax.set_title("depthwise growth at matched FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = os.path.join(plots, "val_loss_vs_flops.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    ref = curves.get("scratch")
    target = float(ref[1][-1]) if ref else None
    rows = ["| arm | final val loss | total FLOPs | FLOPs to reach scratch final loss | "
            "speedup (FLOPs saved) |", "|---|---|---|---|---|"]
    for arm, (x, y, _) in curves.items():
        reach = None if target is None else flops_to_reach(x, y, target)
        speed = "n/a" if reach is None or ref is None else f"{1 - reach / ref[0][-1]:.1%}"
        rows.append(f"| {arm} | {y[-1]:.4f} | {x[-1]:.3e} | "
                    f"{'not reached' if reach is None else f'{reach:.3e}'} | {speed} |")
    text = "\n".join([
        "# G_stack vs G_zero vs G_random vs scratch (matched FLOPs)", "",
        "Validation loss (all domains) at each evaluation against cumulative training FLOPs; "
        "dotted lines mark the growth event. Speedup = 1 - FLOPs to reach scratch's final loss / "
        "scratch's FLOPs.", "", *rows, "", f"![val loss vs FLOPs](plots/{os.path.basename(png)})",
        ""])
    return experiment.write_report(out_dir, text)


def main(argv=None):
    return experiment.main(description=__doc__, presets=PRESETS, arms=ARMS, run_arm=run_arm,
                           report=report, argv=argv)


if __name__ == "__main__":
    main()
