"""The router catalog at matched active compute: top-k, RMoE (+ its no-recurrence control), top-p,
null experts, MaskMoE, expert choice, MoGE, and the MoE variants Chain-of-Experts, CartesianMoE
and HyperMoE (shared/methods/architecture.md sections 0, 4, 8.1-8.5, 8.10, 8.11; expert choice:
Zhou et al. 2022).

Same MoE model and data in every arm; only the router (or the MoE layer variant) changes. Each
arm has a '-s2' replica on a second train.seed (init and step keys; same data); the report gives
mean ± half-range over the seeds that ran.

Arms and how they are matched to top-k (k experts of width F per token, E experts):
    rmoe          GRU router across layers (p=64 on cpu, the paper's p=256 on gpu/tpu)
    rmoe_reset    the same-parameter control: the GRU input state is zero at every layer
                  (router.recurrent_reset), so nothing crosses layers
    rmoe_normal   RMoE with the reference initialisation N(0, init_std) (router.recurrent_init)
    topp          top-p (p=0.4), no slot cap (max_experts_per_token=0): active experts vary
    null_experts  AdaMoE: N = E/k null experts and top-(k+1); with the LBL balancing all E+N
                  columns a token uses (k+1) E / (E+N) = k real experts on average: the same
                  expected compute as top-k (the measured real experts/token are reported)
    maskmoe       MaskMoE token-id masks (rare ids see one expert, so some tokens use < k)
    expert_choice NON-CAUSAL: each expert ranks all tokens of the batch, future ones included,
                  so its loss is not comparable with the causal arms (marked in the report)
    moge          Pangu MoGE, 2 groups of E/2 experts, k/2 per group
    coe           Chain-of-Experts CoE-2(k/2E) as the paper's fine-grained CoE-2(4/64): 2E
                  half-width experts, 2 iterations of top-k each: 2k x 3D(F/2) = k x 3DF expert
                  FLOPs and 2E x 3D(F/2) = E x 3DF expert params, as top-k
    cartesian     CartesianMoE, sub-layers A and B of E half-width experts (F/2), top-k each:
                  2 k x 3D(F/2) = k x 3DF expert FLOPs and E x 3DF expert params, as top-k
    hyper         HyperMoE with top-(k-1) experts plus the generated adapter, its generator
                  shrunk (``hyper_matched_dims``) so the adapter costs at most one expert

``moe_flops`` counts the forward multiply-adds per token of one MoE layer (experts, routers,
RMoE cell, HyperMoE generator); the report gives it with the measured active experts.

After training each arm runs one routing pass over the validation set (``collect_routing``):
per-layer router entropy, expert-usage entropy and the mutual information between consecutive
layers' expert choices (RMoE's cross-layer metrics, spec 4.3; token-choice arms only), and the
active experts per domain and per layer (top-p's "harder tasks need more experts"). Top-k arms
(not MoGE) also get the CartesianMoE robustness probe: the validation loss again with every
router's top-1 pick dropped (``router.drop_top_experts=1``; per router: CartesianMoE loses one
expert in each sub-layer, CoE one in each iteration).

Expected: RMoE slightly lower loss than top-k and than rmoe_reset (the recurrence, not the extra
parameters, is the cause), with higher consecutive-layer MI (section 4.3); top-p uses more
experts in lower layers and on harder domains (8.5); null experts use fewer real experts on easy
tokens (8.4); CoE lower loss than top-k (8.10); CartesianMoE a smaller loss increase than top-k
when the top-1 expert is dropped (8.2); HyperMoE lower loss than top-k at equal experts (8.1).

Command:
    python -m experiments.routers --preset cpu --workdir runs/routers

Presets and runtime: cpu-smoke (~27 s per arm contended; CI runs topk and expert_choice, ~1 min);
cpu (lbl_scope's model with its own batch, pinned: 32 sequences of 128 without accumulation, 100
steps = 0.4M tokens per run; the default runs are topk, rmoe and rmoe_reset with two seeds:
6.6 min wall with the report, 509 s user CPU on 2 cores, peak RSS 2.6 GB, measured 2026-12-01
from a clean checkout with low-priority jobs beside it and a warm compilation cache; other arms
with --arms); gpu and tpu-v5p-64
(lbl_scope's models and batches, RMoE p=256) compile and fit per ``python -m moejax.aot``.
Smallest preset that can show each direction: cpu for the routing metrics (consecutive-layer MI,
entropies, active experts per domain and layer, null-expert use) at ~0.1 passes over each
domain; its loss differences (RMoE vs control, CoE, HyperMoE, the probe) are read against the
seed spread and are mostly below it at 0.4M tokens. Loss claims need the gpu preset on a real
corpus (``data.corpus=...``): the embedded one repeats the prose domain many times there (the
report's passes table warns).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np

from experiments import lbl_scope
from moejax import experiment
from moejax.analysis.plots import plot_curves
from moejax.analysis.routing_layers import (collect_routing, consecutive_layer_mi,
                                            usage_entropy)
from moejax.config import Config, ModelConfig
from moejax.metrics import read_metrics
from moejax.overrides import apply_overrides
from moejax.paths import as_path, read_json
from moejax.trainer import Trainer

# cpu: routers need no micro/global contrast, so the batch is not lbl_scope's 64 x 16 accumulation
CPU_TRAIN = dict(steps=100, batch_size=32, grad_accum=1, lr=3e-3, warmup_steps=10, log_every=10,
                 eval_every=50, eval_batches=1, ckpt_every=50)


def _preset(name: str, cfg: Config) -> Config:
    if name != "cpu":
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **CPU_TRAIN))


PRESETS: dict[str, Config] = {name: _preset(name, cfg) for name, cfg in lbl_scope.PRESETS.items()}
SEEDS = lbl_scope.SEEDS
RMOE_DIM = {"cpu-smoke": 32, "cpu": 64}  # the paper's p=256 elsewhere
HYPER_WIDTH = 16  # HyperMoE expert-embedding, selection-processor and generator width (matched arm)
BASE_ARMS = ("topk", "rmoe", "rmoe_reset", "rmoe_normal", "topp", "null_experts", "maskmoe",
             "expert_choice", "moge", "coe", "cartesian", "hyper")
NON_CAUSAL = ("expert_choice",)
ADAPTIVE = ("topp", "null_experts", "maskmoe", "expert_choice")  # token-varying expert count
DEFAULT_ARMS = {
    "cpu-smoke": BASE_ARMS,
    **{p: tuple(f"{a}{s}" for a in ("topk", "rmoe", "rmoe_reset") for s in ("", "-s2"))
       for p in ("cpu", "gpu", "tpu-v5p-64", "tpu-v5p-128")},
}
DOMAINS = lbl_scope.DOMAINS


# -- FLOP matching ----------------------------------------------------------------------------

def expert_macs(model: ModelConfig) -> int:
    """Multiply-adds per token of one routed SwiGLU expert: 3 D F."""
    return 3 * model.d_model * model.moe.d_expert


def hyper_adapter_macs(model: ModelConfig) -> int:
    """Multiply-adds per token of HyperMoE's adapter as ``moe_variants.HyperMoE`` computes it:
    u = (1 - selected) e (E P), phi (2 P^2), generator hidden ((P + Lz) H), W_down and W_up
    generated and applied (2 H D r), their static parts (2 D r), b_down (H r), b_up (H D)."""
    m, v, D = model.moe, model.moe.variant, model.d_model
    P, Lz = v.hyper_embed_dim, v.hyper_layer_embed_dim
    H, r = v.hyper_bottleneck, v.hyper_adapter_dim
    return m.num_experts * P + 2 * P * P + (P + Lz) * H + 2 * H * D * r + 2 * D * r + H * r + H * D


def router_macs(model: ModelConfig) -> int:
    """Multiply-adds per token of one MoE layer's routers (and RMoE's cell)."""
    m, r, D = model.moe, model.moe.router, model.d_model
    n = {"coe": m.variant.coe_iterations, "cartesian": 2}.get(m.variant.kind, 1)
    if r.recurrent == "none":
        return n * D * (m.num_experts + r.num_null_experts)
    p, g = r.recurrent_dim, 3 if r.recurrent == "gru" else 1
    return D * p + 2 * g * p * p + p * m.num_experts + D * r.num_null_experts


def nominal_active_experts(model: ModelConfig) -> float:
    """Expert calls per token as configured (expected value for null experts at balance; top-p
    and MaskMoE vary per token: k is their nominal value)."""
    m, r = model.moe, model.moe.router
    if r.num_null_experts:
        return m.top_k * m.num_experts / (m.num_experts + r.num_null_experts)
    if m.variant.kind == "cartesian":
        return 2 * m.top_k
    return float(m.top_k)


def moe_flops(model: ModelConfig, active_experts: float | None = None) -> float:
    """Forward FLOPs per token of one MoE layer: 2 x (active experts x 3DF + routers + HyperMoE
    adapter). ``active_experts`` overrides the nominal count (e.g. the measured one)."""
    a = nominal_active_experts(model) if active_experts is None else active_experts
    extra = hyper_adapter_macs(model) if model.moe.variant.kind == "hyper" else 0
    return 2.0 * (a * expert_macs(model) + router_macs(model) + extra)


def hyper_matched_dims(model: ModelConfig) -> tuple[int, int]:
    """(generator width, adapter dim r) of a HyperMoE whose adapter costs at most one expert:
    width ``HYPER_WIDTH`` and the largest r >= 1 within 3 D F multiply-adds."""
    def cost(r):
        v = dataclasses.replace(model.moe.variant, kind="hyper", hyper_embed_dim=HYPER_WIDTH,
                                hyper_bottleneck=HYPER_WIDTH, hyper_adapter_dim=r)
        return hyper_adapter_macs(dataclasses.replace(
            model, moe=dataclasses.replace(model.moe, variant=v)))
    r = 1
    while cost(r + 1) <= expert_macs(model):
        r += 1
    return HYPER_WIDTH, r


def arms_for(preset: str) -> dict[str, tuple[str, ...]]:
    """Every arm of ``preset`` (each with a '-s2' replica on the second seed); the matched sizes
    depend on the preset's E, k and widths (module docstring)."""
    model = PRESETS[preset].model
    m, k, E = model.moe, model.moe.top_k, model.moe.num_experts
    r, v = "model.moe.router", "model.moe.variant"
    rmoe = (f"{r}.recurrent=gru", f"{r}.recurrent_dim={RMOE_DIM.get(preset, 256)}")
    width, adapter = hyper_matched_dims(model)
    base = {
        "topk": (),
        "rmoe": rmoe,
        "rmoe_reset": (*rmoe, f"{r}.recurrent_reset=True"),
        "rmoe_normal": (*rmoe, f"{r}.recurrent_init=normal"),
        "topp": (f"{r}.kind=topp", f"{r}.top_p=0.4", f"{r}.max_experts_per_token=0"),
        "null_experts": (f"{r}.num_null_experts={E // k}", f"model.moe.top_k={k + 1}"),
        "maskmoe": (f"{r}.token_mask=maskmoe",),
        "expert_choice": (f"{r}.kind=expert_choice", f"{r}.expert_choice_capacity=1.0"),
        "moge": (f"{r}.group_mode=moge", f"{r}.num_groups=2"),
        "coe": (f"{v}.kind=coe", f"{v}.coe_iterations=2", f"model.moe.num_experts={2 * E}",
                f"model.moe.d_expert={m.d_expert // 2}", f"model.moe.top_k={2 * k}"),
        "cartesian": (f"{v}.kind=cartesian", f"model.moe.d_expert={m.d_expert // 2}"),
        "hyper": (f"{v}.kind=hyper", f"model.moe.top_k={k - 1}", f"{v}.hyper_embed_dim={width}",
                  f"{v}.hyper_bottleneck={width}", f"{v}.hyper_adapter_dim={adapter}"),
    }
    return experiment.with_seed_replicas(base, SEEDS[1])


