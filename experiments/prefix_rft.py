"""Prefix-RFT vs SFT, RFT and SFT->RFT on verifiable arithmetic (methods/rl-and-data.md B.1,
issue #14).

Every arm starts from the same SFT warm start as ``experiments.grpo`` (demonstrations of the task
family, trained once per model in ``workdir/_sft-<hash>``):

    sft_only    the SFT start evaluated; no RL (one evaluation, the baseline of every column)
    rft         GRPO for ``train.steps`` RL steps (``experiments.grpo``'s grpo arm)
    sft_rft     more SFT, then GRPO, at matched optimizer steps: half the RL steps are traded for
                SFT steps, rl.sft.steps = S + (R - R//2) x mini_batches and train.steps = R//2, so
                S + R x mini_batches optimizer updates in all, as rft (it sees half the rollouts)
    prefix_rft  rl.prefix with the spec's defaults (2 variants per prompt, one on-policy, one with a
                demonstration prefix; low 0.05, high cosine 0.95 -> 0.05 over the run; top-20%
                entropy prefix tokens kept), Dr.GRPO advantages and the dr_grpo loss aggregation
                in verl's form (sum / L_max, no 1/N; the released recipe's). prompts_per_step is
                halved so each step has the same P x G rollouts as rft

Report: pass@1 per tier at the start -> end, the in-distribution and OOD means, the policy entropy,
the prefix-token share over training (plot, with the ratio schedule) and the optimizer steps.

Smallest preset that shows each direction: ``cpu`` (the spec's (a) needs items the SFT start
rarely solves: prefix groups have reward variance from step 0 where GRPO groups are all 0;
``cpu-smoke`` only checks the wiring: its 16-token prompt bucket leaves 5 prefix tokens; CI
runs its sft_only and prefix_rft arms, the two runner paths, rft and sft_rft being grpo's).
The cpu preset: 19.1 min wall for the four arms and the report, measured 2026-12-01 (clean
checkout, 2 cores); there Prefix-RFT did not beat RFT (in distribution 6.9 vs 8.8 %, every arm 0
OOD) while SFT->RFT reached 27.4 %: the 300-step SFT stage is under-trained for this comparison.
``gpu``/``tpu-v5p-8`` add 4-digit items (OOD 5 digits) with 80 new tokens; the paper's scale is a
1.5-7B reasoning model on OpenR1-Math-46k with 8k-token responses, i.e. ``--source`` with an
imported model and ``--set rl.task_file=...`` on a v5p-64 or larger.

Command:
    python -m experiments.prefix_rft --preset cpu --workdir runs/prefix_rft
    python -m moejax.aot --experiment prefix_rft --preset tpu-v5p-8 --arms prefix_rft
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np

from experiments import grpo
from moejax import experiment
from moejax.analysis.plots import plot_curves
from moejax.metrics import read_metrics
from moejax.paths import as_path, read_json
from moejax.rl import tasks as tasks_lib
from moejax.rl.config import RLRunConfig
from moejax.rl.tasks import TaskConfig

HARD_TASKS = TaskConfig(families=("add", "sub"), digits=(2, 3, 4))  # OOD: 5 digits
EVAL_ONLY = ("sft_only",)  # arms that evaluate the SFT start and run no RL step


def _bucket(cfg: RLRunConfig, prompt_len: int, new_tokens: int,
            task_cfg: TaskConfig) -> RLRunConfig:
    """``cfg`` with a prompt bucket that holds prompt + prefix and room for the OOD answer."""
    rollout = dataclasses.replace(cfg.rl.rollout, max_prompt_len=prompt_len,
                                  max_new_tokens=new_tokens)
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, max_seq_len=prompt_len + new_tokens),
        data=dataclasses.replace(cfg.data, seq_len=prompt_len + new_tokens - 1),
        rl=dataclasses.replace(cfg.rl, rollout=rollout, tasks=task_cfg))


# cpu-smoke is grpo's (the same shapes, so CI shares its compiled programs)
PRESETS: dict[str, RLRunConfig] = {
    "cpu-smoke": grpo.PRESETS["cpu-smoke"],
    "cpu": _bucket(grpo.PRESETS["cpu"], 48, 64, grpo.TASKS),
    "gpu": _bucket(grpo.PRESETS["gpu"], 64, 80, HARD_TASKS),
    "tpu-v5p-8": _bucket(grpo.PRESETS["tpu-v5p-8"], 64, 80, HARD_TASKS),
}


def arms_for(cfg: RLRunConfig) -> dict[str, tuple[str, ...]]:
    """The arms' overrides for one preset (sft_rft's step trade and prefix_rft's prompt count
    depend on its RL steps, mini-batches and prompts per step)."""
    rl, steps = cfg.rl, cfg.train.steps
    rl_half = max(steps // 2, 1)
    extra_sft = (steps - rl_half) * rl.mini_batches
    variants = 2  # the spec's num_prefix: one on-policy, one prefixed variant per prompt
    return {
        "sft_only": grpo.GRPO,
        "rft": grpo.GRPO,
        "sft_rft": grpo.GRPO + (f"rl.sft.steps={rl.sft.steps + extra_sft}",
                                f"train.steps={rl_half}"),
        "prefix_rft": ("rl.prefix.enabled=true", f"rl.prefix.num_prefix={variants}",
                       f"rl.prompts_per_step={max(rl.prompts_per_step // variants, 1)}",
                       f"rl.prefix.high.n_steps={steps}", "rl.advantage.estimator=dr_grpo",
                       "rl.loss.agg=dr_grpo", "rl.loss.dr_grpo_form=verl"),
    }


ARMS = arms_for(PRESETS["cpu"])  # the default preset's table (main uses the chosen preset's)


def aot_experiment() -> tuple[dict, dict]:
    """(presets, arms) for ``moejax.aot``: the tpu preset's arm table (shapes are the same for
    every preset's table; only sft_rft's step counts differ)."""
    return PRESETS, arms_for(PRESETS["tpu-v5p-8"])


def evaluate_start(cfg: RLRunConfig, workdir: str) -> dict:
    """The sft_only arm: the shared SFT stage, then one evaluation of its result (step 0)."""
    from moejax.metrics import MetricsLogger
    from moejax.rl import sft as sft_lib
    from moejax.rl.run_inputs import load_file_items, rl_tokenizer
    from moejax.rl.trainer import RLTrainer, latest_policy_state
    from moejax.trainer import write_or_check_config

    start_dir = grpo.sft_dir(cfg, os.fspath(as_path(workdir).parent))
    sft_lib.run_sft(cfg, start_dir, rl_tokenizer(cfg), file_items=load_file_items(cfg))
    trainer = RLTrainer(cfg, workdir, init_state_fn=lambda s: latest_policy_state(s, start_dir))
    write_or_check_config(cfg, trainer.workdir)
    first = trainer.evaluate(trainer._initial_state())
    logger = MetricsLogger(trainer.workdir)
    logger.log(0, first)
    logger.close()
    return {"step": 0, "prompts_seen": 0, "preempted": False, "initial": first, **first}


def run_arm(cfg: RLRunConfig, workdir: str) -> dict:
    """grpo's arm runner (SFT start, then RL), or the evaluation of the SFT start alone."""
    if as_path(workdir).name in EVAL_ONLY:
        return evaluate_start(cfg, workdir)
    return grpo.make_run_arm(None)(cfg, workdir)


