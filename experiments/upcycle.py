"""Dense -> MoE upcycling: copy vs fine-grained split vs EMoE vs the dense model continued
(sparse upcycling; DeepSeekMoE fine-grained experts, section 8.6; EMoE, section 6 of
shared/methods/architecture.md).

A dense model is trained on the embedded corpus (code, prose, math) for ``growth.source_steps``
steps, once (``workdir/_source-<hash>``, shared by all arms). Each arm then continues for the same
``train.steps`` steps with a fresh AdamW and a new LR schedule:

    dense   the dense model continued (identity "growth")
    copy    8 experts, each a copy of the FFN, top-2, random router, 1% weight noise
    fine    the FFN cut into 4 segments along d_ff, 2 copies -> 8 experts of d_ff/4, top-4
            (w_down x 4), random router
    emoe    EMoE: balanced k-means of the FFN gate keys into 8 blocks of d_ff/8, top-4 blocks
            routed by average key, no router parameters (weight 1 per block)

Active FFN width per token: dense d_ff, copy 2 d_ff, fine d_ff, emoe d_ff/2.

Expected: copy and fine start at (or near) the dense loss (copy is function preserving without
noise) and end at or below the dense-continued loss; EMoE starts slightly above (half the neurons
per token) and its expert use is domain dependent (heatmaps: domains x experts, selection rate
relative to uniform; from the eval ``moe/domain_counts`` records).

Command:
    python -m experiments.upcycle --preset cpu --workdir runs/upcycle

Presets and runtime (2 shared CPU cores): cpu-smoke (CI, ~1 min for all arms), cpu (4 layers
d=128, d_ff 512, 200 dense steps + 150 steps per arm: measured 10:38 wall for all arms incl. the
corpus build, quiet machine, 2026-11-23), gpu (12 layers d=768, one H100; not run),
tpu-v5p-64 (16 layers d=1024 upcycled to 8 experts, EP 8 over 32 chips; compiles and fits per
``python -m moejax.aot``).
"""

from __future__ import annotations

import json
import os


from moejax import experiment, grow_run
from moejax.analysis.plots import plot_curves, plot_domain_heatmaps
from moejax.config import (AttentionConfig, BalanceConfig, Config, DataConfig, GrowthConfig,
                           MeshConfig, ModelConfig, MoEConfig, RouterConfig, TrainConfig)
from moejax.analysis.routing import domain_frequencies, specialisation
from moejax.metrics import read_metrics
from moejax.paths import as_path


def _model(d, layers, heads, kv, hd, seq, **kw) -> ModelConfig:
    moe = MoEConfig(num_experts=0, router=RouterConfig(norm_topk_prob=True),
                    balance=BalanceConfig(scope="global", coef=1e-2))
    return ModelConfig(vocab_size=kw.pop("vocab_size", 320), d_model=d, num_layers=layers,
                       d_ff=4 * d, max_seq_len=seq, dtype=kw.pop("dtype", "float32"),
                       attention=AttentionConfig(num_heads=heads, num_kv_heads=kv, head_dim=hd),
                       moe=moe, **kw)


PRESETS: dict[str, Config] = {
    "cpu-smoke": Config(
        model=_model(64, 2, 4, 2, 16, 64),
        data=DataConfig(seq_len=64, corpus_bytes_per_domain=300_000),
        train=TrainConfig(steps=3, batch_size=8, warmup_steps=1, log_every=1, eval_every=3,
                          eval_batches=1, ckpt_every=3, async_ckpt=False),
        growth=GrowthConfig(source_steps=2)),
    "cpu": Config(
        model=_model(128, 4, 4, 2, 32, 128),
        data=DataConfig(seq_len=128, corpus_bytes_per_domain=2_000_000),
        train=TrainConfig(steps=150, batch_size=16, lr=2e-3, warmup_steps=10, log_every=10,
                          eval_every=50, eval_batches=2, ckpt_every=75),
        growth=GrowthConfig(source_steps=200)),
    "gpu": Config(
        model=_model(768, 12, 12, 4, 64, 1024, vocab_size=8192, dtype="bfloat16"),
        data=DataConfig(seq_len=1024, tokenizer="bpe", bpe_vocab_size=8192,
                        corpus_bytes_per_domain=12_000_000, prefetch_threads=4),
        train=TrainConfig(steps=3000, batch_size=64, lr=6e-4, warmup_steps=100, log_every=20,
                          eval_every=250, eval_batches=8, ckpt_every=1000),
        growth=GrowthConfig(source_steps=3000)),
    "tpu-v5p-64": Config(
        model=_model(1024, 16, 16, 4, 64, 2048, vocab_size=8192, dtype="bfloat16",
                     scan_layers=True, remat="full"),
        mesh=MeshConfig(data=-1, expert=8),
        data=DataConfig(seq_len=2048, tokenizer="bpe", bpe_vocab_size=8192,
                        corpus_bytes_per_domain=12_000_000, prefetch_threads=8),
        train=TrainConfig(steps=10000, batch_size=256, lr=3e-4, warmup_steps=500, log_every=50,
                          eval_every=500, eval_batches=8, ckpt_every=1000),
        growth=GrowthConfig(source_steps=10000)),
}


