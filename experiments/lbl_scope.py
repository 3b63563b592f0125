"""Load-balancing scope: micro-batch vs sequence vs shuffled vs global LBL vs aux-loss-free bias.

Reproduces "Demons in the Detail" (Qiu et al., ACL 2025; shared/methods/architecture.md section 1)
at small scale on the embedded multi-domain corpus (code, prose, math). Same MoE model and token
budget in every arm; only the scope of the balance loss changes:

    micro         LBL per micro-batch (what one device sees in one accumulation micro-step)
    sequence      LBL per document (a segment of a packed row; model.moe.balance.sequence_unit=row
                  pools the whole packed row instead)
    shuffled      the decisive control (1.4): LBL per group of micro-batch size drawn at random,
                  token level, from the whole global batch (fresh each step). It has micro's token
                  count with global's diversity: the paper finds it beats micro.
    global        LBL over the whole global batch (count buffer across micro-steps)
    global+micro  global + 0.01 x micro (the Qwen efficiency add-on)
    switch        micro for the first half of training, global after (1.4: helps, stays below
                  global from the start)
    bsz<G>        balance batch size sweep: G = 1, 2, 4, ... up to the global batch sequences
                  per group (groups wider than a micro-step are pooled across micro-steps exactly)
    aux_free      no LBL; DeepSeek-V3 sigmoid affinities with the selection bias updated from
                  global counts (aux_free_softmax: the same bias on the softmax router)

Every arm has a '-s2' replica on a second train.seed (init and step keys; same data); the report
gives mean ± half-range over the seeds that ran. By default the presets run sequence, micro,
shuffled and global with both seeds; the other arms with ``--arms``.

Expected (the paper's direction): global (and shuffled, more weakly) has more concentrated
per-domain expert use than micro: higher I(domain; expert) and domain-vs-marginal KL (hot
experts per domain in the heatmaps), a higher top-k score sum, equal or lower validation loss;
its global max/mean load stays near 1 while per-sequence load is more skewed.

Command:
    python -m experiments.lbl_scope --preset cpu --workdir runs/lbl_scope

Presets and runtime: cpu-smoke (tiny, ~10 s per arm; CI runs global and aux_free); cpu (8
experts top-2, micro-batch 4 sequences vs a global batch of 64 via 16 accumulation micro-steps,
seq 128, 64 steps = 0.5M tokens per run; the 8 default runs with the report: 16.4 min wall,
1,059 s user CPU on 2 cores, peak RSS 1.5 GB, measured 2026-12-01 from a clean checkout with
low-priority jobs beside it and a warm compilation cache);
gpu (one H100, ~150M total params, 64 experts top-4, global batch 128 of
micro 16), tpu-v5p-64 (1.7B, 64 experts top-8, EP 8), tpu-v5p-128 (Qwen3-30B-A3B-shaped, EP 16
x FSDP 4); both compile and fit per ``python -m moejax.aot`` (table: benchmarks/RESULTS.md).
Smallest preset that can show the direction: cpu, for the routing metrics (specialisation, top-k
score sum, loads) at ~0.1 passes over each domain; its loss differences are read against the
seed spread. Loss claims need the gpu preset on a real corpus (``data.corpus=...``): on the
embedded one it repeats the prose domain many times (the report's passes table warns).
The micro-batch is ``train.batch_size / train.grad_accum`` sequences (over all batch shards);
``run_arm`` refuses a micro/global comparison whose micro-batch is the global batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from moejax import experiment
from moejax.analysis.plots import plot_curves, plot_domain_heatmaps
from moejax.analysis.routing import domain_frequencies
from moejax.analysis.specialisation import domain_expert_mi, mean_domain_kl
from moejax.config import (AttentionConfig, BalanceConfig, Config, ConfigError, DataConfig,
                           MeshConfig, ModelConfig, MoEConfig, RouterConfig, TrainConfig)
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
    # micro-batch 4 sequences vs a global batch of 64 (16 accumulation micro-steps)
    "cpu": Config(
        model=_moe_model(128, 4, 4, 2, 32, 8, 2, 128, 128),
        data=DataConfig(seq_len=128, corpus_bytes_per_domain=2_000_000),
        train=TrainConfig(steps=64, batch_size=64, grad_accum=16, lr=3e-3, warmup_steps=6,
                          log_every=8, eval_every=32, eval_batches=1, ckpt_every=32)),
    "gpu": Config(
        model=_moe_model(512, 12, 8, 4, 64, 64, 4, 256, 1024, vocab_size=8192, dtype="bfloat16"),
        data=DataConfig(seq_len=1024, tokenizer="bpe", bpe_vocab_size=8192,
                        corpus_bytes_per_domain=12_000_000, prefetch_threads=4),
        train=TrainConfig(steps=4000, batch_size=128, grad_accum=8, lr=1e-3, warmup_steps=200,
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

SEEDS = (0, 1)  # train.seed of each seed replica (init and per-step keys; the data stream is fixed)
CORE_ARMS = ("sequence", "micro", "shuffled", "global")
# the decisive comparison runs by default (two seeds each); the rest with --arms
DEFAULT_ARMS = {
    "cpu-smoke": ("sequence", "micro", "shuffled", "global", "switch", "aux_free", "bsz8"),
    **{p: tuple(f"{a}{_s}" for a in CORE_ARMS for _s in ("", "-s2")) for p in
       ("cpu", "gpu", "tpu-v5p-64", "tpu-v5p-128")},
}
# scopes whose arms compare micro-batch with global balancing: their micro-batch must be smaller
CONTRAST_SCOPES = ("micro", "global", "global+micro", "shuffled")
MIN_GLOBAL_SEQS = {"cpu": 64, "gpu": 128, "tpu-v5p-64": 128, "tpu-v5p-128": 128}
MAX_MICRO_SEQS = {"cpu": 4}
DOMAINS = ("code", "prose", "math")


def micro_seqs(cfg: Config) -> int:
    """Sequences in one micro-batch (one accumulation micro-step, all batch shards together; each
    shard holds micro_seqs / shards of them)."""
    return cfg.train.batch_size // cfg.train.grad_accum


def arms_for(preset: str) -> dict[str, tuple[str, ...]]:
    """Every arm of ``preset`` (each with a '-s2' replica on the second seed). The switch arm
    balances per micro-batch for the first half of training, globally after; the bsz<G> sweep
    pools G consecutive sequences (1, 2, 4, ... up to the global batch; groups wider than a
    micro-step span micro-steps exactly, moejax.layers.balance)."""
    cfg = PRESETS[preset]
    b = "model.moe.balance"
    base = {
        "micro": (f"{b}.scope=micro",),
        "sequence": (f"{b}.scope=sequence",),
        "shuffled": (f"{b}.scope=shuffled",),
        "global": (f"{b}.scope=global",),
        "global+micro": (f"{b}.scope=global+micro",),
        "switch": (f"{b}.scope=global", f"{b}.switch_step={cfg.train.steps // 2}"),
        # DeepSeek-V3: sigmoid affinities, bias-only balancing (routed_scaling stays 1 so the
        # output scale matches the other arms); the softmax router as the second aux-free arm
        "aux_free": (f"{b}.scope=none", "model.moe.router.aux_free_bias=True",
                     "model.moe.router.score=sigmoid"),
        "aux_free_softmax": (f"{b}.scope=none", "model.moe.router.aux_free_bias=True"),
    }
    g = 1
    while g <= cfg.train.batch_size:
        base[f"bsz{g}"] = (f"{b}.scope=group", f"{b}.group_size={g}")
        g *= 2
    return experiment.with_seed_replicas(base, SEEDS[1])


ARMS: dict[str, tuple[str, ...]] = arms_for("cpu")
base_arm = experiment.base_arm




def check_contrast(cfg: Config) -> None:
    """Micro-batch balancing must see fewer sequences than the global batch (config time)."""
    if cfg.model.moe.balance.scope in CONTRAST_SCOPES and micro_seqs(cfg) >= cfg.train.batch_size:
        raise ConfigError(f"train.grad_accum={cfg.train.grad_accum}: a micro-batch of "
                          f"{micro_seqs(cfg)} sequences is the global batch "
                          f"({cfg.train.batch_size}); raise train.grad_accum")


def run_arm(cfg: Config, workdir: str) -> dict:
    check_contrast(cfg)
    return Trainer(cfg, workdir).run()


def _last(recs: list[dict], prefix: str) -> float:
    """Mean over layers of the last logged values whose key starts with ``prefix``."""
    for r in reversed(recs):
        vals = [v for k, v in r.items() if k.startswith(prefix)]
        if vals:
            return float(np.mean(vals))
    return float("nan")


COLUMNS = ("val loss", "code", "prose", "math", "top-k score sum", "global max/mean load",
           "per-doc max/mean load", "MI(domain; expert)", "mean KL(domain ‖ marginal)")


def arm_values(wd: str) -> tuple[list[float], np.ndarray, np.ndarray]:
    """(the report's columns, per-layer MI [L], expert frequency / uniform [L,D,E]) of one run."""
    recs = read_metrics(os.path.join(wd, "metrics.jsonl"))
    ev = [r for r in recs if "moe/domain_counts" in r][-1]
    with open(os.path.join(wd, "config.json")) as f:
        top_k = json.load(f)["model"]["moe"]["top_k"]
    counts = np.asarray(ev["moe/domain_counts"], np.float64)  # [L,D,E]
    mi = domain_expert_mi(counts)
    vals = [ev["val/loss"], *(ev.get(f"val/loss/{d}", float("nan")) for d in DOMAINS),
            _last(recs, "val/topk_score_sum/"), _last(recs, "moe/imbalance/"),
            _last(recs, "moe/seq_imbalance/"), float(np.mean(mi)),
            float(np.mean(mean_domain_kl(counts)))]
    return vals, mi, domain_frequencies(ev, top_k)


def _mean_spread(xs) -> str:
    """'mean' for one value, 'mean ± half-range' over seeds."""
    xs = np.asarray(xs, np.float64)
    return f"{xs.mean():.3f}" if len(xs) == 1 else f"{xs.mean():.3f} ± {np.ptp(xs) / 2:.3f}"



def report(workdirs: dict[str, str], out_dir: str) -> str:
    plots = os.path.join(out_dir, "plots")
    by_arm: dict[str, list] = {}
    heatmaps = []
    for run, wd in workdirs.items():
        vals, mi, freq = arm_values(wd)
        by_arm.setdefault(base_arm(run), []).append((run, vals, mi))
        heatmaps.append(plot_domain_heatmaps(freq, os.path.join(plots, f"heatmap_{run}.png"),
                                             title=f"{run}: expert frequency / uniform",
                                             domains=DOMAINS))
    rows = ["| arm | seeds | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    n_layers = len(mi)
    layers = ["| arm | " + " | ".join(f"layer {i}" for i in range(n_layers)) + " |",
              "|---" * (n_layers + 1) + "|"]
    for arm, runs in by_arm.items():
        cols = np.asarray([v for _, v, _ in runs])  # [seeds, columns]
        rows.append(f"| {arm} | {len(runs)} | " + " | ".join(
            _mean_spread(cols[:, j]) for j in range(len(COLUMNS))) + " |")
        mis = np.asarray([m for _, _, m in runs])  # [seeds, L]
        layers.append(f"| {arm} | " + " | ".join(_mean_spread(mis[:, l]) for l in
                                                 range(mis.shape[1])) + " |")
    curves = plot_curves(workdirs, ["train/loss", "val/loss"], os.path.join(plots, "loss.png"),
                         title="LBL scope: loss")
    text = "\n".join([
        "# Load-balancing scope (Demons in the Detail, small scale)", "",
        "Final evaluation, mean ± half the range over seeds (train.seed; same data). Top-k score "
        "sum and loads are means over MoE layers; the per-doc load is per document (packed-row "
        "segment) unless model.moe.balance.sequence_unit=row. Specialisation (spec 1.5): the "
        "mutual information I(domain; expert) of the eval selections and the mean over domains "
        "of KL(domain's expert frequencies ‖ all domains'), in nats, mean over MoE layers; both "
        "are 0 when every domain routes alike, however imbalanced the experts.", "", *rows, "",
        "I(domain; expert) per MoE layer:", "", *layers, "",
        f"![loss](plots/{os.path.basename(curves)})", "",
        *[f"![{os.path.basename(h)}](plots/{os.path.basename(h)})" for h in heatmaps], ""])
    return experiment.write_report(out_dir, text)


def main(argv=None):
    """The shared command line; without --arms, the preset's DEFAULT_ARMS."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="cpu")
    pre.add_argument("--arms")
    known = pre.parse_known_args(argv)[0]
    preset = known.preset if known.preset in PRESETS else "cpu"
    if known.arms is None:
        argv += ["--arms", ",".join(DEFAULT_ARMS[preset])]
    return experiment.main(description=__doc__, presets=PRESETS, arms=arms_for(preset),
                           run_arm=run_arm, report=report, argv=argv)


if __name__ == "__main__":
    main()
