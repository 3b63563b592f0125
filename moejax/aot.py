"""Compile an experiment's train (and eval) step for a TPU pod ahead of time, on a CPU host.

``python -m moejax.aot --experiment pretrain --preset tpu-v5p-64 [--arms a] [--set k=v ...]
[--topology v5p:2x4x4] [--slices 2] [--json out.json]`` builds the run's exact programs (the
experiment's preset, arm and ``--set`` overrides through ``experiment.build_config``; the mesh of
``moejax.mesh.make_mesh`` over the topology's devices; ``train.setup`` / ``make_train_step`` /
``make_eval_step`` with their shardings, remat, scan and kernels resolved for TPU), lowers them
with ShapeDtypeStruct inputs (nothing is allocated), compiles them with libtpu and prints per chip:
HBM (arguments, temporaries, outputs; total against the chip), FLOPs per step (compiled, weighted
by loop trip counts, vs the analytic count), the collectives (count and bytes per step), the Pallas
kernels in the program and a roofline lower bound on the step time with the MFU it implies: the
largest of compute (the program's matmul and kernel FLOPs, grouped matmuls at the rows balanced
routing fills) at peak, estimated HBM traffic at full bandwidth, and ICI / DCN bytes at the
chip's link bandwidth (``moejax.tpu_specs``); MFU counts the analytic 6 N tokens + attention.

Errors with a name: ``DoesNotFit`` (HBM; with the numbers and the knob to turn), ``KernelMissing``
(the config selects a Pallas kernel or ragged exchange the compiled program lacks: no silent
fallback), ``LibtpuMissing`` (the CLI prints the one-line install instead of a traceback).
Multi-slice (``--slices N``): the topology's devices carry their ``slice_index`` and
``moejax.mesh.make_mesh`` (what a run builds) lays the config's mesh over each slice's chips (ICI)
with the ``data`` axis also across the N slices (DCN).

RL configs (``RLRunConfig``, e.g. ``--experiment grpo``) compile the RL step's programs instead:
the rollout engine's program at the step's bucket (prompts_per_step x num_generations rows) and
at the eval bucket, the teacher-forced logprob recompute over the whole rollout batch, and the
update step on one mini-batch (``forced_experts`` under routing replay). Prefill and decode
attend over the KV cache through the XLA path (splash serves same-sequence attention only); the
logprob and update programs use splash where the train step would (length a multiple of 128).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import re
import sys
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from moejax import hlo_stats, tpu_specs
from moejax.aot_estimates import (Work, abstract_batch, analytic_split, eval_work, gmm_row_share,
                                  per_chip_bytes, remat_factor, train_work)
from moejax.aot_table import MD_HEADER, format_table, markdown_rows
from moejax.config import Config, ConfigError
from moejax.runtime import LIBTPU_ENV, libtpu_flags, set_compilation_cache, set_libtpu_flags

GiB = tpu_specs.GiB
INSTALL_LINE = f'pip install "jax[tpu]=={jax.__version__}"   (or: pip install -e ".[tpu]")'


class LibtpuMissing(RuntimeError):
    """libtpu (the TPU compiler) is not installed; the message is the install command."""


class DoesNotFit(ConfigError):
    """The compiled program needs more HBM per chip than the chip has."""


class KernelMissing(RuntimeError):
    """The config selects a TPU kernel (splash, megablox gmm, ragged exchange) that the compiled
    program does not contain."""


# -- topology and mesh ----------------------------------------------------------------------------

def require_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None:
        raise LibtpuMissing(f"compiling for TPU needs libtpu: {INSTALL_LINE}")


def topology_devices(topology: str, slices: int = 1) -> list:
    """The compile-only devices of ``slices`` copies of a TPU slice ('v5p:2x4x4')."""
    require_libtpu()
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata queries off a TPU VM
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    kw = {"num_slices": slices} if slices > 1 else {}
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu", **kw).devices)


def default_topology(preset: str) -> str:
    """'tpu-v5p-64' -> 'v5p:2x4x4' (accelerator type in the preset name, cores counted)."""
    m = re.fullmatch(r"tpu-(v\w+?-\d+)(?:-.*)?", preset)
    if not m:
        raise ConfigError(f"preset {preset!r} names no accelerator type (tpu-<gen>-<cores>): pass "
                          "--topology, e.g. --topology v5p:2x4x4")
    return tpu_specs.topology_for_accelerator(m.group(1))


# -- building and compiling the programs ----------------------------------------------------------

@contextlib.contextmanager
def tpu_tracing() -> Iterator[None]:
    """Kernels resolved for TPU, default matmul precision (Mosaic rejects fp32 contraction of bf16
    that 'highest' asks for; runs use the default) and no persistent-cache entries (a TPU
    executable cannot be read back on a CPU host: the next run warned and compiled again)."""
    from moejax import kernels
    cache = jax.config.jax_enable_compilation_cache
    set_compilation_cache(False)
    try:
        with kernels.target_platform("tpu"), jax.default_matmul_precision("default"):
            yield
    finally:
        set_compilation_cache(cache)


@dataclasses.dataclass
class Program:
    """One compiled program: its text, per-chip memory, XLA's cost analysis and timings, the
    work it does and the per-chip bytes of its abstract arguments."""

    name: str
    text: str
    memory: dict  # argument/output/alias/temp/generated_code bytes per chip
    cost: dict  # XLA cost_analysis (loop bodies counted once)
    lower_s: float
    compile_s: float
    work: Work
    argument_bytes: int  # sum of each argument's own shard (what ``memory['argument']`` should be)


def compile_program(name: str, fn, work: Work, *args, **static) -> Program:
    """Lower and compile jitted ``fn`` for the abstract ``args`` (``static``: its static
    keyword arguments); out-of-HBM -> DoesNotFit."""
    t0 = time.perf_counter()
    with tpu_tracing():
        lowered = fn.lower(*args, **static)
        t1 = time.perf_counter()
        try:
            compiled = lowered.compile()
        except Exception as e:  # XlaRuntimeError: the TPU compiler's buffer assignment failed
            if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e):
                raise DoesNotFit(_oom_message(name, str(e))) from None
            raise
    t2 = time.perf_counter()
    m = compiled.memory_analysis()
    memory = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
              for k in ("argument", "output", "alias", "temp", "generated_code")}
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    keep = ("flops", "bytes accessed", "transcendentals")
    cost = {k: float(v) for k, v in cost.items() if k in keep}
    return Program(name, compiled.as_text(), memory, cost, t1 - t0, t2 - t1, work,
                   per_chip_bytes(args))


def _oom_message(name: str, err: str) -> str:
    """DoesNotFit text from the TPU compiler's out-of-memory error, with its numbers."""
    need = re.search(r"required for ([\w ]+?) \(([\d.]+[KMGT]?)\) exceeds available HBM "
                     r"\(([\d.]+[KMGT]?)\)", err)
    used = re.search(r"Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm", err)
    if need:
        nums = (f"needs {need.group(2)} of HBM for {need.group(1)} where {need.group(3)} is "
                "available")
    elif used:
        nums = f"uses {used.group(1)} of {used.group(2)} HBM per chip"
    else:
        nums = f"runs out of HBM ({err.strip().splitlines()[0][:200]})"
    return (f"the {name} step {nums} per chip: raise train.grad_accum or lower train.batch_size "
            "(activations), set model.remat='full', or shard the state further (mesh.fsdp, "
            "mesh.expert for experts)")


