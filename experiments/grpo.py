"""Critic-free RL on verifiable rewards: GRPO vs Dr.GRPO vs DAPO vs GSPO, and for an MoE policy
GRPO vs GRPO + routing replay R3 vs GSPO (shared/methods/rl-and-data.md Part A, B.5, Part D).

Every arm starts from the same SFT warm start (demonstrations of the task family, prompt tokens
masked; trained once per model in ``workdir/_sft-<hash>`` and shared by the arms of that model),
then runs ``train.steps`` RL steps of ``rl.prompts_per_step`` prompts x ``rl.num_generations``
completions on the synthetic arithmetic tasks (or ``--set rl.task_file=tasks.jsonl``).

    grpo        group mean/std advantages, PPO clip 0.2, seq-mean-token-mean (the GRPO paper)
    dr_grpo     no std, no length normalisation (Dr.GRPO's constant denominator)
    dapo        clip-higher 0.2/0.28, token-mean, dynamic sampling, overlong shaping
    gspo        sequence ratio, clip 3e-4/4e-4, sequence-level aggregation
    moe_grpo    grpo on an MoE policy (8 experts, top-2, in every layer), sampled in bf16 and
                trained in fp32 (the rollout/train mismatch of methods B.5), live routing
    moe_grpo_r3 moe_grpo with R3 routing replay (the rollout's top-k sets forced in training)
    moe_gspo    gspo on the MoE policy

Report: pass@1 per tier (greedy and sampled; in-distribution and OOD) at the SFT start and at the
end, reward / length / entropy / clip-fraction / KL curves, the effective-gradient ratio, and the
routing disagreement rollout vs train for the MoE arms.

Command:
    python -m experiments.grpo --preset cpu --workdir runs/grpo [--source HF_DIR]

Presets: cpu-smoke (CI, seconds per arm), cpu (2-core CPU; measured times in the closing note of
issue #11), gpu (one GPU), tpu-v5p-8 (a v5p-8 slice, 4 chips; ``python -m moejax.aot --experiment
grpo --preset tpu-v5p-8 [--arms moe_grpo_r3]`` compiles its rollout, logprob and update programs).
``--source`` starts from an imported Hugging Face model instead (its tokenizer.json and chat
template are used).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys

import numpy as np

from moejax import experiment
from moejax.analysis.plots import plot_curves
from moejax.config import DataConfig, MeshConfig, ModelConfig, TrainConfig
from moejax.metrics import read_metrics
from moejax.paths import as_path
from moejax.rl import tasks as tasks_lib
from moejax.rl.config import RLConfig, RLRunConfig, SFTConfig
from moejax.rl.rollout import RolloutConfig
from moejax.rl.tasks import TaskConfig

TASKS = TaskConfig(families=("add", "sub"), digits=(2, 3))


def _preset(model: ModelConfig, *, steps: int, sft: SFTConfig, lr: float, P: int, G: int,
            eval_items: int, eval_samples: int, eval_every: int, mesh=MeshConfig(),
            mini_batches: int = 2) -> RLRunConfig:
    rollout = RolloutConfig(max_prompt_len=16, max_new_tokens=48, temperature=1.0)
    return RLRunConfig(
        model=model, mesh=mesh,
        data=DataConfig(tokenizer="byte",
                        seq_len=rollout.max_prompt_len + rollout.max_new_tokens - 1),
        train=TrainConfig(steps=steps, lr=lr, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0,
                          batch_size=sft.batch_size, clip_norm=1.0, log_every=1,
                          eval_every=max(steps // 4, 1), eval_batches=2, ckpt_every=max(steps // 4, 1)),
        rl=RLConfig(tasks=TASKS, sft=sft,
                    rollout=rollout,
                    prompts_per_step=P, num_generations=G, mini_batches=mini_batches,
                    eval_every=eval_every, eval_items_per_tier=eval_items,
                    eval_samples=eval_samples, loss=RLConfig().loss))


def _model(d: int, layers: int, heads: int, dtype: str) -> ModelConfig:
    from moejax.config import AttentionConfig
    return ModelConfig(vocab_size=259, d_model=d, num_layers=layers, d_ff=4 * d, max_seq_len=64,
                       attention=AttentionConfig(num_heads=heads, num_kv_heads=heads,
                                                 head_dim=d // heads),
                       dtype=dtype, init_std=0.02)


PRESETS: dict[str, RLRunConfig] = {
    "cpu-smoke": _preset(_model(64, 2, 2, "float32"), steps=3,
                         sft=SFTConfig(steps=4, batch_size=16, lr=3e-3, warmup_steps=1,
                                       scratchpad=True, eval_items=16),
                         lr=1e-4, P=4, G=4, eval_items=4, eval_samples=2, eval_every=3),
    "cpu": _preset(_model(128, 4, 4, "float32"), steps=40,
                   sft=SFTConfig(steps=300, batch_size=64, lr=3e-3, warmup_steps=20,
                                 scratchpad=True, eval_items=256),
                   lr=1e-4, P=16, G=8, eval_items=128, eval_samples=4, eval_every=20),
    "gpu": _preset(_model(256, 4, 4, "bfloat16"), steps=600,
                   sft=SFTConfig(steps=1000, batch_size=128, lr=2e-3, warmup_steps=50,
                                 scratchpad=True, eval_items=512),
                   lr=1e-4, P=64, G=8, eval_items=512, eval_samples=8, eval_every=50,
                   mini_batches=4),
    "tpu-v5p-8": _preset(_model(512, 8, 8, "bfloat16"), steps=600,
                         sft=SFTConfig(steps=2000, batch_size=256, lr=1e-3, warmup_steps=100,
                                       scratchpad=True, eval_items=1024),
                         lr=5e-5, P=128, G=8, eval_items=1024, eval_samples=8, eval_every=50,
                         mesh=MeshConfig(data=-1), mini_batches=4),
}

# MoE arms sample in bf16 and train in fp32 (methods B.5.1's setting): the mismatch R3 corrects
MOE = ("model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.balance.scope=none",
       "rl.rollout_dtype=bfloat16")
GSPO = ("rl.loss.algo=gspo", "rl.loss.eps_low=3e-4", "rl.loss.eps_high=4e-4",
        "rl.loss.agg=seq_mean_token_mean")
GRPO = ("rl.advantage.estimator=grpo", "rl.loss.agg=seq_mean_token_mean")
ARMS: dict[str, tuple[str, ...]] = {
    "grpo": GRPO,
    "dr_grpo": ("rl.advantage.estimator=dr_grpo", "rl.loss.agg=dr_grpo"),
    "dapo": ("rl.loss.eps_high=0.28", "rl.loss.agg=token_mean", "rl.dynamic_sampling=true",
             "rl.overlong_cache_len=2"),
    "gspo": GSPO,
    "moe_grpo": MOE + GRPO,
    "moe_grpo_r3": MOE + GRPO + ("rl.replay.mode=r3",),
    "moe_gspo": MOE + GSPO,
}


def sft_dir(cfg: RLRunConfig, root: str) -> str:
    """The shared SFT workdir of every arm with this model, data, task and SFT config."""
    from moejax.rl.sft import sft_config
    digest = hashlib.sha256(sft_config(cfg).to_json().encode()).hexdigest()[:10]
    return os.fspath(as_path(root) / f"_sft-{digest}")


def make_run_arm(source_dir: str | None):
    def run_arm(cfg: RLRunConfig, workdir: str) -> dict:
        from moejax.rl import sft as sft_lib
        from moejax.rl.run_inputs import load_file_items, rl_tokenizer
        from moejax.rl.trainer import RLTrainer, latest_policy_state

        root = os.fspath(as_path(workdir).parent)
        init = None
        if source_dir is not None:
            init = _source_init(source_dir, cfg)
        start_dir = None
        if cfg.rl.sft.steps > 0:
            start_dir = sft_dir(cfg, root)
            sft_lib.run_sft(cfg, start_dir, rl_tokenizer(cfg), file_items=load_file_items(cfg),
                            init_state_fn=None if init is None else (lambda s, it: init(s)))
        init_fn = ((lambda s: latest_policy_state(s, start_dir)) if start_dir is not None
                   else init)
        return RLTrainer(cfg, workdir, init_state_fn=init_fn).run()
    return run_arm


def _source_init(source_dir: str, cfg: RLRunConfig):
    """``setup -> TrainState`` with the imported Hugging Face weights."""
    from flax import nnx

    from moejax import train as T
    from moejax.interop import hf

    def init(setup):
        state = T.init_state(setup)
        target = nnx.to_pure_dict(setup.abstract_state.params)
        nnx.replace_by_pure_dict(state.params, hf.load_workdir_params(source_dir, cfg.model, target))
        return state
    return init


# -- report --------------------------------------------------------------------------------------

def _evals(workdir: str) -> list[dict]:
    return [r for r in read_metrics(as_path(workdir) / "metrics.jsonl") if "rl/eval_items" in r]


def _tiers(rec: dict, prefix: str) -> list[str]:
    return sorted(k[len(prefix):] for k in rec if k.startswith(prefix))


def report(workdirs: dict[str, str], out_dir: str) -> str:
    plots = os.path.join(out_dir, "plots")
    rows, tiers = [], None
    for arm, wd in workdirs.items():
        ev = _evals(wd)
        if not ev:
            continue
        first, last = ev[0], ev[-1]
        tiers = tiers or _tiers(first, "rl/greedy/")
        cells = []
        for t in tiers:
            p0, p1 = first.get(f"rl/pass@1/{t}"), last.get(f"rl/pass@1/{t}")
            g0, g1 = first.get(f"rl/greedy/{t}"), last.get(f"rl/greedy/{t}")
            pass1 = (f"{100 * p0:.1f} → {100 * p1:.1f}" if p0 is not None and p1 is not None
                     else "n/a")
            cells.append(f"{pass1} (greedy {100 * g0:.1f} → {100 * g1:.1f})")
        recs = [r for r in read_metrics(as_path(wd) / "metrics.jsonl") if "rl/reward" in r]
        tail = recs[-10:] if recs else []
        mean = lambda k: np.mean([r[k] for r in tail if k in r]) if tail else float("nan")  # noqa: E731
        dis = [v for r in tail for k, v in r.items() if k.startswith("rl/route_disagree/")]
        rows.append(f"| {arm} | " + " | ".join(cells) + f" | {mean('rl/effective_gradient_ratio'):.2f}"
                    f" | {mean('rl/clip_frac'):.4f} | {mean('rl/k3_train_rollout'):.2e} | "
                    + (f"{np.mean(dis):.4f}" if dis else "n/a") + " |")
    tiers = tiers or []
    header = ("| arm | " + " | ".join(f"pass@1 % {t}" for t in tiers)
              + " | eff. grad ratio | clip frac | k3(train‖rollout) | routing disagreement |")
    curves = plot_curves(workdirs, ["rl/reward", "rl/response_len", "rl/entropy",
                                    "rl/clip_frac", "rl/approx_kl", "rl/kl"],
                         os.path.join(plots, "rl_curves.png"), title="RL training")
    text = "\n".join([
        "# GRPO family on verifiable arithmetic", "",
        "pass@1 per tier (unbiased estimator over `rl.eval_samples` samples at the rollout "
        "temperature; greedy accuracy in brackets), at the SFT start → at the end of RL. "
        "Tiers are `<family>-d<digits>`; the OOD tier has one more digit than training. The "
        "other columns average the last 10 logged RL steps.", "",
        header, "|---" * (len(tiers) + 5) + "|", *rows, "",
        f"![curves](plots/{os.path.basename(curves)})", ""])
    return experiment.write_report(out_dir, text)


def budget(configs, workdirs) -> str:
    """Prompts and completions seen per arm, how many distinct prompts that was, and the SFT rows."""
    lines = ["", "## Data budget", "",
             "| arm | RL prompts seen | distinct | completions | SFT demonstration rows |",
             "|---|---|---|---|---|"]
    for arm, cfg in configs.items():
        s = experiment.finished(workdirs[arm]) or {}
        seen = int(s.get("prompts_seen", cfg.train.steps * cfg.rl.prompts_per_step))
        from moejax.rl.collect import RL_STREAM_OFFSET
        prompts = {tasks_lib.stream_item(cfg.rl.tasks, None, i, RL_STREAM_OFFSET).prompt
                   for i in range(min(seen, 200_000))} if not cfg.rl.task_file else set()
        lines.append(f"| {arm} | {seen:,} | {len(prompts):,} | {seen * cfg.rl.num_generations:,} "
                     f"| {cfg.rl.sft.steps * cfg.rl.sft.batch_size:,} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--source")
    known, rest = pre.parse_known_args(argv)
    presets, source_dir = PRESETS, None
    if known.source:
        from experiments.finetune import prepare_source, source_config
        peek = argparse.ArgumentParser(add_help=False)
        peek.add_argument("--workdir", required=True)
        seen, _ = peek.parse_known_args(rest)
        source_dir = prepare_source(known.source, seen.workdir)
        src = source_config(source_dir)
        presets = {name: dataclasses.replace(
            p, model=dataclasses.replace(src.model, dtype=p.model.dtype, param_dtype="float32"),
            data=dataclasses.replace(p.data, tokenizer=src.data.tokenizer))
            for name, p in PRESETS.items()}
    return experiment.main(description=__doc__, presets=presets, arms=ARMS,
                           run_arm=make_run_arm(source_dir), report=report, argv=rest,
                           budget=budget)


if __name__ == "__main__":
    main()
