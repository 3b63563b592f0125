"""A Bradley-Terry reward model for RL (methods/rl-and-data.md B.3): the policy backbone with a
scalar head ``w · h_last`` (h_last: the final-norm hidden state at a row's last non-pad token, the
eos of a finished completion; no bias, it cancels in every preference), trained on preference
pairs of the tasks and scored over rollouts as the reward (``rl.reward_source='reward_model'``).

Pairs (``build_pair``, a pure function of (seed, i)): chosen = the solver's demonstration
(verified), rejected = it with a wrong final answer; each side repeats k of its lines and the
chosen side gets the larger k with probability ``length_bias`` (the PLANTED length bias: an RM
fit to them learns "longer is better"). ``train_reward_model``: the SFT backbone + a random head,
AdamW on ``bradley_terry_loss``, sharded like the policy, Orbax checkpoints every ``ckpt_every``
steps, at the end and on SIGTERM/Ctrl-C (a rerun resumes or reuses it); held-out pair scores go
to ``rm_eval.json``. ``RewardModelScorer``: the RM restored on the RL run's mesh, scoring rollout
rows in fixed-size chunks (one compiled program).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import train as T
from moejax.config import ConfigError
from moejax.config_checks import _fail
from moejax.paths import as_path, read_json, write_text_atomic
from moejax.rl import encode, tasks
from moejax.rl.calibration import bradley_terry_loss
from moejax.rl.rows import length_correlation, to_global
from moejax.rl.run_inputs import rl_tokenizer
from moejax.rl.trainer import latest_policy_state

RM_STREAM_OFFSET = 1 << 41  # pair items come from another part of the stream than SFT's and RL's
_PAIR_SALT = 0xB7
RM_CONFIG = "rm_config.json"
RM_EVAL = "rm_eval.json"


@dataclasses.dataclass(frozen=True)
class RewardModelConfig:
    """The RM stage: ``steps`` AdamW steps of ``batch_size`` pairs; pairs with ``length_bias`` =
    P(chosen side longer) and up to ``max_extra_lines`` repeated lines per side."""

    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-4
    warmup_steps: int = 10
    clip_norm: float = 1.0
    length_bias: float = 0.8
    max_extra_lines: int = 3
    eval_pairs: int = 256  # held-out pairs (items of the eval split) scored for the report
    ckpt_every: int = 50
    score_rows: int = 64  # rows per scoring call (rounded up to the batch shards)
    seed: int = 0

    def __post_init__(self):
        for name, low in (("steps", 1), ("batch_size", 1), ("eval_pairs", 1), ("ckpt_every", 1),
                          ("score_rows", 1), ("warmup_steps", 0), ("max_extra_lines", 0)):
            if getattr(self, name) < low:
                _fail(f"reward_model.{name}", getattr(self, name), f"must be >= {low}")
        for name in ("lr", "clip_norm"):
            if not getattr(self, name) > 0:
                _fail(f"reward_model.{name}", getattr(self, name), "must be > 0")
        if not 0.0 <= self.length_bias <= 1.0:
            _fail("reward_model.length_bias", self.length_bias, "is a probability in [0, 1]")


# -- preference pairs ----------------------------------------------------------------------------

@dataclasses.dataclass
class Pairs:
    """Rows of both sides int32 [n, S] (prompt + completion + eos, pad after), their token
    counts [n] and completion token counts [n] (the length c)."""

    chosen: np.ndarray
    chosen_lengths: np.ndarray
    chosen_completion: np.ndarray
    rejected: np.ndarray
    rejected_lengths: np.ndarray
    rejected_completion: np.ndarray


def wrong_answer_text(item: tasks.TaskItem, rng: np.random.Generator) -> str:
    """A wrong integer answer near the right one (arithmetic families only)."""
    if item.family not in tasks.ARITH_OPS and item.family != "multi":
        raise ConfigError(f"rl.tasks.families: reward-model pairs need arithmetic families "
                          f"(add, sub, mul, multi); got task {item.tier}")
    delta = int(rng.integers(1, 10)) * (1 if rng.random() < 0.5 else -1)
    return str(int(item.answer) + delta)


def verbose(text: str, k: int) -> str:
    """``text`` with k of its lines repeated in place (scratchpad lines first, cyclically; the
    final answer line when there are none): the planted verbosity."""
    lines = text.split("\n")
    body = [i for i, line in enumerate(lines[:-1]) if line] or [len(lines) - 1]
    extra = collections.Counter(body[j % len(body)] for j in range(k))
    return "\n".join(x for i, line in enumerate(lines) for x in [line] * (1 + extra.get(i, 0)))


def _side(prompt_ids, text, k, tokenizer, width, item) -> list[int]:
    """The row prompt + ``text`` with k repeated lines + eos, k lowered until it fits ``width``."""
    for kk in range(k, -1, -1):
        ids = prompt_ids + encode.encode_checked(tokenizer, verbose(text, kk), "RM pair")
        if len(ids) < width:
            return ids + [tokenizer.eos_id]
    raise ConfigError(f"rl.rollout.max_new_tokens: the demonstration of task {item.tier} does not "
                      f"fit in rollout.max_prompt_len + max_new_tokens = {width} tokens")


def build_pair(item: tasks.TaskItem, rng: np.random.Generator, tokenizer, width: int,
               cfg: RewardModelConfig, *, scratchpad: bool = True, chat=None):
    """(chosen ids, rejected ids, prompt length) for one item (see the module docstring)."""
    prompt_ids = encode.encode_prompts([item], tokenizer, chat_template=chat).tokens[0].tolist()
    right = tasks.demonstration(item, scratchpad)
    wrong = right.rsplit("=", 1)[0] + "=" + wrong_answer_text(item, rng)
    lo, hi = sorted(rng.choice(cfg.max_extra_lines + 1, size=2, replace=cfg.max_extra_lines == 0))
    k_c, k_r = (hi, lo) if rng.random() < cfg.length_bias else (lo, hi)
    return (_side(prompt_ids, right, int(k_c), tokenizer, width, item),
            _side(prompt_ids, wrong, int(k_r), tokenizer, width, item), len(prompt_ids))


def pairs_from_items(run_cfg, cfg: RewardModelConfig, tokenizer, items, seeds) -> Pairs:
    """Pairs of ``items`` in the run's rows; pair j draws from rng([cfg.seed, seeds[j], salt])."""
    width, chat = _width(run_cfg), None if run_cfg.rl.chat_template == "none" else "auto"
    made = [build_pair(it, np.random.default_rng([cfg.seed, int(s), _PAIR_SALT]), tokenizer,
                       width, cfg, scratchpad=run_cfg.rl.sft.scratchpad, chat=chat)
            for it, s in zip(items, seeds)]

    def pad(rows):
        lengths = np.array([len(r) for r in rows], np.int32)
        return encode._pad(rows, width, tokenizer.pad_id, "RM pairs"), lengths
    (c, cl), (r, rl) = pad([m[0] for m in made]), pad([m[1] for m in made])
    plen = np.array([m[2] for m in made], np.int32)
    return Pairs(c, cl, cl - plen, r, rl, rl - plen)


