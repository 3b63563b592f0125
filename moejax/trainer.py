"""The pretraining loop: init or resume, step, evaluate, log, checkpoint, handle preemption.

``Trainer(cfg, workdir).run()`` resumes from ``workdir/ckpt`` (local or ``gs://``) when a
checkpoint exists (model, optimizer, data iterator, RNG, step; a damaged newest step is set aside,
see moejax.ckpt), refuses a resume whose config changes the data stream or the math, saves on
SIGTERM or Ctrl-C before returning (with several processes at a step they all agree on, via JAX's
preemption sync point), evaluates every ``eval_every`` and logs every ``log_every`` steps, and
applies the ``train.nan_policy`` to non-finite steps (whose updates the step already dropped).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Callable

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

from moejax import train as T
from moejax.ckpt import Checkpointer
from moejax.config import Config, ConfigError
from moejax.data import prepare_data
from moejax.mesh import make_mesh
from moejax.metrics import MetricsLogger
from moejax.paths import as_path, read_json, write_text_atomic


class NonFiniteLossError(RuntimeError):
    """Raised under ``nan_policy='stop'`` when a step's loss or gradient is not finite."""


class DataError(RuntimeError):
    """The data pipeline could not be built from ``data.*`` (a missing file, too little text...);
    the message names the field."""


# What a resumed run may change: how the same computation is executed, how long it runs and how
# often it reports. Every other field (data stream, model, optimisation) must match the checkpoint.
EXECUTION_ONLY_SECTIONS = ("mesh",)  # a checkpoint reshards onto another mesh on restore
EXECUTION_ONLY_FIELDS = frozenset({
    "model.remat", "model.dtype", "model.attention.impl", "model.moe.gmm_impl",
    "data.cache_dir", "data.prefetch_threads",
    "train.steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.ckpt_every",
    "train.keep_ckpts", "train.async_ckpt", "train.peak_flops", "train.nan_policy"})


# What a resumed run may change in its data mixture when its caller asks for it
# (``Trainer(allow_mixture_change=True)``: a continued-training phase on other weights): the keyed
# domain mixture (moejax.data.mixture) restores every stream by domain name, so new weights apply
# from the resumed step, an added domain starts at its first row and a dropped one is left (logged);
# per-domain token counts carry by name. Experiments never allow it: an arm is one mixture.
RESUMABLE_MIXTURE_FIELDS = frozenset({"data.mixture", "data.domains"})


