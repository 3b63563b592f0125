"""Reward calibration against length with a learned Bradley-Terry reward model
(methods/rl-and-data.md B.3, issue #14 item 3).

Stages: the SFT warm start of ``experiments.grpo`` (shared: ``workdir/_sft-<hash>``) -> a reward
model (``moejax.rl.reward_model``: the SFT backbone + a scalar head, Bradley-Terry on preference
pairs of the tasks, chosen = the verified demonstration, rejected = a wrong final answer, with a
PLANTED length bias: the chosen side carries more repeated lines with probability
``length_bias``; trained once per preset in ``workdir/_rm-<hash>``) -> RL arms that train on the
RM's score (``rl.reward_source=reward_model``) at the same seeds and steps:

    raw            GRPO on the RM's raw scores
    local_average  scores minus the local average of the rolling (length, score) buffer
    lowess         scores minus its LOWESS fit (statsmodels; frac 0.5, the spec's default)

Report: the RM's pairwise accuracy on held-out pairs (all, and the pairs against the bias:
chosen side shorter) and the score-length correlation (Pearson, Spearman) over the held-out
responses, raw and after each calibration (fitted on that pool); per RL arm the mean completion
length at the start and the end of RL (the drift), the score-length correlation of the rewards it
trained on, pass@1 in- and out-of-distribution (the verifier's, start -> end) and tokens seen.

Smallest preset meant to show the direction (raw RM rewards lengthen completions, calibrated ones
do not; calibration cuts the score-length correlation): ``cpu`` (grpo's SFT, 150 RM steps, 3 arms x
40 RL steps of 16 x 8 rollouts): 9.9 min wall with the report, measured 2026-12-01 (clean checkout,
2 cores). There calibration cut the score-length correlation (+0.89 -> ~0) but the RM had learned
length rather than correctness (a 6 % pass@1 policy cannot verify sums), so RL on its scores
lowered pass@1 in every arm and the raw arm barely drifted in length: the drift claim needs an RM
that learned some correctness (gpu preset). ``cpu-smoke`` checks the wiring only. ``gpu`` /
``tpu-v5p-8`` scale the RM (1000 / 2000 steps) and RL (600 steps of 64 / 128 prompts x 8). The
paper's scale (RewardBench / AlpacaEval RMs of 2-8B parameters, 300k scored responses, DPO or PPO
policies) needs ``--source`` with an imported model, a task file of open-ended prompts with a real
preference set, and a v5p-64.

Command:
    python -m experiments.reward_calibration --preset cpu --workdir runs/reward_calibration
    python -m moejax.aot --experiment reward_calibration --preset tpu-v5p-8 --arms lowess
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys

import numpy as np

from experiments import grpo, prefix_rft
from moejax import experiment
from moejax.analysis.plots import plot_curves
from moejax.paths import as_path, read_json
from moejax.rl import calibration as calib_lib
from moejax.rl.config import RLRunConfig
from moejax.rl.reward_model import RM_EVAL, RewardModelConfig

PRESETS: dict[str, RLRunConfig] = dict(grpo.PRESETS)  # the SFT stage and shapes are grpo's
RM_PRESETS: dict[str, RewardModelConfig] = {
    "cpu-smoke": RewardModelConfig(steps=3, batch_size=8, lr=1e-4, warmup_steps=1, eval_pairs=16,
                                   ckpt_every=2, score_rows=16),
    "cpu": RewardModelConfig(steps=150, batch_size=32, lr=1e-4, warmup_steps=10, eval_pairs=256,
                             ckpt_every=50, score_rows=128),
    "gpu": RewardModelConfig(steps=1000, batch_size=128, lr=1e-4, warmup_steps=50,
                             eval_pairs=1024, ckpt_every=200, score_rows=512),
    "tpu-v5p-8": RewardModelConfig(steps=2000, batch_size=256, lr=5e-5, warmup_steps=100,
                                   eval_pairs=1024, ckpt_every=200, score_rows=1024),
}
AUTO_DIR = "auto"  # rl.reward_model_dir placeholder: the experiment's own _rm-<hash> stage
HALF_WIDTH = 2.0  # local average over rollouts: window half-width in tokens


def arms_for(cfg: RLRunConfig) -> dict[str, tuple[str, ...]]:
    """The arms' overrides (the local average's neighbour floor follows the batch size)."""
    rm = grpo.GRPO + ("rl.reward_source=reward_model", f"rl.reward_model_dir={AUTO_DIR}")
    floor = max(min(20, cfg.rl.rows_per_step // 4), 2)
    return {
        "raw": rm,
        "local_average": rm + ("rl.reward_calibration.method=local_average",
                               f"rl.reward_calibration.half_width={HALF_WIDTH}",
                               f"rl.reward_calibration.min_neighbours={floor}"),
        "lowess": rm + ("rl.reward_calibration.method=lowess",),
    }


ARMS = arms_for(PRESETS["cpu"])


def aot_experiment() -> tuple[dict, dict]:
    return PRESETS, arms_for(PRESETS["tpu-v5p-8"])


def rm_preset(cfg: RLRunConfig) -> RewardModelConfig:
    """The RM stage of the preset whose model and RL batch ``cfg`` has (``--set`` may not
    change the model between stages)."""
    for name, p in PRESETS.items():
        if p.model == cfg.model and p.rl.prompts_per_step == cfg.rl.prompts_per_step:
            return dataclasses.replace(RM_PRESETS[name], seed=cfg.train.seed)
    return dataclasses.replace(RM_PRESETS["cpu"], seed=cfg.train.seed)


def rm_dir(cfg: RLRunConfig, rm: RewardModelConfig, root: str) -> str:
    """The shared RM workdir of every arm with this SFT stage and RM config."""
    from moejax.rl.sft import sft_config
    text = sft_config(cfg).to_json() + json.dumps(dataclasses.asdict(rm), sort_keys=True)
    return os.fspath(as_path(root) / f"_rm-{hashlib.sha256(text.encode()).hexdigest()[:10]}")


def run_arm(cfg: RLRunConfig, workdir: str) -> dict:
    """SFT (grpo's, shared) -> the RM (shared) -> RL on its scores."""
    from moejax.rl import reward_model as rm_lib
    from moejax.rl import sft as sft_lib
    from moejax.rl.run_inputs import load_file_items, rl_tokenizer
    from moejax.rl.trainer import RLTrainer, latest_policy_state

    root = os.fspath(as_path(workdir).parent)
    start = grpo.sft_dir(cfg, root)
    sft_lib.run_sft(cfg, start, rl_tokenizer(cfg), file_items=load_file_items(cfg))
    if cfg.rl.reward_model_dir == AUTO_DIR:
        rm = rm_preset(cfg)
        where = rm_dir(cfg, rm, root)
        done = rm_lib.train_reward_model(cfg, rm, where, start)
        if done["preempted"]:
            return {"step": 0, "prompts_seen": 0, "preempted": True}
        cfg = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, reward_model_dir=where))
    return RLTrainer(cfg, workdir, init_state_fn=lambda s: latest_policy_state(s, start)).run()