def train_pairs(run_cfg, cfg: RewardModelConfig, tokenizer, step: int) -> Pairs:
    """Step ``step``'s batch: pairs of training items step*B .. step*B + B - 1 of the stream."""
    idx = range(step * cfg.batch_size, (step + 1) * cfg.batch_size)
    items = [tasks.train_item(run_cfg.rl.tasks, RM_STREAM_OFFSET + i) for i in idx]
    return pairs_from_items(run_cfg, cfg, tokenizer, items, idx)


def eval_pairs(run_cfg, cfg: RewardModelConfig, tokenizer) -> Pairs:
    """Held-out pairs: items of every training tier's eval split (never trained on)."""
    tiers = tasks.train_tiers(run_cfg.rl.tasks)
    per = -(-cfg.eval_pairs // len(tiers))
    items = [it for t in tiers for it in tasks.eval_items(run_cfg.rl.tasks, t, per)]
    items = items[:cfg.eval_pairs]
    return pairs_from_items(run_cfg, cfg, tokenizer, items, [(1 << 40) + i for i in
                                                             range(len(items))])


def _width(run_cfg) -> int:
    return run_cfg.rl.rollout.max_prompt_len + run_cfg.rl.rollout.max_new_tokens


# -- the model -----------------------------------------------------------------------------------

@dataclasses.dataclass
class RMSetup:
    """The policy's Setup + the RM's optimizer, shardings, abstract state (params = {"backbone":
    policy params, "head": {"w": [D]}})."""

    policy: T.Setup
    tx: optax.GradientTransformation
    state_shardings: T.TrainState
    abstract_state: T.TrainState


def rm_setup(run_cfg, mesh, cfg: RewardModelConfig = RewardModelConfig()) -> RMSetup:
    """Shapes and shardings of the RM's train state on ``mesh`` (head replicated)."""
    s = T.setup(run_cfg, mesh)
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adamw(
        optax.warmup_constant_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1)), weight_decay=0.0))
    replicated = NamedSharding(mesh, P())
    D = run_cfg.model.d_model
    params = {"backbone": s.abstract_state.params,
              "head": {"w": jax.ShapeDtypeStruct((D,), jnp.float32, sharding=replicated)}}
    p_sh = {"backbone": s.state_shardings.params, "head": {"w": replicated}}
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt, p_sh,
                                   transform_non_params=lambda _: replicated)
    shardings = T.TrainState(step=replicated, params=p_sh, rest=s.state_shardings.rest,
                             opt_state=opt_sh, rng=replicated)
    abstract = T.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                            rest=s.abstract_state.rest, opt_state=abstract_opt,
                            rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                            abstract, shardings)
    return RMSetup(s, tx, shardings, abstract)


