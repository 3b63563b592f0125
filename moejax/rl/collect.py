"""Rollout collection for one RL step: prompts from the task stream (a task-family mixture, the SEC
curriculum, the offline difficulty filter), completions sampled by the rollout engine and scored
(Knapsack's per-prompt rollout counts, Prefix-RFT's demonstration prefixes), and the refills of DAPO
dynamic sampling or the online difficulty filter. The RL trainer (``moejax.rl.trainer``) owns the
loop, the updates and the checkpoints; this owns what one step trains on.

The method switches' JSON state (``methods``: success buffer, SEC Q-table and family cursors,
calibration buffer) lives here, where prompts are drawn; the trainer saves and restores it. The
methods' host-side draws are keyed by (``train.seed``, step, a salt) and the sampler's key is folded
from the saved train-state rng and the step, so a resumed run draws the same prompts and completions.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from moejax import train as T
from moejax.config import ConfigError
from moejax.rl import advantages as adv_lib
from moejax.rl import budget as budget_lib
from moejax.rl import encode, rewards, tasks
from moejax.rl import prefix as prefix_lib
from moejax.rl.config import RLRunConfig
from moejax.rl.rollout import RolloutEngine
from moejax.rl.rows import Rollouts
from moejax.train import to_host

RL_STREAM_OFFSET = 1 << 40  # RL prompts come from another part of the item stream than SFT's
SAMPLER_SALT = 0x5EED  # the sampler's key is folded from the saved rng, this salt and the step


def method_rng(seed: int, step: int, salt: int, *more: int) -> np.random.Generator:
    """A method switch's host-side draws at ``step``: default_rng([seed, step, salt, *more])."""
    return np.random.default_rng([seed, step, salt, *more])


class RolloutCollector:
    """Prompts -> scored ``Rollouts`` for one RL step (``collect``), and the greedy / sampled
    generations evaluation scores (``generate``). ``methods`` is the switches' state dict."""

    def __init__(self, cfg: RLRunConfig, tokenizer, engine: RolloutEngine, file_items,
                 methods: dict):
        self.cfg, self.tokenizer, self.engine, self.file_items = cfg, tokenizer, engine, file_items
        self.methods = methods
        self.chat = None if cfg.rl.chat_template == "none" else "auto"

    def items(self, cursor: int, n: int, step: int = 0, draw: int = 0) -> list:
        """``n`` prompts from the stream at ``cursor``, or under the curriculum each from the
        family SEC draws (per-family cursors in the method state)."""
        rl = self.cfg.rl
        if rl.budget.curriculum:
            rng = method_rng(self.cfg.train.seed, step, budget_lib.BUDGET_SALT, draw)
            return self._curriculum_items(n, rng)
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
            return self.items(cursor, P, step, draw), cursor + P, {}
        kept, skipped = [], []
        for extra in range(1 + rl.max_refills):
            items = self.items(cursor, P, step, draw * (1 + rl.max_refills) + extra)
            cursor += P
            keep = budget_lib.offline_keep(self.methods["success"],
                                           [tasks.split_key(it) for it in items],
                                           rl.budget.difficulty)
            kept += [it for it, k in zip(items, keep) if k]
            skipped += [it for it, k in zip(items, keep) if not k]
            if len(kept) >= P:
                break
        return (kept + skipped)[:P], cursor, {"budget/offline_skipped": len(skipped)}

    def prompts(self, items) -> encode.PromptBatch:
        """Prompt ids padded to the rollout bucket; a prompt too long for it, or a task text the
        tokenizer cannot represent, is a ConfigError naming the field to change."""
        try:
            return encode.encode_prompts(items, self.tokenizer, chat_template=self.chat,
                                         pad_to=self.cfg.rl.rollout.max_prompt_len)
        except ValueError as e:
            field = "rl.rollout.max_prompt_len" if "pad_to" in str(e) else "data.tokenizer"
            raise ConfigError(f"{field}: {e}") from e

    def generate(self, state: T.TrainState, items, G: int, key, *, greedy=False) -> Rollouts:
        """Sample G completions of each item and score them (host arrays)."""
        p = self.prompts(items)
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
        p = self.prompts(items)
        demos = [self._demo_ids(it) for it in items]
        rng = method_rng(self.cfg.train.seed, step, prefix_lib.PREFIX_SALT)
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
        r = self.generate(state, rows, 1, key)
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
        return self.generate(state, items, rl.num_generations, key), {}

    def shaped_rewards(self, r: Rollouts, base: np.ndarray | None = None) -> np.ndarray:
        """``base`` (default the rollouts' rewards) with DAPO's overlong shaping."""
        rl = self.cfg.rl
        out = (r.rewards if base is None else base).astype(np.float32)
        if rl.overlong_cache_len > 0:
            out = out + np.asarray(adv_lib.overlong_penalty(
                r.completion_lengths, rl.rollout.max_new_tokens, rl.overlong_cache_len,
                rl.overlong_factor))
        return out

    def collect(self, state, step: int, cursor: int) -> tuple[Rollouts, int, dict]:
        """This step's groups: one rollout batch, or under dynamic sampling the first
        ``prompts_per_step`` groups with reward variance from up to 1 + max_refills batches
        (topped up with filtered groups, counted in ``dapo/short_groups``, if too few).
        ``rl/rollouts`` and ``rl/rollout_tokens`` count every rollout sampled (refills included;
        Prefix-RFT's demonstration tokens are not sampled)."""
        rl = self.cfg.rl
        P, G = rl.prompts_per_step, rl.num_generations
        base = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng),
                                                     SAMPLER_SALT), step)
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
        shaped = self.shaped_rewards(r)
        return np.asarray(adv_lib.group_signal_mask(jnp.asarray(shaped), group, P,
                                                    rl.filter_rule))
