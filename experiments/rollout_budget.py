"""Rollout budget and curriculum at matched rollout tokens: fixed G vs Knapsack RL vs SEC
curriculum vs online difficulty filtering (methods/rl-and-data.md B.4, issue #14 item 4).

Every arm starts from ``experiments.grpo``'s SFT warm start (trained once per model in
``workdir/_sft-<hash>``) and runs GRPO on the same prompts: ``rl.prompt_pool`` cycles the first N
items of the RL stream (the paper's multi-epoch setting: prompts come back, so the per-prompt
success buffer has estimates from the second visit on):

    fixed_g        GRPO, num_generations = G rollouts for every prompt
    knapsack       rl.budget.allocation=knapsack: the same P x G rollouts per step spread over the
                   prompts by v(N, p) = (1 - p^N - (1-p)^N) p (1-p)^2 from the success buffer
                   (min 2, prompts without an estimate get G; surplus to p = 0 prompts)
    curriculum     rl.budget.curriculum: SEC's Q-table over task families (mean |A| reward,
                   Boltzmann draws), P x G rollouts per step
    online_filter  rl.budget.filter=online (ODF): groups with success rate outside [0.25, 0.75]
                   are dropped and refilled (up to rl.max_refills extra draws): more rollouts per
                   step, which the token matching below accounts for

Matching: fixed_g, knapsack and curriculum sample exactly prompts_per_step x num_generations
rollouts per step (equal prompts x G); their token counts differ only by response lengths.
The loop logs ``rl/rollout_tokens`` (every sampled completion token of the step, refills
included); the report stops each arm at the same cumulative count T* = the smallest arm's total:
its pass@1 is read at T*, linearly between the last evaluation whose cumulative rollout tokens
are <= T* (``matched_eval_step``) and the next (``score_at_tokens``). It also gives the tokens each arm needed to first reach fixed_g's final
in-distribution pass@1 (the paper's claim: Knapsack needs fewer).

Report: pass@1 in/out of distribution at the start -> at T* -> at the end, a pass@1 vs rollout
tokens plot, the effective-gradient ratio (share of groups with reward variance, as the loop
logs it) and the effective-rollout share (share of rollouts in groups with a non-zero
advantage, ``rollout_stats.jsonl``), tokens sampled / trained and the data budget (prompts,
distinct prompts, passes).

Presets: cpu-smoke (grpo's, pool = one step's prompts: checks the wiring only); cpu (grpo's cpu
model and SFT, a pool of 64 prompts = 4 steps per epoch, 40 steps, an evaluation every 10 steps:
11.4 min wall for the four arms and the report, measured 2026-12-01 (clean checkout, 2 cores);
there Knapsack reached fixed G's final pass@1 with 34 % fewer rollout tokens, one seed); gpu /
tpu-v5p-8 (grpo's, pools of 1024 / 2048). ``python -m moejax.aot --experiment rollout_budget
--preset tpu-v5p-8 --arms knapsack`` compiles the Knapsack step (its rollout is one G=1 generation
over the P x G repeated prompts). Paper scale: Qwen2.5-Math-7B on DAPO-Math-17k with n̄ = 8 and
budgets up to 128 per prompt (``--source`` and ``--set rl.task_file=...`` on a v5p-64 or larger).

Command:
    python -m experiments.rollout_budget --preset cpu --workdir runs/rollout_budget
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import numpy as np

from experiments import grpo, prefix_rft
from moejax import experiment
from moejax.config import ConfigError
from moejax.metrics import read_metrics
from moejax.paths import as_path, write_text_atomic
from moejax.rl import tasks as tasks_lib
from moejax.rl.config import RLRunConfig

STEP_LOG = "rollout_stats.jsonl"


def _pooled(cfg: RLRunConfig, *, pool: int, eval_every: int, eval_items: int | None = None,
            max_refills: int | None = None) -> RLRunConfig:
    """grpo's preset on a prompt pool of ``pool`` items, the success buffer counting a prompt's
    estimate after one visit (buffer_min_count = G), Knapsack's mean allocation n̄ = G (used by
    the knapsack arm only), evaluations every ``eval_every`` steps."""
    rl = cfg.rl
    G = rl.num_generations
    budget = dataclasses.replace(rl.budget, buffer_min_count=G, buffer_window=max(16, G),
                                 knapsack=dataclasses.replace(rl.budget.knapsack, mean_n=G))
    rl = dataclasses.replace(rl, prompt_pool=pool, eval_every=eval_every, budget=budget,
                             eval_items_per_tier=eval_items or rl.eval_items_per_tier,
                             max_refills=rl.max_refills if max_refills is None else max_refills)
    return dataclasses.replace(cfg, rl=rl)


# cpu-smoke is grpo's shape and SFT (its compiled programs and SFT stage are shared)
PRESETS: dict[str, RLRunConfig] = {
    "cpu-smoke": _pooled(grpo.PRESETS["cpu-smoke"], pool=4, eval_every=3, max_refills=1),
    "cpu": _pooled(grpo.PRESETS["cpu"], pool=64, eval_every=10, eval_items=64),
    "gpu": _pooled(grpo.PRESETS["gpu"], pool=1024, eval_every=50),
    "tpu-v5p-8": _pooled(grpo.PRESETS["tpu-v5p-8"], pool=2048, eval_every=50),
}


ARMS: dict[str, tuple[str, ...]] = {
    "fixed_g": grpo.GRPO,
    "knapsack": grpo.GRPO + ("rl.budget.allocation=knapsack",),
    "curriculum": grpo.GRPO + ("rl.budget.curriculum=true",),
    "online_filter": grpo.GRPO + ("rl.budget.filter=online",),
}


# -- running an arm ------------------------------------------------------------------------------


class StepLog:
    """``rollout_stats.jsonl`` of a run: per RL step, the trained rollouts, those in groups with a
    non-zero advantage, and per task family the prompts (split keys), rollouts and completion
    tokens. Kept by step (a resumed run rewrites the steps it repeats, identically)."""

    def __init__(self, workdir: str):
        self.path = as_path(workdir) / STEP_LOG
        self.records = {r["step"]: r for r in read_step_log(workdir)}

    def __call__(self, trainer, step: int, batch: dict) -> None:
        if jax.process_index() != 0:
            return
        self.records[step + 1] = {"step": step + 1, **step_stats(batch["rollouts"],
                                                                 batch["advantages"])}
        text = "".join(json.dumps(self.records[s]) + "\n" for s in sorted(self.records))
        write_text_atomic(self.path, text)


def read_step_log(workdir: str) -> list[dict]:
    path = as_path(workdir) / STEP_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_stats(r, advantages: np.ndarray) -> dict:
    """One step's rollouts -> {rollouts, effective_rollouts, families: {f: {prompts, rollouts,
    tokens}}}: a rollout is effective when its group (prompt) has some non-zero advantage."""
    group = np.asarray(r.group)
    adv = np.abs(np.asarray(advantages, np.float64)).reshape(len(group), -1).max(axis=1)
    live = np.zeros(int(group.max()) + 1, bool)
    np.logical_or.at(live, group, adv > 0)
    families: dict[str, dict] = {}
    first = {}
    for row, (g, item) in enumerate(zip(group.tolist(), r.items)):
        fam = families.setdefault(item.family, {"prompts": [], "rollouts": 0, "tokens": 0})
        fam["rollouts"] += 1
        fam["tokens"] += int(r.completion_lengths[row])
        if g not in first:
            first[g] = row
            fam["prompts"].append(tasks_lib.split_key(item))
    return {"rollouts": len(group), "effective_rollouts": int(live[group].sum()),
            "families": families}


def run_from_sft(cfg: RLRunConfig, workdir: str, sft_root: str) -> dict:
    """The shared SFT stage (in ``sft_root``), then RL in ``workdir`` logging ``StepLog``."""
    from moejax.rl import sft as sft_lib
    from moejax.rl.run_inputs import load_file_items, rl_tokenizer
    from moejax.rl.trainer import RLTrainer, latest_policy_state

    if cfg.train.log_every != 1:
        raise ConfigError(f"train.log_every={cfg.train.log_every}: the token matching reads "
                          "every step's rl/rollout_tokens; set it to 1")
    start_dir = grpo.sft_dir(cfg, sft_root)
    sft_lib.run_sft(cfg, start_dir, rl_tokenizer(cfg), file_items=load_file_items(cfg))
    return RLTrainer(cfg, workdir, init_state_fn=lambda s: latest_policy_state(s, start_dir),
                     on_batch=StepLog(workdir)).run()


def run_arm(cfg: RLRunConfig, workdir: str) -> dict:
    return run_from_sft(cfg, workdir, os.fspath(as_path(workdir).parent))


# -- token matching ------------------------------------------------------------------------------


def cumulative_tokens(step_tokens: dict[int, int]) -> dict[int, int]:
    """{step: rollout tokens of that step} for steps 1..S -> {step: tokens up to it}, step 0: 0.
    A missing step is an error (the count would be short)."""
    steps = sorted(step_tokens)
    if steps != list(range(1, len(steps) + 1)):
        raise ValueError(f"rollout tokens logged at steps {steps[:5]}...: need every step 1..S")
    out, total = {0: 0}, 0
    for s in steps:
        total += int(step_tokens[s])
        out[s] = total
    return out


def matched_eval_step(eval_steps, cumulative: dict[int, int], budget: int) -> int:
    """The arm stopped at ``budget`` rollout tokens: its last evaluated step whose cumulative
    tokens are <= budget (step 0, before any rollout, always qualifies)."""
    return max(s for s in [0, *eval_steps] if cumulative.get(s, math.inf) <= budget)


def score_at_tokens(points: list[tuple[int, float]], budget: int) -> float:
    """A score read at ``budget`` cumulative tokens from evaluations (tokens, score): linear
    between the last evaluation within the budget and the next one (the last evaluation when
    the budget is beyond it), so arms whose totals differ slightly are not sent back a whole
    evaluation interval."""
    pts = sorted(points)
    before = [p for p in pts if p[0] <= budget][-1]
    after = [p for p in pts if p[0] > budget]
    if not after:
        return before[1]
    (t0, s0), (t1, s1) = before, after[0]
    return s0 + (s1 - s0) * (budget - t0) / (t1 - t0)


def first_reaching(evals: list[tuple[int, float]], cumulative: dict[int, int],
                   target: float) -> int | None:
    """Cumulative rollout tokens at the first evaluation (step, score) with score >= target."""
    for step, score in sorted(evals):
        if score >= target:
            return cumulative[step]
    return None


# -- report --------------------------------------------------------------------------------------


def _metrics(workdir: str) -> list[dict]:
    path = as_path(workdir) / "metrics.jsonl"
    return read_metrics(path) if path.exists() else []


def arm_curve(workdir: str) -> dict | None:
    """An arm's evaluations against cumulative rollout tokens, or None before any RL step."""
    recs = _metrics(workdir)
    train = {r["step"]: r for r in recs if "rl/rollout_tokens" in r}
    evals = [r for r in recs if "rl/eval_items" in r]
    if not train or not evals:
        return None
    cum = cumulative_tokens({s: r["rl/rollout_tokens"] for s, r in train.items()})
    ood = prefix_rft.ood_tier_names(workdir)
    points = []
    for r in evals:
        tiers = [k[len("rl/pass@1/"):] for k in r if k.startswith("rl/pass@1/")]
        points.append({"step": r["step"], "tokens": cum[r["step"]],
                       "ind": prefix_rft._mean([r[f"rl/pass@1/{t}"] for t in tiers
                                                if t not in ood]),
                       "ood": prefix_rft._mean([r[f"rl/pass@1/{t}"] for t in tiers if t in ood])})
    stats = read_step_log(workdir)
    return {"cum": cum, "points": points, "train": train, "stats": stats}