def _moe(op: str, experts: int, k: int, d_expert_div: int, *extra: str) -> tuple[str, ...]:
    """Overrides for an MoE arm; d_expert = d_ff / d_expert_div is set in run_arm."""
    return (f"growth.op={op}", f"model.moe.num_experts={experts}", f"model.moe.top_k={k}",
            f"model.moe.d_expert={d_expert_div}", *extra)


ARMS: dict[str, tuple[str, ...]] = {
    "dense": ("growth.op=identity",),
    "copy": _moe("copy", 8, 2, 1, "growth.noise=0.01"),
    "fine": _moe("fine", 8, 4, 4),
    "emoe": _moe("emoe", 8, 4, 8, "model.moe.router.gating=avg_key"),
}


def run_arm(cfg: Config, workdir: str) -> dict:
    """The arms give d_expert as a divisor of d_ff (ARMS are preset independent)."""
    import dataclasses
    m = cfg.model
    if m.moe.enabled:
        moe = dataclasses.replace(m.moe, d_expert=m.d_ff // m.moe.d_expert)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(m, moe=moe))
    root = os.fspath(as_path(workdir).parent)  # local or gs://
    return grow_run.run(cfg, workdir, source_workdir=grow_run.source_workdir_for(cfg, root))


def report(workdirs: dict[str, str], out_dir: str) -> str:
    plots = os.path.join(out_dir, "plots")
    rows = ["| arm | val loss at upcycling | final val loss | code | prose | math | "
            "domain specialisation |", "|---" * 7 + "|"]
    heatmaps = []
    for arm, wd in workdirs.items():
        recs = read_metrics(os.path.join(wd, "metrics.jsonl"))
        event = next(r for r in recs if r.get("event") == "grow")
        last = [r for r in recs if "val/loss" in r][-1]
        with open(os.path.join(wd, "config.json")) as f:
            top_k = json.load(f)["model"]["moe"]["top_k"]
        spec = "n/a"
        ev = [r for r in recs if "moe/domain_counts" in r and r.get("phase") == "grown"]
        if ev:
            freq = domain_frequencies(ev[-1], top_k)
            spec = f"{specialisation(freq):.2f}"
            heatmaps.append(plot_domain_heatmaps(
                freq, os.path.join(plots, f"heatmap_{arm}.png"), domains=("code", "prose", "math"),
                title=f"{arm}: expert selection rate / uniform"))
        rows.append(f"| {arm} | {event.get('val/loss', float('nan')):.4f} | {last['val/loss']:.4f} | "
                    + " | ".join(f"{last.get(f'val/loss/{d}', float('nan')):.3f}"
                                 for d in ("code", "prose", "math")) + f" | {spec} |")
    curves = plot_curves(workdirs, ["train/loss", "val/loss"], os.path.join(plots, "loss.png"),
                         title="upcycling: loss (source phase, then each arm)")
    text = "\n".join([
        "# Dense -> MoE upcycling: copy vs fine-grained vs EMoE vs dense continued", "",
        "Val loss at upcycling = the upcycled model before any step. Domain specialisation = mean "
        "over layers and domains of the hottest expert's selection rate relative to uniform.", "",
        *rows, "", f"![loss](plots/{os.path.basename(curves)})", "",
        *[f"![{os.path.basename(h)}](plots/{os.path.basename(h)})" for h in heatmaps], ""])
    return experiment.write_report(out_dir, text)


def main(argv=None):
    return experiment.main(description=__doc__, presets=PRESETS, arms=ARMS, run_arm=run_arm,
                           report=report, argv=argv)


if __name__ == "__main__":
    main()