def flat_fields(d: dict, prefix: str = "") -> dict:
    """A nested config dict as ``{dotted field: value}`` (the names resume rules use)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_fields(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_conflicts(saved: dict, cfg: Config, *,
                     may_change: frozenset = frozenset()) -> dict[str, tuple]:
    """``{dotted field: (saved, now)}`` for changes that would alter the data stream or the math
    of a run resumed from ``saved`` (a config dict), other than the fields in ``may_change``. A
    field the saved run predates counts with its default value."""
    # the run config's own defaults (an RL run's rl.* too), JSON round-tripped like ``saved``
    defaults = flat_fields(json.loads(json.dumps(type(cfg)().to_dict())))
    now = flat_fields(json.loads(json.dumps(cfg.to_dict())))  # tuples -> lists, as saved
    old = flat_fields(saved)
    out = {}
    for k, v in now.items():
        before = old.get(k, defaults.get(k))
        if before != v and k.split(".")[0] not in EXECUTION_ONLY_SECTIONS \
                and k not in EXECUTION_ONLY_FIELDS | may_change:
            out[k] = (before, v)
    return out


def write_or_check_config(cfg: Config, workdir: epath.Path, *,
                          may_change: frozenset = frozenset()) -> None:
    """Write ``config.json``; on resume refuse changes to the data stream or the math, naming the
    fields (execution-only fields, the mesh, the step budget and ``may_change`` may change)."""
    path = workdir / "config.json"
    saved = read_json(path)
    if saved is not None:
        conflicts = resume_conflicts(saved, cfg, may_change=may_change)
        if conflicts:
            what = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in
                             ((k, *ab) for k, ab in sorted(conflicts.items())))
            raise ConfigError(
                f"{path} holds a run with other settings ({what}): resuming it would change its "
                f"data stream or its math. Restore the old values or use a new --workdir "
                f"(a resume may change the mesh, train.steps and the execution-only fields "
                f"{sorted(EXECUTION_ONLY_FIELDS - {'train.steps'})}; the mixture "
                f"{sorted(RESUMABLE_MIXTURE_FIELDS)} with Trainer(allow_mixture_change=True)).")
    if jax.process_index() == 0:
        write_text_atomic(path, cfg.to_json())


def _prepare_data(cfg: Config):
    """``moejax.data.prepare_data``; its failures (bad paths, too little text) become DataError."""
    try:
        return prepare_data(cfg.data, vocab_size=cfg.model.vocab_size)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"the data pipeline failed: {e}") from e


def _preemption_service_running() -> bool:
    """Whether ``jax.distributed`` started its preemption sync manager (the default, unless
    ``jax_enable_preemption_service`` is off): ``reached_preemption_sync_point`` needs it."""
    from jax._src import distributed
    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class StopSignals:
    """Stop a loop cleanly on SIGTERM or a first Ctrl-C (a second Ctrl-C aborts): the loop asks
    ``agreed(step)`` after each step and saves and returns when it is True. With several
    processes every one stops at the same step (JAX's preemption sync point, or an all-gather of
    the flags). Use as a context manager around the loop (installs and restores the handlers)."""

    def __init__(self):
        self.requested = False
        self.preemption_service = False
        self._previous: dict = {}

    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.preemption_service:  # tell JAX's preemption notifier, so every process stops
            os.kill(os.getpid(), signal.SIGTERM)

    def __enter__(self) -> "StopSignals":
        """Handle SIGTERM and SIGINT (main thread only). Under JAX's preemption service SIGTERM
        stays with its notifier (see ``agreed``)."""
        self.preemption_service = jax.process_count() > 1 and _preemption_service_running()
        if threading.current_thread() is threading.main_thread():
            sigs = ((signal.SIGINT,) if self.preemption_service
                    else (signal.SIGTERM, signal.SIGINT))
            self._previous = {s: signal.signal(s, self._on_signal) for s in sigs}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def agreed(self, step: int) -> bool:
        """Whether every process saves and stops after ``step``. One process: its own flag.
        Several: JAX's preemption sync point (a notice on any process is broadcast and all agree
        on one step), or, without that service, an all-gather of the flags every step."""
        if jax.process_count() == 1:
            return self.requested
        if self.preemption_service:
            return multihost_utils.reached_preemption_sync_point(step)
        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.max(flags))


class Trainer:
    """One training run in one workdir. ``on_step(trainer, step, metrics)`` is an optional hook
    called after each logged step (tests use it; experiments use it for extra statistics).
    ``init_state_fn(setup, data_iterator) -> TrainState`` replaces the fresh init when no
    checkpoint exists (moejax.grow_run: grow a finished source run; it may rewind the iterator).
    ``data`` replaces the corpus pipeline ``data.*`` describes with any object of its interface
    (``domains``, ``train_iterator``, ``eval_batches``; moejax.rl.sft: task demonstrations).
    ``mixer`` changes the domain weights between steps: ``mixer.before_step(trainer, step)`` is
    called before the batch of step ``step + 1`` is drawn (``trainer.state`` is the train state
    after ``step`` steps) and returns new weights ``{domain: w}`` (applied from that batch on) or
    None; its JSON-ready ``state()`` is saved inside the data iterator's checkpoint item and
    handed back to ``load_state`` on resume (moejax.data.mixture). ``allow_mixture_change``
    lets a resume change ``data.mixture``/``data.domains`` (a continued-training phase)."""

    def __init__(self, cfg: Config, workdir: str | os.PathLike, *,
                 on_step: Callable[["Trainer", int, dict], None] | None = None,
                 progress: bool = True,
                 init_state_fn: Callable[[T.Setup, object], T.TrainState] | None = None,
                 data=None, mixer=None, allow_mixture_change: bool = False):
        self.cfg, self.workdir, self.on_step = cfg, as_path(workdir), on_step
        self.allow_mixture_change = allow_mixture_change
        self.mixer = mixer
        self.init_state_fn = init_state_fn
        self.progress = progress and jax.process_index() == 0
        self.stop = StopSignals()
        self.mesh = make_mesh(cfg.mesh)
        self.setup = T.setup(cfg, self.mesh)
        self.data = _prepare_data(cfg) if data is None else data
        self.domains = self.data.domains
        self.train_step = T.make_train_step(self.setup, len(self.domains))
        self.eval_step = T.make_eval_step(self.setup, len(self.domains))
        self.ckpt = Checkpointer(self.workdir / "ckpt", keep=cfg.train.keep_ckpts,
                                 async_save=cfg.train.async_ckpt)
        self._eval_batches = None

    # -- pieces ------------------------------------------------------------------------------
    def _iterator(self):
        return self.data.train_iterator(global_batch=self.cfg.train.batch_size,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())

    def evaluate(self, state: T.TrainState) -> dict[str, float]:
        """Validation statistics on a fixed held-out set, each token-weighted (sums over every
        batch, divided once): loss per domain and overall, ``val/tokens/<domain>`` (the set is
        ``train.eval_batches`` batches per domain, capped at what the domain's split holds) and,
        with MoE, per-domain expert counts and the top-k score mass per layer."""
        if self._eval_batches is None:
            self._eval_batches = [
                T.global_batch(self.mesh, b)
                for d in self.domains
                for b in self.data.eval_batches(d, num_batches=self.cfg.train.eval_batches,
                                                global_batch=self.cfg.train.batch_size,
                                                process_index=jax.process_index(),
                                                process_count=jax.process_count())]
        n = len(self.domains)
        totals: dict[str, np.ndarray] = {"loss_sum": np.zeros(n), "tokens": np.zeros(n)}
        for b in self._eval_batches:
            for k, v in jax.device_get(self.eval_step(state, b)).items():
                totals[k] = totals.get(k, 0) + np.asarray(v, np.float64)
        loss_sum, tokens = totals["loss_sum"], totals["tokens"]
        out = {f"val/loss/{d}": float(loss_sum[i] / max(tokens[i], 1.0))
               for i, d in enumerate(self.domains)}
        out["val/loss"] = float(loss_sum.sum() / max(tokens.sum(), 1.0))
        out.update({f"val/tokens/{d}": int(tokens[i]) for i, d in enumerate(self.domains)})
        if "domain_counts" in totals:  # [L_moe, D, E_all] -> selection frequency per domain
            out["moe/domain_counts"] = totals["domain_counts"].tolist()
            score = totals["topk_score_sum"] / max(float(totals["router_tokens"]), 1.0)
            out.update({f"val/topk_score_sum/layer{i}": float(v) for i, v in enumerate(score)})
        return out

    def _save(self, step: int, state, it, tokens: int, *, force: bool = False) -> None:
        domain_tokens = dict(zip(self.domains, self._tokens_by_domain().tolist()))
        self.ckpt.save(step, state, it, {"step": step, "tokens": tokens,
                                         "domain_tokens": domain_tokens}, force=force)

    def _tokens_by_domain(self) -> np.ndarray:
        """Training target tokens seen per domain since step 0, all processes: [D] int64 (the
        restored count plus every process's count since; a collective with several processes)."""
        local = self._domain_tokens_local
        if jax.process_count() > 1:
            local = np.asarray(multihost_utils.process_allgather(local)).sum(0)
        return self._domain_tokens_base + local

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to ``train.steps``; returns a summary (final losses, whether preempted)."""
        cfg = self.cfg
        write_or_check_config(cfg, self.workdir, may_change=RESUMABLE_MIXTURE_FIELDS
                              if self.allow_mixture_change else frozenset())
        it = self._iterator()
        if self.mixer is not None:
            if not hasattr(it, "set_weights"):
                raise TypeError(f"Trainer(mixer=...) needs a data iterator with set_weights (the "
                                f"corpus mixture); {type(it).__name__} has none")
            it.mixer = self.mixer  # its state is saved and restored with the iterator's
        latest = self.ckpt.latest_step()
        if latest is not None and latest > cfg.train.steps:
            raise ConfigError(f"train.steps={cfg.train.steps} is below step {latest} of the "
                              f"checkpoint in {self.ckpt.directory}: raise train.steps or use a "
                              "new --workdir")
        restored = (None if latest is None
                    else self.ckpt.restore_latest(self.setup.abstract_state, it))
        if restored is not None:
            state, meta = restored
            step, tokens = int(meta["step"]), int(meta["tokens"])
            saved_tokens = meta.get("domain_tokens", {})
        else:
            state, step, tokens = (T.init_state(self.setup) if self.init_state_fn is None
                                   else self.init_state_fn(self.setup, it)), 0, 0
            saved_tokens = {}
            if cfg.model.moe.enabled and cfg.model.moe.router.token_mask == "maskmoe":
                state = T.set_token_masks(self.setup, state,
                                          self.data.token_counts(cfg.model.vocab_size))
        self._domain_tokens_base = np.array([saved_tokens.get(d, 0) for d in self.domains],
                                            np.int64)
        self._domain_tokens_local = np.zeros(len(self.domains), np.int64)
        logger = MetricsLogger(self.workdir, resume_step=step if restored is not None else None)
        if restored is None:
            logger.log(0, {"tokens": 0, **self.evaluate(state)})

        self.stop.__enter__()
        bar = tqdm(total=cfg.train.steps, initial=step, disable=not self.progress,
                   desc=self.workdir.name, dynamic_ncols=True)
        tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        window_t, window_steps, nonfinite_steps = time.perf_counter(), 0, 0
        pending = None  # (step, metrics) of the last step, read one step late to keep dispatch async
        preempted, last = False, {}
        try:
            while step < cfg.train.steps:
                if self.mixer is not None:
                    self.state = state
                    weights = self.mixer.before_step(self, step)
                    if weights is not None:
                        it.set_weights(weights)  # from this step's batch on
                local = next(it)
                self._domain_tokens_local += np.bincount(
                    local["domain"], weights=local["loss_mask"].sum(1),
                    minlength=len(self.domains)).astype(np.int64)
                batch = T.global_batch(self.mesh, local)
                state, metrics = self.train_step(state, batch)
                self.state = state  # the donated old state must not be read again (hooks read this)
                step, tokens, window_steps = step + 1, tokens + tokens_per_step, window_steps + 1
                if pending is not None:
                    nonfinite_steps += self._check_finite(*pending)
                pending = (step, metrics)
                final = step == cfg.train.steps
                evaluate = step % cfg.train.eval_every == 0 or final
                if step % cfg.train.log_every == 0 or evaluate:
                    nonfinite_steps += self._check_finite(*pending)
                    pending = None
                    dt = time.perf_counter() - window_t
                    rate = window_steps * tokens_per_step / dt
                    last = self._log_record(metrics, tokens, rate, nonfinite_steps, it)
                    if evaluate:
                        last.update(self.evaluate(state))
                    logger.log(step, last)
                    if self.on_step is not None:
                        self.on_step(self, step, last)
                    bar.set_postfix(loss=f"{last['train/loss']:.3f}")
                    window_t, window_steps = time.perf_counter(), 0
                bar.update(1)
                saved = step % cfg.train.ckpt_every == 0 or final
                if saved:
                    self._save(step, state, it, tokens)
                if self.stop.agreed(step) and not final:
                    if not saved:  # this step is on disk already when it was a checkpoint step
                        self._save(step, state, it, tokens, force=True)
                    preempted = True
                    break
            if pending is not None:
                nonfinite_steps += self._check_finite(*pending)
        finally:
            self.stop.__exit__()
            bar.close()
            self.ckpt.wait()
            logger.close()
        self.state = state
        return {"step": step, "tokens": tokens, "preempted": preempted,
                "nonfinite_steps": nonfinite_steps, **last}

    def _check_finite(self, step: int, metrics: dict) -> int:
        if not bool(metrics["nonfinite"]):
            return 0
        msg = (f"step {step}: non-finite loss/gradient (loss={float(metrics['train/loss'])}, "
               f"grad_norm={float(metrics['train/grad_norm'])}); the update was not applied")
        if self.cfg.train.nan_policy == "stop":
            raise NonFiniteLossError(msg + "; stopping (train.nan_policy='stop')")
        tqdm.write(msg + "; skipped (train.nan_policy='skip')")
        return 1

    def _log_record(self, metrics: dict, tokens: int, tokens_per_s: float, nonfinite: int,
                    it=None) -> dict:
        m = jax.device_get(metrics)
        rec = {"tokens": tokens, "train/loss": float(m["train/loss"]),
               "train/lr": float(m["train/lr"]), "train/grad_norm": float(m["train/grad_norm"]),
               "perf/tokens_per_s": tokens_per_s, "train/nonfinite_steps": nonfinite}
        mfu = T.mfu(self.cfg, tokens_per_s)
        if mfu is not None:
            rec["perf/mfu"] = mfu
        for i, d in enumerate(self.domains):
            if m["domain_tokens"][i] > 0:
                rec[f"train/loss/{d}"] = float(m["domain_loss_sum"][i] / m["domain_tokens"][i])
        rec.update(moe_records(m, self.cfg.model.moe.num_experts))
        rec.update({f"train/tokens/{d}": int(n)
                    for d, n in zip(self.domains, self._tokens_by_domain())})
        weights = getattr(it, "weights", None)  # the corpus mixture's, in effect for this step
        if weights:
            rec.update({f"train/mixture/{d}": float(w) for d, w in weights.items()})
        return rec


def moe_records(m: dict, num_experts: int) -> dict:
    """Per-layer MoE metrics ``moe/<stat>/layer<i>`` from a train step's ``moe/*`` outputs;
    ``imbalance`` is max/mean expert load over the global batch (real experts only)."""
    rec = {}
    for key, v in m.items():
        if not key.startswith("moe/"):
            continue
        v = np.asarray(v)
        if key == "moe/counts":
            load = v[:, :num_experts].astype(np.float64)
            rec.update({f"moe/imbalance/layer{i}": float(load[i].max() / max(load[i].mean(), 1e-9))
                        for i in range(load.shape[0])})
        elif v.ndim == 0:
            rec[f"train/{key[4:]}"] = float(v)
        elif v.ndim == 1:
            rec.update({f"{key}/layer{i}": float(x) for i, x in enumerate(v)})
    return rec