ARMS: dict[str, tuple[str, ...]] = arms_for("cpu")
base_arm = experiment.base_arm


# -- one arm ----------------------------------------------------------------------------------

def probe_applies(cfg: Config) -> bool:
    """The drop-top-1 probe needs a ranked token-choice top-k router (not MoGE, top-p, EC)."""
    r = cfg.model.moe.router
    return r.kind == "topk" and r.group_mode != "moge"


def drop_top1_loss(trainer: Trainer, state) -> float:
    """Validation loss of ``state`` with every router's top-1 pick dropped (the same parameters
    under ``router.drop_top_experts=1``; the trainer's validation set)."""
    from moejax import train as T

    probe = apply_overrides(trainer.cfg, ["model.moe.router.drop_top_experts=1"])
    saved = trainer.eval_step
    trainer.eval_step = T.make_eval_step(T.setup(probe, trainer.mesh), len(trainer.domains))
    try:
        return float(trainer.evaluate(state)["val/loss"])
    finally:
        trainer.eval_step = saved


def routing_summary(sums: dict, num_experts: int) -> dict:
    """JSON-able routing metrics from ``collect_routing`` sums: per layer router entropy, usage
    entropy (real experts), consecutive-layer MI (None without per-token choices), and the
    active real experts per token by [layer][domain]."""
    counts = np.asarray(sums["domain_counts"])[..., :num_experts]  # [L,D,E]
    tokens = np.asarray(sums["tokens"])  # [D]
    active = counts.sum(-1) / np.maximum(tokens, 1.0)[None, :]  # [L,D]
    return {"router_entropy": np.asarray(sums["entropy"]).tolist(),
            "usage_entropy": usage_entropy(counts.sum(1)).tolist(),
            "layer_mi": (consecutive_layer_mi(sums["cooc"]).tolist() if "cooc" in sums else None),
            "active_by_domain": active.tolist(),
            "active_experts": float(counts.sum() / max(tokens.sum(), 1.0) / counts.shape[0])}


