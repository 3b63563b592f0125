"""Dense -> MoE upcycling: copy vs fine-grained split vs EMoE vs DSMoE vs BAM vs the dense model
continued (sparse upcycling; DeepSeekMoE fine-grained experts, section 8.6; EMoE, section 6; DSMoE,
8.7; BAM, 8.9 of shared/methods/architecture.md).

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
    dsmoe   DSMoE: the FFN cut along d_ff into 8 blocks of d_ff/8 (no permutation), block i on
            where sigmoid(w_i . x) > 1/2 (fresh gate: about half the blocks per token at
            upcycling), output weight 1, straight-through gradient, sparsity loss 1e-2 x mean
            gate (an untuned [verify] choice), no balance loss, every layer
    bam     BAM: one dense branch per trained domain (weight > 0 in data.mixture: N = 2 in the
            OOD presets, 3 otherwise) continues the source for ``growth.branch_steps`` steps on
            its domain alone (fresh AdamW, own schedule; ``moejax.bam_run``, branch runs shared
            and reused like the source), then ``bam.branch_and_mix``: N FFN experts (d_ff each,
            top-min(2, N), random router, global balance loss 1e-2) and N full attention experts
            (soft softmax mixture, every expert on every token) per block

copy, fine and bam keep the global balance loss (coef 1e-2) of sparse upcycling. Active FFN width
per token: dense d_ff, copy 2 d_ff, fine d_ff, emoe d_ff/2, emoe64 d_ff/4 in its MoE layers (d_ff
elsewhere), dsmoe (measured mean active-block share) x d_ff, bam min(2, N) d_ff plus N attentions.
The report gives each arm's active training FLOPs per token and plots loss against the FLOPs
spent after the shared source, so arms of different active compute compare at equal FLOPs.
DSMoE's active FLOPs use its measured mean active-block share over the grown phase (training
logs ``moe/active_experts/layer<i>``: blocks on per token); this implementation also runs the
inactive blocks (their straight-through gradient needs their output), so its wall-clock training
cost is the dense one.

Budget: every arm continues for the same ``train.steps`` after upcycling (matched post-upcycling
steps, not matched total tokens). BAM spends N x ``growth.branch_steps`` more steps of the dense
model before upcycling (cpu: 50 per branch, i.e. 100 / 150 steps for N = 2 / 3, against 150
grown steps); the report's token column shows branch + grown tokens, and BAM's FLOPs curves start
at its branch-phase FLOPs. The paper's parallel attention+FFN block (8.9) would need a parallel
seed: the shared source is the ordinary sequential block, so the bam arm keeps it
(``--set model.parallel_block=true`` trains a parallel source of its own).
Data: each branch continues the source's stream on its domain (new rows, as the paper's
branches), and the BAM model's stream continues after the branches' rows, so no row is trained
on twice (``moejax.bam_run``). With N = 2 (the OOD presets) top-min(2, N) FFN routing is top-2 of
2: every expert on every token, a soft FFN mixture like the attention experts
(``--set model.moe.top_k=1`` makes it sparse).

Out-of-distribution evaluation (EMoE's headline): with ``growth.source_mixture`` set, the dense
source trains on that mixture (every domain) and the arms fine-tune on ``data.mixture``, where
a domain of weight 0 is held out; the report then splits the final loss into in-distribution
(the fine-tuned domains) and OOD (the held-out ones). The ``*-ood`` presets hold out math.

Expected: copy and fine start at (or near) the dense loss (copy is function preserving without
noise) and end at or below the dense-continued loss; EMoE starts slightly above (half the neurons
per token) and its expert use is domain dependent (heatmaps: domains x experts, selection rate
relative to uniform; from the eval ``moe/domain_counts`` records). EMoE's claim: equal or better
ID loss than the dense fine-tune and a larger gain OOD. DSMoE (8.7): starts above the dense loss
(about half the blocks on), recovers as the gates learn; its claim is a better loss than the
other sparse arms at matched active FLOPs, with a layer-dependent active share. BAM (8.9): starts
at the mix of the branches (each better on its own domain), and should end below copy (BTX-like
FFN-only upcycling) at matched FLOPs (the FLOPs plots, its branch phase counted); its FFN experts
should be domain-specialised (heatmap).

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
dense and emoe64, and dsmoe and bam in a second smoke; every arm's config is built without
training), cpu and cpu-ood (4 layers d=128, d_ff 512, 200 dense steps + 150 steps per arm: measured
10:38 wall for the four arms before emoe64 incl. the corpus build, quiet machine, 2026-11-23;
emoe64 and dsmoe add about one arm each (dsmoe runs every block), bam about three: its N branch
runs plus a grown phase with N attentions; not measured), gpu and gpu-ood (12 layers d=768, one
H100, 1000 steps per BAM branch; not run), tpu-v5p-64 (16 layers d=1024 upcycled to 8 experts,
EP 8 over 32 chips; compiles and fits per ``python -m moejax.aot``; its scanned layers cannot take
emoe64's dense/MoE mix, and BAM's N = 3 experts do not split over mesh.expert = 8: both raise a
ConfigError naming why).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from moejax import bam_run, experiment, grow_run, upcycle
from moejax.analysis.plots import plot_curves, plot_domain_heatmaps, plt
from moejax.config import (AttentionConfig, BalanceConfig, Config, ConfigError, DataConfig,
                           GrowthConfig, MeshConfig, ModelConfig, MoEConfig, RouterConfig,
                           TrainConfig)
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
        growth=GrowthConfig(source_steps=2, source_mixture=ALL_DOMAINS, branch_steps=1)),
    "cpu": Config(
        model=_model(128, 4, 4, 2, 32, 128),
        data=DataConfig(seq_len=128, corpus_bytes_per_domain=2_000_000),
        train=TrainConfig(steps=150, batch_size=16, lr=2e-3, warmup_steps=10, log_every=10,
                          eval_every=50, eval_batches=2, ckpt_every=75),
        growth=GrowthConfig(source_steps=200, branch_steps=50)),
    "gpu": Config(
        model=_model(768, 12, 12, 4, 64, 1024, vocab_size=8192, dtype="bfloat16"),
        data=DataConfig(seq_len=1024, tokenizer="bpe", bpe_vocab_size=8192,
                        corpus_bytes_per_domain=12_000_000, prefetch_threads=4),
        train=TrainConfig(steps=3000, batch_size=64, lr=6e-4, warmup_steps=100, log_every=20,
                          eval_every=250, eval_batches=8, ckpt_every=1000),
        growth=GrowthConfig(source_steps=3000, branch_steps=1000)),
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
# top_k=8 is unused by DSMoE (up to all 8 blocks per token); bam's num_experts / top_k are
# placeholders that arm_config sets from the trained domains
DSMOE = ("model.moe.variant.kind=dsmoe", "model.moe.balance.scope=none",
         "model.moe.variant.dsmoe_sparsity_coef=0.01")

ARMS: dict[str, tuple[str, ...]] = {
    "dense": ("growth.op=identity",),
    "copy": _moe("copy", 8, 2, 1, "growth.noise=0.01"),
    "fine": _moe("fine", 8, 4, 4),
    "emoe": _moe("emoe", 8, 4, 8, *EMOE),
    "emoe64": _moe("emoe", 64, 16, 64, *EMOE, "growth.moe_layers=last_half"),
    "dsmoe": _moe("dsmoe", 8, 8, 8, *DSMOE),
    "bam": _moe("bam", 8, 2, 1, "model.moe.variant.kind=bam"),
}


def arm_config(cfg: Config) -> Config:
    """The config an arm trains (also what ``moejax.aot`` compiles): the arms give d_expert as a
    divisor of d_ff (ARMS are preset independent), EMoE's layer choice by name, and BAM one
    expert per trained domain (N), routed top-min(2, N). ``growth.branch_steps`` (the preset's,
    for BAM) is 0 in the other arms' configs: they do not read it."""
    if cfg.growth.op != "bam" and cfg.growth.branch_steps:
        cfg = dataclasses.replace(cfg, growth=dataclasses.replace(cfg.growth, branch_steps=0))
    m = cfg.model
    if m.moe.enabled:
        moe = dataclasses.replace(m.moe, d_expert=m.d_ff // m.moe.d_expert)
        if cfg.growth.op == "bam":
            domains = bam_run.trained_domains(cfg)
            n = len(domains)
            if n % max(cfg.mesh.expert, 1):
                raise ConfigError(f"arm bam: one expert per trained domain ({n}: {domains}) "
                                  f"does not split over mesh.expert={cfg.mesh.expert}; use a "
                                  f"mesh.expert dividing {n}")
            moe = dataclasses.replace(moe, num_experts=n, top_k=min(moe.top_k, n))
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


def active_counts(recs: list[dict]) -> list[float]:
    """DSMoE's blocks on per token (``moe/active_experts/layer<i>``) of every logged grown-phase
    train step and layer."""
    return [v for r in recs if r.get("phase") == "grown" for k, v in r.items()
            if k.startswith("moe/active_experts/layer")]


def active_share(recs: list[dict], num_experts: int) -> float:
    """Mean share of a DSMoE layer's blocks on per token over the grown phase's logged train
    steps and the layers (``active_counts``); 1.0 (every block, what the implementation runs)
    when no train step was logged."""
    vals = active_counts(recs)
    return float(np.mean(vals)) / num_experts if vals else 1.0


def active_flops_per_token(cfg: Config, recs: list[dict]) -> float:
    """Training FLOPs per token over the active parameters (``flops_per_token``); DSMoE's at its
    measured mean active-block share (the config counts every block: this implementation runs
    them all for the straight-through gradient)."""
    m = cfg.model
    flops = m.flops_per_token(cfg.data.seq_len)
    if m.moe.variant.kind != "dsmoe":
        return flops
    n_moe = sum(m.moe.is_moe_layer(i) for i in range(m.num_layers))
    blocks = 6.0 * n_moe * 3 * m.d_model * m.moe.d_expert * m.moe.num_experts  # fwd+bwd, all on
    return flops - (1.0 - active_share(recs, m.moe.num_experts)) * blocks


def grown_curve(recs: list[dict], domains: list[str],
                flops_per_token: float) -> tuple[np.ndarray, np.ndarray]:
    """(training FLOPs after the shared source, pooled val loss over ``domains``): the upcycled
    model before any step at BAM's branch-phase FLOPs (0 for the other arms), then every
    grown-phase evaluation, its tokens at ``flops_per_token``."""
    event = next(r for r in recs if r.get("event") == "grow")
    x0 = event.get("branch_flops", 0.0)
    pts = [(x0, pooled_loss(event, domains))]
    pts += [(x0 + (r["tokens"] - event["tokens"]) * flops_per_token, pooled_loss(r, domains))
            for r in recs if r.get("phase") == "grown" and "val/loss" in r]
    x, y = (np.array(v, np.float64) for v in zip(*pts))
    return x, y


def plot_loss_vs_flops(curves: dict, path: str, title: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for arm, (x, y) in curves.items():
        ax.plot(x, y, marker=".", label=arm)
    ax.set_xlabel("training FLOPs after the shared source (active parameters; BAM: + branches)")
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
    header = (["arm", "active GFLOPs/token", "branch + grown tokens", "val loss at upcycling",
               "final val loss", *doms, *ood_cols, "domain specialisation"])
    rows = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    heatmaps, id_curves, ood_curves, notes = [], {}, {}, []
    for arm, wd in workdirs.items():
        recs = read_metrics(os.path.join(wd, "metrics.jsonl"))
        event = next(r for r in recs if r.get("event") == "grow")
        last = [r for r in recs if "val/loss" in r][-1]
        with open(os.path.join(wd, "config.json")) as f:
            cfg = Config.from_dict(json.load(f))
        top_k = cfg.model.moe.top_k
        flops_tok = active_flops_per_token(cfg, recs)
        branch = int(event.get("branch_tokens", 0))
        tokens = f"{branch:,} + {int(last['tokens'] - event['tokens']):,}"
        if cfg.model.moe.variant.kind == "dsmoe":
            n = cfg.model.moe.num_experts
            notes.append(f"{arm}: measured mean active-block share {active_share(recs, n):.3f} "
                         f"of {n} blocks (its GFLOPs/token use it)." if active_counts(recs) else
                         f"{arm}: no grown-phase train step logged: its GFLOPs/token count "
                         f"every block (the implementation runs them all).")
        spec = "n/a"
        ev = [r for r in recs if "moe/domain_counts" in r and r.get("phase") == "grown"]
        if ev:
            freq = domain_frequencies(ev[-1], top_k)
            spec = f"{specialisation(freq):.2f}"
            heatmaps.append(plot_domain_heatmaps(
                freq, os.path.join(plots, f"heatmap_{arm}.png"), domains=tuple(doms),
                title=f"{arm}: expert selection rate / uniform"))
        cols = [arm, f"{flops_tok / 1e9:.4g}", tokens, f"{event.get('val/loss', float('nan')):.4f}",
                f"{last['val/loss']:.4f}",
                *[f"{last.get(f'val/loss/{d}', float('nan')):.3f}" for d in doms]]
        if held:
            cols += [f"{pooled_loss(last, fit):.4f}", f"{pooled_loss(last, held):.4f}"]
            ood_curves[arm] = grown_curve(recs, held, flops_tok)
        id_curves[arm] = grown_curve(recs, fit, flops_tok)
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
        "# Dense -> MoE upcycling: copy vs fine-grained vs EMoE vs DSMoE vs BAM vs dense "
        "continued", "",
        "Val loss at upcycling = the upcycled model before any step. Active GFLOPs/token = "
        "training FLOPs per token over the active parameters (top-k experts, attention "
        "included; DSMoE at its measured active-block share): compare arms along the FLOPs "
        "plots, not per step. Every arm trains the same steps after upcycling (matched "
        "post-upcycling steps, not matched total tokens); BAM's branch phase (one dense run per "
        "trained domain before mixing) adds the branch tokens of its row, and its FLOPs curves "
        "start at their FLOPs. " + ood_text +
        "Domain specialisation = mean over layers and domains of the hottest expert's selection "
        "rate relative to uniform.", "",
        *rows, "", *notes, "", f"![loss](plots/{os.path.basename(curves)})", "",
        *[f"![{os.path.basename(f)}](plots/{os.path.basename(f)})" for f in figs], "",
        *[f"![{os.path.basename(h)}](plots/{os.path.basename(h)})" for h in heatmaps], ""])
    return experiment.write_report(out_dir, text)


def budget(configs: dict[str, Config], workdirs: dict[str, str]) -> str:
    """The data-budget section, plus BAM's branch phase (its tokens per domain, before
    upcycling), which the per-arm table (``train.steps`` only) leaves out."""
    lines = []
    for arm, cfg in configs.items():
        if cfg.growth.op == "bam" and cfg.growth.branch_steps:
            per = cfg.growth.branch_steps * cfg.train.batch_size * cfg.data.seq_len
            doms = ", ".join(f"{d} {per:,}" for d in bam_run.trained_domains(cfg))
            lines.append(f"- {arm}: {doms} tokens ({cfg.growth.branch_steps} steps x "
                         f"{cfg.train.batch_size} sequences per branch)")
    extra = ["", "Branch phase before upcycling (one dense run per trained domain, not in the "
             "table above):", "", *lines, ""] if lines else []
    return experiment.budget_section(configs, workdirs) + "\n".join(extra)


def main(argv=None):
    return experiment.main(description=__doc__, presets=PRESETS, arms=ARMS, run_arm=run_arm,
                           report=report, argv=argv, budget=budget)


if __name__ == "__main__":
    main()