def last_hidden(graphdef, backbone, rest, tokens, lengths):
    """The final-norm hidden state at each row's last real token: tokens [n, S] int32, lengths
    [n] -> [n, D] float32 (the model with its unembedding swapped for the identity)."""
    model = nnx.merge(graphdef, backbone, rest)
    model.lm_head, model.mtp = (lambda h: h), None
    S = tokens.shape[1]
    h, _ = model(tokens, segment_ids=(jnp.arange(S)[None] < lengths[:, None]).astype(jnp.int32))
    idx = jnp.clip(lengths - 1, 0, S - 1)[:, None, None]
    return jnp.take_along_axis(h, idx, axis=1)[:, 0].astype(jnp.float32)


def scores(graphdef, params, rest, tokens, lengths):
    """RM scores [n] float32."""
    return last_hidden(graphdef, params["backbone"], rest, tokens, lengths) @ params["head"]["w"]


def make_bt_grad(rs: RMSetup):
    """Traceable ``(state, batch) -> (grads, metrics)`` of the Bradley-Terry loss; batch =
    {chosen, chosen_lengths, rejected, rejected_lengths} (rows over the batch axes)."""
    graphdef = rs.policy.graphdef

    def loss_fn(params, rest, batch):
        n = batch["chosen"].shape[0]
        tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])
        lengths = jnp.concatenate([batch["chosen_lengths"], batch["rejected_lengths"]])
        s = scores(graphdef, params, rest, tokens, lengths)
        return bradley_terry_loss(s[:n], s[n:])

    def grad_fn(state: T.TrainState, batch: dict):
        with T.tracing_mesh(rs.policy):
            rest = jax.tree.map(lambda x: x, state.rest)
            grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, rest, batch)
        return grads, metrics
    return grad_fn


def make_bt_step(rs: RMSetup):
    """Jitted ``(state, batch) -> (state, metrics)``: one AdamW step on the BT loss."""
    grad_fn = make_bt_grad(rs)

    def step_fn(state: T.TrainState, batch: dict):
        grads, metrics = grad_fn(state, batch)
        updates, opt = rs.tx.update(grads, state.opt_state, state.params)
        new = T.TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           rest=state.rest, opt_state=opt, rng=state.rng)
        return new, {**metrics, "grad_norm": optax.tree.norm(grads)}

    replicated = NamedSharding(rs.policy.mesh, P())
    return jax.jit(step_fn, out_shardings=(rs.state_shardings, replicated), donate_argnums=(0,))