def run_arm(cfg: Config, workdir: str) -> dict:
    """Train one arm (resuming if interrupted), then the routing pass and, for top-k routers,
    the drop-top-1 probe over the validation set; both land in the arm's summary."""
    trainer = Trainer(cfg, workdir)
    summary = trainer.run()
    if summary.get("preempted"):
        return summary
    if trainer._eval_batches is None:
        trainer.evaluate(trainer.state)
    sums = collect_routing(trainer.setup, trainer.state, trainer._eval_batches,
                           len(trainer.domains))
    out = {**summary, "routing": routing_summary(sums, cfg.model.moe.num_experts),
           "moe_flops_nominal": moe_flops(cfg.model)}
    if probe_applies(cfg):
        out["drop_top1_loss"] = drop_top1_loss(trainer, trainer.state)
    return out


# -- report -----------------------------------------------------------------------------------



def _mean_spread(xs, fmt: str = ".3f") -> str:
    """'mean' for one value, 'mean ± half-range' over seeds, '—' when nothing was measured."""
    xs = np.asarray([x for x in xs if x is not None and np.isfinite(x)], np.float64)
    if not len(xs):
        return "—"
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(xs.mean(), fmt)} ± {format(np.ptp(xs) / 2, fmt)}"


def _last(recs: list[dict], prefix: str) -> float:
    """Mean over layers of the last logged values whose key starts with ``prefix``."""
    for r in reversed(recs):
        vals = [v for k, v in r.items() if k.startswith(prefix)]
        if vals:
            return float(np.mean(vals))
    return float("nan")


