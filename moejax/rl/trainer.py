"""The RL loop (GRPO family): rollout -> reward -> advantages -> PPO-style updates, with evaluation,
checkpoints and exact resume. Built from the pretraining pieces (mesh, ``train.Setup`` and
optimizer, Orbax ``Checkpointer``, ``MetricsLogger``, ``StopSignals``); the compiled programs are the
rollout engine (``moejax.rl.rollout``) and the policy programs (``moejax.rl.policy``).

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
from moejax.rl import encode, minibatch, passk, rewards, tasks
from moejax.rl import kl as kl_lib
from moejax.rl import prefix as prefix_lib
from moejax.rl.config import RLRunConfig
from moejax.rl.policy import make_logprob_fn, make_update_step
from moejax.rl.rollout import RolloutEngine
from moejax.rl.rows import Rollouts, length_correlation, rl_batch, routing_disagreement, to_global
from moejax.rl.run_inputs import eval_sets, load_file_items, rl_tokenizer
from moejax.train import to_host
from moejax.trainer import StopSignals, write_or_check_config

RL_STREAM_OFFSET = 1 << 40  # RL prompts come from another part of the item stream than SFT's
_SAMPLER_SALT = 0x5EED
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
        self.logprob_fn = make_logprob_fn(self.setup, rl.rollout.temperature)
        self.update_step = make_update_step(self.setup, cfg)
        self.ckpt = Checkpointer(self.workdir / "ckpt", keep=cfg.train.keep_ckpts,
                                 async_save=cfg.train.async_ckpt)
        self.stop = StopSignals()
        self.chat = None if rl.chat_template == "none" else "auto"
        self.methods = self._initial_methods()
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

    def _method_rng(self, step: int, salt: int, *more: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.train.seed, step, salt, *more])

    # -- prompts and rollouts ----------------------------------------------------------------
    def _items(self, cursor: int, n: int, step: int = 0, draw: int = 0) -> list:
        """``n`` prompts from the stream at ``cursor``, or under the curriculum each from the
        family SEC draws (per-family cursors in the method state)."""
        rl = self.cfg.rl
        if rl.budget.curriculum:
            return self._curriculum_items(n, self._method_rng(step, budget_lib.BUDGET_SALT, draw))
        index = [tasks.pool_index(cursor + i, rl.prompt_pool) for i in range(n)]
        if rl.family_weights:  # a task-family mixture (C.1)
            return [tasks.mixture_item(rl.tasks, rl.family_weights, RL_STREAM_OFFSET + i)
                    for i in index]
        train = None if self.file_items is None else self.file_items[0]
        return [tasks.stream_item(rl.tasks, train, i, RL_STREAM_OFFSET) for i in index]

    def _curriculum_items(self, n: int, rng: np.random.Generator) -> list:
        rl, cur = self.cfg.rl, self.methods["curriculum"]
        cursors, items = dict(cur["cursors"]), []
        for arm in budget_lib.curriculum_sample(cur, n, rl.budget.sec, rng):
            family_cfg = dataclasses.replace(rl.tasks, families=(arm,))
            index = tasks.pool_index(cursors[arm], rl.prompt_pool)
            items.append(tasks.train_item(family_cfg, RL_STREAM_OFFSET + index))
            cursors[arm] += 1
        self.methods["curriculum"] = {**cur, "cursors": cursors}
        return items

    def _draw_items(self, step: int, cursor: int, draw: int) -> tuple[list, int, dict]:
        """This draw's prompts -> (items, cursor, info); ``rl.budget.filter='offline'`` skips
        prompts whose buffered success rate is outside the band (up to 1 + max_refills draws,
        then topped up with skipped ones)."""
        rl, P = self.cfg.rl, self.cfg.rl.prompts_per_step
        if rl.budget.filter != "offline":
            return self._items(cursor, P, step, draw), cursor + P, {}
        kept, skipped = [], []
        for extra in range(1 + rl.max_refills):
            items = self._items(cursor, P, step, draw * (1 + rl.max_refills) + extra)
            cursor += P
            keep = budget_lib.offline_keep(self.methods["success"],
                                           [tasks.split_key(it) for it in items],
                                           rl.budget.difficulty)
            kept += [it for it, k in zip(items, keep) if k]
            skipped += [it for it, k in zip(items, keep) if not k]
            if len(kept) >= P:
                break
        return (kept + skipped)[:P], cursor, {"budget/offline_skipped": len(skipped)}

    def _prompts(self, items) -> encode.PromptBatch:
        """Prompt ids padded to the rollout bucket; a prompt too long for it, or a task text the
        tokenizer cannot represent, is a ConfigError naming the field to change."""
        try:
            return encode.encode_prompts(items, self.tokenizer, chat_template=self.chat,
                                         pad_to=self.cfg.rl.rollout.max_prompt_len)
        except ValueError as e:
            field = "rl.rollout.max_prompt_len" if "pad_to" in str(e) else "data.tokenizer"
            raise ConfigError(f"{field}: {e}") from e

    def _generate(self, state: T.TrainState, items, G: int, key, *, greedy=False) -> Rollouts:
        """Sample G completions of each item and score them (host arrays)."""
        p = self._prompts(items)
        return self._sample(state, p.tokens, p.lengths, items, G, key, greedy=greedy)

    def _sample(self, state: T.TrainState, prompt_tokens, prompt_lengths, items, G: int, key, *,
                greedy=False, prefix_lengths=None) -> Rollouts:
        """Sample G completions of each prompt row and score them; with ``prefix_lengths`` [B]
        (Prefix-RFT) the rows' prompts end with that many demonstration tokens, which are then
        read as the start of the response (scored with it, marked by ``prefix_mask``)."""
        res = self.engine.generate((state.params, state.rest), prompt_tokens, prompt_lengths,
                                   num_generations=G, rng=key, greedy=greedy)
        tokens = to_host(res.tokens)
        plen, clen = to_host(res.prompt_lengths), to_host(res.completion_lengths)
        completion_mask, prefix_mask = to_host(res.completion_mask), None
        if prefix_lengths is not None:
            plen, clen, completion_mask, prefix_mask = prefix_lib.move_prefix_to_response(
                plen, clen, prefix_lengths, tokens.shape[1])
        completions = [row[a:a + c] for row, a, c in zip(tokens, plen, clen)]
        texts = encode.decode_completions(np.array(
            [np.pad(c, (0, tokens.shape[1] - len(c)), constant_values=self.tokenizer.pad_id)
             for c in completions]), self.tokenizer)
        rows = [it for it in items for _ in range(G)]
        scored = rewards.score_batch(rows, texts, self.cfg.rl.reward)
        routing = None if res.routing is None else np.swapaxes(to_host(res.routing), 0, 1)
        routed = None if res.routing_valid is None else to_host(res.routing_valid)
        return Rollouts(tokens=tokens, prompt_lengths=plen, completion_lengths=clen,
                        finished=to_host(res.finished), completion_mask=completion_mask,
                        logprobs=to_host(res.logprobs), routing=routing, routing_valid=routed,
                        rewards=scored["reward"], correct=scored["correct"],
                        tiers=[it.tier for it in rows], items=rows,
                        group=np.arange(len(rows)) // G, prefix_mask=prefix_mask)

    def _demo_ids(self, item) -> list[int]:
        """Token ids of an item's demonstration and eos (what a Prefix-RFT prefix is cut from)."""
        text = tasks.demonstration(item, self.cfg.rl.sft.scratchpad)
        try:
            ids = encode.encode_checked(self.tokenizer, text, f"task {item.tier} demonstration")
        except ValueError as e:
            raise ConfigError(f"data.tokenizer: {e}") from e
        return ids + [self.tokenizer.eos_id]

    def _prefix_rollouts(self, state, items, step: int, key) -> tuple[Rollouts, dict]:
        """Prefix-RFT: ``num_prefix`` variants per prompt (prompt + a cut of its demonstration,
        lengths drawn from the ratio schedule), ``num_generations`` continuations each."""
        rl, pad = self.cfg.rl, self.tokenizer.pad_id
        p = self._prompts(items)
        demos = [self._demo_ids(it) for it in items]
        rng = self._method_rng(step, prefix_lib.PREFIX_SALT)
        try:
            variants = prefix_lib.build_variants([[len(d)] for d in demos], p.lengths, rl.prefix,
                                                 step, rng, rl.rollout.max_prompt_len)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        tokens = np.full((len(variants), rl.rollout.max_prompt_len), pad, np.int32)
        lengths = np.zeros(len(variants), np.int32)
        for i, v in enumerate(variants):
            ids = list(p.tokens[v.prompt, :p.lengths[v.prompt]]) + demos[v.prompt][:v.prefix_len]
            tokens[i, :len(ids)], lengths[i] = ids, len(ids)
        arr = prefix_lib.variant_arrays(variants, rl.num_generations)
        r = self._sample(state, tokens, lengths, [items[v.prompt] for v in variants],
                         rl.num_generations, key, prefix_lengths=arr["prefix_len"])
        r.group, r.uid = arr["prompt"], arr["uid"]
        lo, hi = prefix_lib.ratio_bounds(rl.prefix, step)
        return r, {"prefix/ratio_low": lo, "prefix/ratio_high": hi,
                   "prefix/ratio_mean": float(np.mean(arr["ratio"][arr["uid"] != 0]))
                   if np.any(arr["uid"] != 0) else 0.0}

    def _knapsack_rollouts(self, state, items, key) -> tuple[Rollouts, dict]:
        """Knapsack RL: N_i rollouts of prompt i (Σ N_i = prompts_per_step x num_generations)
        from the success buffer's estimates; one G=1 generation over the repeated prompts."""
        rl = self.cfg.rl
        p_hat, valid = budget_lib.success_rates(self.methods["success"],
                                                [tasks.split_key(it) for it in items])
        n, info = budget_lib.knapsack_allocate(p_hat, valid, rl.budget.knapsack,
                                               total=rl.rows_per_step)
        rows = [it for it, k in zip(items, n) for _ in range(int(k))]
        r = self._generate(state, rows, 1, key)
        r.group = np.repeat(np.arange(len(items)), n)
        return r, {"budget/effective_prompts": info["effective"],
                   "budget/knapsack_value": info["value"],
                   "budget/fallback": int(info["fallback"]),
                   "budget/max_n": int(n.max()), "budget/min_n": int(n.min())}

    def _step_rollouts(self, state, items, step: int, key) -> tuple[Rollouts, dict]:
        """One rollout batch of ``items`` under the configured method -> (rollouts, info)."""
        rl = self.cfg.rl
        if rl.prefix.enabled:
            return self._prefix_rollouts(state, items, step, key)
        if rl.budget.allocation == "knapsack":
            return self._knapsack_rollouts(state, items, key)
        return self._generate(state, items, rl.num_generations, key), {}

    def _shaped_rewards(self, r: Rollouts, base: np.ndarray | None = None) -> np.ndarray:
        """``base`` (default the rollouts' rewards) with DAPO's overlong shaping."""
        rl = self.cfg.rl
        out = (r.rewards if base is None else base).astype(np.float32)
        if rl.overlong_cache_len > 0:
            out = out + np.asarray(adv_lib.overlong_penalty(
                r.completion_lengths, rl.rollout.max_new_tokens, rl.overlong_cache_len,
                rl.overlong_factor))
        return out

    def _collect(self, state, step: int, cursor: int) -> tuple[Rollouts, int, dict]:
        """This step's groups: one rollout batch, or under dynamic sampling the first
        ``prompts_per_step`` groups with reward variance from up to 1 + max_refills batches
        (topped up with filtered groups, counted in ``dapo/short_groups``, if too few).
        ``rl/rollouts`` and ``rl/rollout_tokens`` count every rollout sampled (refills included;
        Prefix-RFT's demonstration tokens are not sampled)."""
        rl = self.cfg.rl
        P, G = rl.prompts_per_step, rl.num_generations
        base = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng),
                                                     _SAMPLER_SALT), step)
        refill = rl.dynamic_sampling or rl.budget.filter == "online"
        kept, dropped, info, draws = [], [], {}, 0
        sampled = {"rl/rollouts": 0, "rl/rollout_tokens": 0}
        while True:
            items, cursor, drawn = self._draw_items(step, cursor, draws)
            r, made = self._step_rollouts(state, items, step, jax.random.fold_in(base, draws))
            draws += 1
            sampled["rl/rollouts"] += len(r.tokens)
            sampled["rl/rollout_tokens"] += int(r.completion_lengths.sum()) - (
                0 if r.prefix_mask is None else int(r.prefix_mask.sum()))
            info = {**drawn, **made, **sampled}
            if not refill:
                return r, cursor, info
            group = np.arange(P * G) // G
            signal = self._group_signal(r, group, P)
            for g in range(P):
                (kept if signal[g] else dropped).append(r.select(np.arange(g * G, (g + 1) * G)))
            if len(kept) >= P or draws > rl.max_refills:
                break
        info = {"dapo/draws": draws, "dapo/kept_groups": min(len(kept), P),
                "dapo/short_groups": max(P - len(kept), 0), **sampled}
        out = Rollouts.concat((kept + dropped)[:P])
        out.group = np.arange(P * G) // G
        return out, cursor, info

    def _group_signal(self, r: Rollouts, group, P: int) -> np.ndarray:
        """Which groups train under refilling [P]: DAPO's reward-variance rule, or with
        ``rl.budget.filter='online'`` the difficulty band on the group's success rate."""
        rl = self.cfg.rl
        if rl.budget.filter == "online":
            rates = budget_lib.group_success_rates(r.correct, group, P)
            return budget_lib.difficulty_keep(rates, rl.budget.difficulty)
        shaped = self._shaped_rewards(r)
        return np.asarray(adv_lib.group_signal_mask(jnp.asarray(shaped), group, P,
                                                    rl.filter_rule))

    # -- one RL step ---------------------------------------------------------------------------
    def _forward(self, params, rest, rows: dict) -> dict:
        batch = {k: to_global(self.mesh, v) for k, v in rows.items()}
        return {k: to_host(v) for k, v in self.logprob_fn(params, rest, batch).items()}

    def rl_step(self, state: T.TrainState, ref, step: int, cursor: int):
        """One RL step -> (state, cursor, metrics)."""
        rl = self.cfg.rl
        t0 = time.perf_counter()
        r, cursor, info = self._collect(state, step, cursor)
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
        reward = self._shaped_rewards(r, self._calibrated_rewards(r, metrics))
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
        rng = self._method_rng(step, BALANCE_SALT)
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
        key = jax.random.fold_in(jax.random.key(self.cfg.train.seed), _SAMPLER_SALT + 1)
        out = {"rl/eval_items": len(items)}
        greedy = self._generate(state, items, 1, key, greedy=True)
        tiers = np.asarray(greedy.tiers)
        for t in self.eval_items:
            out[f"rl/greedy/{t}"] = float(np.mean(greedy.correct[tiers == t]))
        n = rl.eval_samples
        if n:
            s = self._generate(state, items, n, key)
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