def make_score_fn(rs: RMSetup):
    """Jitted ``(params, rest, tokens [n, S], lengths [n]) -> scores [n]`` (replicated)."""
    graphdef = rs.policy.graphdef

    def fn(params, rest, tokens, lengths):
        with T.tracing_mesh(rs.policy):
            return scores(graphdef, params, rest, tokens, lengths)
    return jax.jit(fn, out_shardings=NamedSharding(rs.policy.mesh, P()))


def init_rm_state(rs: RMSetup, policy_state: T.TrainState, seed: int) -> T.TrainState:
    """The RM's step-0 state: the policy's backbone, head ~ N(0, 1/D), fresh AdamW moments."""
    D = rs.abstract_state.params["head"]["w"].shape[0]
    params = {"backbone": policy_state.params,
              "head": {"w": jax.random.normal(jax.random.key(seed), (D,)) / np.sqrt(D)}}
    init = jax.jit(lambda p: T.TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                          rest=policy_state.rest, opt_state=rs.tx.init(p),
                                          rng=policy_state.rng),
                   out_shardings=rs.state_shardings)
    return init(params)


def _rows_global(mesh, batch: dict) -> dict:
    return {k: to_global(mesh, np.ascontiguousarray(v)) for k, v in batch.items()}


def pair_batch(p: Pairs) -> dict[str, np.ndarray]:
    return {k: getattr(p, k) for k in ("chosen", "chosen_lengths", "rejected", "rejected_lengths")}


def _check_rm_config(workdir, run_cfg, cfg: RewardModelConfig) -> None:
    """Write ``rm_config.json`` (RM settings, model, tasks, row width); refuse other values."""
    record = {"reward_model": dataclasses.asdict(cfg), "width": _width(run_cfg),
              "model": json.loads(run_cfg.to_json())["model"], "tasks": run_cfg.rl.tasks}
    record = json.loads(json.dumps(record, default=dataclasses.asdict))  # as it reads back
    path, saved = as_path(workdir) / RM_CONFIG, read_json(as_path(workdir) / RM_CONFIG)
    if saved is not None and saved != record:
        raise ConfigError(f"{path} holds a reward model trained with other settings ("
                          f"{sorted(k for k in record if saved.get(k) != record[k])}); use a "
                          "new directory or the old settings")
    if jax.process_index() == 0:
        write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True))


def train_reward_model(run_cfg, cfg: RewardModelConfig, workdir, init_dir) -> dict:
    """Train (resume, or reuse) the RM in ``workdir`` from the SFT checkpoint in ``init_dir``,
    then score the held-out pairs into ``rm_eval.json`` -> {"step", "preempted", "accuracy"}."""
    from moejax.ckpt import Checkpointer
    from moejax.mesh import make_mesh
    from moejax.metrics import MetricsLogger
    from moejax.trainer import StopSignals

    workdir = as_path(workdir)
    done = read_json(workdir / RM_EVAL)
    _check_rm_config(workdir, run_cfg, cfg)
    if done is not None:
        return {"step": cfg.steps, "preempted": False, "accuracy": done["accuracy"]}
    mesh, tok = make_mesh(run_cfg.mesh), rl_tokenizer(run_cfg)
    if cfg.batch_size % T.batch_shards(mesh):
        _fail("reward_model.batch_size", cfg.batch_size, f"must divide over the mesh's "
              f"{T.batch_shards(mesh)} batch shards (data*fsdp*expert)")
    rs = rm_setup(run_cfg, mesh, cfg)
    ckpt = Checkpointer(workdir / "ckpt", keep=2, async_save=False)
    restored = ckpt.restore_latest(rs.abstract_state, None)
    if restored is not None:
        state, step = restored[0], int(restored[1]["step"])
    else:
        state, step = init_rm_state(rs, latest_policy_state(rs.policy, init_dir), cfg.seed), 0
    bt_step, stop, preempted = make_bt_step(rs), StopSignals(), False
    logger = MetricsLogger(workdir, resume_step=step if restored is not None else None)
    try:
        with stop:
            while step < cfg.steps and not preempted:
                batch = _rows_global(mesh, pair_batch(train_pairs(run_cfg, cfg, tok, step)))
                state, m = bt_step(state, batch)
                step += 1
                logger.log(step, {f"rm/{k}": float(v) for k, v in jax.device_get(m).items()})
                preempted = stop.agreed(step) and step < cfg.steps  # save now, stop
                if step % cfg.ckpt_every == 0 or step == cfg.steps or preempted:
                    ckpt.save(step, state, None, {"step": step}, force=preempted)
    finally:
        ckpt.close()
        logger.close()
    if preempted:
        return {"step": step, "preempted": True}
    p, score = eval_pairs(run_cfg, cfg, tok), make_score_fn(rs)
    sc, sr = (score_rows(score, mesh, state.params, state.rest, t, n, cfg.score_rows)
              for t, n in ((p.chosen, p.chosen_lengths), (p.rejected, p.rejected_lengths)))
    ev = {"chosen_score": sc.tolist(), "rejected_score": sr.tolist(), "accuracy":
          float(np.mean(sc > sr)), "chosen_len": p.chosen_completion.tolist(),
          "rejected_len": p.rejected_completion.tolist()}
    if jax.process_index() == 0:  # the held-out pairs' scores and completion lengths
        write_text_atomic(workdir / RM_EVAL, json.dumps(ev))
    return {"step": step, "preempted": False, "accuracy": ev["accuracy"]}