def arm_row(wd: str) -> dict:
    """One run's report values from its metrics, config and summary."""
    recs = read_metrics(os.path.join(wd, "metrics.jsonl"))
    ev = [r for r in recs if "val/loss" in r][-1]
    train = [r for r in recs if "train/loss" in r]
    summary = read_json(as_path(wd) / experiment.SUMMARY) or {}
    cfg = Config.from_dict(read_json(as_path(wd) / "config.json"))
    routing = summary.get("routing", {})
    active = routing.get("active_experts", float("nan"))
    tokens_micro = cfg.train.batch_size // cfg.train.grad_accum * cfg.data.seq_len
    dropped = _last(train, "moe/dropped/")
    act_train = _last(train, "moe/active_experts/")
    probe = summary.get("drop_top1_loss")
    return {
        "val": ev["val/loss"], **{d: ev.get(f"val/loss/{d}", float("nan")) for d in DOMAINS},
        "active": active, "dropped_share": dropped / max(dropped + act_train * tokens_micro, 1e-9),
        "flops": moe_flops(cfg.model, active) / 1e6 if np.isfinite(active) else float("nan"),
        "probe": None if probe is None else probe - ev["val/loss"],
        "tps": float(np.median([r["perf/tokens_per_s"] for r in train[1:] or train])),
        "router_entropy": float(np.mean(routing["router_entropy"])) if routing else None,
        "usage_entropy": float(np.mean(routing["usage_entropy"])) if routing else None,
        "layer_mi": routing.get("layer_mi"), "active_by_domain": routing.get("active_by_domain"),
    }


MAIN_COLUMNS = (("val loss", "val"), ("code", "code"), ("prose", "prose"), ("math", "math"),
                ("active experts/token", "active"), ("dropped share", "dropped_share"),
                ("MoE MFLOPs/token (fwd)", "flops"), ("drop-top-1 Δloss", "probe"),
                ("tokens/s", "tps"))


def _label(arm: str) -> str:
    return f"{arm} (non-causal†)" if arm in NON_CAUSAL else arm


