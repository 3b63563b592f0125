"""The shared command line of experiment files.

``python -m experiments.<name> --preset cpu --arms a,b --workdir runs/x --set train.steps=200``
runs each arm in ``workdir/<arm>`` (local or ``gs://``), then writes ``workdir/report.md``. An arm
that finished with the same config (``config_hash`` in its summary.json) is not rerun; an
interrupted one, or one given a longer ``train.steps``, resumes from its checkpoint; a finished arm
whose data or math settings differ is refused with the fields named. Configuration and data
errors print one message (``--debug`` or MOEJAX_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from typing import Callable, Iterator, Mapping, Sequence

import jax

from moejax.config import Config, ConfigError
from moejax.overrides import apply_overrides
from moejax.paths import as_path, read_json, write_text_atomic

SUMMARY = "summary.json"
DEBUG_ENV = "MOEJAX_DEBUG"


def build_config(presets: Mapping[str, Config], arms: Mapping[str, Sequence[str]], preset: str,
                 arm: str, overrides: Sequence[str]) -> Config:
    """Preset, then the arm's overrides, then the command line's ``--set`` (last wins)."""
    if preset not in presets:
        raise SystemExit(f"--preset {preset!r}: choose one of {sorted(presets)}")
    if arm not in arms:
        raise SystemExit(f"--arms {arm!r}: choose from {sorted(arms)}")
    return apply_overrides(presets[preset], [*arms[arm], *overrides])


SEED_REPLICA = "-s2"  # suffix of an arm's replica on the second train.seed


def with_seed_replicas(base: Mapping[str, Sequence[str]], seed: int) -> dict[str, tuple]:
    """Every arm of ``base`` followed by its ``<arm>-s2`` replica on ``train.seed=seed`` (same
    data; other init and step keys), for reports that give mean ± spread over seeds."""
    arms: dict[str, tuple] = {}
    for name, over in base.items():
        arms[name] = tuple(over)
        arms[f"{name}{SEED_REPLICA}"] = (*over, f"train.seed={seed}")
    return arms


def base_arm(name: str) -> str:
    """'micro-s2' -> 'micro' (the arm a seed replica repeats)."""
    return name[:-len(SEED_REPLICA)] if name.endswith(SEED_REPLICA) else name


def config_hash(cfg: Config) -> str:
    """SHA-256 of the whole config (sorted JSON): two runs with equal hashes ran the same config."""
    return hashlib.sha256(cfg.to_json().encode()).hexdigest()


def finished(workdir: str | os.PathLike) -> dict | None:
    """The arm's ``summary.json`` (written when it finished), or None."""
    return read_json(as_path(workdir) / SUMMARY)


def reuse_finished(workdir: str, cfg: Config) -> dict | None:
    """The summary of a finished arm that this config may reuse, or None to run (or resume) it.

    Reused: the same config (hash), or one that differs only in fields a resume may change
    (execution-only fields, the mesh) at the same ``train.steps``. A longer budget resumes the
    run. A change to the data stream or the math raises ConfigError naming the fields: the old run
    is never reported as the new one (use a new --workdir for it)."""
    from moejax.trainer import resume_conflicts  # the same rule as resuming a checkpoint

    done = finished(workdir)
    if done is None:
        return None
    if done.get("config_hash") == config_hash(cfg):
        return done
    saved = read_json(as_path(workdir) / "config.json") or {}
    conflicts = resume_conflicts(saved, cfg)
    if conflicts:
        what = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(conflicts.items()))
        raise ConfigError(f"{workdir} holds a finished run with other settings ({what}); use a "
                          "new --workdir for this config, or restore the old values to reuse it")
    return done if done.get("step") == cfg.train.steps else None


def write_summary(workdir: str, summary: dict, cfg: Config) -> None:
    """``summary.json``: the run's summary and the hash of the config that produced it."""
    from moejax.data import corpus_provenance

    record = {**summary, "config_hash": config_hash(cfg)}
    if cfg.uses_corpus:
        record["corpus"] = corpus_provenance(cfg.data)
    write_text_atomic(as_path(workdir) / SUMMARY, json.dumps(record, indent=2))


def write_report(out_dir: str | os.PathLike, text: str) -> str:
    """Write ``out_dir/report.md`` (markdown; plots are linked relative to it); returns its path."""
    path = as_path(out_dir) / "report.md"
    write_text_atomic(path, text)
    return os.fspath(path)


def debug_from_env() -> bool:
    """MOEJAX_DEBUG=1 (or true/yes) asks for tracebacks, like ``--debug``."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


@contextlib.contextmanager
def user_errors(debug: bool) -> Iterator[None]:
    """Configuration and data errors end the command with their one-line message (exit code 2);
    with ``debug`` they propagate with the traceback."""
    from moejax.ckpt import CheckpointMismatchError
    from moejax.trainer import DataError

    try:
        yield
    except (ConfigError, DataError, CheckpointMismatchError) as e:
        if debug:
            raise
        print(f"error: {e}\n(run with --debug or {DEBUG_ENV}=1 for the traceback)",
              file=sys.stderr)
        raise SystemExit(2) from None


def preset_arms(argv: Sequence[str], presets: Mapping[str, Config],
                arms_for: Callable[[Config], Mapping[str, Sequence[str]]],
                default: Mapping[str, Sequence[str]]) -> Mapping[str, Sequence[str]]:
    """The arm table of the ``--preset`` named in ``argv`` (``arms_for(presets[name])``), for
    experiments whose arms depend on the preset; ``default`` for an unknown name (``main``
    then refuses it with the choices)."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--preset", default="cpu")
    name = peek.parse_known_args(list(argv))[0].preset
    return arms_for(presets[name]) if name in presets else default