# -- report --------------------------------------------------------------------------------------

def correlations(lengths, values) -> tuple[float, float]:
    """(Pearson, Spearman) of values with lengths (NaN when either is constant)."""
    from scipy import stats
    x, y = np.asarray(lengths, np.float64), np.asarray(values, np.float64)
    if x.std() == 0 or y.std() == 0:
        return float("nan"), float("nan")
    return float(stats.pearsonr(x, y)[0]), float(stats.spearmanr(x, y)[0])


def rm_rows(ev: dict) -> list[str]:
    """Rows of the RM table: raw and each calibration (fitted on the held-out pool)."""
    sc, sr = np.asarray(ev["chosen_score"]), np.asarray(ev["rejected_score"])
    lc, lr = np.asarray(ev["chosen_len"], float), np.asarray(ev["rejected_len"], float)
    pool_len, pool = np.concatenate([lc, lr]), np.concatenate([sc, sr])
    against = lc < lr  # pairs whose chosen side is shorter: the bias points the wrong way
    out = []
    for name in ("raw", "local_average", "lowess"):
        if name == "raw":
            c, r = sc, sr
        else:
            state = calib_lib.fit(pool_len, pool, calib_lib.CalibrationConfig(method=name),
                                  pairs=(lc, lr))
            c, r = calib_lib.apply_pairs(state, lc, sc, lr, sr)
        acc = float(np.mean(c > r))
        acc_against = float(np.mean(c[against] > r[against])) if against.any() else float("nan")
        pe, sp = correlations(pool_len, np.concatenate([c, r]))
        out.append(f"| {name} | {100 * acc:.1f} | {prefix_rft._pct(acc_against)} | {pe:+.3f} | "
                   f"{sp:+.3f} |")
    return out


