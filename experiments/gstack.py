"""Depthwise model growth at matched FLOPs: scratch vs G_stack vs G_zero vs G_random vs G_learn
("Stacking Your Transformers", Du et al., NeurIPS 2024; shared/methods/architecture.md section 5).

Question: does training a small model (depth L/g, g=4) first and growing it to the target depth
reach the scratch model's loss with fewer total FLOPs? Arms (same target model, data, seed):

    scratch   the target trained from scratch for ``train.steps`` steps
    gstack    G_stack: a depth-L/4 model for ``growth.source_steps`` steps, stacked [0..L/4-1] x 4
    gzero     G_zero depth: the same source, each source layer followed by copies of itself whose
              output projections (attn o, FFN down) are zero (``new_layer_init=copy``; 'fresh'
              keeps the random-init variant): function preserving at growth
    grandom   G_random depth as prts's MSG: the source layers, then new randomly initialised
              layers on top whose residual branches are faded in by m(t) = min(1, t / T) over the
              first T = ``growth.fade_in_steps`` grown steps (function preserving at growth; the
              ramp's clock is the optimizer's step count, so it is checkpointed)
    glearn    G_learn, **depth only** (LiGO-style: each target layer a learned linear mix of the
              source layers, fitted for ``growth.learn_steps`` batches from the G_stack map; no
              width map). Its fitting batches are not counted as training FLOPs.

Every arm also runs on a second seed (``<arm>-s2``: ``train.seed=1``, its own source run; same
data stream); the report gives mean ± half-range over the seeds that ran.

Every growth arm continues with a fresh AdamW and a new LR schedule (warmup + cosine) for as many
steps as keep its total FLOPs (source FLOPs counted) equal to scratch's; the growth arms of one
seed share one source run (``workdir/_source-<hash>``). FLOPs are training FLOPs (6 x active
params + attention, ``ModelConfig.flops_per_token``) x tokens.

Expected (the paper's direction): gstack starts above scratch's initial loss, drops fast and
crosses below scratch's curve at matched FLOPs before the end; gzero/grandom gain less. The report
plots validation loss vs FLOPs and gives the FLOPs-to-reach-scratch-final-loss speedup
(1 - FLOPs_arm / FLOPs_scratch, each seed against scratch of the same seed; the paper's 7B
figure is 54.6%).

Smallest preset that can show the direction: ``cpu`` (target 8 layers d=128 grown from 2, source
40 of 160 scratch-equivalent steps). The effect needs a source trained long enough that its layers
are worth copying and a target at least g = 4 times deeper; cpu-smoke (2 source steps, 4 layers)
only checks the plumbing. The paper's growth-timing rule (section 5.3) asks for far more source
tokens than any cpu budget, so a null result on cpu does not refute the claim. gpu/tpu presets
need a real corpus (``--set data.corpus=...``): on the embedded corpus (~7M tokens, prose ~0.45M)
their budgets repeat each domain many times (the report's passes table warns) and their loss
comparisons are not readable.

Command:
    python -m experiments.gstack --preset cpu --workdir runs/gstack

Presets and runtime (2 shared CPU cores): cpu-smoke (CI runs scratch,
scratch-s2 and gstack; every arm's config is built without training),
cpu (target 8 layers d=128, 160 scratch-equivalent steps of 16 x 128 tokens, source 40 steps of
the 2-layer model; measured 8:10 wall for the four arms scratch/gstack/gzero/grandom of one seed
incl. the corpus build, quiet machine, 2026-11-23; glearn adds about one growth arm, the second
seed doubles it: ~22 min for all ten runs, estimated), gpu (24 layers d=1024 grown from 6, one
H100; not run), tpu-v5p-64 (1.5B target, 24 layers d=2048 grown from 6, FSDP over 32 chips;
compiles and fits per ``python -m moejax.aot``).
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
        growth=GrowthConfig(factor=4, source_steps=2, fade_in_steps=2, learn_steps=2)),
    "cpu": Config(
        model=_model(128, 8, 4, 2, 32, 128),
        data=DataConfig(seq_len=128, corpus_bytes_per_domain=2_000_000),
        train=TrainConfig(steps=160, batch_size=16, lr=3e-3, warmup_steps=16, log_every=10,
                          eval_every=20, eval_batches=2, ckpt_every=80),
        growth=GrowthConfig(factor=4, source_steps=40, fade_in_steps=30)),
    "gpu": Config(
        model=_model(1024, 24, 16, 4, 64, 1024, vocab_size=8192, dtype="bfloat16", remat="dots"),
        data=DataConfig(seq_len=1024, tokenizer="bpe", bpe_vocab_size=8192,
                        corpus_bytes_per_domain=12_000_000, prefetch_threads=4),
        train=TrainConfig(steps=6000, batch_size=64, lr=3e-4, min_lr_ratio=0.1,
                          warmup_steps=200, log_every=20, eval_every=250, eval_batches=8,
                          ckpt_every=1000),
        growth=GrowthConfig(factor=4, source_steps=1200, fade_in_steps=500)),
    "tpu-v5p-64": Config(
        model=_model(2048, 24, 16, 8, 128, 2048, vocab_size=8192, dtype="bfloat16",
                     scan_layers=True, remat="full"),
        mesh=MeshConfig(data=1, fsdp=-1),
        data=DataConfig(seq_len=2048, tokenizer="bpe", bpe_vocab_size=8192,
                        corpus_bytes_per_domain=12_000_000, prefetch_threads=8),
        train=TrainConfig(steps=20000, batch_size=256, lr=6e-4, min_lr_ratio=0.1,
                          warmup_steps=1000, log_every=50, eval_every=500, eval_batches=8,
                          ckpt_every=1000),
        growth=GrowthConfig(factor=4, source_steps=4000, fade_in_steps=1600)),
}

BASE_ARMS: dict[str, tuple[str, ...]] = {
    "scratch": ("growth.op=none",),
    "gstack": ("growth.op=stack",),
    "gzero": ("growth.op=zero_depth", "growth.new_layer_init=copy"),
    "grandom": ("growth.op=random_depth", "growth.new_layers=top"),
    "glearn": ("growth.op=learn_depth",),
}
LABELS = {"scratch": "scratch", "gstack": "G_stack", "gzero": "G_zero (copies, zero out-proj)",
          "grandom": "G_random (MSG fade-in, on top)", "glearn": "G_learn (depth only)"}
SEEDS = (0, 1)  # train.seed of the two replicas
SEED_SUFFIX = "-s2"

ARMS: dict[str, tuple[str, ...]] = {
    **BASE_ARMS,
    **{f"{a}{SEED_SUFFIX}": (*o, f"train.seed={SEEDS[1]}") for a, o in BASE_ARMS.items()}}


def base_arm(arm: str) -> str:
    """'gstack-s2' -> 'gstack'."""
    return arm[:-len(SEED_SUFFIX)] if arm.endswith(SEED_SUFFIX) else arm


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


def mean_spread(values: list[float]) -> str:
    """'mean' for one value, 'mean ± half-range' for several; 'n/a' for none."""
    v = [x for x in values if x is not None and np.isfinite(x)]
    if not v:
        return "n/a"
    if len(v) == 1:
        return f"{v[0]:.4g}"
    return f"{np.mean(v):.4g} ± {(max(v) - min(v)) / 2:.2g}"


def seed_rows(curves: dict[str, tuple]) -> list[str]:
    """One table row per base arm: final val loss, total FLOPs, FLOPs to reach scratch's final
    loss and the speedup, each as mean ± half-range over its seeds (each seed against scratch of
    the same seed; a seed whose scratch did not run is left out of the speedup)."""
    by_base: dict[str, dict[str, tuple]] = {}
    for arm, c in curves.items():
        by_base.setdefault(base_arm(arm), {})[arm[len(base_arm(arm)):] or "s1"] = c
    scratch = by_base.get("scratch", {})
    rows = ["| arm | seeds | final val loss | total FLOPs | FLOPs to reach scratch final loss | "
            "speedup (FLOPs saved) |", "|---|---|---|---|---|---|"]
    for base, runs in by_base.items():
        reach, speed = [], []
        for seed, (x, y, _) in runs.items():
            ref = scratch.get(seed)
            if ref is None:
                continue
            r = flops_to_reach(x, y, float(ref[1][-1]))
            reach.append(r)
            speed.append(None if r is None else 1 - r / ref[0][-1])
        missed = sum(r is None for r in reach)
        reach_s = mean_spread(reach)
        if missed:
            reach_s += f" ({missed} of {len(reach)} not reached)"
        speed_s = mean_spread([100 * v if v is not None else None for v in speed])
        rows.append(f"| {LABELS.get(base, base)} | {len(runs)} | "
                    f"{mean_spread([float(y[-1]) for _, y, _ in runs.values()])} | "
                    f"{mean_spread([float(x[-1]) for x, _, _ in runs.values()])} | {reach_s} | "
                    f"{speed_s if speed_s == 'n/a' else speed_s + ' %'} |")
    return rows


def report(workdirs: dict[str, str], out_dir: str) -> str:
    plots = os.path.join(out_dir, "plots")
    os.makedirs(plots, exist_ok=True)
    curves = {arm: curve(wd) for arm, wd in workdirs.items()}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colours = {}
    for arm, (x, y, ev) in curves.items():
        base = base_arm(arm)
        colours.setdefault(base, f"C{len(colours)}")
        ax.plot(x, y, marker=".", color=colours[base], ls="--" if base != arm else "-",
                label=arm)
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
    text = "\n".join([
        "# G_stack vs G_zero vs G_random vs G_learn vs scratch (matched FLOPs)", "",
        "Validation loss (all domains) at each evaluation against cumulative training FLOPs; "
        "dotted lines mark the growth event, dashed curves the second seed. Speedup = 1 - FLOPs "
        "to reach scratch's final loss / scratch's FLOPs, per seed against scratch of the same "
        "seed. Values: mean ± half the range over seeds. G_learn is depth only (no width map); "
        "its fitting batches are not counted in its FLOPs.", "", *seed_rows(curves), "",
        f"![val loss vs FLOPs](plots/{os.path.basename(png)})", ""])
    return experiment.write_report(out_dir, text)


def main(argv=None):
    return experiment.main(description=__doc__, presets=PRESETS, arms=ARMS, run_arm=run_arm,
                           report=report, argv=argv)


if __name__ == "__main__":
    main()