def main_table(by_arm: dict[str, list[dict]]) -> list[str]:
    """Loss, compute and probe per arm (mean ± half-range over seeds)."""
    rows = ["| arm | seeds | " + " | ".join(c for c, _ in MAIN_COLUMNS) + " |",
            "|---" * (len(MAIN_COLUMNS) + 2) + "|"]
    for arm, runs in by_arm.items():
        cells = [_mean_spread([r[key] for r in runs], ",.0f" if key == "tps" else ".3f")
                 for _, key in MAIN_COLUMNS]
        rows.append(f"| {_label(arm)} | {len(runs)} | " + " | ".join(cells) + " |")
    return rows


def layer_table(by_arm: dict[str, list[dict]]) -> list[str]:
    """RMoE's cross-layer metrics: router and usage entropy (means over layers) and the MI between
    each pair of consecutive MoE layers' choices."""
    pairs = max((len(r["layer_mi"]) for runs in by_arm.values() for r in runs if r["layer_mi"]),
                default=0)
    rows = ["| arm | router entropy | usage entropy | " + " | ".join(
        f"MI(l{i}; l{i + 1})" for i in range(pairs)) + " | mean MI |",
        "|---" * (pairs + 4) + "|"]
    for arm, runs in by_arm.items():
        mi = [r["layer_mi"] for r in runs if r["layer_mi"]]
        cells = [_mean_spread([r["router_entropy"] for r in runs]),
                 _mean_spread([r["usage_entropy"] for r in runs])]
        cells += [_mean_spread([m[i] for m in mi]) for i in range(pairs)]
        cells.append(_mean_spread([float(np.mean(m)) for m in mi]))
        rows.append(f"| {_label(arm)} | " + " | ".join(cells) + " |")
    return rows


def active_table(by_arm: dict[str, list[dict]]) -> list[str]:
    """Active real experts per token by domain and MoE layer for the token-adaptive arms."""
    layers = max((len(r["active_by_domain"]) for runs in by_arm.values() for r in runs
                  if r["active_by_domain"]), default=0)
    rows = ["| arm | domain | " + " | ".join(f"layer {i}" for i in range(layers)) + " |",
            "|---" * (layers + 2) + "|"]
    for arm, runs in by_arm.items():
        got = [np.asarray(r["active_by_domain"]) for r in runs if r["active_by_domain"]]
        if arm not in ADAPTIVE or not got:
            continue
        for d, dom in enumerate(DOMAINS[:got[0].shape[1]]):
            rows.append(f"| {_label(arm)} | {dom} | " + " | ".join(
                _mean_spread([g[l, d] for g in got], ".2f") for l in range(layers)) + " |")
    return rows if len(rows) > 2 else ["(no token-adaptive arm ran)"]


def report(workdirs: dict[str, str], out_dir: str) -> str:
    by_arm: dict[str, list[dict]] = {}
    for run, wd in workdirs.items():
        by_arm.setdefault(base_arm(run), []).append(arm_row(wd))
    curves = plot_curves(workdirs, ["train/loss", "val/loss"],
                         os.path.join(out_dir, "plots", "loss.png"), title="routers: loss")
    text = "\n".join([
        "# Router catalog at matched active compute", "",
        "Final evaluation, mean ± half the range over seeds (train.seed; same data). Active "
        "experts/token: real experts per non-padding validation token, mean over MoE layers "
        "(CartesianMoE counts both sub-layers' half-width experts; CoE both iterations). MoE "
        "MFLOPs/token: forward FLOPs of one MoE layer at that measured count (experts, routers, "
        "RMoE cell, HyperMoE generator). Dropped share: selections lost to a cap on the last "
        "logged training step (top-p runs without a slot cap). Drop-top-1 Δloss: validation "
        "loss with every top-k router's best pick removed, minus the plain loss "
        "(CartesianMoE's robustness probe; '—' where routing is not ranked top-k).", "",
        *main_table(by_arm), "",
        "† expert choice is non-causal: each expert picks its tokens among the whole batch, "
        "future tokens included, so its loss is not comparable with the other arms.", "",
        "## Cross-layer routing (RMoE, spec 4.3)", "",
        "Router entropy: mean per-token -Σ p log p; usage entropy: entropy of each layer's expert "
        "shares (log E = uniform); MI(l; l+1): mutual information (nats) between consecutive MoE "
        "layers' expert choices, each token counting every (layer-l pick, layer-l+1 pick) pair. "
        "'—': the arm has no per-token top-k choices.", "",
        *layer_table(by_arm), "",
        "## Active experts per domain and layer (token-adaptive arms)", "",
        *active_table(by_arm), "",
        f"![loss](plots/{os.path.basename(curves)})", ""])
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
