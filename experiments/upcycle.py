"""Dense -> MoE upcycling: copy vs fine-grained split vs EMoE vs the dense model continued
(sparse upcycling; DeepSeekMoE fine-grained experts, section 8.6; EMoE, section 6 of
shared/methods/architecture.md).

A dense model is trained for ``growth.source_steps`` steps, once (``workdir/_source-<hash>``,
shared by all arms). Each arm then continues for the same ``train.steps`` steps with a fresh AdamW
and a new LR schedule:

    dense   the dense model continued (identity "growth")
    copy    8 experts, each a copy of the FFN, top-2, random router, 1% weight noise
    fine    the FFN cut into 4 segments along d_ff, 2 copies -> 8 experts of d_ff/4, top-4
            (w_down x 4), random router
    emoe    EMoE: balanced k-means of the FFN gate keys into 8 blocks of d_ff/8, top-4 blocks
            routed by average key, no router parameters (weight 1 per block), every layer,
            no balance loss (EMoE has none)
    emoe64  EMoE as in the paper (section 6.2): 64 blocks of d_ff/64, top-16, MoE only in every
            4th layer of the last half (``growth.moe_layers=last_half``; 'last_quarter' = every
            2nd layer of the last quarter), no balance loss

copy and fine keep the global balance loss (coef 1e-2) of sparse upcycling. Active FFN width per
token: dense d_ff, copy 2 d_ff, fine d_ff, emoe d_ff/2, emoe64 d_ff/4 in its MoE layers (d_ff
elsewhere). The report gives each arm's active training FLOPs per token and plots loss against
the grown phase's FLOPs, so arms of different active compute compare at equal FLOPs.

Out-of-distribution evaluation (EMoE's headline): with ``growth.source_mixture`` set, the dense
source trains on that mixture (every domain) and the arms fine-tune on ``data.mixture``, where
a domain of weight 0 is held out; the report then splits the final loss into in-distribution
(the fine-tuned domains) and OOD (the held-out ones). The ``*-ood`` presets hold out math.

Expected: copy and fine start at (or near) the dense loss (copy is function preserving without
noise) and end at or below the dense-continued loss; EMoE starts slightly above (half the neurons
per token) and its expert use is domain dependent (heatmaps: domains x experts, selection rate
relative to uniform; from the eval ``moe/domain_counts`` records). EMoE's claim: equal or better
ID loss than the dense fine-tune and a larger gain OOD.

Smallest preset that can show the direction: ``cpu-ood`` (the cpu model: 4 layers d=128,
d_ff 512, 200 dense steps on all domains, 150 fine-tuning steps without math). EMoE's gain is a
fine-tuning effect on a model whose FFN neurons already cluster; cpu-smoke's 2-step source has no
such structure (it only checks the plumbing). With 4 layers, ``last_half`` makes one layer MoE
(layer 2). Whether the OOD gain shows at this scale has not been measured. gpu/tpu presets need a
real corpus (``--set data.corpus=...``): the embedded corpus (~7M tokens, prose ~0.45M) is
repeated many times by their budgets (the report's passes table warns), so their loss
comparisons are not readable on it.

Command:
    python -m experiments.upcycle --preset cpu-ood --workdir runs/upcycle

Presets and runtime (2 shared CPU cores): cpu-smoke (OOD on; CI runs
dense and emoe64, every arm's config is built without training), cpu and
cpu-ood (4 layers d=128, d_ff 512, 200 dense steps + 150 steps per arm: measured 10:38 wall for
the four arms before emoe64 incl. the corpus build, quiet machine, 2026-11-23; emoe64 adds about
one arm), gpu and gpu-ood (12 layers d=768, one H100; not run), tpu-v5p-64 (16 layers d=1024
upcycled to 8 experts, EP 8 over 32 chips; compiles and fits per ``python -m moejax.aot``; its
scanned layers cannot take emoe64's dense/MoE mix).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from moejax import experiment, grow_run, upcycle
from moejax.analysis.plots import plot_curves, plot_domain_heatmaps, plt
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


ALL_DOMAINS = (1.0, 1.0, 1.0)  # code, prose, math
OOD_MIXTURE = (1.0, 1.0, 0.0)  # fine-tune on code and prose; math is held out


def _ood(cfg: Config) -> Config:
    """``cfg`` with its source on every domain and the arms' fine-tuning without math."""
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, mixture=OOD_MIXTURE),
        growth=dataclasses.replace(cfg.growth, source_mixture=ALL_DOMAINS))


