"""Tokenize a real corpus once, ahead of a run: ``python -m moejax.data.prepare SRC --out DIR``.

SRC (a local or ``gs://`` folder) holds ``*.jsonl``, ``*.jsonl.gz``, ``*.parquet`` or ArrayRecord
(``*.array_record``, records are JSON objects; local only) files: one sub-folder per domain, or
files at the top whose records carry a domain field. Documents are streamed (never the whole
corpus in memory), tokenized by ``--workers`` processes and appended to one ``TokenStore`` per
(domain, split) under DIR; the split is a hash of the document text (duplicates never straddle
train/val).

``DIR/manifest.json`` records the tokenizer, per stream the documents and tokens, and per source
file its size, mtime and counts. It is rewritten after every completed source file, so a killed run
continues from there (what it wrote past that point is discarded) and ends identical to a straight
run. A training run opens DIR directly: ``data.corpus=DIR``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import time
from typing import Iterator

import numpy as np
from etils import epath
from tqdm.auto import tqdm

from moejax.data.sources import PrepareError, Source, _check_domain, discover, read_chunks
from moejax.data.store import StreamWriter
from moejax.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer

MANIFEST = "manifest.json"
FORMAT = "moejax-prepared-v1"
SPLITS = ("train", "val")
BPE_TRAIN_BYTES = 100 << 20  # training text sampled (from the first files) for --tokenizer bpe


# -- tokenization (runs in worker processes) ----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EncodeSpec:
    """What a worker needs to turn a task into per-stream tokens."""

    tokenizer_file: str | None  # None: the byte tokenizer
    text_field: str
    domain_field: str
    val_fraction: float


_WORKER_TOKENIZER: dict = {}


def _tokenizer_for(spec: EncodeSpec) -> Tokenizer:
    tok = _WORKER_TOKENIZER.get(spec.tokenizer_file)
    if tok is None:
        tok = ByteTokenizer() if spec.tokenizer_file is None else _load_bpe(spec.tokenizer_file)
        _WORKER_TOKENIZER[spec.tokenizer_file] = tok
    return tok


def _load_bpe(path: str) -> BPETokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    return BPETokenizer(HFTokenizer.from_str(epath.Path(path).read_text()), path)


def split_of(text: str, val_fraction: float) -> str:
    """``"val"`` for a ``val_fraction`` share of texts, by a hash of the text (stable, no RNG)."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return "val" if h / 2.0 ** 64 < val_fraction else "train"


def _records(task: tuple, spec: EncodeSpec, src_rel: str, first: int,
             fixed_domain: str | None) -> Iterator[tuple[str, str]]:
    """(domain, text) of every record of a task; errors name the file, record and field."""
    if task[0] == "cols":
        for i, (text, dom) in enumerate(task[1]):
            yield _checked(src_rel, first + i, text, fixed_domain or dom, spec)
        return
    for i, raw in enumerate(task[1]):
        try:
            row = json.loads(raw)
        except ValueError as e:
            raise PrepareError(f"{src_rel} record {first + i}: not a JSON object ({e})") from None
        if not isinstance(row, dict):
            raise PrepareError(f"{src_rel} record {first + i}: not a JSON object")
        dom = fixed_domain if fixed_domain is not None else _field(row, spec.domain_field)
        yield _checked(src_rel, first + i, row.get(spec.text_field), dom, spec)


def _field(row: dict, dotted: str):
    """``row["a"]["b"]`` for ``"a.b"`` (SlimPajama: ``meta.redpajama_set_name``); None if absent."""
    for key in dotted.split("."):
        row = row.get(key) if isinstance(row, dict) else None
    return row


def _checked(src_rel: str, index: int, text, domain, spec: EncodeSpec) -> tuple[str, str]:
    if not isinstance(text, str):
        raise PrepareError(f"{src_rel} record {index}: expected a string field {spec.text_field!r} "
                           "(--text-field)")
    if not isinstance(domain, str):
        raise PrepareError(f"{src_rel} record {index}: expected a string field {spec.domain_field!r}"
                           " (--domain-field), or put the file in a per-domain sub-folder")
    return _check_domain(domain, f"{src_rel} record {index}"), text