# -- report --------------------------------------------------------------------------------------

def _metrics(workdir: str) -> list[dict]:
    path = as_path(workdir) / "metrics.jsonl"
    return read_metrics(path) if path.exists() else []


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}"


def arm_row(arm: str, workdir: str, ood: set[str]) -> tuple[str, list[str]] | None:
    """One report row: pass@1 in/out of distribution (start -> end), per tier at the end, the
    entropy and prefix-token share (means over training), or None before any evaluation."""
    recs = _metrics(workdir)
    evals = [r for r in recs if "rl/eval_items" in r]
    if not evals:
        return None
    first, last = evals[0], evals[-1]
    tiers = sorted(k[len("rl/pass@1/"):] for k in first if k.startswith("rl/pass@1/"))
    ind = [t for t in tiers if t not in ood]
    out = [t for t in tiers if t in ood]

    def pair(tier_list):
        a = _mean([first.get(f"rl/pass@1/{t}") for t in tier_list])
        b = _mean([last.get(f"rl/pass@1/{t}") for t in tier_list])
        return f"{_pct(a)} → {_pct(b)}"
    train = [r for r in recs if "rl/reward" in r]
    entropy = _mean([r.get("rl/entropy") for r in train])
    share = _mean([r.get("prefix/token_share") for r in train]) if train else float("nan")
    cells = [pair(ind), pair(out), *(_pct(last.get(f"rl/pass@1/{t}", float("nan")))
                                     for t in tiers),
             "n/a" if entropy != entropy else f"{entropy:.3f}",
             "n/a" if share != share else f"{100 * share:.1f}", str(len(train))]
    return f"| {arm} | " + " | ".join(cells) + " |", tiers


