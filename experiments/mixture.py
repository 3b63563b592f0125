"""Data mixtures: natural vs uniform vs RegMix vs Aioli vs DGA (shared/methods/rl-and-data.md C.1).

Same model and token budget (``train.steps`` x ``train.batch_size`` rows) in every arm; only the
weights of the training domains change (``moejax.mixing.run``):

    natural   the corpus's training-token shares, static
    uniform   equal weights, static
    regmix    a sweep of tiny proxies on Dirichlet mixtures around natural (shared by arms in
              ``workdir/_regmix-<hash>``, resumable), a regressor of the proxies' mean val loss
              (linear or LightGBM) scored by Spearman on held-out proxies, the top-k average of
              simulated candidates, then the target run on that static mixture
    aioli     online: LearnParams rounds (perturbed mixtures, loss drops un-mixed into A, EMA),
              then the exponentiated update; its LearnParams steps count as training steps
    dga       online: weights ∝ alpha * exp(eta <g_domain, g_target>) towards the target domain

The target domain (``mixing.target_domain``) has weight 0 in every arm: it is evaluated (DGA's
goal) and gives DGA its target gradient. The fine embedded domains carry planted helper structure:
math-add helps math-word and math-mul helps math-mul3 by construction (moejax.data.corpus_build).

Report: average (unweighted mean over the training domains) and per-domain validation loss at
matched tokens, tokens seen and passes per domain (``train/tokens/<domain>``: the mixers change
the weights, so the counts come from the runs), the weight trajectories
(``train/mixture/<domain>``), RegMix's Spearman on held-out proxies (and on larger runs where the
preset runs them), Aioli's learned A (heatmap) and DGA's target loss and final weights.

Command:
    python -m experiments.mixture --preset cpu --workdir runs/mixture

Presets: cpu-smoke (CI, seconds per arm; shows nothing, checks the wiring); cpu (6 training
domains + the math-mul3 target, a 2-layer d=64 model, 400 steps x 16 x 128 tokens per arm, 32
proxies at the same shape and 100 steps, LightGBM; no larger runs, so rank invariance is not
checked on cpu; measured: ~12.5 CPU-minutes for all arms and the sweep, i.e. well under 25 min on
2 quiet cores) is the smallest preset that can show each direction: RegMix's
ranking needs tens of proxies whose mixtures differ by more than the seed noise, Aioli's tilt
needs LearnParams segments long enough for per-domain loss drops to exceed the eval noise, DGA's
needs a target whose gradient aligns with one helper (math-mul -> math-mul3); gpu (one GPU: 64
proxies, 8 larger runs at 4x size for rank invariance) and tpu-v5p-64 (``python -m moejax.aot
--experiment mixture --preset tpu-v5p-64`` compiles its step) need a real corpus
(``data.corpus=...`` prepared with ``python -m moejax.data.prepare``): the embedded one is ~7M
tokens and those presets would repeat it many times (the budget section's passes column says so).

Measured on cpu (one seed, so loss gaps below ~0.1 are noise; math-word's loss drops late and
unevenly across arms): RegMix's Spearman on 8 held-out proxies 0.857 (LightGBM; linear 0.429,
whose top-k choice is a simplex vertex, one domain only); Aioli recovers the planted helper in A
(A[math-word, math-add] 0.018 vs math-word's own 0.017) but eta=1 on the normalised A hardly
moves the weights (math-add 0.169 vs 0.167) and its average val loss is 0.21 above uniform
(eta=20: math-add/word/mul 0.23-0.25, average still 0.27 above uniform); DGA puts 0.50 on
math-mul and 0.21 on math-add (uniform 0.167) and lowers the target loss vs uniform (1.52 vs
1.86), but natural's is lower still (1.35).
"""

from __future__ import annotations

import os
import sys

import numpy as np

from moejax import experiment
from moejax.config import AttentionConfig, DataConfig, MeshConfig, ModelConfig, TrainConfig
from moejax.metrics import read_metrics
from moejax.mixing.aioli import AioliConfig
from moejax.mixing.config import MixingConfig, MixRunConfig, RegMixConfig
from moejax.mixing.dga import DGAConfig
from moejax.mixing.run import run_mixing_arm
from moejax.paths import as_path, read_json

