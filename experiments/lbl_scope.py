"""Load-balancing scope: micro-batch vs sequence vs global-batch LBL vs aux-loss-free bias.

Reproduces "Demons in the Detail" (Qiu et al., ACL 2025; shared/methods/architecture.md section 1)
at small scale on the embedded multi-domain corpus (code, prose, math). Same MoE model and token
budget in every arm; only the scope of the balance loss changes:

    micro         LBL per micro-batch (what one device sees in one accumulation micro-step)
    sequence      LBL per document (a segment of a packed row; model.moe.balance.sequence_unit=row
                  pools the whole packed row instead)
    global        LBL over the whole global batch (count buffer across micro-steps)
    global+micro  global + 0.01 x micro (the Qwen efficiency add-on)
    aux_free      no LBL; DeepSeek-V3 selection bias updated from global counts

Expected (the paper's direction): global has more concentrated per-domain expert use (hot experts
per domain in the heatmaps) and a higher top-k score sum than micro, with equal or lower
validation loss; its global max/mean load stays near 1 while per-sequence load is more skewed.

Command:
    python -m experiments.lbl_scope --preset cpu --workdir runs/lbl_scope

Presets and runtime: cpu-smoke (tiny, ~10 s per arm, CI), cpu (8 experts top-2, 160 steps;
~3 min per arm; the 5 arms with the report in 14.9 min on 2 quiet CPU cores, measured), gpu
(one H100, ~150M total params, 64 experts top-4), tpu-v5p-64 (1.7B, 64 experts top-8, EP 8),
tpu-v5p-128 (Qwen3-30B-A3B-shaped, EP 16 x FSDP 4); both compile and fit per
``python -m moejax.aot`` (table: benchmarks/RESULTS.md).
The micro-batch is ``train.batch_size / train.grad_accum`` sequences per batch shard.
"""

from __future__ import annotations

import json
import os

import numpy as np

from moejax import experiment
from moejax.analysis.plots import plot_curves, plot_domain_heatmaps
from moejax.config import (AttentionConfig, BalanceConfig, Config, DataConfig, MeshConfig,
                           ModelConfig, MoEConfig, RouterConfig, TrainConfig)
from moejax.analysis.routing import domain_frequencies, specialisation
from moejax.metrics import read_metrics
from moejax.trainer import Trainer


def _moe_model(d, layers, heads, kv, hd, experts, k, d_expert, seq, **kw) -> ModelConfig:
    return ModelConfig(
        vocab_size=kw.pop("vocab_size", 320), d_model=d, num_layers=layers, d_ff=4 * d,
        max_seq_len=seq, dtype=kw.pop("dtype", "float32"),
        attention=AttentionConfig(num_heads=heads, num_kv_heads=kv, head_dim=hd),
        moe=MoEConfig(num_experts=experts, top_k=k, d_expert=d_expert,
                      router=RouterConfig(kind="topk", score="softmax", norm_topk_prob=True),
                      balance=BalanceConfig(scope="global", coef=1e-2)), **kw)


PRESETS: dict[str, Config] = {
    "cpu-smoke": Config(
        model=_moe_model(64, 2, 4, 2, 16, 8, 2, 64, 64),
        data=DataConfig(seq_len=64, corpus_bytes_per_domain=300_000),
        train=TrainConfig(steps=4, batch_size=8, grad_accum=2, warmup_steps=1, log_every=1,
                          eval_every=2, eval_batches=1, ckpt_every=2, async_ckpt=False)),
    "cpu": Config(
        model=_moe_model(128, 4, 4, 2, 32, 8, 2, 128, 256),
        data=DataConfig(seq_len=256, corpus_bytes_per_domain=2_000_000),
        train=TrainConfig(steps=160, batch_size=16, grad_accum=4, lr=3e-3, warmup_steps=16,
                          log_every=10, eval_every=40, eval_batches=4, ckpt_every=80)),
    "gpu": Config(
        model=_moe_model(512, 12, 8, 4, 64, 64, 4, 256, 1024, vocab_size=8192, dtype="bfloat16"),
        data=DataConfig(seq_len=1024, tokenizer="bpe", bpe_vocab_size=8192,
                        corpus_bytes_per_domain=12_000_000, prefetch_threads=4),
        train=TrainConfig(steps=4000, batch_size=64, grad_accum=4, lr=1e-3, warmup_steps=200,
                          log_every=20, eval_every=500, eval_batches=8, ckpt_every=1000)),
    "tpu-v5p-64": Config(
        model=_moe_model(1024, 16, 16, 4, 64, 64, 8, 512, 2048, vocab_size=8192,
                         dtype="bfloat16", scan_layers=True, remat="full"),
        mesh=MeshConfig(data=-1, expert=8),
        data=DataConfig(seq_len=2048, tokenizer="bpe", bpe_vocab_size=8192,
                        corpus_bytes_per_domain=12_000_000, prefetch_threads=8),
        train=TrainConfig(steps=20000, batch_size=512, grad_accum=4, lr=6e-4, warmup_steps=1000,
                          log_every=50, eval_every=1000, eval_batches=8, ckpt_every=1000)),
    # Qwen3-30B-A3B-shaped (48 layers, d=2048, 32/4 heads of 128, 128 experts top-8 of 768,
    # its 151936 vocabulary): 30B parameters, 3B active; experts over expert=16 x fsdp=4 (a
    # 4x4x4 torus has no 8 x 8 split without cutting a physical axis: jax.make_mesh refuses it)
    "tpu-v5p-128": Config(
        model=_moe_model(2048, 48, 32, 4, 128, 128, 8, 768, 2048, vocab_size=151936,
                         dtype="bfloat16", scan_layers=True, remat="full"),
        mesh=MeshConfig(data=1, fsdp=4, expert=16),
        data=DataConfig(seq_len=2048, tokenizer="bpe", bpe_vocab_size=8192,
                        corpus_bytes_per_domain=12_000_000, prefetch_threads=8),
        train=TrainConfig(steps=20000, batch_size=256, grad_accum=2, lr=3e-4, warmup_steps=1000,
                          log_every=50, eval_every=1000, eval_batches=8, ckpt_every=1000)),
}