def _plot(curves: dict[str, dict], out_png: str) -> str:
    from moejax.analysis.plots import _save_png, plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in zip(axes, ("ind", "ood"), ("in-distribution", "OOD")):
        for arm, c in curves.items():
            pts = c["points"]
            ax.plot([p["tokens"] for p in pts], [100 * p[key] for p in pts], marker="o", label=arm)
        ax.set_xlabel("cumulative rollout tokens")
        ax.set_ylabel(f"pass@1 % ({title})")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    return _save_png(fig, out_png)


def _row(arm: str, c: dict, budget: int, target: float | None) -> str:
    pts = {p["step"]: p for p in c["points"]}
    at = pts[matched_eval_step(list(pts), c["cum"], budget)]
    first, last = c["points"][0], c["points"][-1]
    pct = prefix_rft._pct
    at_t = {k: score_at_tokens([(p["tokens"], p[k]) for p in c["points"]], budget)
            for k in ("ind", "ood")}
    eff = [r["rl/effective_gradient_ratio"] for r in c["train"].values()]
    share = [s["effective_rollouts"] / s["rollouts"] for s in c["stats"] if s["rollouts"]]
    reach = None if target is None else first_reaching(
        [(p["step"], p["ind"]) for p in c["points"]], c["cum"], target)
    cells = [f"{pct(first['ind'])} → {pct(at_t['ind'])} → {pct(last['ind'])}",
             f"{pct(first['ood'])} → {pct(at_t['ood'])} → {pct(last['ood'])}",
             f"{at['step']} ({at['tokens']:,})", f"{max(c['cum'].values()):,}",
             "not reached" if reach is None else f"{reach:,}",
             f"{np.mean(eff):.3f}", f"{np.mean(share):.3f}" if share else "n/a"]
    return f"| {arm} | " + " | ".join(cells) + " |"


