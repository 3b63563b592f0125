"""The cancellation hypothesis in critic-free RL (methods/rl-and-data.md B.2, issue #14): token
flipping, gradient coupling, and the mini-batch interventions.

Every arm starts from ``experiments.grpo``'s SFT warm start and runs GRPO (group mean/std
advantages) with ``rl.mini_batches`` optimizer steps per RL step; the arms differ in which rows each
optimizer step sees:

    shuffled         rollouts permuted across mini-batches (groups split over optimizer steps)
    query_preserved  QPM: each mini-batch holds all G rollouts of whole prompts
    reward_balanced  RBB (a): whole groups paired so each mini-batch has equal #pos and #neg
    positive_only    the control: rows with advantage <= 0 carry no signal (shuffled)

Diagnostics, measured on every RL step through the trainer's hooks (``diagnostics.jsonl`` in the
arm's workdir): the teacher-forced logprobs of the step's rows before its updates (the pi_old
recompute) and after them give Δ per token, and ``moejax.rl.flips`` the flip table (B±, S±, F,
labelled by the sign of the group-centred reward, also for the positive-only arm) per token class:
``format`` (non-digit tokens: newlines, operators, '=', EOS), ``reasoning`` (scratchpad digits) and
``answer`` (digits after the last '='); the share of Σ|Δ| landing on each class (where updates
land); and, every ``COUPLING_EVERY`` steps, the coupling diagnostic: the cosine between the
unembedding-layer gradients of log p of two sampled response tokens (grad = (onehot(y) - p) ⊗ h,
h recovered from the logits by least squares: exact for the linear head when vocab >= d_model),
bucketed by min(p), same vs different token id.

Report: pass@1 in/out of distribution (start -> end), the flip table, where updates land, the
coupling plot, and reward curves. Direction to check (paper): S⁺ and B⁻ far from 0 with (B⁺, S⁺) ≈
(B⁻, S⁻); the largest |cos| for identical low-confidence pairs; positive-only moves more of Σ|Δ|
onto format tokens than the critic-free arms; QPM or RBB pass@1 ≥ shuffled.

Smallest preset that shows each direction: the flip table and the coupling plot show at
``cpu-smoke`` already: it checks the wiring (CI runs its reward_balanced arm), and its format bonus
of 0.5 after 50 SFT steps (half the outputs well formed) gives mixed groups on every RL step, which
the flip table's labels and the balanced batches need (measured, reward_balanced: F ≈ 0.41-0.45
with B⁺/S⁺ ≈ 0.55-0.63/0.37-0.45 and B⁻/S⁻ ≈ 0.39-0.48/0.51-0.61); the where-updates-land shift and
the pass@1 ordering need ``cpu`` (40 steps of 16 x 8 rollouts, 4 mini-batches, the spec's G=8/M=4;
dense model: 17.0 min wall for the four arms and the report, measured 2026-12-01 (clean checkout, 2
cores); S+ ~19 % and B- ~22 % there, while query-preserved and reward-balanced batching did not
beat shuffled, one seed). ``gpu``/``tpu-v5p-8`` use the spec's toy MoE (4 experts, top-2); the
paper's scale is 1.5-32B models on math RLVR with long responses (``--source`` with an imported
model and ``--set rl.task_file=...``).

Command:
    python -m experiments.cancellation --preset cpu --workdir runs/cancellation
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from experiments import grpo
from experiments.prefix_rft import _mean, _metrics, _pct, ood_tier_names
from moejax import experiment
from moejax.analysis.plots import plot_curves
from moejax.overrides import apply_overrides
from moejax.paths import as_path
from moejax.rl import flips
from moejax.rl.config import RLRunConfig

CLASSES = {0: "format", 1: "reasoning", 2: "answer"}
COUPLING_EVERY = 5  # RL steps between coupling measurements (also at step 0)
COUPLING_TOKENS = 128  # sampled response tokens per measurement (M² / 2 pairs)
DIAGNOSTICS = "diagnostics.jsonl"
TOY_MOE = ("model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.balance.scope=none")


def _minibatches(cfg: RLRunConfig, m: int) -> RLRunConfig:
    return dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, mini_batches=m))


# cpu-smoke: grpo's shapes (CI shares its compiled programs) with a 50-step SFT start and a
# format bonus, so its groups already mix rewards (4 SFT steps leave every reward at 0: no flips;
# 150 leave step 0's groups all well formed); the SFT stage evaluates and checkpoints once (its
# cadences are train.*'s, every step at grpo's 3 RL steps)
SMOKE = ("rl.sft.steps=50", "rl.sft.warmup_steps=5", "rl.reward.format_coef=0.5",
         "train.eval_every=50", "train.ckpt_every=50")

PRESETS: dict[str, RLRunConfig] = {
    "cpu-smoke": apply_overrides(grpo.PRESETS["cpu-smoke"], SMOKE),
    "cpu": _minibatches(grpo.PRESETS["cpu"], 4),
    "gpu": apply_overrides(grpo.PRESETS["gpu"], TOY_MOE),
    "tpu-v5p-8": apply_overrides(grpo.PRESETS["tpu-v5p-8"], TOY_MOE),
}

ARMS: dict[str, tuple[str, ...]] = {
    "shuffled": grpo.GRPO + ("rl.minibatch_sampler=shuffled",),
    "query_preserved": grpo.GRPO + ("rl.minibatch_sampler=query_preserved",),
    "reward_balanced": grpo.GRPO + ("rl.minibatch_sampler=reward_balanced",),
    "positive_only": grpo.GRPO + ("rl.positive_only=true",),
}


# -- token classes and the coupling probe ------------------------------------------------------

def token_classes(targets: np.ndarray, mask: np.ndarray, tokenizer) -> np.ndarray:
    """[n,T] class of each target token: 2 = a digit after the row's last '=' in its response
    (the answer), 1 = another digit (the scratchpad), 0 = anything else (format/template)."""
    vocab = int(targets.max()) + 1
    text = [tokenizer.decode([i]) for i in range(vocab)]
    digit = np.array([bool(t) and t.isdigit() for t in text])
    equals = np.array(["=" in t for t in text])
    mask = np.asarray(mask, bool)
    t = np.arange(targets.shape[1])[None, :]
    last_eq = np.max(np.where(equals[targets] & mask, t, -1), axis=1, keepdims=True)
    is_digit = digit[targets]
    return np.where(is_digit & (t > last_eq), 2, np.where(is_digit, 1, 0)).astype(np.int32)


def group_centred(reward: np.ndarray, group: np.ndarray) -> np.ndarray:
    """r_i - mean of its group [B]: the sign a GRPO advantage has (the flip table's labels)."""
    n = int(group.max()) + 1
    counts = np.maximum(np.bincount(group, minlength=n), 1)
    mean = np.bincount(group, weights=reward, minlength=n) / counts
    return reward - mean[group]


def head_matrix(params) -> np.ndarray:
    """The output projection as [V, D] (logits = h @ W.T): the tied embedding or the LM head."""
    from flax import nnx
    pure = nnx.to_pure_dict(params)
    if "lm_head" in pure:
        return np.asarray(pure["lm_head"]["kernel"], np.float64).T
    return np.asarray(pure["embed"]["embedding"], np.float64)


def unembedding_grads(logits: np.ndarray, targets: np.ndarray, w: np.ndarray) -> tuple:
    """Per-token gradients of log softmax(logits)[target] w.r.t. the unembedding W [V,D]:
    (onehot - p) ⊗ h, with h the least-squares solution of logits = h W.T. logits [M,V],
    targets [M] -> (grads [M, V*D], p(target) [M], relative residual of the h recovery)."""
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = -p
    g[np.arange(len(z)), targets] += 1.0
    h = np.linalg.lstsq(w, z.T, rcond=None)[0].T  # [M,D]
    residual = float(np.linalg.norm(h @ w.T - z) / max(np.linalg.norm(z), 1e-30))
    grads = (g[:, :, None] * h[:, None, :]).reshape(len(z), -1)
    return grads, p[np.arange(len(z)), targets], residual


def make_logits_fn(setup):
    """Jitted ``(params, rest, rows) -> logits [n,T,V]`` of the policy programs' rows."""
    import jax
    from flax import nnx

    from moejax import train as T
    from moejax.rl.policy import _forced

    def fn(params, rest, batch):
        with T.tracing_mesh(setup):
            model = nnx.merge(setup.graphdef, params, rest)
            logits, _ = model(batch["inputs"], segment_ids=batch["segment_ids"],
                              positions=batch["positions"], forced_experts=_forced(batch))
            return logits
    return jax.jit(fn)


class Diagnostics:
    """The trainer hooks that measure each RL step's update: wraps ``update_step`` to keep the
    state after the step's last optimizer update, and on ``on_batch`` compares teacher-forced
    logprobs before (the pi_old recompute) and after; appends one JSON line per step."""

    def __init__(self, workdir: str, coupling_every: int = COUPLING_EVERY,
                 coupling_tokens: int = COUPLING_TOKENS):
        self.path = as_path(workdir) / DIAGNOSTICS
        self.coupling_every, self.coupling_tokens = coupling_every, coupling_tokens
        self.state = None
        self.logits_fn = None

    def attach(self, trainer) -> None:
        if trainer.cfg.rl.old_logprobs != "recompute" or trainer.cfg.rl.ppo_epochs != 1:
            raise ValueError("flip diagnostics read Δ against the pi_old recompute of one epoch: "
                             "rl.old_logprobs='recompute', rl.ppo_epochs=1")
        update = trainer.update_step

        def recorded(state, batch):
            state, metrics = update(state, batch)
            self.state = state
            return state, metrics
        trainer.update_step = recorded
        trainer.on_batch = self.on_batch
        self.logits_fn = make_logits_fn(trainer.setup)

    def on_batch(self, trainer, step: int, batch: dict) -> None:
        import jax

        from moejax.rl.rows import to_global
        from moejax.train import to_host
        rows, r = batch["rows"], batch["rollouts"]
        after = trainer._forward(self.state.params, self.state.rest, rows)["logprobs"]
        mask = rows["completion_mask"] > 0
        labels = group_centred(np.asarray(batch["reward"], np.float64), r.group)
        classes = token_classes(rows["targets"], mask, trainer.tokenizer)
        before = rows["old_logprobs"]
        record = {"step": step,
                  "flips": flips.flip_table_by_class(before, after, labels, mask, classes, CLASSES),
                  "update_share": flips.update_share_by_class(before, after, mask, classes,
                                                              len(CLASSES)).tolist(),
                  "token_share": (np.bincount(classes[mask], minlength=len(CLASSES))
                                  / max(int(mask.sum()), 1)).tolist()}
        if step % self.coupling_every == 0:
            batch_rows = {k: to_global(trainer.mesh, v) for k, v in rows.items()}
            logits = to_host(self.logits_fn(self.state.params, self.state.rest, batch_rows))
            rng = np.random.default_rng([trainer.cfg.train.seed, step, 0xC0])
            flat = np.flatnonzero(mask)
            pick = rng.choice(flat, size=min(self.coupling_tokens, len(flat)), replace=False)
            ids = rows["targets"].reshape(-1)[pick]
            scaled = logits.reshape(-1, logits.shape[-1])[pick] / trainer.cfg.rl.rollout.temperature
            grads, p, residual = unembedding_grads(scaled, ids, head_matrix(self.state.params))
            c = flips.coupling_by_confidence(ids, p, grads)
            record["coupling"] = {k: {s: np.asarray(v[s], np.float64).tolist() for s in v}
                                  for k, v in c.items()}
            record["coupling_h_residual"] = residual
        if jax.process_index() == 0:
            with self.path.open("a") as f:
                f.write(json.dumps(record, allow_nan=True) + "\n")


def run_arm(cfg: RLRunConfig, workdir: str) -> dict:
    """grpo's arm (shared SFT start, then RL) with the diagnostics hooked into the trainer."""
    from moejax.rl import sft as sft_lib
    from moejax.rl.run_inputs import load_file_items, rl_tokenizer
    from moejax.rl.trainer import RLTrainer, latest_policy_state

    start_dir = grpo.sft_dir(cfg, os.fspath(as_path(workdir).parent))
    sft_lib.run_sft(cfg, start_dir, rl_tokenizer(cfg), file_items=load_file_items(cfg))
    trainer = RLTrainer(cfg, workdir, init_state_fn=lambda s: latest_policy_state(s, start_dir))
    Diagnostics(workdir).attach(trainer)
    return trainer.run()


# -- report --------------------------------------------------------------------------------------

def read_diagnostics(workdir: str) -> list[dict]:
    """The per-step records (the last one per step: a resumed run repeats its lost steps)."""
    path = as_path(workdir) / DIAGNOSTICS
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def _flip_cells(recs: list[dict], cls: str) -> list[str]:
    keys = ("B+", "S+", "B-", "S-", "F")
    return [_pct(_mean([r["flips"][cls][k] for r in recs
                        if r["flips"][cls][k] == r["flips"][cls][k]])) for k in keys]


def _coupling_means(recs: list[dict], kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Count-weighted mean |cos| per confidence bucket over the measured steps -> (mean, count)."""
    measured = [r["coupling"][kind] for r in recs if "coupling" in r]
    if not measured:
        return np.full(len(flips.CONFIDENCE_EDGES) - 1, np.nan), np.zeros(0)
    count = np.sum([np.asarray(m["count"], np.float64) for m in measured], axis=0)
    total = np.sum([np.nan_to_num(np.asarray(m["mean_abs_cos"], np.float64))
                    * np.asarray(m["count"]) for m in measured], axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan), count


def plot_coupling(diags: dict[str, list[dict]], out_png: str) -> str:
    """Mean |cos| of per-token gradients vs min(p) bucket; same-id pairs solid, different dashed."""
    from moejax.analysis.plots import _save_png, plt
    edges = np.asarray(flips.CONFIDENCE_EDGES)
    mid = (edges[:-1] + edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, recs in diags.items():
        color = None
        for kind, style in (("same", "-"), ("different", "--")):
            mean, _ = _coupling_means(recs, kind)
            line = ax.plot(mid, mean, style, marker=".", color=color, label=f"{arm} {kind} id")
            color = line[0].get_color()
    ax.set_xlabel("min(p) of the pair")
    ax.set_ylabel("mean |cos| of unembedding gradients")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    return _save_png(fig, out_png)


def report(workdirs: dict[str, str], out_dir: str) -> str:
    passes, flip_rows, land_rows, diags = [], [], [], {}
    for arm, wd in workdirs.items():
        evals = [r for r in _metrics(wd) if "rl/eval_items" in r]
        recs = diags[arm] = read_diagnostics(wd)
        if evals:
            ood = ood_tier_names(wd)
            first, last = evals[0], evals[-1]
            tiers = sorted(k[len("rl/pass@1/"):] for k in first if k.startswith("rl/pass@1/"))
            cells = []
            for group in ([t for t in tiers if t not in ood], [t for t in tiers if t in ood]):
                a = _mean([first.get(f"rl/pass@1/{t}") for t in group])
                b = _mean([last.get(f"rl/pass@1/{t}") for t in group])
                cells.append(f"{_pct(a)} → {_pct(b)}")
            passes.append(f"| {arm} | " + " | ".join(cells) + " |")
        if recs:
            for cls in ("all", *CLASSES.values()):
                flip_rows.append(f"| {arm} | {cls} | " + " | ".join(_flip_cells(recs, cls)) + " |")
            moved = [r["update_share"] for r in recs if sum(r["update_share"]) > 0]
            share = np.mean(moved, axis=0) if moved else np.full(len(CLASSES), np.nan)
            tokens = np.mean([r["token_share"] for r in recs], axis=0)
            land_rows.append(f"| {arm} | " + " | ".join(
                f"{_pct(s)} ({_pct(t)})" for s, t in zip(share, tokens)) + " |")
    plots = os.path.join(out_dir, "plots")
    coupling = plot_coupling(diags, os.path.join(plots, "coupling.png"))
    curves = plot_curves(workdirs, ["rl/reward", "rl/entropy", "rl/clip_frac"],
                         os.path.join(plots, "rl_curves.png"), title="Cancellation arms")
    names = " | ".join(CLASSES.values())
    text = "\n".join([
        "# The cancellation hypothesis: token flips, coupling and mini-batch composition", "",
        "## pass@1 % (start → end)", "", "| arm | in-dist. | OOD |", "|---|---|---|", *passes, "",
        "## Flip table (% of tokens; mean over RL steps)", "",
        "Δ = log π_after − log π_before per response token for each RL step's update (all its "
        "mini-batches), τ = 1e-4. B⁺/S⁺: boosted/suppressed among tokens of rollouts with a "
        "positive group-centred reward, B⁻/S⁻ among negative ones, F: moved against that sign. "
        "Naive view: B⁺ ≈ 100, S⁻ ≈ 100; token flipping: S⁺ and B⁻ far from 0.", "",
        "| arm | tokens | B⁺ | S⁺ | B⁻ | S⁻ | F |", "|---|---|---|---|---|---|---|", *flip_rows, "",
        "## Where updates land", "",
        "Share of Σ|Δ| on each token class, % (mean over the steps that moved any token; the "
        "class's share of response tokens in brackets): "
        "the paper's claim is that critic-free RL moves less of its update onto format/template "
        "tokens than positive-only training.", "",
        f"| arm | {names} |", "|---" * (len(CLASSES) + 1) + "|", *land_rows, "",
        "## Gradient coupling", "",
        "Mean |cos| between per-token unembedding gradients, by the pair's min(p); prediction: "
        "largest for identical, low-confidence tokens.", "",
        f"![coupling](plots/{os.path.basename(coupling)})", "",
        f"![curves](plots/{os.path.basename(curves)})", ""])
    return experiment.write_report(out_dir, text)


def main(argv=None):
    return experiment.main(description=__doc__, presets=PRESETS, arms=ARMS, run_arm=run_arm,
                           report=report, argv=argv, budget=grpo.budget)


if __name__ == "__main__":
    main()