def main(*, description: str, presets: Mapping[str, Config], arms: Mapping[str, Sequence[str]],
         run_arm: Callable[[Config, str], dict],
         report: Callable[[dict[str, str], str], str],
         argv: Sequence[str] | None = None,
         budget: Callable[[Mapping[str, Config], Mapping[str, str]], str] | None = None
         ) -> dict[str, dict]:
    """Parse the command line, run the arms, write the report. ``budget(configs, workdirs)``
    gives the report's data-budget section (default ``budget_section``: corpus tokens and
    passes per domain)."""
    from moejax.runtime import tune_host_malloc

    tune_host_malloc()  # before jax starts its threads: XLA:CPU's step scratch stays mapped
    p = argparse.ArgumentParser(description=description.strip().splitlines()[0])
    p.add_argument("--preset", default="cpu", choices=sorted(presets))
    p.add_argument("--arms", default=",".join(arms), help=f"comma-separated, from {list(arms)}")
    p.add_argument("--workdir", required=True, help="a local directory or a gs:// URI")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, e.g. train.lr=3e-4 (repeatable)")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() (multi-host: TPU pods, SLURM)")
    p.add_argument("--debug", action="store_true",
                   help=f"show the traceback of configuration and data errors (or {DEBUG_ENV}=1)")
    args = p.parse_args(argv)
    with user_errors(args.debug or debug_from_env()):
        return _run(args, presets, arms, run_arm, report, budget or budget_section)


def _run(args, presets, arms, run_arm, report, budget) -> dict[str, dict]:
    """Run (or reuse, or resume) each arm, then write the report."""
    from moejax.runtime import set_libtpu_flags

    names = [a for a in args.arms.split(",") if a]
    configs = {a: build_config(presets, arms, args.preset, a, args.set) for a in names}
    if configs:  # before the TPU backend starts (the arms of a preset share a mesh and model kind)
        set_libtpu_flags(next(iter(configs.values())))
    if args.distributed:
        from moejax.mesh import initialize_distributed
        initialize_distributed()
    summaries, workdirs = {}, {}
    for arm, cfg in configs.items():
        wd = workdirs[arm] = os.fspath(as_path(args.workdir) / arm)
        done = reuse_finished(wd, cfg)
        if done is not None:
            print(f"[{arm}] already finished in {wd} with this config; not rerun")
            summaries[arm] = done
            continue
        summary = run_arm(cfg, wd)
        summaries[arm] = summary
        if summary.get("preempted"):
            print(f"[{arm}] stopped at step {summary['step']} (checkpoint saved); rerun the "
                  "command to resume")
            return summaries
        if jax.process_index() == 0:
            write_summary(wd, summary, cfg)
    if jax.process_index() == 0:
        path = report(workdirs, os.fspath(as_path(args.workdir)))
        append_budget(path, budget(configs, workdirs))
        print(f"report: {path}")
    return summaries


def budget_section(configs: Mapping[str, Config], workdirs: Mapping[str, str]) -> str:
    """Markdown: tokens seen and passes over each domain per arm (its ``train.steps`` x
    ``train.batch_size`` rows; a multi-phase arm's earlier phases are not counted), the eval tokens
    of the last evaluation, and the corpus provenance (Python version, content hash)."""
    from moejax.analysis.budget import budget_markdown, domain_budget
    from moejax.data import corpus_provenance, prepare_data
    from moejax.metrics import read_metrics

    budgets, evals = {}, []
    for arm, cfg in configs.items():
        data = prepare_data(cfg.data)
        budgets[arm] = domain_budget(data, cfg.train.steps, cfg.train.batch_size)
        metrics = as_path(workdirs[arm]) / "metrics.jsonl"
        recs = [r for r in (read_metrics(metrics) if metrics.exists() else [])
                if any(k.startswith("val/tokens/") for k in r)]
        if recs:
            toks = {k.split("/", 2)[2]: v for k, v in recs[-1].items() if k.startswith("val/tokens/")}
            evals.append(f"| {arm} | " + " | ".join(f"{d} {int(n):,}" for d, n in toks.items())
                         + " |")
    prov = corpus_provenance(next(iter(configs.values())).data)
    lines = ["", "## Data budget", "", budget_markdown(budgets), ""]
    if evals:
        lines += ["Validation tokens per domain (the eval set is capped at each held-out split):",
                  "", "| arm | tokens |", "|---|---|", *evals, ""]
    lines += [f"Corpus: `{prov['corpus']}` built with Python {prov['python_version']}, sha256 "
              f"`{prov['sha256'][:16]}`.", ""]
    return "\n".join(lines)


def append_budget(report_path: str, section: str) -> None:
    """Append the data-budget ``section`` (markdown) to the experiment's report."""
    path = as_path(report_path)
    write_text_atomic(path, path.read_text() + section)