def report(workdirs: dict[str, str], out_dir: str) -> str:
    curves = {a: c for a, wd in workdirs.items() if (c := arm_curve(wd)) is not None}
    budget = min(max(c["cum"].values()) for c in curves.values()) if curves else 0
    target = (curves["fixed_g"]["points"][-1]["ind"] if "fixed_g" in curves else None)
    rows = [_row(a, c, budget, target) for a, c in curves.items()]
    plot = _plot(curves, os.path.join(out_dir, "plots", "pass_vs_tokens.png"))
    text = "\n".join([
        "# Rollout budget: fixed G vs Knapsack vs SEC curriculum vs online filtering", "",
        f"Matched rollout tokens: T* = {budget:,} (the smallest arm's total sampled completion "
        "tokens). pass@1 (unbiased, `rl.eval_samples` samples per held-out item; mean over the "
        "in-distribution / OOD tiers) at the start → at T* (linear between the last evaluation "
        "within T*, whose step is given, and the next) → at the end. 'tokens to fixed_g' = cumulative rollout tokens at the first evaluation reaching "
        "fixed_g's final in-distribution pass@1. Effective-gradient ratio: share of groups with "
        "reward variance (mean over steps); effective-rollout share: share of trained rollouts "
        "in groups with a non-zero advantage.", "",
        "| arm | pass@1 % in-dist. | pass@1 % OOD | last eval within T*: step (tokens) | "
        "rollout tokens | "
        "tokens to fixed_g | eff. grad ratio | eff. rollout share |",
        "|---" * 8 + "|", *rows, "",
        f"![pass@1 vs rollout tokens](plots/{os.path.basename(plot)})", "",
        "### pass@1 vs cumulative rollout tokens (every evaluation)", "",
        "| arm | step | rollout tokens | pass@1 % in-dist. | pass@1 % OOD |", "|---" * 5 + "|",
        *(f"| {a} | {p['step']} | {p['tokens']:,} | {prefix_rft._pct(p['ind'])} | "
          f"{prefix_rft._pct(p['ood'])} |" for a, c in curves.items() for p in c["points"]),
        ""])
    return experiment.write_report(out_dir, text)


