"""The router catalog at matched active parameters: top-k, RMoE, top-p, null experts, expert
choice and MoGE (shared/methods/architecture.md sections 0, 4, 8.4, 8.5, 8.11; expert choice:
Zhou et al. 2022).

Same MoE model, data and budget as ``experiments.lbl_scope`` (global-batch LBL); only the router
changes. Every arm has the same expert sizes and a nominal k=2; top-p and null experts make k
token-adaptive, so the report gives the measured active experts per token next to the loss.

Expected: RMoE slightly lower loss than top-k at a few percent throughput cost (section 4.3);
top-p uses a variable number of experts (more in lower layers, section 8.5); null experts use
fewer real experts than k (section 8.4); MoGE is perfectly balanced across groups by
construction (section 8.11).

Command:
    python -m experiments.routers --preset cpu --workdir runs/routers

Presets and runtime: cpu-smoke (~10 s per arm, CI); cpu (120 steps, ~2.5 min per arm, ~15 min
for the 6 arms on 2 CPU cores); gpu and tpu-v5p-64 as in lbl_scope.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from experiments import lbl_scope
from moejax import experiment
from moejax.analysis.plots import plot_curves
from moejax.config import Config
from moejax.metrics import read_metrics
from moejax.trainer import Trainer

PRESETS: dict[str, Config] = {
    name: dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, steps=120, warmup_steps=12, eval_every=40, ckpt_every=60))
    if name == "cpu" else cfg
    for name, cfg in lbl_scope.PRESETS.items()
}

ARMS: dict[str, tuple[str, ...]] = {
    "topk": (),
    "rmoe": ("model.moe.router.recurrent=gru", "model.moe.router.recurrent_dim=64"),
    "topp": ("model.moe.router.kind=topp", "model.moe.router.top_p=0.4",
             "model.moe.router.max_experts_per_token=4"),
    "null_experts": ("model.moe.router.num_null_experts=4", "model.moe.top_k=3"),
    "expert_choice": ("model.moe.router.kind=expert_choice",
                      "model.moe.router.expert_choice_capacity=1.0"),
    "moge": ("model.moe.router.group_mode=moge", "model.moe.router.num_groups=2"),
}


def run_arm(cfg: Config, workdir: str) -> dict:
    return Trainer(cfg, workdir).run()


def _layer_mean(rec: dict, prefix: str) -> float:
    vals = [v for k, v in rec.items() if k.startswith(prefix)]
    return float(np.mean(vals)) if vals else float("nan")


def report(workdirs: dict[str, str], out_dir: str) -> str:
    rows = ["| arm | val loss | code | prose | math | active experts/token | top-k score sum | "
            "global max/mean load | tokens/s |", "|---" * 9 + "|"]
    for arm, wd in workdirs.items():
        recs = read_metrics(os.path.join(wd, "metrics.jsonl"))
        ev = [r for r in recs if "val/loss" in r][-1]
        train = [r for r in recs if "train/loss" in r]
        last = train[-1]
        tps = float(np.median([r["perf/tokens_per_s"] for r in train[1:] or train]))
        rows.append(
            f"| {arm} | {ev['val/loss']:.3f} | {ev['val/loss/code']:.3f} | "
            f"{ev['val/loss/prose']:.3f} | {ev['val/loss/math']:.3f} | "
            f"{_layer_mean(last, 'moe/active_experts/'):.2f} | "
            f"{_layer_mean(ev, 'val/topk_score_sum/'):.3f} | "
            f"{_layer_mean(last, 'moe/imbalance/'):.2f} | {tps:,.0f} |")
    curves = plot_curves(workdirs, ["train/loss", "val/loss"],
                         os.path.join(out_dir, "plots", "loss.png"), title="routers: loss")
    text = "\n".join([
        "# Router catalog at matched expert sizes", "",
        "Final evaluation; active experts/token, load and throughput from the last logged training "
        "step (tokens/s is the median over logged windows).", "", *rows, "",
        f"![loss](plots/{os.path.basename(curves)})", ""])
    return experiment.write_report(out_dir, text)


def main(argv=None):
    return experiment.main(description=__doc__, presets=PRESETS, arms=ARMS, run_arm=run_arm,
                           report=report, argv=argv)


if __name__ == "__main__":
    main()
