"""The shared command line of experiment files.

``python -m experiments.<name> --preset cpu --arms a,b --workdir runs/x --set train.steps=200``
runs each arm in ``workdir/<arm>`` (an arm that already finished is not rerun; an interrupted
one resumes from its checkpoint), then writes ``workdir/report.md``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable, Mapping, Sequence

import jax

from moejax.config import Config
from moejax.overrides import apply_overrides

SUMMARY = "summary.json"


def build_config(presets: Mapping[str, Config], arms: Mapping[str, Sequence[str]], preset: str,
                 arm: str, overrides: Sequence[str]) -> Config:
    """Preset, then the arm's overrides, then the command line's ``--set`` (last wins)."""
    if preset not in presets:
        raise SystemExit(f"--preset {preset!r}: choose one of {sorted(presets)}")
    if arm not in arms:
        raise SystemExit(f"--arms {arm!r}: choose from {sorted(arms)}")
    return apply_overrides(presets[preset], [*arms[arm], *overrides])


def finished(workdir: str) -> dict | None:
    path = os.path.join(workdir, SUMMARY)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def write_report(out_dir: str, text: str) -> str:
    """Write ``out_dir/report.md`` (markdown; plots are linked relative to it); returns its path."""
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(text)
    return path


def main(*, description: str, presets: Mapping[str, Config], arms: Mapping[str, Sequence[str]],
         run_arm: Callable[[Config, str], dict],
         report: Callable[[dict[str, str], str], str],
         argv: Sequence[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=description.strip().splitlines()[0])
    p.add_argument("--preset", default="cpu", choices=sorted(presets))
    p.add_argument("--arms", default=",".join(arms), help=f"comma-separated, from {list(arms)}")
    p.add_argument("--workdir", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, e.g. train.lr=3e-4 (repeatable)")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() (multi-host: TPU pods, SLURM)")
    args = p.parse_args(argv)
    if args.distributed:
        from moejax.mesh import initialize_distributed
        initialize_distributed()
    names = [a for a in args.arms.split(",") if a]
    configs = {a: build_config(presets, arms, args.preset, a, args.set) for a in names}
    summaries, workdirs = {}, {}
    for arm, cfg in configs.items():
        wd = workdirs[arm] = os.path.join(args.workdir, arm)
        done = finished(wd)
        if done is not None and done.get("step") == cfg.train.steps:
            print(f"[{arm}] already finished in {wd}; not rerun")
            summaries[arm] = done
            continue
        summary = run_arm(cfg, wd)
        summaries[arm] = summary
        if summary.get("preempted"):
            print(f"[{arm}] preempted at step {summary['step']}; rerun the command to resume")
            return summaries
        if jax.process_index() == 0:
            with open(os.path.join(wd, SUMMARY), "w") as f:
                json.dump(summary, f, indent=2)
    if jax.process_index() == 0:
        print(f"report: {report(workdirs, args.workdir)}")
    return summaries