def build_programs(cfg: Config, mesh: Mesh, *, eval_step: bool = True) -> dict[str, Program]:
    """Compile the run's train step (and eval step) exactly as ``Trainer`` builds them; an RL
    config's programs through ``build_rl_programs``."""
    from moejax import train as T
    from moejax.rl.config import RLRunConfig
    if isinstance(cfg, RLRunConfig):
        return build_rl_programs(cfg, mesh, eval_rollout=eval_step)
    with tpu_tracing():
        s = T.setup(cfg, mesh)
        n_domains = len(cfg.data.domains)
        batch = abstract_batch(mesh, cfg.train.batch_size, cfg.data.seq_len)
        progs = {"train": compile_program("train", T.make_train_step(s, n_domains),
                                          train_work(cfg), s.abstract_state, batch)}
        if eval_step:
            progs["eval"] = compile_program("eval", T.make_eval_step(s, n_domains),
                                            eval_work(cfg), s.abstract_state, batch)
    return progs


# -- RL programs ----------------------------------------------------------------------------------

def _replicated(mesh: Mesh, tree):
    """ShapeDtypeStructs of ``tree``'s leaves, replicated on ``mesh`` (host inputs)."""
    from jax.sharding import NamedSharding, PartitionSpec
    sh = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree)


def rollout_args(engine, mesh: Mesh, prompts: int, G: int) -> tuple:
    """Abstract (prompt [Bp,P], lengths [Bp], rng, knobs) as ``RolloutEngine.generate`` passes
    them for ``prompts`` prompts (filled with dummy prompts until Bp*G rows divide the batch
    shards, as ``generate`` does)."""
    import numpy as np

    from moejax.sampling import make_knobs
    P = engine.cfg.max_prompt_len
    prompt, lengths = engine._fill_shards(np.zeros((prompts, P), np.int32),
                                          np.ones((prompts,), np.int32), G)
    host = (jax.ShapeDtypeStruct(prompt.shape, jnp.int32),
            jax.ShapeDtypeStruct(lengths.shape, jnp.int32),
            jax.eval_shape(lambda: jax.random.key(0)),
            jax.eval_shape(lambda: make_knobs(1.0, 1.0, 0, False, engine.eos_id)))
    return _replicated(mesh, host)