TARGET = "math-mul3"
SMOKE_DOMAINS = ("math-add", "math-word", "math-mul", "noise", TARGET)
DOMAINS = ("prose-docstrings", "code-text", "math-add", "math-word", "math-mul", "noise", TARGET)
HELPERS = {"aioli": ("math-add", "math-word"), "dga": ("math-mul", TARGET)}  # (helper, helped)


def _model(d: int, layers: int, heads: int, kv: int, hd: int, seq: int, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=kw.pop("vocab_size", 320), d_model=d, num_layers=layers,
                       d_ff=kw.pop("d_ff", 4 * d), max_seq_len=seq,
                       dtype=kw.pop("dtype", "float32"),
                       attention=AttentionConfig(num_heads=heads, num_kv_heads=kv, head_dim=hd),
                       **kw)


def _data(domains, seq: int, cap: int, **kw) -> DataConfig:
    return DataConfig(domains=domains, mixture=(1.0,) * len(domains), seq_len=seq,
                      corpus_bytes_per_domain=cap, **kw)


PRESETS: dict[str, MixRunConfig] = {
    "cpu-smoke": MixRunConfig(
        model=_model(64, 2, 4, 2, 16, 64, d_ff=128),
        data=_data(SMOKE_DOMAINS, 64, 300_000),
        train=TrainConfig(steps=6, batch_size=8, warmup_steps=1, log_every=1, eval_every=6,
                          eval_batches=1, ckpt_every=3, async_ckpt=False),
        mixing=MixingConfig(
            target_domain=TARGET,
            aioli=AioliConfig(update_steps=5, lp_rounds=1, lp_steps=1),
            dga=DGAConfig(every=2, eta=1.0), dga_layers=1,
            regmix=RegMixConfig(num_proxies=4, held_out=3, proxy_steps=2, candidates=2000,
                                top_k=20))),
    "cpu": MixRunConfig(
        model=_model(64, 2, 4, 2, 16, 128, d_ff=256),
        data=_data(DOMAINS, 128, 1_000_000),
        train=TrainConfig(steps=400, batch_size=16, lr=3e-3, warmup_steps=20, log_every=10,
                          eval_every=200, eval_batches=2, ckpt_every=200),
        mixing=MixingConfig(
            target_domain=TARGET,
            aioli=AioliConfig(update_steps=100, lp_rounds=1, lp_steps=6, eta=1.0),
            dga=DGAConfig(every=10, eta=1.0, ema=0.5), dga_layers=1, eval_batches=2,
            # LightGBM: a linear fit's top-k over the simplex is a vertex (one domain only)
            regmix=RegMixConfig(num_proxies=24, held_out=8, proxy_steps=100, candidates=100_000,
                                top_k=100, regressor="lgbm"))),
    "gpu": MixRunConfig(
        model=_model(512, 8, 8, 4, 64, 1024, vocab_size=8192, dtype="bfloat16"),
        data=_data(DOMAINS, 1024, 12_000_000, tokenizer="bpe", bpe_vocab_size=8192,
                   prefetch_threads=4),
        train=TrainConfig(steps=4000, batch_size=64, lr=1e-3, warmup_steps=200, log_every=20,
                          eval_every=500, eval_batches=8, ckpt_every=500),
        mixing=MixingConfig(
            target_domain=TARGET, aioli=AioliConfig(update_steps=500, lp_rounds=2, lp_steps=10),
            dga=DGAConfig(every=20, eta=1.0, ema=0.5), dga_layers=2, eval_batches=4,
            regmix=RegMixConfig(num_proxies=64, held_out=8, proxy_steps=1000, proxy_num_layers=2,
                                proxy_d_model=128, num_larger=8, larger_num_layers=4,
                                larger_d_model=256, regressor="lgbm"))),
    "tpu-v5p-64": MixRunConfig(
        model=_model(1024, 16, 16, 4, 64, 2048, vocab_size=8192, dtype="bfloat16",
                     scan_layers=True, remat="full"),
        mesh=MeshConfig(data=-1),
        data=_data(DOMAINS, 2048, 12_000_000, tokenizer="bpe", bpe_vocab_size=8192,
                   prefetch_threads=8),
        train=TrainConfig(steps=20000, batch_size=256, lr=6e-4, warmup_steps=1000, log_every=50,
                          eval_every=1000, eval_batches=8, ckpt_every=1000),
        mixing=MixingConfig(
            target_domain=TARGET, aioli=AioliConfig(update_steps=1000, lp_rounds=2, lp_steps=10),
            dga=DGAConfig(every=50, eta=1.0, ema=0.5), dga_layers=2, eval_batches=4,
            regmix=RegMixConfig(num_proxies=128, held_out=8, proxy_steps=2000,
                                proxy_num_layers=2, proxy_d_model=256, num_larger=8,
                                larger_num_layers=8, larger_d_model=512, regressor="lgbm"))),
}

