"""RL data mixing over task families: MoDoMoDo's chosen mixture vs the uniform one
(methods/rl-and-data.md C.1, issue #14 item 5).

Every run starts from ``experiments.grpo``'s SFT warm start (``workdir/_sft-<hash>``; the mixture
only changes the RL prompts, ``rl.family_weights``) and runs GRPO:

    uniform    equal family weights
    modomodo   before the arms: pilot RL runs of ``pilot_steps`` steps on Dirichlet mixtures
               around uniform (``moejax.mixing.modomodo``; a resumable sweep in
               ``workdir/_modomodo-<hash>``: a finished pilot is reused only when its whole run
               config matches), each scored by its final pass@1 (mean over every eval tier,
               in-distribution and OOD); the linear and the quadratic surrogate of the score in
               the weights (Scheffé forms) fitted on ``num_pilots`` pilots and scored (R²,
               Spearman) on ``held_out`` others, then refitted on all; the arm trains on the
               exact argmax of the quadratic one over the simplex (the weights are in its
               config, ``rl.family_weights=...``)

Both arms run ``train.steps`` steps of prompts_per_step x num_generations rollouts (matched
rollouts; the pilots' compute is reported apart). Report: the surrogates' held-out fit, the
pilots, pass@1 per tier at the start -> end for each arm, and per family the prompts, distinct
prompts, passes, rollouts and completion tokens each arm trained on.

Presets: cpu-smoke (grpo's shapes and SFT, families add/sub, 3 + 2 one-step pilots: wiring only);
cpu (families add, sub, multi, sort at 2 digits / 3-4 numbers, 12 + 4 pilots of 10 steps, arms of
40 steps: the smallest run whose quadratic surrogate has more pilots than its 10 coefficients: 18.1
min wall with the report, measured 2026-12-01 (clean checkout, 2 cores); its SFT start is at 1.9 %
pass@1, so the pilots' scores differ by evaluation noise and the surrogates fit noise: a wiring
run, not a test of the claim); gpu / tpu-v5p-8 (2-3 digits, 16 + 4 / 24 + 8 pilots of 100 steps;
tpu-v5p-8 evaluates 512 items per tier to fit HBM). ``python -m moejax.aot --experiment rl_mixture
--preset tpu-v5p-8`` compiles a run's programs (the mixture changes no shape). Paper scale: 5
vision-language RLVR datasets and a 7B model; here a task file per family would be ``rl.task_file``
runs, which ``rl.family_weights`` does not mix.

Command:
    python -m experiments.rl_mixture --preset cpu --workdir runs/rl_mixture
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys

import numpy as np

from experiments import grpo, prefix_rft, rollout_budget
from moejax import experiment
from moejax.mixing import modomodo, regmix
from moejax.metrics import read_metrics
from moejax.mixing.modomodo import ModoConfig
from moejax.paths import as_path, read_json, write_text_atomic
from moejax.rl.config import RLRunConfig
from moejax.rl.tasks import TaskConfig

FIT_FILE = "modomodo.json"  # in the experiment workdir: the sweep's fit and chosen mixture
MIX_TASKS = TaskConfig(families=("add", "sub", "multi", "sort"), digits=(2,),
                       sort_lengths=(3, 4))
BIG_TASKS = TaskConfig(families=("add", "sub", "multi", "sort"), digits=(2, 3),
                       sort_lengths=(3, 4, 5))


def _evals(cfg: RLRunConfig, items: int) -> RLRunConfig:
    """``cfg`` with ``items`` held-out items per tier (9 tiers x items x (1 + eval_samples)
    rollouts per evaluation, and every pilot evaluates twice)."""
    return dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, eval_items_per_tier=items))


# cpu-smoke is grpo's (families add, sub): its compiled programs and SFT stage are shared
PRESETS: dict[str, RLRunConfig] = {
    "cpu-smoke": grpo.PRESETS["cpu-smoke"],
    "cpu": _evals(prefix_rft._bucket(grpo.PRESETS["cpu"], 24, 64, MIX_TASKS), 32),
    "gpu": prefix_rft._bucket(grpo.PRESETS["gpu"], 32, 96, BIG_TASKS),
    # 512 held-out items per tier (grpo's 1024): the eval rollout over every tier needs 100 GiB of
    # temporaries per v5p chip at 1024 (python -m moejax.aot), over the 95 GiB of HBM
    "tpu-v5p-8": _evals(prefix_rft._bucket(grpo.PRESETS["tpu-v5p-8"], 32, 96, BIG_TASKS), 512),
}
MODO: dict[str, ModoConfig] = {
    "cpu-smoke": ModoConfig(num_pilots=3, held_out=2, pilot_steps=1),
    "cpu": ModoConfig(num_pilots=12, held_out=4, pilot_steps=10),
    "gpu": ModoConfig(num_pilots=16, held_out=4, pilot_steps=100),
    "tpu-v5p-8": ModoConfig(num_pilots=24, held_out=8, pilot_steps=100),
}


def weights_override(weights) -> str:
    """``rl.family_weights=...`` with each float's repr (reads back exactly)."""
    return "rl.family_weights=" + ",".join(repr(float(w)) for w in weights)


