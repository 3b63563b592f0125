"""Run metrics: one JSON object per logged step in ``metrics.jsonl`` plus TensorBoard events.

Only process 0 writes. On resume the file is cut back to the restored step, so a run that was
interrupted and resumed keeps one continuous, duplicate-free metrics file.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np


def _to_python(v: Any) -> Any:
    if isinstance(v, (np.ndarray, jax.Array)):
        v = np.asarray(v)
        return v.item() if v.ndim == 0 else v.tolist()
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    return v


class MetricsLogger:
    """Append-only ``metrics.jsonl`` + ``tb/`` events; ``step`` is always present."""

    def __init__(self, workdir: str, *, resume_step: int | None = None):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = jax.process_index() == 0
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        truncate_after(self.path, resume_step if resume_step is not None else -1)
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: _to_python(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def truncate_after(path: str, step: int) -> None:
    """Drop records with ``step > step`` (all of them for step=-1) from a metrics file."""
    if not os.path.exists(path):
        return
    keep = [line for line in read_metrics(path) if line["step"] <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for rec in keep:
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
    """All records of a metrics.jsonl file (a torn last line from a crash is ignored)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