def score_rows(score_fn, mesh, params, rest, tokens, lengths, chunk: int) -> np.ndarray:
    """Scores [n] of rows [n, S] in chunks of ``chunk`` rows (rounded up to the batch shards;
    the last chunk padded with one-token rows): one compiled shape whatever n."""
    shards, out = T.batch_shards(mesh), []
    chunk = -(-chunk // shards) * shards
    for lo in range(0, len(tokens), chunk):
        t, ln = tokens[lo:lo + chunk], lengths[lo:lo + chunk]
        fill = chunk - len(t)
        t = np.concatenate([t, np.zeros((fill, t.shape[1]), t.dtype)])
        ln = np.concatenate([ln, np.ones((fill,), ln.dtype)])
        g = _rows_global(mesh, {"t": t, "l": ln.astype(np.int32)})
        s = jax.device_get(score_fn(params, rest, g["t"], g["l"]))
        out.append(np.asarray(s)[:chunk - fill])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


class RewardModelScorer:
    """The trained RM of ``directory`` on the RL run's mesh, scoring rollouts as rewards."""

    def __init__(self, run_cfg, mesh, directory):
        from moejax.ckpt import Checkpointer

        directory = as_path(directory)
        saved, restored = read_json(directory / RM_CONFIG), None
        cfg = RewardModelConfig(**(saved or {}).get("reward_model", {}))
        self.mesh, self.chunk = mesh, cfg.score_rows
        rs = rm_setup(run_cfg, mesh, cfg)
        if saved is not None and (directory / "ckpt").exists():
            ckpt = Checkpointer(directory / "ckpt", async_save=False)
            restored = ckpt.restore_latest(rs.abstract_state, None)
            ckpt.close()
        if restored is None:
            raise ConfigError(f"rl.reward_model_dir: {os.fspath(directory)} holds no trained "
                              "reward model; train one (experiments.reward_calibration)")
        self.params, self.rest = restored[0].params, restored[0].rest
        self.score_fn = make_score_fn(rs)

    def score(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        return score_rows(self.score_fn, self.mesh, self.params, self.rest, tokens,
                          np.asarray(lengths, np.int32), self.chunk)

    def score_rollouts(self, r, metrics: dict) -> np.ndarray:
        """Scores [B] float32 of rollouts; logs ``rm/score`` and its length correlation."""
        s = self.score(r.tokens, r.prompt_lengths + r.completion_lengths).astype(np.float32)
        metrics["rm/score"] = float(np.mean(s))
        metrics["rm/length_corr"] = length_correlation(r.completion_lengths, s)
        return s


def abstract_score_rows(mesh, rows: int, width: int) -> tuple:
    """Abstract (tokens [rows, width], lengths [rows]) as ``score_rows`` shards them (AOT)."""
    return tuple(jax.ShapeDtypeStruct(sh, jnp.int32, sharding=T.batch_sharding(mesh, len(sh)))
                 for sh in ((rows, width), (rows,)))