def arms_for(cfg: RLRunConfig, chosen=None) -> dict[str, tuple[str, ...]]:
    """uniform, and modomodo on ``chosen`` weights (uniform until the pilots chose them: the
    table ``moejax.aot`` compiles, whose shapes do not depend on the weights)."""
    k = len(cfg.rl.tasks.families)
    uniform = [1.0 / k] * k
    return {"uniform": grpo.GRPO + (weights_override(uniform),),
            "modomodo": grpo.GRPO + (weights_override(uniform if chosen is None else chosen),)}


ARMS = arms_for(PRESETS["cpu"])


def aot_experiment() -> tuple[dict, dict]:
    return PRESETS, arms_for(PRESETS["tpu-v5p-8"])


def run_arm(cfg: RLRunConfig, workdir: str) -> dict:
    return rollout_budget.run_from_sft(cfg, workdir, os.fspath(as_path(workdir).parent))


# -- the pilot sweep -----------------------------------------------------------------------------


class PilotInterrupted(RuntimeError):
    """A pilot stopped on a signal (checkpoint saved); rerunning the command resumes it."""


def pilot_config(base: RLRunConfig, weights, steps: int) -> RLRunConfig:
    """``base`` on ``weights`` for ``steps`` RL steps, evaluated only at the start and the end."""
    rl = dataclasses.replace(base.rl, family_weights=tuple(float(w) for w in weights),
                             eval_every=steps)
    train = dataclasses.replace(base.train, steps=steps, ckpt_every=steps, eval_every=steps)
    return dataclasses.replace(base, rl=rl, train=train)


def final_score(workdir: str) -> float:
    """Mean pass@1 over every eval tier at the run's last evaluation (greedy accuracy without
    samples), from its metrics (a finished run restored at its last step logs nothing new)."""
    last = [r for r in read_metrics(as_path(workdir) / "metrics.jsonl") if "rl/eval_items" in r][-1]
    keys = [k for k in last if k.startswith("rl/pass@1/")] or [
        k for k in last if k.startswith("rl/greedy/")]
    return float(np.mean([last[k] for k in keys]))


def sweep_dir(root: str, base: RLRunConfig, modo: ModoConfig) -> str:
    """``root/_modomodo-<hash>`` of the base run config (weights aside) and the sweep fields."""
    key = {"base": json.loads(dataclasses.replace(
        base, rl=dataclasses.replace(base.rl, family_weights=())).to_json()),
        "modo": json.loads(json.dumps(modo.sweep_fields))}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return os.fspath(as_path(root) / f"_modomodo-{digest}")


def run_pilots(base: RLRunConfig, modo: ModoConfig, root: str) -> dict:
    """Run (or reuse) the pilots, fit and score the surrogates, choose the mixture; writes
    ``<sweep>/fit.json`` and ``root/modomodo.json`` and returns the latter's content."""
    families = base.rl.tasks.families
    mixes = modomodo.pilot_mixtures(families, modo)
    where = sweep_dir(root, base, modo)
    configs = {name: json.loads(pilot_config(base, w.values(), modo.pilot_steps).to_json())
               for name, w in mixes.items()}

    def run_one(name: str, _config) -> dict:
        cfg = pilot_config(base, mixes[name].values(), modo.pilot_steps)
        wd = os.fspath(as_path(where) / name)
        summary = rollout_budget.run_from_sft(cfg, wd, root)
        if summary.get("preempted"):
            raise PilotInterrupted(f"pilot {name} stopped at step {summary['step']}")
        return {"score": final_score(wd), "weights": mixes[name]}

    results = regmix.run_sweep(configs, run_one, as_path(where) / "sweep.json")
    names = list(mixes)
    W = np.array([list(mixes[n].values()) for n in names])
    y = np.array([results[n]["score"] for n in names])
    n = modo.num_pilots
    fit = modomodo.fit_report(families, W[:n], y[:n], W[n:], y[n:], modo)
    fit.update({"sweep": where, "config": dataclasses.asdict(modo),
                "pilots": {nm: {"weights": mixes[nm], "score": float(s),
                                "held_out": i >= n} for i, (nm, s) in enumerate(zip(names, y))}})
    text = json.dumps(fit, indent=1, sort_keys=True)
    write_text_atomic(as_path(where) / "fit.json", text)
    write_text_atomic(as_path(root) / FIT_FILE, text)
    return fit


# -- report --------------------------------------------------------------------------------------


def _weights(w: dict) -> str:
    return ", ".join(f"{f} {v:.2f}" for f, v in w.items())


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"