def rl_row(arm: str, workdir: str) -> str | None:
    recs = prefix_rft._metrics(workdir)
    evals = [r for r in recs if "rl/eval_items" in r]
    train = [r for r in recs if "rl/reward" in r]
    if not evals or not train:
        return None
    ood = prefix_rft.ood_tier_names(workdir)
    first, last = evals[0], evals[-1]
    tiers = sorted(k[len("rl/pass@1/"):] for k in first if k.startswith("rl/pass@1/"))

    def pair(names):
        a = prefix_rft._mean([first.get(f"rl/pass@1/{t}") for t in names])
        b = prefix_rft._mean([last.get(f"rl/pass@1/{t}") for t in names])
        return f"{prefix_rft._pct(a)} → {prefix_rft._pct(b)}"
    k = max(len(train) // 4, 1)
    len0 = prefix_rft._mean([r["rl/response_len"] for r in train[:k]])
    len1 = prefix_rft._mean([r["rl/response_len"] for r in train[-k:]])
    raw_corr = prefix_rft._mean([r.get("rm/length_corr") for r in train])
    used = prefix_rft._mean([r.get("calib/length_corr", r.get("rm/length_corr")) for r in train])
    cfg = read_json(as_path(workdir) / "config.json") or {}
    rows = cfg.get("rl", {}).get("prompts_per_step", 0) * cfg.get("rl", {}).get(
        "num_generations", 0)
    tokens = int(sum(r.get("rl/rollout_tokens", r["rl/response_len"] * rows) for r in train))
    return (f"| {arm} | {len0:.1f} → {len1:.1f} ({len1 - len0:+.1f}) | {raw_corr:+.3f} | "
            f"{used:+.3f} | {pair([t for t in tiers if t not in ood])} | "
            f"{pair([t for t in tiers if t in ood])} | {len(train)} | {tokens:,} |")


def report(workdirs: dict[str, str], out_dir: str) -> str:
    rm_eval = None
    for wd in workdirs.values():
        saved = (read_json(as_path(wd) / "config.json") or {}).get("rl", {})
        if saved.get("reward_model_dir"):
            rm_eval = read_json(as_path(saved["reward_model_dir"]) / RM_EVAL)
            break
    rows = [r for arm, wd in workdirs.items() if (r := rl_row(arm, wd)) is not None]
    curves = plot_curves(workdirs, ["rl/response_len", "rm/score", "rl/reward",
                                    "rm/length_corr", "calib/length_corr"],
                         os.path.join(out_dir, "plots", "reward_calibration_curves.png"),
                         title="RL on reward-model scores")
    text = ["# Reward calibration of a learned reward model (length bias)", "",
            "## Reward model on held-out pairs", "",
            "Pairwise accuracy % (chosen scored above rejected) on all held-out pairs and on those "
            "against the planted bias (chosen side shorter); the score-length correlation over "
            "both sides' responses. Calibrations are fitted on that pool (local average: window "
            "= mean pair gap / 4, >= 20 neighbours; LOWESS frac 0.5). Direction (paper): "
            "calibration cuts the correlation and keeps or raises the accuracy.", "",
            "| scores | accuracy % | against-bias accuracy % | Pearson(len) | Spearman(len) |",
            "|---|---|---|---|---|", *(rm_rows(rm_eval) if rm_eval else ["| (no RM) |||||"]),
            "", "## RL on the reward model's scores", "",
            "Mean completion length over the first → last quarter of the RL steps (the drift); "
            "Pearson correlation of the RM's raw score and of the trained reward with length "
            "(means over steps); pass@1 (the verifier's) averaged over in-distribution and OOD "
            "tiers, start → end; completion tokens generated. Direction: calibrated arms drift "
            "less than raw at no loss of pass@1.", "",
            "| arm | length (drift) | corr raw score | corr trained reward | pass@1 % in-dist. | "
            "pass@1 % OOD | RL steps | completion tokens |", "|---" * 8 + "|", *rows, "",
            f"![curves](plots/{os.path.basename(curves)})", ""]
    return experiment.write_report(out_dir, "\n".join(text))


def budget(configs, workdirs) -> str:
    """grpo's prompt/completion/SFT table plus the RM stage's pairs."""
    lines = [grpo.budget(configs, workdirs), "| arm | RM steps | RM pairs (2 responses each) |",
             "|---|---|---|"]
    for arm, cfg in configs.items():
        rm = rm_preset(cfg)
        lines.append(f"| {arm} | {rm.steps:,} | {rm.steps * rm.batch_size:,} |")
    return "\n".join(lines + [""])


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    arms = experiment.preset_arms(argv, PRESETS, arms_for, ARMS)
    return experiment.main(description=__doc__, presets=PRESETS, arms=arms, run_arm=run_arm,
                           report=report, argv=argv, budget=budget)


if __name__ == "__main__":
    main()