def rl_rows(cfg, mesh: Mesh, rows: int, *, ref: bool, forced: bool) -> dict:
    """Abstract policy-program rows (``moejax.rl.policy``; ``rows.rl_batch``) of ``rows``
    rows, sharded as ``rows.to_global`` shards them; ``ref``: with ref_logprobs,
    ``forced``: with forced_experts [rows, L_moe, T, k]; under ``rl.prefix.enabled`` also
    prefix_mask [rows, T] and entropy_mask_ratio [rows]."""
    from moejax import train as T
    rl, m = cfg.rl, cfg.model
    Tn = rl.rollout.max_prompt_len + rl.rollout.max_new_tokens - 1
    shapes = {k: ((rows, Tn), jnp.int32) for k in ("inputs", "targets", "positions",
                                                   "segment_ids")}
    f32 = ["completion_mask", "advantages", "old_logprobs", "rollout_logprobs"]
    if ref:
        f32.append("ref_logprobs")
    if rl.prefix.enabled:  # Prefix-RFT rows: demo tokens in the response, the step's mask ratio
        f32.append("prefix_mask")
        shapes["entropy_mask_ratio"] = ((rows,), jnp.float32)
    shapes.update({k: ((rows, Tn), jnp.float32) for k in f32})
    if forced:
        shapes["forced_experts"] = ((rows, T.num_moe_layers(m), Tn, m.moe.top_k), jnp.int32)
    return {k: jax.ShapeDtypeStruct(shape, dt, sharding=T.batch_sharding(mesh, len(shape)))
            for k, (shape, dt) in shapes.items()}


def eval_prompts(cfg) -> int:
    """Prompts of one evaluation rollout: every held-out item of every tier (``RLTrainer``)."""
    from moejax.rl.run_inputs import eval_sets, load_file_items
    return sum(len(v) for v in eval_sets(cfg, load_file_items(cfg)).values())


