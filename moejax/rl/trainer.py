"""The RL loop (GRPO family): rollout -> reward -> advantages -> PPO-style updates, with evaluation,
checkpoints and exact resume. Built from the pretraining pieces (mesh, ``train.Setup`` and
optimizer, Orbax ``Checkpointer``, ``MetricsLogger``, ``StopSignals``); the compiled programs are the
rollout engine (``moejax.rl.rollout``) and the policy programs (``moejax.rl.policy``); what each
step trains on (prompts, scored rollouts, refills) comes from ``moejax.rl.collect``.

One RL step (``train.steps`` of them):
1. ``prompts_per_step`` prompts from the task stream (a cursor; DAPO dynamic sampling draws more),
   ``num_generations`` completions each, sampled with per-token logprobs and MoE routing;
2. rewards (``moejax.rl.rewards``), DAPO overlong shaping, optional KL-in-reward; groups without
   reward variance dropped and refilled under ``rl.dynamic_sampling``;
3. pi_old: the trainer's recompute (R3: under the rollout's routing; R2: its routing recorded)
   or the rollout's logprobs (``rl.old_logprobs='rollout'``, bypass); the reference's logprobs
   when a KL term needs them;
4. group advantages; ``ppo_epochs`` x ``mini_batches`` optimizer steps over seeded permutations.

Method switches (methods B.1-B.4; all off by default): ``rl.prefix`` (Prefix-RFT variants with a
demonstration prefix moved into the response, prefix advantages and surrogate),
``rl.minibatch_sampler`` / ``rl.positive_only`` (which rows each optimizer step sees),
``rl.reward_calibration`` (rewards minus their fitted length bias, from a rolling buffer) and
``rl.budget`` (Knapsack rollouts per prompt, difficulty filtering, SEC curriculum over task
families). Their state (calibration buffer, success buffer, Q-table and family cursors) is JSON in
the checkpoint's metadata (``methods``); their random draws are keyed by (seed, step).

Everything random is a function of (``train.seed``, step): the sampler key is folded from the
saved rng and the RL step, the prompt cursor and step live in the checkpoint's metadata, the
reference model in its ``extra`` item; an interrupted run resumes bit-identically.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from moejax import train as T
from moejax.ckpt import Checkpointer
from moejax.config import ConfigError
from moejax.mesh import make_mesh
from moejax.metrics import MetricsLogger
from moejax.paths import as_path
from moejax.rl import advantages as adv_lib
from moejax.rl import budget as budget_lib
from moejax.rl import calibration as calib_lib
from moejax.rl import collect, minibatch, passk, tasks
from moejax.rl import kl as kl_lib
from moejax.rl import prefix as prefix_lib
from moejax.rl.config import RLRunConfig
from moejax.rl.policy import make_logprob_fn, make_update_step
from moejax.rl.rollout import RolloutEngine
from moejax.rl.rows import Rollouts, length_correlation, rl_batch, routing_disagreement, to_global
from moejax.rl.run_inputs import eval_sets, load_file_items, rl_tokenizer
from moejax.train import to_host
from moejax.trainer import StopSignals, write_or_check_config

BALANCE_SALT = 0xBA1A  # balanced_subsample draws use default_rng([seed, step, BALANCE_SALT])


class RLTrainer:
    """One RL run in one workdir (local or ``gs://``). ``init_state_fn(setup) -> TrainState``
    gives the starting policy when no checkpoint exists (the SFT result, an imported model);
    without it the policy starts from ``Model`` init. ``on_step(trainer, step, record)`` is an
    optional hook after each logged step; ``on_batch(trainer, step, batch)`` one after each RL
    step's updates, with ``batch`` = {rollouts, reward, advantages, rows, minibatches} (the
    trained rows and each epoch's mini-batch row indices: for tests and diagnostics)."""

    def __init__(self, cfg: RLRunConfig, workdir, *, init_state_fn=None, on_step=None,
                 on_batch=None, progress: bool = True):
        self.cfg, self.workdir = cfg, as_path(workdir)
        self.init_state_fn, self.on_step, self.on_batch = init_state_fn, on_step, on_batch
        self.progress = progress and jax.process_index() == 0
        rl = cfg.rl
        self.mesh = make_mesh(cfg.mesh)
        self.setup = T.setup(cfg.optimizer_config(), self.mesh)
        self.tokenizer = rl_tokenizer(cfg)
        self.file_items = load_file_items(cfg)
        self.eval_items = eval_sets(cfg, self.file_items)
        self.engine = self._engine()
        self.collector = collect.RolloutCollector(cfg, self.tokenizer, self.engine,
                                                  self.file_items, self._initial_methods())
        self.logprob_fn = make_logprob_fn(self.setup, rl.rollout.temperature)
        self.update_step = make_update_step(self.setup, cfg)
        self.ckpt = Checkpointer(self.workdir / "ckpt", keep=cfg.train.keep_ckpts,
                                 async_save=cfg.train.async_ckpt)
        self.stop = StopSignals()
        self.reward_model = None  # rl.reward_source='reward_model': its scorer (B.3)
        if rl.reward_source == "reward_model":
            from moejax.rl.reward_model import RewardModelScorer
            self.reward_model = RewardModelScorer(cfg, self.mesh, rl.reward_model_dir)

    def _engine(self) -> RolloutEngine:
        """The rollout engine on the training mesh; with ``rl.rollout_dtype`` its model computes
        in that dtype over the same (fp32) parameters."""
        rl, eos, pad = self.cfg.rl, self.tokenizer.eos_id, self.tokenizer.pad_id
        if not rl.rollout_dtype or rl.rollout_dtype == self.cfg.model.dtype:
            return RolloutEngine(self.setup, rl.rollout, eos_id=eos, pad_id=pad)
        from flax import nnx

        from moejax.mesh import rules_for, use_mesh
        from moejax.model import Model

        model_cfg = dataclasses.replace(self.cfg.model, dtype=rl.rollout_dtype)
        with use_mesh(self.mesh, rules_for(self.cfg.mesh)):
            graphdef = nnx.split(nnx.eval_shape(lambda: Model(model_cfg, rngs=nnx.Rngs(0))),
                                 nnx.Param, ...)[0]
        return RolloutEngine(graphdef, rl.rollout, eos_id=eos, pad_id=pad, mesh=self.mesh,
                             rules=rules_for(self.cfg.mesh))

    # -- method state ------------------------------------------------------------------------
    @property
    def methods(self) -> dict:
        """The method switches' JSON state (the collector's; saved in checkpoint metadata)."""
        return self.collector.methods

    @methods.setter
    def methods(self, value: dict) -> None:
        self.collector.methods = value

    def _initial_methods(self) -> dict:
        """The switches' JSON-able state at step 0 (empty with every switch off)."""
        rl, out = self.cfg.rl, {}
        if rl.reward_calibration.enabled:
            out["calibration"] = {"lengths": [], "rewards": []}
        if rl.budget.uses_success_buffer:
            out["success"] = rl.budget.empty_buffer()
        if rl.budget.curriculum:
            out["curriculum"] = {**budget_lib.curriculum_init(rl.tasks.families, rl.budget.sec),
                                 "cursors": {f: 0 for f in rl.tasks.families}}
        return out

    # -- one RL step ---------------------------------------------------------------------------
    def _forward(self, params, rest, rows: dict) -> dict:
        batch = {k: to_global(self.mesh, v) for k, v in rows.items()}
        return {k: to_host(v) for k, v in self.logprob_fn(params, rest, batch).items()}

    def rl_step(self, state: T.TrainState, ref, step: int, cursor: int):
        """One RL step -> (state, cursor, metrics)."""
        rl = self.cfg.rl
        t0 = time.perf_counter()
        r, cursor, info = self.collector.collect(state, step, cursor)
        t_roll = time.perf_counter() - t0
        group = r.group
        P = int(group.max()) + 1  # prompts (groups) this step
        mode = rl.replay.mode
        forced = r.routing if mode == "r3" else None
        rows = rl_batch(r, np.zeros(len(r.tokens), np.float32), r.logprobs, None, forced)
        metrics = dict(info)
        old = r.logprobs
        if rl.old_logprobs == "recompute" or r.prefix_mask is not None:
            out = self._forward(state.params, state.rest, rows)
            if r.prefix_mask is not None:  # the rollout never sampled the prefix tokens
                r.logprobs = prefix_lib.prefix_old_logprobs(r.logprobs, out["logprobs"],
                                                            r.prefix_mask)
                old = r.logprobs
        if rl.old_logprobs == "recompute":
            old = out["logprobs"]
            mask = r.completion_mask
            metrics["rl/k3_train_rollout"] = float(
                np.sum(np.asarray(kl_lib.k3_value(r.logprobs - old, None, None)) * mask)
                / max(mask.sum(), 1))
            if "experts" in out and mode != "r3" and r.routing is not None:
                valid = r.routing_valid[:, :-1]  # tokens the rollout fed (the last one it did not)
                dis = routing_disagreement(out["experts"], r.routing[:, :, :-1], valid)
                metrics.update({f"rl/route_disagree/layer{i}": float(v)
                                for i, v in enumerate(dis)})
            if mode == "r2":
                forced = out["experts"]
        ref_lp = None
        if ref is not None:
            ref_lp = self._forward(ref["params"], ref.get("rest", state.rest), rows)["logprobs"]
        reward = self.collector.shaped_rewards(r, self._calibrated_rewards(r, metrics))
        if rl.kl_in_reward_coef > 0:
            kl_tok = np.asarray(kl_lib.kl_estimate(jnp.asarray(old), jnp.asarray(ref_lp),
                                                   rl.loss.kl_estimator))
            reward = np.asarray(adv_lib.kl_penalized_reward(
                jnp.asarray(reward), jnp.asarray(kl_tok), jnp.asarray(r.completion_mask),
                rl.kl_in_reward_coef))
        adv = self._advantages(r, reward, P, step)
        self._update_method_state(r, adv, metrics)
        ratio = (prefix_lib.schedule_value(rl.prefix.entropy_mask, step) if rl.prefix.enabled
                 else 0.0)
        rows = rl_batch(r, adv, old, ref_lp, forced, entropy_mask_ratio=ratio)
        sums: dict[str, float] = {}
        splits = []
        for epoch in range(rl.ppo_epochs):
            rng = np.random.default_rng([self.cfg.train.seed, step, epoch])
            splits.append(minibatch.make_minibatches(rl.minibatch_sampler, group, r.correct,
                                                     rl.mini_batches, rng))
            for idx in splits[-1]:
                mb = {k: to_global(self.mesh, np.ascontiguousarray(v[idx])) for k, v in rows.items()}
                state, m = self.update_step(state, mb)
                for k, v in jax.device_get(m).items():
                    sums[k] = sums.get(k, 0.0) + float(np.asarray(v))
        if self.on_batch is not None:
            self.on_batch(self, step, {"rollouts": r, "reward": reward, "advantages": adv,
                                       "rows": rows, "minibatches": splits})
        updates = rl.updates_per_step
        names = {"kl_ref": "kl"}  # the DESIGN contract's metric names
        metrics.update({f"rl/{names.get(k, k)}": v / updates for k, v in sums.items()
                        if k not in ("nonfinite",)})
        metrics["rl/nonfinite_updates"] = int(sums.get("nonfinite", 0))
        metrics.update(self._rollout_metrics(r, reward, group, P))
        if r.prefix_mask is not None:
            metrics.update(prefix_lib.prefix_metrics(r.prefix_mask, r.completion_mask))
            metrics["prefix/entropy_mask_ratio"] = ratio
        metrics["perf/rollout_s"] = t_roll
        metrics["perf/rollout_tokens_per_s"] = float(r.completion_lengths.sum()) / t_roll
        metrics["perf/step_s"] = time.perf_counter() - t0
        return state, cursor, metrics

    def _calibrated_rewards(self, r: Rollouts, metrics: dict) -> np.ndarray:
        """The rollouts' rewards (the verifier's, or the reward model's scores under
        ``rl.reward_source``), or under ``rl.reward_calibration`` r - alpha*b(length) with b
        fitted on the rolling buffer after appending this batch (rewards where b is undefined)."""
        cal = self.cfg.rl.reward_calibration
        raw = (r.rewards if self.reward_model is None
               else self.reward_model.score_rollouts(r, metrics))
        if not cal.enabled:
            return raw
        buf = calib_lib.buffer_append(self.methods["calibration"], r.completion_lengths,
                                      raw, cal.buffer_size)
        self.methods["calibration"] = buf
        fitted = calib_lib.apply(calib_lib.fit(buf["lengths"], buf["rewards"], cal),
                                 r.completion_lengths, raw)
        out = np.where(np.isfinite(fitted), fitted, raw).astype(np.float32)
        metrics["calib/length_corr_raw"] = length_correlation(r.completion_lengths, raw)
        metrics["calib/length_corr"] = length_correlation(r.completion_lengths, out)
        return out

    def _advantages(self, r: Rollouts, reward: np.ndarray, P: int, step: int) -> np.ndarray:
        """Group advantages [B] (or Prefix-RFT's token advantages [B, S-1]); the positive-only
        control keeps only the positive ones; ``rl.balanced_subsample`` computes them over each
        group's balanced subsample and masks the other rows out (in ``r.completion_mask``)."""
        rl = self.cfg.rl
        if r.prefix_mask is not None:
            adv = prefix_lib.prefix_advantages(reward, r.group, r.uid, r.completion_mask,
                                               r.prefix_mask, rl.num_generations, rl.prefix)
        elif rl.balanced_subsample:
            adv = self._balanced_advantages(r, reward, step)
        else:
            adv = np.asarray(adv_lib.group_advantages(jnp.asarray(reward), jnp.asarray(r.group),
                                                      P, rl.advantage))
        return minibatch.positive_only_advantages(adv) if rl.positive_only else adv

    def _balanced_advantages(self, r: Rollouts, reward: np.ndarray, step: int) -> np.ndarray:
        """RBB (b): group advantages of the kept rows [B] (0 elsewhere); dropped rows (and groups
        with one class only) get an all-zero completion mask, so no loss term or denominator."""
        rng = collect.method_rng(self.cfg.train.seed, step, BALANCE_SALT)
        keep = minibatch.balanced_subsample(r.group, r.correct, rng)
        adv = np.zeros(len(reward), np.float32)
        if len(keep):
            group, n = adv_lib.dense_group_ids(r.group[keep])
            adv[keep] = np.asarray(adv_lib.group_advantages(
                jnp.asarray(reward[keep]), jnp.asarray(group), n, self.cfg.rl.advantage))
        dropped = np.ones(len(reward), bool)
        dropped[keep] = False
        r.completion_mask = np.where(dropped[:, None], False, r.completion_mask)
        return adv

    def _update_method_state(self, r: Rollouts, adv: np.ndarray, metrics: dict) -> None:
        """After the advantages: the success buffer records this step's outcomes, SEC's
        Q-table moves toward each family's mean |advantage|."""
        rl = self.cfg.rl
        if "success" in self.methods:
            self.methods["success"] = budget_lib.record_outcomes(
                self.methods["success"], [tasks.split_key(it) for it in r.items], r.correct)
        if "curriculum" in self.methods:
            cm = np.asarray(r.completion_mask, np.float64)
            row_adv = adv if adv.ndim == 1 else (adv * cm).sum(1) / np.maximum(cm.sum(1), 1)
            arms = budget_lib.arm_rewards([it.family for it in r.items], row_adv)
            cur = budget_lib.curriculum_update(self.methods["curriculum"], arms, rl.budget.sec)
            self.methods["curriculum"] = cur
            metrics.update({f"budget/q/{a}": q for a, q in cur["q"].items()})

    @staticmethod
    def _rollout_metrics(r: Rollouts, reward, group, P) -> dict:
        out = {"rl/reward": float(np.mean(r.rewards)), "rl/reward_shaped": float(np.mean(reward)),
               "rl/accuracy": float(np.mean(r.correct)),
               "rl/response_len": float(np.mean(r.completion_lengths)),
               "rl/finished_frac": float(np.mean(r.finished)),
               "rl/effective_gradient_ratio": float(adv_lib.effective_gradient_ratio(
                   jnp.asarray(reward), jnp.asarray(group), P))}
        tiers = np.asarray(r.tiers)
        for t in sorted(set(r.tiers)):
            out[f"rl/accuracy/{t}"] = float(np.mean(r.correct[tiers == t]))
        return out

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, state: T.TrainState) -> dict:
        """Greedy accuracy per tier (``rl/greedy/<tier>``) and, with ``rl.eval_samples`` = n,
        pass@1 and pass@n per tier from n samples (``rl/pass@k/<tier>``, unbiased estimator),
        on the fixed held-out sets (training tiers and OOD tiers)."""
        rl = self.cfg.rl
        items = [it for its in self.eval_items.values() for it in its]
        key = jax.random.fold_in(jax.random.key(self.cfg.train.seed), collect.SAMPLER_SALT + 1)
        out = {"rl/eval_items": len(items)}
        greedy = self.collector.generate(state, items, 1, key, greedy=True)
        tiers = np.asarray(greedy.tiers)
        for t in self.eval_items:
            out[f"rl/greedy/{t}"] = float(np.mean(greedy.correct[tiers == t]))
        n = rl.eval_samples
        if n:
            s = self.collector.generate(state, items, n, key)
            correct = s.correct.reshape(len(items), n)
            names = [it.tier for it in items]
            ks = sorted({1, n})
            out.update(passk.pass_at_k_by_tier(names, correct, ks))
        return out

    # -- state, checkpoints and the loop -------------------------------------------------------
    def _initial_state(self) -> T.TrainState:
        if self.init_state_fn is not None:
            return self.init_state_fn(self.setup)
        return T.init_state(self.setup)

    def _abstract_ref(self):
        if not self.cfg.rl.needs_reference:
            return None
        a = self.setup.abstract_state
        ref = {"params": a.params}
        if jax.tree.leaves(a.rest):
            ref["rest"] = a.rest
        return ref

    @staticmethod
    def _copy(tree):
        return jax.tree.map(lambda x: x.copy(), tree)

    def run(self) -> dict:
        """Run to ``train.steps`` RL steps (resuming when a checkpoint exists); returns a
        summary with the first and last evaluations."""
        cfg = self.cfg
        write_or_check_config(cfg, self.workdir)
        latest = self.ckpt.latest_step()
        if latest is not None and latest > cfg.train.steps:
            raise ConfigError(f"train.steps={cfg.train.steps} is below step {latest} of the "
                              f"checkpoint in {self.ckpt.directory}: raise train.steps or use a "
                              "new --workdir")
        abstract_ref = self._abstract_ref()
        restored = (None if latest is None else self.ckpt.restore_latest(
            self.setup.abstract_state, None, abstract_extra=abstract_ref))
        if restored is not None:
            state, meta = restored
            step, cursor, ref = int(meta["step"]), int(meta["cursor"]), meta.get("extra")
            self.methods = meta.get("methods", self._initial_methods())
        else:
            self.methods = self._initial_methods()
            state, step, cursor = self._initial_state(), 0, 0
            ref = None
            if abstract_ref is not None:
                ref = {k: self._copy(getattr(state, k)) for k in abstract_ref}
        logger = MetricsLogger(self.workdir, resume_step=step if restored is not None else None)
        first = None
        if restored is None:
            first = {**self.evaluate(state)}
            logger.log(0, first)
        bar = tqdm(total=cfg.train.steps, initial=step, disable=not self.progress,
                   desc=self.workdir.name, dynamic_ncols=True)
        preempted, last = False, {}
        try:
            with self.stop:
                while step < cfg.train.steps:
                    state, cursor, metrics = self.rl_step(state, ref, step, cursor)
                    step += 1
                    final = step == cfg.train.steps
                    if step % cfg.rl.eval_every == 0 or final:
                        metrics.update(self.evaluate(state))
                    metrics["rl/prompts_seen"] = cursor
                    if step % cfg.train.log_every == 0 or "rl/eval_items" in metrics:
                        logger.log(step, metrics)
                        if self.on_step is not None:
                            self.on_step(self, step, metrics)
                    last = metrics
                    bar.set_postfix(reward=f"{metrics['rl/reward']:.3f}")
                    bar.update(1)
                    saved = step % cfg.train.ckpt_every == 0 or final
                    if saved:
                        self._save(step, state, cursor, ref)
                    if self.stop.agreed(step) and not final:
                        if not saved:
                            self._save(step, state, cursor, ref, force=True)
                        preempted = True
                        break
        finally:
            bar.close()
            self.ckpt.wait()
            logger.close()
        self.state = state
        summary = {"step": step, "prompts_seen": cursor, "preempted": preempted,
                   **{k: v for k, v in last.items() if not k.startswith("perf/")}}
        if first is not None:
            summary["initial"] = first
        return summary

    def _save(self, step, state, cursor, ref, *, force=False):
        meta = {"step": step, "cursor": cursor}
        if self.methods:  # the method switches' state, JSON (restores exactly)
            meta["methods"] = self.methods
        self.ckpt.save(step, state, None, meta, force=force, extra=ref)


def latest_policy_state(setup: T.Setup, workdir: str | os.PathLike) -> T.TrainState:
    """A fresh train state (step 0, new optimizer, this run's seed) holding the parameters and the
    non-trainable model variables (router biases, MaskMoE masks) of ``workdir``'s latest
    checkpoint (an SFT or RL run of the same model): how an RL run starts from its SFT stage."""
    ckpt = Checkpointer(as_path(workdir) / "ckpt", async_save=False)
    try:
        restored = ckpt.restore_latest(setup.abstract_state, None)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"{workdir}: no checkpoint to start the policy from")
    source, _ = restored
    fresh = T.init_state(setup)  # its optimizer moments are zeros whatever the parameters
    return dataclasses.replace(fresh, params=source.params, rest=source.rest)