def surrogate_section(fit: dict) -> list[str]:
    lines = ["## Surrogates (MoDoMoDo)", "",
             f"{sum(not p['held_out'] for p in fit['pilots'].values())} pilots fitted, "
             f"{sum(p['held_out'] for p in fit['pilots'].values())} held out; the argmax and "
             "predictions use the fit on all pilots. Chosen: "
             f"{fit['config']['surrogate']} → {_weights(fit['chosen'])}.", "",
             "| surrogate | held-out R² | held-out Spearman | fit R² | argmax over the simplex "
             "| predicted score there | predicted at uniform |", "|---" * 7 + "|"]
    for kind, s in fit["surrogates"].items():
        lines.append(f"| {kind} | {_fmt(s['held_out']['r2'])} | "
                     f"{_fmt(s['held_out']['spearman'])} | {_fmt(s['train_r2'])} | "
                     f"{_weights(s['argmax'])} | {_fmt(s['predicted'])} | "
                     f"{_fmt(s['predicted_uniform'])} |")
    lines += ["", "| pilot | weights | score (mean pass@1) | held out |", "|---|---|---|---|"]
    lines += [f"| {n} | {_weights(p['weights'])} | {100 * p['score']:.1f} | "
              f"{'yes' if p['held_out'] else ''} |" for n, p in fit["pilots"].items()]
    return lines + [""]


def report(workdirs: dict[str, str], out_dir: str) -> str:
    rows, tiers = [], []
    for arm, wd in workdirs.items():
        made = prefix_rft.arm_row(arm, wd, prefix_rft.ood_tier_names(wd))
        if made is not None:
            rows.append(made[0])
            tiers = tiers or made[1]
    fit = read_json(as_path(out_dir) / FIT_FILE)
    text = "\n".join([
        "# RL data mixing over task families: MoDoMoDo vs uniform", "",
        "pass@1 (unbiased, `rl.eval_samples` samples per held-out item) averaged over the "
        "in-distribution and the OOD tiers at the start → the end, then per tier at the end; "
        "entropy is the mean over the RL steps (the prefix column is empty: no Prefix-RFT). "
        "Direction to check (paper): the chosen mixture ≥ uniform; the quadratic surrogate "
        "beats the linear one on held-out pilots.", "",
        "| arm | pass@1 % in-dist. | pass@1 % OOD | " + " | ".join(f"{t} (end)" for t in tiers)
        + " | entropy | prefix-token share % | RL steps |",
        "|---" * (len(tiers) + 6) + "|", *rows, "",
        *(surrogate_section(fit) if fit else ["(no MoDoMoDo fit in this workdir)", ""])])
    return experiment.write_report(out_dir, text)


def budget(configs, workdirs) -> str:
    """Per arm and family: prompts drawn, distinct prompts, passes, rollouts and completion
    tokens trained on; then rollout_budget's per-arm table."""
    lines = ["", "## Data budget per task family", "",
             "| arm | family | weight | prompts | distinct | passes | rollouts | tokens |",
             "|---" * 8 + "|"]
    for arm, cfg in configs.items():
        stats = rollout_budget.read_step_log(workdirs[arm])
        w = cfg.rl.family_weights or (1.0,) * len(cfg.rl.tasks.families)
        for fam, wf in zip(cfg.rl.tasks.families, w):
            rec = [s["families"].get(fam, {}) for s in stats]
            keys = [k for r in rec for k in r.get("prompts", [])]
            lines.append(f"| {arm} | {fam} | {wf / sum(w):.3f} | {len(keys):,} | "
                         f"{len(set(keys)):,} | {len(keys) / max(len(set(keys)), 1):.1f} | "
                         f"{sum(r.get('rollouts', 0) for r in rec):,} | "
                         f"{sum(r.get('tokens', 0) for r in rec):,} |")
    return "\n".join(lines) + "\n" + rollout_budget.budget(configs, workdirs)


def _prepare_arms(argv: list[str]) -> dict | None:
    """The arm table for this command: with the modomodo arm asked for, the pilots run first
    and its weights are the chosen mixture; None when a pilot was interrupted."""
    peek = argparse.ArgumentParser(add_help=False)
    for flag in ("--preset", "--workdir", "--arms"):
        peek.add_argument(flag, default=None)
    peek.add_argument("--set", action="append", default=[])
    peek.add_argument("--debug", action="store_true")
    known, _ = peek.parse_known_args(argv)
    preset = known.preset or "cpu"
    if preset not in PRESETS:
        return ARMS  # experiment.main names the valid presets
    arms = arms_for(PRESETS[preset])
    if known.workdir is None or "modomodo" not in (known.arms or ",".join(arms)).split(","):
        return arms
    from moejax.runtime import set_libtpu_flags, tune_host_malloc
    tune_host_malloc()
    with experiment.user_errors(known.debug or experiment.debug_from_env()):
        base = experiment.build_config(PRESETS, arms, preset, "uniform", known.set)
        set_libtpu_flags(base)
        try:
            fit = run_pilots(base, MODO[preset], known.workdir)
        except PilotInterrupted as e:
            print(f"[modomodo] {e} (checkpoint saved); rerun the command to resume")
            return None
    return arms_for(PRESETS[preset], list(fit["chosen"].values()))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    arms = _prepare_arms(argv)
    if arms is None:
        return {}
    return experiment.main(description=__doc__, presets=PRESETS, arms=arms, run_arm=run_arm,
                           report=report, argv=argv, budget=budget)


if __name__ == "__main__":
    main()