def encode_task(task: tuple, spec: EncodeSpec, src_rel: str, first: int,
                fixed_domain: str | None) -> tuple[int, dict[str, tuple]]:
    """Tokenize one task: (records, {"domain/split": (lengths [n] int64, tokens int32, text bytes)})."""
    tok = _tokenizer_for(spec)
    groups: dict[str, list[str]] = collections.defaultdict(list)
    n = 0
    for dom, text in _records(task, spec, src_rel, first, fixed_domain):
        n += 1
        if text.strip():
            groups[f"{dom}/{split_of(text, spec.val_fraction)}"].append(text)
    out = {}
    for key, texts in groups.items():
        ids = tok.encode_batch(texts)
        lengths = np.array([len(x) for x in ids], np.int64)
        small = np.uint16 if tok.vocab_size <= 1 << 16 else np.int32  # halves what is pickled back
        flat = np.concatenate(ids).astype(small) if ids else np.zeros(0, small)
        out[key] = (lengths, flat, sum(len(t.encode("utf-8")) for t in texts))
    return n, out


def _init_worker() -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"  # one process per core: no nested tokenizer threads
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:  # Linux: end with the parent, so a killed prepare leaves no idle workers behind
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _InProcess:
    """The executor interface, running each task at submit time (``--workers 0``)."""

    def submit(self, fn, *args):
        f: cf.Future = cf.Future()
        f.set_result(fn(*args))
        return f

    def shutdown(self, cancel_futures: bool = False) -> None:
        pass


# -- the manifest -------------------------------------------------------------------------------

def read_manifest(out) -> dict | None:
    """The manifest of a prepared directory, or None when there is none."""
    path = epath.Path(os.path.expanduser(str(out))) / MANIFEST
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    if m.get("format") != FORMAT:
        raise PrepareError(f"{path}: format {m.get('format')!r}, expected {FORMAT!r}; prepare again")
    return m


def _write_manifest(out: epath.Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=1, sort_keys=True)
    path = out / MANIFEST
    if str(out).startswith("gs://"):  # an object write is atomic already
        path.write_text(text)
        return
    tmp = out / f".{MANIFEST}.{os.getpid()}"
    tmp.write_text(text)
    os.replace(str(tmp), str(path))


def prepared_provenance(corpus: str, domains) -> dict:
    """``corpus_provenance`` of a prepared directory, from its manifest: per domain the documents,
    text bytes and a sha256 over the source files' names, sizes and mtimes; one sha256 over all."""
    m = read_manifest(corpus)
    out = {}
    for dom in domains:
        files = sorted((rel, f["size"], f["mtime"]) for rel, f in m["files"].items()
                       if any(k.startswith(f"{dom}/") for k in f["streams"]))
        per = [s for f in m["files"].values() for k, s in f["streams"].items()
               if k.startswith(f"{dom}/")]
        out[dom] = {"docs": sum(s["docs"] for s in per), "bytes": sum(s["bytes"] for s in per),
                    "sha256": hashlib.sha256(json.dumps(files).encode()).hexdigest()}
    combined = json.dumps([[dom, d["sha256"]] for dom, d in out.items()] + [m["tokenizer"]])
    return {"corpus": corpus, "python_version": sys.version.split()[0], "corpus_version": FORMAT,
            "corpus_bytes_per_domain": None, "tokenizer": m["tokenizer"],
            "sha256": hashlib.sha256(combined.encode()).hexdigest(), "domains": out}


def is_prepared(corpus: str) -> bool:
    """Whether ``data.corpus`` names a prepared directory (it holds a manifest)."""
    if corpus == "embedded" or corpus.endswith(".jsonl"):
        return False
    return (epath.Path(os.path.expanduser(corpus)) / MANIFEST).exists()


# -- the tokenizer ------------------------------------------------------------------------------