def ood_tier_names(workdir: str) -> set[str]:
    """The OOD tiers of the run in ``workdir`` (from its config.json's ``rl.tasks``)."""
    saved = (read_json(as_path(workdir) / "config.json") or {}).get("rl", {}).get("tasks")
    if not saved:
        return set()
    task_cfg = TaskConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    return {t.name for t in tasks_lib.ood_tiers(task_cfg)}


def report(workdirs: dict[str, str], out_dir: str) -> str:
    rows, tiers = [], []
    for arm, wd in workdirs.items():
        made = arm_row(arm, wd, ood_tier_names(wd))
        if made is not None:
            rows.append(made[0])
            tiers = tiers or made[1]
    header = ("| arm | pass@1 % in-dist. | pass@1 % OOD | " + " | ".join(
        f"{t} (end)" for t in tiers) + " | entropy | prefix-token share % | RL steps |")
    plots = os.path.join(out_dir, "plots")
    curves = plot_curves(workdirs, ["rl/reward", "rl/entropy", "prefix/token_share",
                                    "prefix/ratio_high", "prefix/ratio_mean"],
                         os.path.join(plots, "prefix_rft_curves.png"), title="Prefix-RFT")
    text = "\n".join([
        "# Prefix-RFT vs SFT, RFT and SFT→RFT on verifiable arithmetic", "",
        "pass@1 (unbiased, `rl.eval_samples` samples per held-out item) averaged over the "
        "in-distribution and the OOD tiers, at the arm's start → its end (sft_only: the SFT "
        "start; sft_rft starts after its longer SFT), then per tier at the end. Entropy and the "
        "prefix-token share (prefix tokens / response tokens, the paper's off_ratio) are means "
        "over the RL steps. Direction to check (paper): Prefix-RFT ≥ the better of sft_only and "
        "rft on OOD pass@1.", "",
        header, "|---" * (len(tiers) + 6) + "|", *rows, "",
        f"![curves](plots/{os.path.basename(curves)})", ""])
    return experiment.write_report(out_dir, text)


def budget(configs, workdirs) -> str:
    """grpo's budget table (its completions are prompts x G, without Prefix-RFT's variants),
    plus each arm's rollouts and optimizer updates (SFT + RL): the matching of the arms."""
    lines = [grpo.budget(configs, workdirs),
             "| arm | rollouts (all variants) | SFT steps | RL optimizer steps | total steps |",
             "|---|---|---|---|---|"]
    for arm, cfg in configs.items():
        steps = 0 if arm in EVAL_ONLY else cfg.train.steps
        rl_updates = steps * cfg.rl.updates_per_step
        lines.append(f"| {arm} | {steps * cfg.rl.rows_per_step:,} | {cfg.rl.sft.steps:,} | "
                     f"{rl_updates:,} | {cfg.rl.sft.steps + rl_updates:,} |")
    return "\n".join(lines + [""])


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    arms = experiment.preset_arms(argv, PRESETS, arms_for, ARMS)
    return experiment.main(description=__doc__, presets=PRESETS, arms=arms, run_arm=run_arm,
                           report=report, argv=argv, budget=budget)


if __name__ == "__main__":
    main()
