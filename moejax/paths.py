"""Run directories as ``etils.epath`` paths, so a workdir may be local or ``gs://`` (TPU pods).

Every file a run writes under its workdir (config, metrics, checkpoints, summaries, reports) goes
through these helpers: local paths are made absolute, URIs are kept as they are.
"""

from __future__ import annotations

import json
import os

from etils import epath


def as_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an epath.Path: a URI (``gs://...``) unchanged, a local path absolute."""
    text = os.fspath(path)
    return epath.Path(text if is_uri(text) else os.path.abspath(os.path.expanduser(text)))


def is_uri(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a remote store (``scheme://``) rather than the local disk."""
    return "://" in os.fspath(path)


def write_text_atomic(path: epath.Path, text: str) -> None:
    """Write ``text`` whole: a temporary sibling renamed over ``path`` (object stores write an
    object whole anyway)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_uri(path):
        path.write_text(text)
        return
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: epath.Path) -> dict | None:
    """The JSON object in ``path``, or None when the file does not exist."""
    return json.loads(path.read_text()) if path.exists() else None
