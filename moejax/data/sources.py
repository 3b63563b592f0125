"""Source documents for ``moejax.data.prepare``: discovering JSONL / JSONL.gz / Parquet / ArrayRecord
files (local or gs://, one sub-folder per domain or a domain field) and reading them in bounded
chunks, so no file is ever held in memory whole."""

from __future__ import annotations

import dataclasses
import gzip
import os
import re
from typing import Iterator

from etils import epath

CHUNK_BYTES = 4 << 20  # text per tokenization task: bounds memory and keeps workers busy
CHUNK_DOCS = 4096
_SUFFIXES = ((".jsonl", "jsonl"), (".jsonl.gz", "jsonl"), (".parquet", "parquet"))
_ARRAY_RECORD = re.compile(r"\.array_?record(-\d+-of-\d+)?$")
_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=-]*$")


class PrepareError(ValueError):
    """A bad source, option or output directory; the message names the path or field and the fix."""


# -- sources ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Source:
    """One source file: ``rel`` (path under SRC), format, domain (None: from the domain field)."""

    path: epath.Path
    rel: str
    fmt: str
    domain: str | None
    size: int
    mtime: float

    def fingerprint(self) -> dict:
        return {"size": self.size, "mtime": self.mtime}


def _format_of(name: str) -> str | None:
    for suffix, fmt in _SUFFIXES:
        if name.endswith(suffix):
            return fmt
    return "array_record" if _ARRAY_RECORD.search(name) else None


def _source(path: epath.Path, rel: str, domain: str | None) -> Source | None:
    fmt = _format_of(path.name)
    if fmt is None or not path.is_file():
        return None
    st = path.stat()
    return Source(path, rel, fmt, domain, int(st.length), float(st.mtime))


def discover(src: str) -> list[Source]:
    """Source files of SRC in sorted order: top-level files (domain from the records) and the files
    under each sub-folder (the folder names the domain). Other files are ignored."""
    root = epath.Path(os.path.expanduser(src))
    if not root.is_dir():
        raise PrepareError(f"SRC={src!r} is not a directory")
    out = []
    for child in sorted(root.iterdir(), key=lambda p: p.name):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            _check_domain(child.name, f"sub-folder {child}")
            for f in sorted(child.glob("*"), key=lambda p: p.name):
                rel = f"{child.name}/{f.name}"
                if (s := _source(f, rel, child.name)) is not None:
                    out.append(s)
        elif (s := _source(child, child.name, None)) is not None:
            out.append(s)
    if not out:
        raise PrepareError(f"SRC={src!r} holds no *.jsonl, *.jsonl.gz, *.parquet or *.array_record "
                           "files (expected one sub-folder per domain, or files with a domain field)")
    return out


def _check_domain(name: str, where: str) -> str:
    if not _DOMAIN_NAME.match(name):
        raise PrepareError(f"{where}: domain {name!r} is not a valid name (letters, digits, _ . = -)")
    return name


def _grouped(items: Iterator, size) -> Iterator[list]:
    """Group items into tasks of <= CHUNK_BYTES (by ``size(item)``) and <= CHUNK_DOCS items."""
    chunk, total = [], 0
    for item in items:
        chunk.append(item)
        total += size(item)
        if total >= CHUNK_BYTES or len(chunk) >= CHUNK_DOCS:
            yield chunk
            chunk, total = [], 0
    if chunk:
        yield chunk


def _jsonl_lines(src: Source) -> Iterator[bytes]:
    with src.path.open("rb") as raw:
        f = gzip.open(raw) if src.rel.endswith(".gz") else raw
        yield from f


def _array_records(src: Source) -> Iterator[bytes]:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(src.path))
    try:
        n = reader.num_records()
        for start in range(0, n, 1024):
            yield from reader.read(start, min(start + 1024, n))
    finally:
        reader.close()


def _parquet_rows(src: Source, text_field: str, domain_field: str) -> Iterator[tuple]:
    """(text, domain | None) of every row, read one row group at a time."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepareError(f"{src.rel}: reading Parquet needs pyarrow: pip install 'moejax[data]'")

    local = not str(src.path).startswith("gs://")  # a path string is read natively
    pf = pq.ParquetFile(str(src.path) if local else src.path.open("rb"))
    names = pf.schema_arrow.names
    if text_field not in names:
        raise PrepareError(f"{src.rel}: no column {text_field!r} (--text-field); it has {names}")
    cols = [text_field]
    if src.domain is None:
        if domain_field not in names:
            raise PrepareError(f"{src.rel}: no column {domain_field!r} (--domain-field) and not "
                               f"in a domain sub-folder; it has {names}")
        cols.append(domain_field)
    try:  # one row group at a time: iter_batches' memory grew through a file (pyarrow 26)
        for g in range(pf.metadata.num_row_groups):
            yield from _table_rows(pf.read_row_group(g, columns=cols))
            pa.default_memory_pool().release_unused()  # else arrow's allocator keeps old groups
    finally:
        pf.close()


def _table_rows(table) -> Iterator[tuple]:
    """(text, domain | None) of an arrow table's rows, converted to Python 1024 rows at a time."""
    for batch in table.to_batches(max_chunksize=1024):
        texts = batch.column(0).to_pylist()
        domains = batch.column(1).to_pylist() if batch.num_columns > 1 else [None] * len(texts)
        yield from zip(texts, domains)


def read_chunks(src: Source, text_field: str, domain_field: str) -> Iterator[tuple]:
    """Tasks of one source: ``("json", [raw record])`` or ``("cols", [(text, domain | None)])``."""
    if src.fmt == "parquet":
        rows = _parquet_rows(src, text_field, domain_field)
        for chunk in _grouped(rows, lambda r: len(r[0]) if isinstance(r[0], str) else 0):
            yield ("cols", chunk)
        return
    records = _jsonl_lines(src) if src.fmt == "jsonl" else _array_records(src)
    for chunk in _grouped((r for r in records if r.strip()), len):
        yield ("json", chunk)