def _sha256(path: epath.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tokenizer_request(tokenizer: str, bpe_vocab_size: int) -> dict:
    """What the user asked for, as recorded in the manifest (a resume must ask the same)."""
    if tokenizer == "byte":
        return {"kind": "byte"}
    if tokenizer == "bpe":
        return {"kind": "bpe", "vocab_size": bpe_vocab_size}
    p = epath.Path(os.path.expanduser(tokenizer))
    if not p.is_file():
        raise PrepareError(f"--tokenizer={tokenizer!r}: expected 'byte', 'bpe' or a tokenizer.json "
                           f"path, but {p} does not exist")
    return {"kind": "file", "source_sha256": _sha256(p)}


def _setup_tokenizer(tokenizer: str, bpe_vocab_size: int, out: epath.Path, sources: list[Source],
                     text_field: str, domain_field: str, val_fraction: float) -> str | None:
    """Make ``out/tokenizer.json`` if needed; returns its path (None for the byte tokenizer)."""
    if tokenizer == "byte":
        return None
    target = out / "tokenizer.json"
    if not target.exists():
        if tokenizer == "bpe":
            texts = _bpe_sample(sources, text_field, domain_field, val_fraction)
            BPETokenizer.train(texts, bpe_vocab_size).save(f"{target}.tmp")
            epath.Path(f"{target}.tmp").rename(target)
        else:
            epath.Path(os.path.expanduser(tokenizer)).copy(target)
    _load_bpe(str(target))  # fails early, naming the file, if it lacks special tokens
    return str(target)


def _bpe_sample(sources: list[Source], text_field: str, domain_field: str,
                val_fraction: float) -> Iterator[str]:
    """Training-split texts from the first files of every domain folder (or the top-level files),
    up to BPE_TRAIN_BYTES in all, shared evenly over the groups."""
    groups: dict = collections.defaultdict(list)
    for s in sources:
        groups[s.domain].append(s)
    budget = BPE_TRAIN_BYTES // len(groups)
    spec = EncodeSpec(None, text_field, domain_field, val_fraction)
    for files in groups.values():
        used = 0
        for s in files:
            first = 0
            for task in read_chunks(s, text_field, domain_field):
                recs = list(_records(task, spec, s.rel, first, s.domain))
                first += len(recs)
                for _, text in recs:
                    if split_of(text, val_fraction) == "train" and text.strip():
                        used += len(text)
                        yield text
                if used >= budget:
                    break
            if used >= budget:
                break


# -- preparing ----------------------------------------------------------------------------------

def _new_manifest(request: dict, text_field: str, domain_field: str, val_fraction: float) -> dict:
    return {"format": FORMAT, "tokenizer": request, "text_field": text_field,
            "domain_field": domain_field, "val_fraction": val_fraction, "files": {}, "streams": {},
            "complete": False}


def _check_resumable(m: dict, fresh: dict, sources: list[Source], out: epath.Path) -> None:
    """A resume must ask for what the interrupted run asked, over unchanged finished files."""
    for field, flag in (("tokenizer", "--tokenizer"), ("text_field", "--text-field"),
                        ("domain_field", "--domain-field"), ("val_fraction", "--val-fraction")):
        if m[field] != fresh[field]:
            raise PrepareError(f"{out} was prepared with {flag} {m[field]!r}, not {fresh[field]!r}: "
                               f"pass the same {flag}, or a new --out")
    by_rel = {s.rel: s for s in sources}
    for rel, rec in m["files"].items():
        s = by_rel.get(rel)
        if s is None or s.fingerprint() != {k: rec[k] for k in ("size", "mtime")}:
            what = "is gone" if s is None else "changed (size or mtime)"
            raise PrepareError(f"source file {rel} {what} since {out} was prepared from it; restore "
                               "it or prepare into a new --out")


class _Streams:
    """The open ``StreamWriter`` of every (domain, split), created on first use."""

    def __init__(self, out: epath.Path, tok: Tokenizer, committed: dict):
        self.out, self.tok, self.committed = out, tok, committed
        self.writers: dict[str, StreamWriter] = {}

    def get(self, key: str) -> StreamWriter:
        if key not in self.writers:
            c = self.committed.get(key)
            self.writers[key] = StreamWriter(
                self.out / key, self.tok.bos_id, self.tok.eos_id,
                committed=(c["docs"], c["tokens"]) if c else None)
        return self.writers[key]

    def commit(self) -> dict:
        for key, w in self.writers.items():
            docs, tokens = w.commit()
            self.committed[key] = {"docs": docs, "tokens": tokens}
        return self.committed


def _append(streams: _Streams, result: dict, file_rec: dict) -> int:
    """Append one task's streams; returns its token count (bos/eos included)."""
    total = 0
    for key in sorted(result):
        lengths, flat, nbytes = result[key]
        w = streams.get(key)
        before = w.tokens
        w.append(lengths, flat)
        rec = file_rec["streams"].setdefault(key, {"docs": 0, "tokens": 0, "bytes": 0})
        rec["docs"] += len(lengths)
        rec["tokens"] += w.tokens - before
        rec["bytes"] += nbytes
        total += w.tokens - before
    return total


def _prepare_file(src: Source, pool, spec: EncodeSpec, streams: _Streams, inflight: int,
                  bar: tqdm) -> dict:
    """Tokenize and append one source file in order; returns its manifest record."""
    rec = {**src.fingerprint(), "records": 0, "streams": {}}
    pending: collections.deque = collections.deque()
    first = 0

    def drain_one():
        n, result = pending.popleft().result()
        rec["records"] += n
        bar.update(_append(streams, result, rec))

    for task in read_chunks(src, spec.text_field, spec.domain_field):
        pending.append(pool.submit(encode_task, task, spec, src.rel, first, src.domain))
        first += len(task[1])
        while len(pending) >= inflight:
            drain_one()
    while pending:
        drain_one()
    return rec


def _finish(m: dict, streams: _Streams) -> None:
    """Give every domain both splits (an empty stream if needed) and mark the manifest complete."""
    domains = sorted({k.split("/")[0] for k in m["streams"]})
    for dom in domains:
        for split in SPLITS:
            streams.get(f"{dom}/{split}")
    m["streams"] = dict(sorted(streams.commit().items()))
    m["domains"] = domains
    m["complete"] = True


def prepare(src: str, out: str, tokenizer: str = "byte", *, text_field: str = "text",
            domain_field: str = "domain", val_fraction: float = 0.01, workers: int | None = None,
            bpe_vocab_size: int = 512, progress: bool = True) -> dict:
    """Prepare SRC into OUT (resuming an interrupted run into the same OUT); returns the manifest."""
    if not 0.0 < val_fraction < 0.5:
        raise PrepareError(f"--val-fraction={val_fraction}: must lie in (0, 0.5)")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 0:
        raise PrepareError(f"--workers={workers}: must be >= 0 (0 tokenizes in this process)")
    outp = epath.Path(os.path.expanduser(out))
    sources = discover(src)
    fresh = _new_manifest(_tokenizer_request(tokenizer, bpe_vocab_size), text_field, domain_field,
                          val_fraction)
    m = read_manifest(outp)
    if m is None:
        if outp.exists() and any(outp.iterdir()):
            raise PrepareError(f"--out={out!r} is a non-empty directory without a {MANIFEST}; "
                               "choose a new or empty directory")
        outp.mkdir(parents=True, exist_ok=True)
        m = fresh
        _write_manifest(outp, m)  # first: a killed run is resumable from here on
    else:
        _check_resumable(m, fresh, sources, outp)
    tok_file = _setup_tokenizer(tokenizer, bpe_vocab_size, outp, sources, text_field, domain_field,
                                val_fraction)
    tok = ByteTokenizer() if tok_file is None else _load_bpe(tok_file)
    m.update(vocab_size=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    if tok_file is not None:
        m["tokenizer_sha256"] = _sha256(epath.Path(tok_file))
    m["complete"] = False
    _write_manifest(outp, m)
    spec = EncodeSpec(tok_file, text_field, domain_field, val_fraction)
    streams = _Streams(outp, tok, m["streams"])
    todo = [s for s in sources if s.rel not in m["files"]]
    pool = (_InProcess() if workers == 0 else cf.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker))
    t0 = time.time()
    try:
        with tqdm(total=None, unit="tok", unit_scale=True, desc="prepare", disable=not progress,
                  dynamic_ncols=True) as bar:
            for i, s in enumerate(todo):
                bar.set_postfix_str(f"file {i + 1}/{len(todo)} {s.rel}", refresh=False)
                m["files"][s.rel] = _prepare_file(s, pool, spec, streams, 2 * max(workers, 1), bar)
                m["streams"] = streams.commit()
                _write_manifest(outp, m)  # the resume point: this file is done
            _finish(m, streams)
            m["prepare_seconds"] = round(m.get("prepare_seconds", 0) + time.time() - t0, 2)
            _write_manifest(outp, m)
    finally:
        pool.shutdown(cancel_futures=True)
    return m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moejax.data.prepare",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="folder (local or gs://) of *.jsonl[.gz] / *.parquet / *.array_record "
                               "files: one sub-folder per domain, or files with a domain field")
    p.add_argument("--out", required=True, help="output folder (local or gs://); rerun to resume")
    p.add_argument("--tokenizer", default="byte", help="byte, bpe (trained on a sample) or a "
                                                       "tokenizer.json path")
    p.add_argument("--bpe-vocab-size", type=int, default=512)
    p.add_argument("--text-field", default="text")
    p.add_argument("--domain-field", default="domain", help="record field naming the domain of "
                   "top-level files; dotted for nested JSON (meta.redpajama_set_name)")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: cores)")
    a = p.parse_args(argv)
    from moejax.runtime import limit_malloc_arenas

    limit_malloc_arenas(2)  # the command's process only: a library caller keeps its malloc settings
    try:
        m = prepare(a.src, a.out, a.tokenizer, text_field=a.text_field, domain_field=a.domain_field,
                    val_fraction=a.val_fraction, workers=a.workers, bpe_vocab_size=a.bpe_vocab_size)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokens = sum(s["tokens"] for s in m["streams"].values())
    secs = m.get("prepare_seconds", 0)
    print(f"prepared {a.out}: domains {m['domains']}, {tokens:,} tokens in {secs:.0f} s "
          f"({tokens / max(secs, 1e-9):,.0f} tokens/s)")
    for key, s in m["streams"].items():
        print(f"  {key}: {s['docs']:,} docs, {s['tokens']:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