ARMS: dict[str, tuple[str, ...]] = {
    "micro": ("model.moe.balance.scope=micro",),
    "sequence": ("model.moe.balance.scope=sequence",),
    "global": ("model.moe.balance.scope=global",),
    "global+micro": ("model.moe.balance.scope=global+micro",),
    "aux_free": ("model.moe.balance.scope=none", "model.moe.router.aux_free_bias=True"),
}


def run_arm(cfg: Config, workdir: str) -> dict:
    return Trainer(cfg, workdir).run()


def _last(recs: list[dict], prefix: str) -> float:
    """Mean over layers of the last logged values whose key starts with ``prefix``."""
    for r in reversed(recs):
        vals = [v for k, v in r.items() if k.startswith(prefix)]
        if vals:
            return float(np.mean(vals))
    return float("nan")


def report(workdirs: dict[str, str], out_dir: str) -> str:
    plots = os.path.join(out_dir, "plots")
    rows = ["| arm | val loss | code | prose | math | top-k score sum | global max/mean load | "
            "per-doc max/mean load | domain specialisation |", "|---" * 9 + "|"]
    heatmaps = []
    for arm, wd in workdirs.items():
        recs = read_metrics(os.path.join(wd, "metrics.jsonl"))
        ev = [r for r in recs if "moe/domain_counts" in r][-1]
        with open(os.path.join(wd, "config.json")) as f:
            top_k = json.load(f)["model"]["moe"]["top_k"]
        freq = domain_frequencies(ev, top_k)
        spec = specialisation(freq)  # mean over layers/domains of the hottest expert's rate
        rows.append(
            f"| {arm} | {ev['val/loss']:.3f} | {ev.get('val/loss/code', float('nan')):.3f} | "
            f"{ev.get('val/loss/prose', float('nan')):.3f} | {ev.get('val/loss/math', float('nan')):.3f} | "
            f"{_last(recs, 'val/topk_score_sum/'):.3f} | {_last(recs, 'moe/imbalance/'):.2f} | "
            f"{_last(recs, 'moe/seq_imbalance/'):.2f} | {spec:.2f} |")
        heatmaps.append(plot_domain_heatmaps(freq, os.path.join(plots, f"heatmap_{arm}.png"),
                                             title=f"{arm}: expert frequency / uniform",
                                             domains=("code", "prose", "math")))
    curves = plot_curves(workdirs, ["train/loss", "val/loss"], os.path.join(plots, "loss.png"),
                         title="LBL scope: loss")
    text = "\n".join([
        "# Load-balancing scope (Demons in the Detail, small scale)", "",
        "Final evaluation. Top-k score sum and loads are means over MoE layers; the per-doc load "
        "is per document (packed-row segment) unless model.moe.balance.sequence_unit=row; domain "
        "specialisation is the mean over layers and domains of the hottest expert's selection rate "
        "relative to uniform routing (1.0 = flat).", "", *rows, "",
        f"![loss](plots/{os.path.basename(curves)})", "",
        *[f"![{os.path.basename(h)}](plots/{os.path.basename(h)})" for h in heatmaps], ""])
    return experiment.write_report(out_dir, text)


def main(argv=None):
    return experiment.main(description=__doc__, presets=PRESETS, arms=ARMS, run_arm=run_arm,
                           report=report, argv=argv)


if __name__ == "__main__":
    main()