def budget(configs, workdirs) -> str:
    """Per arm: RL steps, prompts drawn, distinct prompts and passes over them, rollouts and
    rollout tokens sampled (refills included) and trained, and the SFT rows."""
    lines = ["", "## Data budget", "",
             "| arm | RL steps | prompts | distinct | passes | rollouts sampled | rollout tokens "
             "sampled | rollout tokens trained | SFT demonstration rows |",
             "|---" * 9 + "|"]
    for arm, cfg in configs.items():
        recs = [r for r in _metrics(workdirs[arm]) if "rl/rollouts" in r]
        stats = read_step_log(workdirs[arm])
        keys = [k for s in stats for f in s["families"].values() for k in f["prompts"]]
        trained = sum(f["tokens"] for s in stats for f in s["families"].values())
        passes = len(keys) / max(len(set(keys)), 1)
        lines.append(f"| {arm} | {len(recs)} | {len(keys):,} | {len(set(keys)):,} | "
                     f"{passes:.1f} | {sum(r['rl/rollouts'] for r in recs):,} | "
                     f"{sum(r['rl/rollout_tokens'] for r in recs):,} | {trained:,} | "
                     f"{cfg.rl.sft.steps * cfg.rl.sft.batch_size:,} |")
    return "\n".join(lines + [""])


def main(argv=None):
    return experiment.main(description=__doc__, presets=PRESETS, arms=ARMS, run_arm=run_arm,
                           report=report, argv=argv, budget=budget)


if __name__ == "__main__":
    main()
