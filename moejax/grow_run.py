"""Growth inside a run: train a source model, grow (or upcycle) it, continue training the target.

``run(cfg, workdir)`` with ``cfg.growth.op != 'none'`` (``moejax.config.GrowthConfig``):

  1. source phase: ``Trainer(growth.source_config(cfg), source_workdir)`` trains the source model for
     ``growth.source_steps`` steps (default dir ``workdir/source``; experiments share one source
     run between arms). Its final checkpoint (saved at its last step) is the growth input.
  2. grown phase: ``Trainer(cfg, workdir/grown, init_state_fn=...)``. When ``workdir/grown/ckpt``
     holds no checkpoint, the hook restores the source's final checkpoint (model, optimizer and
     the data-iterator position: the grown phase continues the data stream when the rows and
     batch size match, ``continues_stream``, its own mixture weights applying by domain name),
     applies the operator (``moejax.growth`` / ``moejax.upcycle``) into the target's sharded
     state, and training starts at step 0 with the target's own LR schedule.
     Otherwise the Trainer resumes the grown phase from its own checkpoint.
  3. ``workdir/metrics.jsonl`` is rebuilt from the two phase files: source records, then one
     event record ``{"step": S, "event": "grow", "op": ..., "val/loss": <grown model at step 0>,
     ...}``, then the grown records with ``step``, ``tokens`` and ``flops`` offset by the source's
     (``flops`` = tokens x the phase model's training FLOPs per token, source FLOPs counted).

BAM (``growth.op='bam'``) adds a branch phase between 1 and 2 (``moejax.bam_run``): one dense run
per trained domain from the source's final checkpoint, mixed into the MoE by the grown phase's
init hook (each branch continues the source's stream on its domain, and the grown phase's
stream skips the branches' rows); their tokens and FLOPs are the event's ``branch_tokens`` /
``branch_flops`` and count in the grown records' ``tokens`` / ``flops``.

Restart safety: every decision is taken from what exists on disk. A crash before the source's
final save resumes the source; a crash between that save and the grown phase's first checkpoint
re-does the (deterministic) growth from the source checkpoint and restarts the grown phase at
step 0 (its metrics file is cut back accordingly); a crash later resumes the grown phase. No step
is lost or repeated in the merged metrics file. (G_learn's fitting batches are drawn from the data
stream after the source phase and are not counted as training tokens.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax

from moejax import growth, growth_learn, upcycle
from moejax import train as T
from moejax.ckpt import Checkpointer
from moejax.config import Config
from moejax.metrics import read_metrics
from moejax.paths import as_path, write_text_atomic
from moejax.trainer import EXECUTION_ONLY_FIELDS, Trainer, flat_fields

UPCYCLE = upcycle.METHODS

def final_state(workdir, cfg: Config, abstract_state: T.TrainState,
                data_iterator=None) -> T.TrainState:
    """The train state of the finished run ``cfg`` in ``workdir`` (its checkpoint at step
    ``train.steps``), rewinding ``data_iterator`` when given."""
    ckpt = Checkpointer(as_path(workdir) / "ckpt", keep=cfg.train.keep_ckpts)
    step = ckpt.latest_step()
    if step != cfg.train.steps:
        raise RuntimeError(f"{workdir}/ckpt: expected the run's final checkpoint at step "
                           f"{cfg.train.steps}, found {step}")
    state, _ = ckpt.restore(step, abstract_state, data_iterator)
    ckpt.close()
    return state


def run_digest(**runs: Config) -> str:
    """8 hex digits naming a shared phase run by what it computes: the model, data and train
    sections of each named config, without the fields a resumed run may change (execution only:
    remat, dtype, kernels, cadences; ``train.steps`` stays, a finished run ends at it)."""
    ignore = EXECUTION_ONLY_FIELDS - {"train.steps"}
    sections = lambda c: {s: c.to_dict()[s] for s in ("model", "data", "train")}  # noqa: E731
    parts = {name: {k: v for k, v in flat_fields(sections(c)).items() if k not in ignore}
             for name, c in runs.items()}
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:8]


def source_workdir_for(cfg: Config, root: str) -> str:
    """A source run directory under ``root`` named by the source config (arms with the same source
    model and steps share it)."""
    return os.fspath(as_path(root) / f"_source-{run_digest(source=growth.source_config(cfg))}")


def continues_stream(before: Config, after: Config) -> bool:
    """Whether the run ``after`` can continue the data stream of the run ``before``: the same
    rows (corpus, tokenizer, sequence length, seed; the mixture weights may differ, they apply
    by domain name on restore, and so may the execution-only data fields) and the same global
    batch."""
    ignore = {f.split(".", 1)[1] for f in EXECUTION_ONLY_FIELDS if f.startswith("data.")}

    def rows(c: Config) -> dict:
        return {k: v for k, v in dataclasses.asdict(c.data).items() if k not in ignore | {"mixture"}}

    return rows(before) == rows(after) and before.train.batch_size == after.train.batch_size


def apply_op(cfg: Config, state: T.TrainState, src: T.Setup, dst: T.Setup, data_iterator):
    """The configured operator: source state -> the target's sharded state."""
    g = cfg.growth
    key = jax.random.key(cfg.train.seed + 17)
    if g.op in UPCYCLE:
        return upcycle.upcycle(state, src, dst, g.op, router_init=g.router_init, noise=g.noise,
                               kmeans_iters=g.kmeans_iters, key=key)
    if g.op == "learn_depth":
        batches = [T.global_batch(dst.mesh, next(data_iterator)) for _ in range(g.learn_steps)]
        return growth_learn.learn_depth(state, src, dst, batches, lr=g.learn_lr,
                                        stack_mode=g.stack_mode)[0]
    return growth.grow(state, src, dst, g.op, options=options(cfg), optimizer=g.optimizer, key=key)


