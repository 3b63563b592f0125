"""The pretraining loop: init or resume, step, evaluate, log, checkpoint, handle preemption.

``Trainer(cfg, workdir).run()`` resumes from ``workdir/ckpt`` when a checkpoint exists (model,
optimizer, data iterator, RNG, step), saves on SIGTERM before returning, and applies the
``train.nan_policy`` to non-finite steps (whose updates the step already dropped on device).
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Callable

import jax
import numpy as np
from tqdm import tqdm

from moejax import train as T
from moejax.ckpt import Checkpointer
from moejax.config import Config, ConfigError
from moejax.data import prepare_data
from moejax.mesh import make_mesh
from moejax.metrics import MetricsLogger


class NonFiniteLossError(RuntimeError):
    """Raised under ``nan_policy='stop'`` when a step's loss or gradient is not finite."""


def write_or_check_config(cfg: Config, workdir: str) -> None:
    """Write ``config.json``; on resume the model and data sections must match the saved ones
    (train and mesh may change: e.g. more steps, or a different mesh that reshards on load)."""
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        now = cfg.to_dict()
        for section in ("model", "data"):
            diff = {k for k in now[section] if saved.get(section, {}).get(k) != now[section][k]}
            # tuples serialise as lists
            diff = {k for k in diff if json.loads(json.dumps(now[section][k])) != saved[section].get(k)}
            if diff:
                raise ConfigError(f"{path}: {section}.{sorted(diff)} differ from the run being "
                                  f"resumed; use a new --workdir or restore the old values")
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(cfg.to_json())
        os.replace(path + ".tmp", path)


class Trainer:
    """One training run in one workdir. ``on_step(trainer, step, metrics)`` is an optional hook
    called after each logged step (tests use it; experiments use it for extra statistics).
    ``init_state_fn(setup, data_iterator) -> TrainState`` replaces the fresh init when no
    checkpoint exists (moejax.grow_run: grow a finished source run; it may rewind the iterator)."""

    def __init__(self, cfg: Config, workdir: str, *,
                 on_step: Callable[["Trainer", int, dict], None] | None = None,
                 progress: bool = True,
                 init_state_fn: Callable[[T.Setup, object], T.TrainState] | None = None):
        self.cfg, self.workdir, self.on_step = cfg, os.path.abspath(workdir), on_step
        self.init_state_fn = init_state_fn
        self.progress = progress and jax.process_index() == 0
        self._stop_requested = False
        self.mesh = make_mesh(cfg.mesh)
        self.setup = T.setup(cfg, self.mesh)
        self.data = prepare_data(cfg.data, vocab_size=cfg.model.vocab_size)
        self.domains = self.data.domains
        self.train_step = T.make_train_step(self.setup, len(self.domains))
        self.eval_step = T.make_eval_step(self.setup, len(self.domains))
        self.ckpt = Checkpointer(os.path.join(self.workdir, "ckpt"), keep=cfg.train.keep_ckpts,
                                 async_save=cfg.train.async_ckpt)
        self._eval_batches = None

    # -- pieces ------------------------------------------------------------------------------
    def _iterator(self):
        return self.data.train_iterator(global_batch=self.cfg.train.batch_size,
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())

    def evaluate(self, state: T.TrainState) -> dict[str, float]:
        """Validation loss per domain on a fixed held-out set."""
        if self._eval_batches is None:
            self._eval_batches = [
                T.global_batch(self.mesh, b)
                for d in self.domains
                for b in self.data.eval_batches(d, num_batches=self.cfg.train.eval_batches,
                                                global_batch=self.cfg.train.batch_size,
                                                process_index=jax.process_index(),
                                                process_count=jax.process_count())]
        totals: dict[str, np.ndarray] = {}
        for b in self._eval_batches:
            for k, v in jax.device_get(self.eval_step(state, b)).items():
                totals[k] = totals.get(k, 0) + np.asarray(v, np.float64)
        loss_sum, tokens = totals["loss_sum"], totals["tokens"]
        out = {f"val/loss/{d}": float(loss_sum[i] / max(tokens[i], 1.0))
               for i, d in enumerate(self.domains)}
        out["val/loss"] = float(loss_sum.sum() / max(tokens.sum(), 1.0))
        if "domain_counts" in totals:  # [L_moe, D, E_all] -> selection frequency per domain
            out["moe/domain_counts"] = totals["domain_counts"].tolist()
            score = totals["topk_score_sum"] / len(self._eval_batches)
            out.update({f"val/topk_score_sum/layer{i}": float(v) for i, v in enumerate(score)})
        return out

    def _save(self, step: int, state, it, tokens: int, *, force: bool = False) -> None:
        self.ckpt.save(step, state, it, {"step": step, "tokens": tokens}, force=force)

    def _on_sigterm(self, signum, frame):
        self._stop_requested = True

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to ``train.steps``; returns a summary (final losses, whether preempted)."""
        cfg = self.cfg
        write_or_check_config(cfg, self.workdir)
        it = self._iterator()
        latest = self.ckpt.latest_step()
        if latest is not None:
            state, meta = self.ckpt.restore(latest, self.setup.abstract_state, it)
            step, tokens = int(meta["step"]), int(meta["tokens"])
        else:
            state, step, tokens = (T.init_state(self.setup) if self.init_state_fn is None
                                   else self.init_state_fn(self.setup, it)), 0, 0
            if cfg.model.moe.enabled and cfg.model.moe.router.token_mask == "maskmoe":
                state = T.set_token_masks(self.setup, state,
                                          self.data.token_counts(cfg.model.vocab_size))
        logger = MetricsLogger(self.workdir, resume_step=step if latest is not None else None)
        if latest is None:
            logger.log(0, {"tokens": 0, **self.evaluate(state)})

        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        bar = tqdm(total=cfg.train.steps, initial=step, disable=not self.progress,
                   desc=os.path.basename(self.workdir), dynamic_ncols=True)
        tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        window_t, window_steps, nonfinite_steps = time.perf_counter(), 0, 0
        pending = None  # (step, metrics) of the last step, read one step late to keep dispatch async
        preempted, last = False, {}
        try:
            while step < cfg.train.steps:
                batch = T.global_batch(self.mesh, next(it))
                state, metrics = self.train_step(state, batch)
                step, tokens, window_steps = step + 1, tokens + tokens_per_step, window_steps + 1
                if pending is not None:
                    nonfinite_steps += self._check_finite(*pending)
                pending = (step, metrics)
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    nonfinite_steps += self._check_finite(*pending)
                    pending = None
                    dt = time.perf_counter() - window_t
                    rate = window_steps * tokens_per_step / dt
                    last = self._log_record(metrics, tokens, rate, nonfinite_steps)
                    if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                        last.update(self.evaluate(state))
                    logger.log(step, last)
                    if self.on_step is not None:
                        self.on_step(self, step, last)
                    bar.set_postfix(loss=f"{last['train/loss']:.3f}")
                    window_t, window_steps = time.perf_counter(), 0
                bar.update(1)
                saved = step % cfg.train.ckpt_every == 0 or step == cfg.train.steps
                if saved:
                    self._save(step, state, it, tokens)
                if self._stop_requested:
                    if not saved:  # this step is on disk already when it was a checkpoint step
                        self._save(step, state, it, tokens, force=True)
                    preempted = True
                    break
            if pending is not None:
                nonfinite_steps += self._check_finite(*pending)
        finally:
            signal.signal(signal.SIGTERM, previous)
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

    def _log_record(self, metrics: dict, tokens: int, tokens_per_s: float, nonfinite: int) -> dict:
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
