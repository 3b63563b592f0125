"""BAM's branch phase inside a grow run (architecture.md 8.9; ``growth.op='bam'``, driven by
``moejax.grow_run.run``):

  1. the dense source (``growth.source_config``: ``bam.dense_branch_config`` of the target)
     trains once, as for every upcycling op;
  2. one branch per trained domain (``trained_domains``: the domains of weight > 0 in
     ``data.mixture``, in ``data.domains`` order; ``model.moe.num_experts`` must equal their
     number) continues the source's final checkpoint for ``growth.branch_steps`` steps on that
     domain alone, with a fresh AdamW and its own LR schedule (the identity growth, as the
     upcycled arms start). Its rows are new data: it continues the source's stream, i.e. its
     domain from the first row the source did not read. Each branch is an ordinary run in its
     own directory beside the source, named by its whole config and its source's
     (``branch_workdir_for``): a finished branch is reused only by a run whose branch config and
     source match, a changed one trains in a new directory, an interrupted one resumes from its
     checkpoint;
  3. ``mixed_state``: ``bam.branch_and_mix`` of the branches' final parameters into the BAM
     model's sharded train state (fresh optimizer, step 0; routers drawn from ``train.seed``).
     With ``branch_steps = 0`` every branch is the source itself, and the mix is the source's
     function (identical experts under weights that sum to 1). The grown phase's stream goes
     on after the branches' rows (``skip_branch_rows``): no row is trained on twice.

The branch phase's tokens (N x branch_steps x batch x seq_len) are counted in the arm's merged
metrics (``grow_run.merge_metrics``: the grow event's ``branch_tokens`` / ``branch_flops``).
"""

from __future__ import annotations

import dataclasses
import os

import jax
from flax import nnx

from moejax import bam, grow_run, growth
from moejax import train as T
from moejax.config import Config, ConfigError, GrowthConfig
from moejax.grow_run import final_state
from moejax.paths import as_path
from moejax.trainer import Trainer


def trained_domains(cfg: Config) -> list[str]:
    """The domains the arm trains on after the source (weight > 0 in ``data.mixture``): one
    branch, hence one FFN / attention expert, each."""
    return [d for d, w in zip(cfg.data.domains, cfg.data.mixture) if w > 0]


def check(cfg: Config) -> None:
    """One expert per branch: ``model.moe.num_experts`` must equal the trained domains."""
    domains = trained_domains(cfg)
    if cfg.model.moe.num_experts != len(domains):
        raise ConfigError(f"model.moe.num_experts={cfg.model.moe.num_experts}: BAM mixes one "
                          f"branch per trained domain (weight > 0 in data.mixture: {domains}); "
                          f"set it to {len(domains)}")


def branch_config(cfg: Config, src_cfg: Config, domain: str) -> Config:
    """The run of the branch on ``domain``: the source model, that domain alone,
    ``growth.branch_steps`` steps of the arm's optimizer settings, no growth."""
    steps = cfg.growth.branch_steps
    mixture = tuple(1.0 if d == domain else 0.0 for d in cfg.data.domains)
    train = dataclasses.replace(cfg.train, steps=steps,
                                warmup_steps=min(cfg.train.warmup_steps, steps))
    return dataclasses.replace(cfg, model=src_cfg.model, growth=GrowthConfig(), train=train,
                               data=dataclasses.replace(cfg.data, mixture=mixture))


def branch_workdir_for(branch_cfg: Config, src_cfg: Config, src_wd) -> str:
    """The branch's run directory beside the source's (``src_wd``'s parent), named by its domain
    and a digest of the branch's and the source's model, data and train sections."""
    digest = grow_run.run_digest(branch=branch_cfg, source=src_cfg)
    domain = trained_domains(branch_cfg)[0]
    return os.fspath(as_path(src_wd).parent / f"_branch-{domain}-{digest}")


def branches(cfg: Config, src_cfg: Config, src_wd) -> list[tuple[Config, str]]:
    """(config, workdir) of every branch, in ``trained_domains`` order (none for 0 steps)."""
    if cfg.growth.branch_steps == 0:
        return []
    out = []
    for domain in trained_domains(cfg):
        b = branch_config(cfg, src_cfg, domain)
        out.append((b, branch_workdir_for(b, src_cfg, src_wd)))
    return out


def run_branches(cfg: Config, src_cfg: Config, src_setup: T.Setup, src_wd, *,
                 progress: bool = True) -> dict | None:
    """Train (or reuse, or resume) every branch from the source's final checkpoint; returns the
    summary of a branch that stopped early (preempted), else None."""
    check(cfg)

    def from_source(setup: T.Setup, it) -> T.TrainState:
        """The source's final state; the branch's stream continues the source's (its domain from
        the first row the source did not read) when the rows match (``continues_stream``)."""
        same_stream = grow_run.continues_stream(src_cfg, setup.cfg)
        state = final_state(src_wd, src_cfg, src_setup.abstract_state, it if same_stream else None)
        return growth.grow(state, src_setup, setup, "identity")

    for bcfg, wd in branches(cfg, src_cfg, src_wd):
        summary = Trainer(bcfg, wd, progress=progress, init_state_fn=from_source).run()
        if summary["preempted"]:
            return {**summary, "branch": wd}
    return None


def skip_branch_rows(cfg: Config, src_cfg: Config, src_wd, it) -> None:
    """Move the grown phase's stream ``it`` (restored to the source's end) past the rows the
    branches trained on: the branch on domain d read the next ``branch_steps x batch_size`` rows
    of d after the source (``run_branches``), so the mixture continues each domain after them."""
    runs = branches(cfg, src_cfg, src_wd)
    if not runs:
        return
    state = it.get_state()
    positions = state["mixture"]["positions"]
    for bcfg, _ in runs:
        positions[trained_domains(bcfg)[0]] += bcfg.train.steps * bcfg.train.batch_size
    it.set_state(state)


def branch_params(cfg: Config, src_cfg: Config, src_setup: T.Setup, src_wd,
                  src_state: T.TrainState) -> list[dict]:
    """Each branch's final parameters as a host pure dict (``src_state``'s for every branch when
    ``growth.branch_steps`` is 0)."""
    runs = branches(cfg, src_cfg, src_wd)
    if not runs:
        return bam.branch(_host(src_state), len(trained_domains(cfg)))
    return [_host(final_state(wd, bcfg, src_setup.abstract_state)) for bcfg, wd in runs]


def _host(state: T.TrainState) -> dict:
    """The parameters as a pure dict of whole numpy arrays on every process."""
    return jax.tree.map(T.to_host, state.params.to_pure_dict())


def mixed_state(branch_params: list[dict], src_state: T.TrainState, src: T.Setup,
                dst: T.Setup) -> T.TrainState:
    """The BAM model's train state (``dst``'s shardings, fresh optimizer, step 0) mixed from the
    branches' parameters; routers drawn from ``train.seed``."""
    cfg = dst.cfg
    mixed = bam.branch_and_mix(branch_params, cfg.model, seed=cfg.train.seed + 17)
    params = jax.tree.map(lambda x: x, dst.abstract_state.params)  # a copy to fill in place
    nnx.replace_by_pure_dict(params, mixed)
    params = jax.device_put(params, dst.state_shardings.params)
    return growth.transform_state(dataclasses.replace(src_state, params=params), src, dst,
                                  lambda p, fresh, key: p, lambda rest, fresh: fresh)