ARMS: dict[str, tuple[str, ...]] = {m: (f"mixing.method={m}",)
                                    for m in ("natural", "uniform", "regmix", "aioli", "dga")}


def run_arm(cfg: MixRunConfig, workdir: str) -> dict:
    return run_mixing_arm(cfg, workdir)


# -- report --------------------------------------------------------------------------------------
def _config(wd: str) -> MixRunConfig:
    return MixRunConfig.from_dict(read_json(as_path(wd) / "config.json"))


def _records(wd: str) -> list[dict]:
    return read_metrics(as_path(wd) / "metrics.jsonl")


def _final_eval(recs: list[dict]) -> dict:
    return [r for r in recs if "val/loss" in r][-1]


def _trajectory(recs: list[dict], domains) -> tuple[list[int], np.ndarray]:
    """(steps, weights [T, D]) of every logged ``train/mixture/<domain>``."""
    rows = [r for r in recs if f"train/mixture/{domains[0]}" in r]
    return ([r["step"] for r in rows],
            np.array([[r[f"train/mixture/{d}"] for d in domains] for r in rows]))


def _plot_weights(trajectories: dict[str, tuple], domains, out_png: str) -> str:
    from moejax.analysis.plots import _save_png, plt
    fig, axes = plt.subplots(1, len(trajectories), figsize=(4.5 * len(trajectories), 3.5),
                             squeeze=False)
    for ax, (arm, (steps, w)) in zip(axes[0], trajectories.items()):
        for j, d in enumerate(domains):
            ax.plot(steps, w[:, j], label=d, drawstyle="steps-post")
        ax.set_title(f"{arm}: domain weights", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return _save_png(fig, out_png)


def _plot_matrix(A: np.ndarray, domains, title: str, out_png: str) -> str:
    from moejax.analysis.plots import _save_png, plt
    fig, ax = plt.subplots(figsize=(1.0 * len(domains) + 2.5, 0.8 * len(domains) + 1.5))
    im = ax.imshow(A, cmap="viridis")
    ax.set_xticks(range(len(domains)), domains, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(domains)), domains, fontsize=7)
    ax.set_xlabel("trained on (j)")
    ax.set_ylabel("loss of (i)")
    for i in range(len(domains)):
        for j in range(len(domains)):
            ax.text(j, i, f"{A[i, j]:.3f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=ax)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save_png(fig, out_png)


def _fmt(x) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"


def report(workdirs: dict[str, str], out_dir: str) -> str:
    plots = os.path.join(out_dir, "plots")
    cfgs = {arm: _config(wd) for arm, wd in workdirs.items()}
    cfg0 = next(iter(cfgs.values()))
    train, domains = cfg0.training_domains, tuple(cfg0.data.domains)
    target = cfg0.mixing.target_domain
    summaries = {arm: experiment.finished(wd) or {} for arm, wd in workdirs.items()}
    evals = {arm: _final_eval(_records(wd)) for arm, wd in workdirs.items()}
    uniform_avg = None
    rows = ["| arm | avg val loss (training domains) | vs uniform | "
            + " | ".join(f"{d}{' (target)' if d == target else ''}" for d in domains) + " |",
            "|---" * (len(domains) + 3) + "|"]
    avgs = {arm: float(np.mean([ev[f"val/loss/{d}"] for d in train])) for arm, ev in evals.items()}
    uniform_avg = avgs.get("uniform")
    for arm, ev in evals.items():
        diff = "" if uniform_avg is None else f"{avgs[arm] - uniform_avg:+.3f}"
        rows.append(f"| {arm} | {avgs[arm]:.3f} | {diff} | "
                    + " | ".join(_fmt(ev.get(f"val/loss/{d}")) for d in domains) + " |")
    tokens = ["| arm | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
    final_w = ["| arm | " + " | ".join(train) + " |", "|---" * (len(train) + 1) + "|"]
    trajectories = {}
    for arm, wd in workdirs.items():
        recs = _records(wd)
        last = [r for r in recs if f"train/tokens/{domains[0]}" in r][-1]
        tokens.append(f"| {arm} | " + " | ".join(f"{int(last[f'train/tokens/{d}']):,}"
                                                 for d in domains) + " |")
        steps, w = _trajectory(recs, domains)
        if len(steps):
            trajectories[arm] = (steps, w)
            seen = np.array([last[f"train/tokens/{d}"] for d in train], np.float64)
            final_w.append(f"| {arm} (last logged weights) | "
                           + " | ".join(f"{x:.3f}" for x in w[-1, :len(domains)]
                                        [[domains.index(d) for d in train]]) + " |")
            final_w.append(f"| {arm} (share of tokens seen) | "
                           + " | ".join(f"{x:.3f}" for x in seen / seen.sum()) + " |")
    lines = ["# Data mixtures (RegMix, Aioli, DGA vs natural and uniform)", "",
             f"Every arm: {cfg0.train.steps} steps x {cfg0.train.batch_size} rows x "
             f"{cfg0.data.seq_len} tokens on the training domains {train}; the target domain "
             f"`{target}` has weight 0 everywhere (evaluated only). Final validation loss on "
             "the held-out split (train.eval_batches per domain); the average is the unweighted "
             "mean over the training domains.", "", *rows, "",
             "Training tokens seen per domain (`train/tokens/<domain>`, the runs' counts):", "",
             *tokens, "", "Weights (last logged `train/mixture/<domain>`) and realised token "
             "shares:", "", *final_w, ""]
    if trajectories:
        png = _plot_weights(trajectories, domains, os.path.join(plots, "weights.png"))
        lines += [f"![weights](plots/{os.path.basename(png)})", ""]
    lines += _regmix_section(summaries.get("regmix"))
    lines += _aioli_section(summaries.get("aioli"), evals, avgs, uniform_avg, plots)
    lines += _dga_section(summaries.get("dga"), evals, target)
    return experiment.write_report(out_dir, "\n".join(lines))


def _regmix_section(s: dict | None) -> list[str]:
    if not s or "regmix/spearman" not in s:
        return []
    out = ["## RegMix", "",
           f"Regressor `{s['regmix/regressor']}` of the proxies' `{s['regmix/metric']}` val loss; "
           f"Spearman on {len(s['regmix/held_out'])} held-out proxies: "
           f"**{s['regmix/spearman']:.3f}** (target >= 0.8)"
           + ("; by regressor: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                           s["regmix/spearman_by_regressor"].items())
              if "regmix/spearman_by_regressor" in s else "") + ".", "",
           "| held-out proxy | predicted | measured |", "|---|---|---|",
           *(f"| {n} | {v['predicted']:.4f} | {v['measured']:.4f} |"
             for n, v in s["regmix/held_out"].items()), ""]
    if "regmix/larger" in s:
        out += [f"Rank invariance: Spearman of proxy-size vs larger-run losses on the same "
                f"mixtures: {_fmt(s.get('regmix/spearman_larger'))}.", "",
                "| mixture | proxy | predicted | larger run |", "|---|---|---|---|",
                *(f"| {n} | {v['proxy']:.4f} | {v['predicted']:.4f} | {v['measured']:.4f} |"
                  for n, v in s["regmix/larger"].items()), ""]
    else:
        out += ["No larger runs in this preset: rank invariance is not checked here (the gpu and "
                "tpu presets run them).", ""]
    out += ["Chosen mixture (top-k average): " + ", ".join(
        f"{d} {w:.3f}" for d, w in s["regmix/chosen"].items()), ""]
    return out


def _aioli_section(s, evals, avgs, uniform_avg, plots) -> list[str]:
    if not s or s.get("aioli/A") is None:
        return []
    doms = s["mixer/domains"]
    png = _plot_matrix(np.asarray(s["aioli/A_ema"]), doms, "Aioli: normalised A (EMA)",
                       os.path.join(plots, "aioli_A.png"))
    w = dict(zip(doms, s["aioli/weights"]))
    helper, helped = HELPERS["aioli"]
    out = ["## Aioli", "", f"{s['aioli/rounds']} rounds. Last weights: "
           + ", ".join(f"{d} {x:.3f}" for d, x in w.items()) + ".", ""]
    if helper in w:
        out.append(f"Tilt toward the planted helper `{helper}` (helps `{helped}`): weight "
                   f"{w[helper]:.3f} vs uniform {1 / len(doms):.3f}.")
    if uniform_avg is not None and "aioli" in avgs:
        out.append(f"Average val loss {avgs['aioli']:.3f} vs uniform {uniform_avg:.3f} "
                   f"({avgs['aioli'] - uniform_avg:+.4f}).")
    return out + ["", f"![A](plots/{os.path.basename(png)})", ""]


def _dga_section(s, evals, target) -> list[str]:
    if not s or "dga/alpha" not in s:
        return []
    doms = s["mixer/domains"]
    helper = HELPERS["dga"][0]
    out = ["## DGA", "", f"Target `{target}`; {s['dga/updates']} updates. Final weights: "
           + ", ".join(f"{d} {x:.3f}" for d, x in zip(doms, s["dga/alpha"])) + "."]
    if helper in doms:
        out.append(f"Weight on the planted helper `{helper}`: "
                   f"{s['dga/alpha'][doms.index(helper)]:.3f} (uniform {1 / len(doms):.3f}).")
    out += ["", "Target-domain val loss by arm: " + ", ".join(
        f"{arm} {ev.get(f'val/loss/{target}', float('nan')):.3f}" for arm, ev in evals.items()),
        ""]
    return out


def budget(configs, workdirs) -> str:
    """Tokens seen (from the runs' ``train/tokens/<domain>``) and passes over each training
    stream, RegMix's proxy tokens counted apart."""
    from moejax.data import prepare_data
    cfg0 = next(iter(configs.values()))
    data = prepare_data(cfg0.data)
    lines = ["", "## Data budget", "", "| arm | domain | tokens seen | stream tokens | passes |",
             "|---|---|---|---|---|"]
    for arm, wd in workdirs.items():
        recs = [r for r in _records(wd) if f"train/tokens/{cfg0.data.domains[0]}" in r]
        for d in cfg0.data.domains:
            seen, stream = recs[-1][f"train/tokens/{d}"], data.num_tokens(d, "train")
            lines.append(f"| {arm} | {d} | {seen:,} | {stream:,} | {seen / stream:.2f} |")
    r = cfg0.mixing.regmix
    proxy_steps = r.proxy_steps or cfg0.train.steps
    lines += ["", f"RegMix's sweep adds {r.num_proxies + r.held_out} proxies x {proxy_steps} "
              f"steps x {cfg0.train.batch_size} rows (not counted above).", ""]
    return "\n".join(lines)


def main(argv=None):
    return experiment.main(description=__doc__, presets=PRESETS, arms=ARMS, run_arm=run_arm,
                           report=report, argv=sys.argv[1:] if argv is None else argv,
                           budget=budget)


if __name__ == "__main__":
    main()