def options(cfg: Config) -> growth.Options:
    """The operator knobs of ``cfg.growth``."""
    g = cfg.growth
    return growth.Options(stack_mode=g.stack_mode, new_layers=g.new_layers,
                          new_layer_init=g.new_layer_init, fade_in_steps=g.fade_in_steps,
                          split=g.split)


class GrownTrainer(Trainer):
    """The grown phase's Trainer; with G_random's MSG fade-in its optimizer is wrapped by
    ``growth.fade_in_optimizer`` (the ramp's clock and the unmasked weights live in the optimizer
    state, so they are checkpointed and a resumed run continues the ramp)."""

    def __init__(self, cfg: Config, workdir, **kw):
        super().__init__(cfg, workdir, **kw)
        g = cfg.growth
        if g.op == "random_depth" and g.fade_in_steps > 0:
            src = growth.source_config(cfg).model
            new = growth.new_layers_of(g.op, src, cfg.model, options(cfg))
            self.setup = growth.with_fade_in(self.setup, new, g.fade_in_steps)
            self.train_step = T.make_train_step(self.setup, len(self.domains))
            self.eval_step = T.make_eval_step(self.setup, len(self.domains))


def run(cfg: Config, workdir: str, *, source_workdir: str | None = None, progress: bool = True,
        on_step=None) -> dict:
    """Run the source phase (if not finished), grow, run the grown phase; merge the metrics."""
    if cfg.growth.op == "none":
        return Trainer(cfg, workdir, progress=progress, on_step=on_step).run()
    cfg = upcycle.apply_moe_layers(cfg)
    bam_run = None
    if cfg.growth.op == "bam":
        from moejax import bam_run  # it builds on this module
        bam_run.check(cfg)  # before the source trains
    src_cfg = growth.source_config(cfg)
    workdir = as_path(workdir)
    src_wd = as_path(source_workdir or workdir / "source")
    src_trainer = Trainer(src_cfg, src_wd, progress=progress)
    src_summary = src_trainer.run()
    if src_summary["preempted"]:
        return {**src_summary, "phase": "source"}
    src_setup = src_trainer.setup
    if bam_run is not None:
        stopped = bam_run.run_branches(cfg, src_cfg, src_setup, src_wd, progress=progress)
        if stopped is not None:
            return {**stopped, "phase": "branch"}
    same_stream = continues_stream(src_cfg, cfg)

    def init_state_fn(setup: T.Setup, it):
        if not same_stream:  # restore into a throwaway iterator: the grown phase starts its own
            it = src_trainer._iterator()
        state = final_state(src_wd, src_cfg, src_setup.abstract_state, it)
        if bam_run is not None:
            if same_stream:
                bam_run.skip_branch_rows(cfg, src_cfg, src_wd, it)
            params = bam_run.branch_params(cfg, src_cfg, src_setup, src_wd, state)
            return bam_run.mixed_state(params, state, src_setup, setup)
        return apply_op(cfg, state, src_setup, setup, it)

    trainer = GrownTrainer(cfg, workdir / "grown", progress=progress, on_step=on_step,
                           init_state_fn=init_state_fn)
    summary = trainer.run()
    branch_tokens = 0
    if bam_run is not None:
        branch_tokens = (len(bam_run.branches(cfg, src_cfg, src_wd)) * cfg.growth.branch_steps
                         * cfg.train.batch_size * cfg.data.seq_len)
    totals = merge_metrics(workdir, src_wd, workdir / "grown", src_cfg, cfg,
                           branch_tokens=branch_tokens)
    if jax.process_index() == 0:
        write_text_atomic(workdir / "config.json", cfg.to_json())
    return {**summary, **totals, "phase": "grown"}


def merge_metrics(workdir, src_wd, grown_wd, src_cfg: Config, cfg: Config, *,
                  branch_tokens: int = 0) -> dict:
    """Write ``workdir/metrics.jsonl``: source records, the grow event, offset grown records
    (the workdirs: local paths or URIs). ``branch_tokens``: BAM's branch phase (source model),
    counted in the event and every grown record."""
    src = read_metrics(as_path(src_wd) / "metrics.jsonl")
    grown = read_metrics(as_path(grown_wd) / "metrics.jsonl")
    f_src = src_cfg.model.flops_per_token(src_cfg.data.seq_len)
    f_dst = cfg.model.flops_per_token(cfg.data.seq_len)
    S = src_cfg.train.steps
    src_tokens = S * src_cfg.train.batch_size * src_cfg.data.seq_len
    out = [{**r, "flops": r.get("tokens", 0) * f_src, "phase": "source"} for r in src if r["step"] <= S]
    event = {"step": S, "event": "grow", "op": cfg.growth.op,
             "tokens": src_tokens + branch_tokens, "flops": (src_tokens + branch_tokens) * f_src,
             "branch_tokens": branch_tokens, "branch_flops": branch_tokens * f_src,
             "source_params": src_cfg.model.num_params(), "target_params": cfg.model.num_params()}
    for r in grown:
        if r["step"] == 0:  # the grown model evaluated before any step: part of the event
            event.update({k: v for k, v in r.items() if k not in ("step", "tokens")})
            continue
        tok = r.get("tokens", 0)
        out.append({**r, "step": S + r["step"], "tokens": event["tokens"] + tok,
                    "flops": event["flops"] + tok * f_dst, "phase": "grown"})
    out.insert(len([r for r in out if r["phase"] == "source"]), event)
    last = out[-1]
    if jax.process_index() == 0:
        write_text_atomic(as_path(workdir) / "metrics.jsonl",
                          "".join(json.dumps(r) + "\n" for r in out))
    return {"total_steps": last["step"], "total_tokens": last["tokens"], "flops": last["flops"]}