def build_rl_programs(cfg, mesh: Mesh, *, eval_rollout: bool = True) -> dict[str, Program]:
    """The programs of one RL step as ``RLTrainer`` builds them: ``rollout`` (prompts_per_step
    prompts, x prefix.num_prefix variants under Prefix-RFT, x G; Knapsack: rows_per_step
    prompt rows x 1), ``logprobs`` (the pi_old /
    reference recompute over all ``rl.rows_per_step`` rows), ``update`` (one optimizer step on a
    mini-batch of rows_per_step/mini_batches rows) and, with ``eval_rollout``,
    ``rollout_eval`` (every eval item x ``rl.eval_samples``, the largest eval bucket)."""
    from moejax import train as T
    from moejax.rl.policy import make_logprob_fn, make_update_step
    from moejax.rl.rollout import RolloutEngine
    rl = cfg.rl
    P, N, G = rl.rollout.max_prompt_len, rl.rollout.max_new_tokens, rl.num_generations
    Tn, B = P + N - 1, rl.rows_per_step
    with tpu_tracing():
        s = T.setup(cfg.optimizer_config(), mesh)
        state = s.abstract_state
        weights = (state.params, state.rest)
        # token ids are values in the program, not shapes: the byte tokenizer's
        engine = RolloutEngine(s, rl.rollout, eos_id=2, pad_id=0)

        def rollout(name, prompts, g):
            args = rollout_args(engine, mesh, prompts, g)
            bp = args[0].shape[0]
            return compile_program(name, engine._program, Work(1, bp, P, bp, bp * g, N),
                                   weights, *args, num_generations=g)

        variants = rl.prefix.num_prefix if rl.prefix.enabled else 1  # Prefix-RFT prompt rows
        knapsack = rl.budget.allocation == "knapsack"  # G=1 over the repeated prompts
        progs = {"rollout": rollout("rollout", B, 1) if knapsack
                 else rollout("rollout", rl.prompts_per_step * variants, G)}
        if eval_rollout:
            progs["rollout_eval"] = rollout("rollout_eval", eval_prompts(cfg),
                                            max(rl.eval_samples, 1))
        progs["logprobs"] = compile_program(
            "logprobs", make_logprob_fn(s, rl.rollout.temperature), Work(1, B, Tn, B),
            state.params, state.rest,  # the trainer's pi_old batch: no reference, R3's routing
            rl_rows(cfg, mesh, B, ref=False, forced=rl.replay.mode == "r3"))
        n = B // rl.mini_batches
        progs["update"] = compile_program(
            "update", make_update_step(s, cfg), Work(3, n, Tn, n // rl.micro_batches),
            state, rl_rows(cfg, mesh, n, ref=rl.needs_reference,
                           forced=rl.replay.mode != "none"))
        if rl.reward_source == "reward_model":  # the reward model's score of the rollout rows
            from moejax.rl import reward_model as rm_lib
            rs = rm_lib.rm_setup(cfg, mesh)
            progs["rm_score"] = compile_program(
                "rm_score", rm_lib.make_score_fn(rs), Work(1, B, P + N, B),
                rs.abstract_state.params, rs.abstract_state.rest,
                *rm_lib.abstract_score_rows(mesh, B, P + N))
    return progs


# -- what the program should contain --------------------------------------------------------------

def attention_impl(cfg: Config, work: Work) -> str:
    """The attention kernel a program runs on TPU: splash for same-sequence attention whose
    length it tiles, the XLA path over a KV cache (rollout prefill and decode) or otherwise."""
    from moejax import kernels
    m = cfg.model
    return kernels.resolve_attention_impl(m.attention.impl, jnp.dtype(m.dtype),
                                          needs_reference=m.attention.sink,
                                          self_attention=not work.rollout,
                                          seq_len=work.seq_len, backend="tpu")


def expected_kernels(cfg: Config, mesh: Mesh, work: Work | None = None) -> dict[str, str]:
    """What the config selects on TPU for a program doing ``work`` (default: the train step):
    {kernel-name prefix or HLO op: the config field}."""
    from moejax import kernels
    m, want = cfg.model, {}
    if attention_impl(cfg, work or train_work(cfg)) == "splash":
        want["splash_mha_fwd"] = "model.attention.impl"
    moe = m.moe
    if moe.enabled and moe.router.kind != "expert_choice" and moe.dispatch == "dropless" \
            and kernels.resolve_gmm_impl(moe.gmm_impl, backend="tpu") == "pallas":
        want["gmm"] = "model.moe.gmm_impl"
    if moe.enabled and moe.dispatch == "dropless" and moe.ep_exchange == "ragged" \
            and mesh.shape.get("expert", 1) > 1:
        want["ragged-all-to-all"] = "model.moe.ep_exchange"
    return want


def check_kernels(cfg: Config, mesh: Mesh, stats: hlo_stats.StepStats, program: str,
                  work: Work | None = None) -> None:
    """KernelMissing unless every kernel the config selects is in the compiled program."""
    have = set(stats.kernels) | {k for k, v in stats.collectives.items() if v["count"]}
    missing = {k: f for k, f in expected_kernels(cfg, mesh, work).items()
               if not any(h.startswith(k) for h in have)}
    if missing:
        what = ", ".join(f"{k} ({f})" for k, f in missing.items())
        raise KernelMissing(f"the compiled {program} step lacks {what}; it has kernels "
                            f"{sorted(stats.kernels) or 'none'}: the config's TPU path fell back")


# -- the report -----------------------------------------------------------------------------------

def roofline(flops: float, hbm_bytes: float, ici_bytes: float, chip: tpu_specs.ChipSpec,
             dcn_bytes: float = 0.0) -> dict:
    """Lower bounds (s) on one step, perfectly overlapped: compute at peak bf16, HBM traffic at
    full bandwidth, ICI bytes sent at the chip's total egress (every port busy: optimistic for a
    collective over one mesh axis) and DCN bytes at the chip's share of the host NICs."""
    terms = {"compute": flops / chip.peak_bf16_flops, "hbm": hbm_bytes / chip.hbm_bw,
             "ici": ici_bytes / chip.ici_egress_bw, "dcn": dcn_bytes / chip.dcn_bw}
    bound = max(terms, key=terms.get)
    return {**{f"{k}_s": v for k, v in terms.items()}, "step_s": terms[bound], "bound_by": bound}


def program_report(cfg: Config, mesh: Mesh, prog: Program, chip: tpu_specs.ChipSpec,
                   expected_args: int | None = None) -> dict:
    """Memory, FLOPs, collectives, kernels and roofline of one compiled program (per chip)."""
    chips, work = mesh.devices.size, prog.work
    stats = hlo_stats.step_stats(prog.text, chips)
    mem = prog.memory
    total = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
    ici = sum(v["wire_bytes"] for k, v in stats.collectives.items() if k != hlo_stats.DCN)
    dcn = stats.collectives.get(hlo_stats.DCN, {}).get("wire_bytes", 0.0)
    split = analytic_split(cfg, chips, work)
    analytic = sum(split.values())
    by = stats.flops_by_source
    share = gmm_row_share(cfg, mesh, work)
    executed = stats.flops - by.get("pallas_matmul", 0.0) * (1.0 - share)  # filled gmm rows only
    rl = roofline(executed, stats.hbm_bytes, ici, chip, dcn)
    remat = remat_factor(cfg, work)
    # gmm kernels at the rows balanced routing fills (their estimates count the whole buffer)
    matmul = by.get("xla_matmul", 0.0) + by.get("pallas_matmul", 0.0) * share
    expect = split["layers"] * remat + split["head"]  # remat reruns the layers only
    matmul_ratio = matmul / expect if expect else None
    attn_ratio = (by.get("splash", 0.0) / split["attention"]
                  if split["attention"] and by.get("splash") else None)
    return {
        "program": prog.name,
        "memory": {**mem, "total": total, "capacity": chip.hbm_bytes,
                   "fraction": total / chip.hbm_bytes,
                   **({"expected_arguments": expected_args} if expected_args is not None else {})},
        "flops": {"compiled": stats.flops, "by_source": stats.flops_by_source,
                  "gmm_row_share": share, "executed_balanced": executed,
                  "analytic": analytic, "ratio": stats.flops / analytic if analytic else None,
                  "expected_ratio": remat,
                  "analytic_split": split,
                  # parameter matmuls (XLA dots + gmm kernels at balanced rows) over 6 N tokens,
                  # the layers' share times the remat recompute
                  "matmul_ratio_remat_adjusted": matmul_ratio,
                  # splash kernels over the causal-half QK^T/PV count (fwd + bwd = 3 fwd)
                  "attention_ratio": attn_ratio,
                  "xla_cost_analysis": prog.cost.get("flops")},
        "hbm_bytes_est": stats.hbm_bytes,
        "collectives": stats.collectives,
        "ici_wire_bytes": ici,
        "dcn_bytes": dcn,
        "kernels": stats.kernels,
        "attention_impl": attention_impl(cfg, work),
        "work": dataclasses.asdict(work),
        "roofline": {**rl, "mfu_bound": analytic / chip.peak_bf16_flops / rl["step_s"]
                     if rl["step_s"] else None},
        "lower_s": prog.lower_s, "compile_s": prog.compile_s,
        "warnings": stats.warnings,
    }


def check_fits(report: dict, cfg: Config) -> None:
    """DoesNotFit when the program's per-chip total exceeds the chip's HBM."""
    mem = report["memory"]
    if mem["total"] <= mem["capacity"]:
        return
    knob = ("the state is most of it: shard it further (mesh.fsdp; mesh.expert for experts)"
            if mem["argument"] > mem["temp"] else
            "activations are most of it: raise train.grad_accum or lower train.batch_size"
            + ("" if cfg.model.remat == "full" else ", or set model.remat='full'"))
    raise DoesNotFit(f"the {report['program']} step needs {mem['total'] / GiB:.2f} GiB per chip "
                     f"(arguments {mem['argument'] / GiB:.2f}, "
                     f"temporaries {mem['temp'] / GiB:.2f}, "
                     f"outputs {(mem['output'] - mem['alias']) / GiB:.2f}) of "
                     f"{mem['capacity'] / GiB:.0f} GiB: {knob}")


def analyze(cfg: Config, topology: str, *, slices: int = 1, eval_step: bool = True,
            dump_prefix: str | None = None) -> dict:
    """Compile the run's programs for ``topology`` and return the report (raises the named
    errors above). ``dump_prefix``: also write each compiled HLO to ``<prefix>.<program>.hlo``."""
    from moejax.mesh import make_mesh
    chip = tpu_specs.chip(topology)
    mesh = make_mesh(cfg.mesh, topology_devices(topology, slices))  # hybrid over slices
    progs = build_programs(cfg, mesh, eval_step=eval_step)
    reports = {}
    for name, prog in progs.items():
        if dump_prefix:
            from moejax.paths import as_path, write_text_atomic
            write_text_atomic(as_path(f"{dump_prefix}.{name}.hlo"), prog.text)
        rep = program_report(cfg, mesh, prog, chip, expected_args=prog.argument_bytes)
        check_kernels(cfg, mesh, hlo_stats.step_stats(prog.text, mesh.devices.size), name,
                      prog.work)
        check_fits(rep, cfg)
        reports[name] = rep
    return {"topology": topology, "slices": slices, "chips": int(mesh.devices.size),
            "chip": chip.name, "mesh": dict(mesh.shape),
            "params": cfg.model.num_params(), "active_params": cfg.model.num_params(active=True),
            "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len, "programs": reports}


# -- command line ---------------------------------------------------------------------------------

def load_experiment(name: str):
    """The experiment module ``experiments.<name>`` (its PRESETS and ARMS)."""
    try:
        return importlib.import_module(f"experiments.{name}")
    except ModuleNotFoundError as e:
        raise SystemExit(f"--experiment {name!r}: no module experiments.{name} ({e})") from None


def experiment_tables(mod) -> tuple[dict, dict]:
    """(presets, arms) to compile: the module's ``aot_experiment()`` where its model comes from
    the command line (finetune's ``--source``: the hook gives a named source shape), else its
    ``PRESETS`` and ``ARMS``."""
    hook = getattr(mod, "aot_experiment", None)
    return hook() if hook is not None else (mod.PRESETS, mod.ARMS)


def arm_config(experiment: str, mod, cfg: Config) -> Config:
    """The config the experiment's ``run_arm`` trains: the module's ``arm_config(cfg)`` where it
    has one, else ``cfg``, except for ``upcycle``, whose arms give ``model.moe.d_expert`` as a
    divisor of d_ff that its ``run_arm`` resolves (the same rule, repeated here)."""
    hook = getattr(mod, "arm_config", None)
    if hook is not None:
        return hook(cfg)
    if experiment == "upcycle" and cfg.model.moe.enabled:
        m = cfg.model
        moe = dataclasses.replace(m.moe, d_expert=m.d_ff // m.moe.d_expert)
        return dataclasses.replace(cfg, model=dataclasses.replace(m, moe=moe))
    return cfg


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--experiment", required=True, help="experiments.<name>, e.g. pretrain")
    p.add_argument("--preset", required=True, help="a preset of that experiment, e.g. tpu-v5p-64")
    p.add_argument("--arms", default=None, help="comma-separated arms (default: the first)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--topology", default=None,
                   help="e.g. v5p:2x4x4 (default: from the preset name)")
    p.add_argument("--slices", type=int, default=1, help="slices joined over DCN (data axis)")
    p.add_argument("--no-eval", action="store_true", help="compile only the train step (RL: no eval rollout)")
    p.add_argument("--json", default=None, help="write the report(s) here")
    p.add_argument("--markdown", action="store_true", help="also print results-table rows")
    p.add_argument("--dump-hlo", default=None, metavar="DIR",
                   help="write the compiled HLO of each program into DIR")
    args = p.parse_args(argv)
    if importlib.util.find_spec("libtpu") is None:
        print(f"moejax.aot compiles for TPU with libtpu, which is not installed: {INSTALL_LINE}",
              file=sys.stderr)
        raise SystemExit(2)
    from moejax import experiment
    mod = load_experiment(args.experiment)
    presets, arm_table = experiment_tables(mod)
    arms = args.arms.split(",") if args.arms else [next(iter(arm_table))]
    topology = args.topology or default_topology(args.preset)
    out, first_flags = {}, None
    with experiment.user_errors(experiment.debug_from_env()):
        for arm in arms:
            cfg = arm_config(args.experiment, mod, experiment.build_config(
                presets, arm_table, args.preset, arm, args.set))
            if first_flags is None:  # libtpu reads its flags once, when a topology is first built
                set_libtpu_flags(cfg)
                first_flags = libtpu_flags(cfg)
            elif libtpu_flags(cfg) != first_flags:
                print(f"warning: arm {arm} would run with libtpu flags {libtpu_flags(cfg)}; "
                      f"this process compiles with {first_flags} (run it on its own)",
                      file=sys.stderr)
            try:
                dump = (os.path.join(args.dump_hlo, f"{args.experiment}.{args.preset}.{arm}")
                        if args.dump_hlo else None)
                rep = analyze(cfg, topology, slices=args.slices, eval_step=not args.no_eval,
                              dump_prefix=dump)
            except KernelMissing as e:
                print(f"error: {e}", file=sys.stderr)
                raise SystemExit(3) from None
            key = f"{args.experiment}/{args.preset}/{arm}"
            rep["libtpu_init_args"] = os.environ.get(LIBTPU_ENV, "")
            print(format_table(key, rep), flush=True)
            print(f"LIBTPU_INIT_ARGS: {rep['libtpu_init_args'] or '(none)'}", flush=True)
            if args.markdown:
                print("\n".join([MD_HEADER, *markdown_rows(key, rep)]), flush=True)
            out[key] = rep
    if args.json:
        from moejax.paths import as_path, write_text_atomic
        write_text_atomic(as_path(args.json), json.dumps(out, indent=2, sort_keys=True))
    return out


if __name__ == "__main__":
    main()
