"""Run metrics: one JSON object per logged step in ``metrics.jsonl`` plus TensorBoard events.

Only process 0 writes. On resume the file is cut back to the restored step, so a run that was
interrupted and resumed keeps one continuous, duplicate-free metrics file. The workdir may be
local or a ``gs://`` URI (etils.epath): on an object store, which cannot append, the metrics file
and the TensorBoard events are kept in memory and the whole object is rewritten on each log
(metrics) and flush (events); both stay small (scalars).
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any

import jax
import numpy as np
from etils import epath

from moejax.paths import as_path, is_uri, write_text_atomic


def _to_python(v: Any) -> Any:
    if isinstance(v, (np.ndarray, jax.Array)):
        v = np.asarray(v)
        return v.item() if v.ndim == 0 else v.tolist()
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    return v


class _EpathEventsFile:
    """A tensorboardX record writer onto any epath URI: bytes are buffered and the whole file is
    rewritten on flush (as tensorboardX's own S3/GCS writers do, without their SDKs)."""

    def __init__(self, path: str):
        self.path, self.buffer = epath.Path(path), io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        self.path.write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _EpathEventsFactory:
    def open(self, path: str) -> _EpathEventsFile:
        return _EpathEventsFile(path)

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def _register_uri_events_writer(path: epath.Path) -> None:
    """Route tensorboardX's event files under ``path``'s scheme through epath."""
    from tensorboardX import record_writer
    record_writer.register_writer_factory(os.fspath(path).split("://", 1)[0],
                                          _EpathEventsFactory())


class MetricsLogger:
    """Append-only ``metrics.jsonl`` + ``tb/`` events; ``step`` is always present."""

    def __init__(self, workdir: str | epath.Path, *, resume_step: int | None = None):
        workdir = as_path(workdir)
        self.path = workdir / "metrics.jsonl"
        self.enabled = jax.process_index() == 0
        self._tb = None
        self._remote_lines: list[str] | None = None
        if not self.enabled:
            return
        workdir.mkdir(parents=True, exist_ok=True)
        truncate_after(self.path, resume_step if resume_step is not None else -1)
        if is_uri(workdir):  # object stores cannot append: keep the lines, rewrite the object
            self._remote_lines = (self.path.read_text().splitlines(keepends=True)
                                  if self.path.exists() else [])
            _register_uri_events_writer(workdir)
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.fspath(workdir / "tb"), purge_step=resume_step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: _to_python(v) for k, v in metrics.items()})
        line = json.dumps(record) + "\n"
        if self._remote_lines is not None:
            self._remote_lines.append(line)
            self.path.write_text("".join(self._remote_lines))
        else:
            with open(self.path, "a") as f:
                f.write(line)
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def truncate_after(path: str | epath.Path, step: int) -> None:
    """Drop records with ``step > step`` (all of them for step=-1) from a metrics file."""
    path = as_path(path)
    if not path.exists():
        return
    keep = [line for line in read_metrics(path) if line["step"] <= step]
    write_text_atomic(path, "".join(json.dumps(rec) + "\n" for rec in keep))


def read_metrics(path: str | epath.Path) -> list[dict]:
    """All records of a metrics.jsonl file (a torn last line from a crash is ignored)."""
    out = []
    for line in as_path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