PRESETS: dict[str, Config] = {
    "cpu-smoke": Config(
        model=_model(64, 2, 4, 2, 16, 64),
        data=DataConfig(seq_len=64, corpus_bytes_per_domain=300_000, mixture=OOD_MIXTURE),
        train=TrainConfig(steps=3, batch_size=8, warmup_steps=1, log_every=1, eval_every=3,
                          eval_batches=1, ckpt_every=3, async_ckpt=False),
        growth=GrowthConfig(source_steps=2, source_mixture=ALL_DOMAINS)),
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
PRESETS["cpu-ood"] = _ood(PRESETS["cpu"])
PRESETS["gpu-ood"] = _ood(PRESETS["gpu"])


def _moe(op: str, experts: int, k: int, d_expert_div: int, *extra: str) -> tuple[str, ...]:
    """Overrides for an MoE arm; d_expert = d_ff / d_expert_div is set in run_arm."""
    return (f"growth.op={op}", f"model.moe.num_experts={experts}", f"model.moe.top_k={k}",
            f"model.moe.d_expert={d_expert_div}", *extra)


EMOE = ("model.moe.router.gating=avg_key", "model.moe.balance.scope=none")  # no balance loss

ARMS: dict[str, tuple[str, ...]] = {
    "dense": ("growth.op=identity",),
    "copy": _moe("copy", 8, 2, 1, "growth.noise=0.01"),
    "fine": _moe("fine", 8, 4, 4),
    "emoe": _moe("emoe", 8, 4, 8, *EMOE),
    "emoe64": _moe("emoe", 64, 16, 64, *EMOE, "growth.moe_layers=last_half"),
}


def arm_config(cfg: Config) -> Config:
    """The config an arm trains (also what ``moejax.aot`` compiles): the arms give d_expert as a
    divisor of d_ff (ARMS are preset independent) and EMoE's layer choice by name."""
    m = cfg.model
    if m.moe.enabled:
        moe = dataclasses.replace(m.moe, d_expert=m.d_ff // m.moe.d_expert)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(m, moe=moe))
    return upcycle.apply_moe_layers(cfg)


def run_arm(cfg: Config, workdir: str) -> dict:
    cfg = arm_config(cfg)
    root = os.fspath(as_path(workdir).parent)  # local or gs://
    return grow_run.run(cfg, workdir, source_workdir=grow_run.source_workdir_for(cfg, root))


def held_out(cfg: dict) -> tuple[list[str], list[str]]:
    """(fine-tuned domains, held-out domains) of an arm's config dict: a domain of weight 0 in
    ``data.mixture`` is out of distribution."""
    data = cfg["data"]
    doms = list(data["domains"])
    held = [d for d, w in zip(doms, data["mixture"]) if w == 0]
    return [d for d in doms if d not in held], held


def pooled_loss(rec: dict, domains: list[str]) -> float:
    """Token-weighted validation loss over ``domains`` of an eval record (NaN for none)."""
    losses = [rec.get(f"val/loss/{d}", np.nan) for d in domains]
    weights = [rec.get(f"val/tokens/{d}", 1.0) for d in domains]
    if not domains:
        return float("nan")
    return float(np.average(losses, weights=weights))


def grown_curve(recs: list[dict], domains: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(grown-phase training FLOPs, pooled val loss over ``domains``): the upcycled model before
    any step at 0, then every grown-phase evaluation."""
    event = next(r for r in recs if r.get("event") == "grow")
    pts = [(0.0, pooled_loss(event, domains))]
    pts += [(r["flops"] - event["flops"], pooled_loss(r, domains)) for r in recs
            if r.get("phase") == "grown" and "val/loss" in r]
    x, y = (np.array(v, np.float64) for v in zip(*pts))
    return x, y


def plot_loss_vs_flops(curves: dict, path: str, title: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for arm, (x, y) in curves.items():
        ax.plot(x, y, marker=".", label=arm)
    ax.set_xlabel("training FLOPs after upcycling (active parameters)")
    ax.set_ylabel("val loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(workdirs: dict[str, str], out_dir: str) -> str:
    plots = os.path.join(out_dir, "plots")
    first_cfg = json.load(open(os.path.join(next(iter(workdirs.values())), "config.json")))
    fit, held = held_out(first_cfg)
    doms = list(first_cfg["data"]["domains"])  # the order of moe/domain_counts
    ood_cols = ["ID loss", "OOD loss"] if held else []
    header = (["arm", "active GFLOPs/token", "val loss at upcycling", "final val loss", *doms,
               *ood_cols, "domain specialisation"])
    rows = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    heatmaps, id_curves, ood_curves = [], {}, {}
    for arm, wd in workdirs.items():
        recs = read_metrics(os.path.join(wd, "metrics.jsonl"))
        event = next(r for r in recs if r.get("event") == "grow")
        last = [r for r in recs if "val/loss" in r][-1]
        with open(os.path.join(wd, "config.json")) as f:
            cfg = Config.from_dict(json.load(f))
        top_k = cfg.model.moe.top_k
        gflops = cfg.model.flops_per_token(cfg.data.seq_len) / 1e9
        spec = "n/a"
        ev = [r for r in recs if "moe/domain_counts" in r and r.get("phase") == "grown"]
        if ev:
            freq = domain_frequencies(ev[-1], top_k)
            spec = f"{specialisation(freq):.2f}"
            heatmaps.append(plot_domain_heatmaps(
                freq, os.path.join(plots, f"heatmap_{arm}.png"), domains=tuple(doms),
                title=f"{arm}: expert selection rate / uniform"))
        cols = [arm, f"{gflops:.4g}", f"{event.get('val/loss', float('nan')):.4f}",
                f"{last['val/loss']:.4f}",
                *[f"{last.get(f'val/loss/{d}', float('nan')):.3f}" for d in doms]]
        if held:
            cols += [f"{pooled_loss(last, fit):.4f}", f"{pooled_loss(last, held):.4f}"]
            ood_curves[arm] = grown_curve(recs, held)
        id_curves[arm] = grown_curve(recs, fit)
        rows.append("| " + " | ".join(cols + [spec]) + " |")
    curves = plot_curves(workdirs, ["train/loss", "val/loss"], os.path.join(plots, "loss.png"),
                         title="upcycling: loss (source phase, then each arm)")
    figs = [plot_loss_vs_flops(id_curves, os.path.join(plots, "id_loss_vs_flops.png"),
                           "in-distribution val loss vs FLOPs after upcycling")]
    if held:
        figs.append(plot_loss_vs_flops(ood_curves, os.path.join(plots, "ood_loss_vs_flops.png"),
                                   f"held-out ({', '.join(held)}) val loss vs FLOPs"))
    ood_text = (f"Out of distribution: the arms fine-tune on {', '.join(fit)} and never see "
                f"{', '.join(held)} after upcycling (the dense source saw every domain); ID / OOD "
                "loss = token-weighted val loss over those domains. " if held else "")
    text = "\n".join([
        "# Dense -> MoE upcycling: copy vs fine-grained vs EMoE vs dense continued", "",
        "Val loss at upcycling = the upcycled model before any step. Active GFLOPs/token = "
        "training FLOPs per token over the active parameters (top-k experts, attention "
        "included): compare arms along the FLOPs plots, not per step. " + ood_text +
        "Domain specialisation = mean over layers and domains of the hottest expert's selection "
        "rate relative to uniform.", "",
        *rows, "", f"![loss](plots/{os.path.basename(curves)})", "",
        *[f"![{os.path.basename(f)}](plots/{os.path.basename(f)})" for f in figs], "",
        *[f"![{os.path.basename(h)}](plots/{os.path.basename(h)})" for h in heatmaps], ""])
    return experiment.write_report(out_dir, text)


def main(argv=None):
    return experiment.main(description=__doc__, presets=PRESETS, arms=ARMS, run_arm=run_arm,
                           report=report, argv=argv)


if __name__ == "__main__":
    main()
