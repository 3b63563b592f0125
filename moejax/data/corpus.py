"""The embedded default corpus (code / prose / math and finer domains), cached; local corpora; the
train/val split; and the provenance every run records.

Nothing is downloaded: each embedded domain's documents come from a builder in
``moejax.data.corpus_build`` (the standard library's source and docstrings, generated math),
built once per Python version and recipe and cached as JSON lines with a manifest (document and
byte counts, content sha256). A local directory of ``<domain>/*.txt`` files or a ``*.jsonl`` file
can replace it (``DataConfig.corpus``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import shutil
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from tqdm.auto import tqdm

from moejax.data.corpus_build import (BUILDERS, CORPUS_VERSION, EMBEDDED_DOMAINS,
                                      FINE_CORPUS_VERSION, FINE_DOMAINS, MATH_SEED)

if TYPE_CHECKING:
    from moejax.config import DataConfig


def cache_root(cache_dir: str) -> Path:
    """The cache directory with ``~`` expanded, created if missing."""
    root = Path(os.path.expanduser(cache_dir)).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def stable_hash(obj) -> str:
    """A short hex digest of a JSON-serialisable object (cache keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def publish(tmp: Path, final: Path) -> Path:
    """Atomically move a finished build ``tmp`` to ``final``; if another process won, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def make_tmp(root: Path, name: str) -> Path:
    """A fresh private build directory next to its final location (same filesystem: rename works)."""
    tmp = root / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def check_embedded_domains(domains: Iterable[str]) -> None:
    """Fail naming the domains the embedded corpus lacks and every valid name (coarse and fine)."""
    bad = [d for d in domains if d not in BUILDERS]
    if bad:
        raise ValueError(f"data.domains: {bad} not in the embedded corpus; choose from "
                         f"{EMBEDDED_DOMAINS + FINE_DOMAINS} (fine ones by group: "
                         "embedded_domain_groups()) or set data.corpus to a directory of "
                         "<domain>/*.txt files")


# -- cached build -----------------------------------------------------------------------------

def embedded_key(domain: str, cap: int) -> str:
    recipe = {"v": CORPUS_VERSION, "domain": domain, "cap": cap, "python": sys.version,
              "math_seed": MATH_SEED}
    if domain in FINE_DOMAINS:  # coarse domains' keys stay as they were before fine ones existed
        recipe["fine_v"] = FINE_CORPUS_VERSION
    return stable_hash(recipe)


def _jsonl_line(doc: str) -> str:
    return json.dumps(doc, ensure_ascii=False) + "\n"


def documents_sha256(docs: Iterable[str]) -> str:
    """Content hash of a domain's documents in order: sha256 of their JSON-lines UTF-8 text (the
    bytes of an embedded domain's ``docs.jsonl``), independent of where they were read from."""
    h = hashlib.sha256()
    for d in docs:
        h.update(_jsonl_line(d).encode("utf-8"))
    return h.hexdigest()


def _write_jsonl(path: Path, docs: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(_jsonl_line(d))


def _read_jsonl(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _embedded_dir(domain: str, cap: int, cache_dir: str) -> Path:
    """The published cache dir of one embedded domain (docs.jsonl + meta.json), built if missing."""
    check_embedded_domains([domain])
    root = cache_root(cache_dir) / "corpus"
    root.mkdir(exist_ok=True)
    final = root / f"{domain}-{embedded_key(domain, cap)}"
    if not (final / "docs.jsonl").exists():
        with tqdm(total=cap, unit="B", unit_scale=True, desc=f"corpus {domain}", leave=False) as bar:
            docs = BUILDERS[domain](cap, bar)
        tmp = make_tmp(root, domain)
        _write_jsonl(tmp / "docs.jsonl", docs)
        (tmp / "meta.json").write_text(json.dumps(
            {"domain": domain, "cap": cap, "corpus_version": CORPUS_VERSION,
             "python_version": platform.python_version(), "python": sys.version,
             "docs": len(docs), "bytes": sum(len(d.encode()) for d in docs),
             "sha256": documents_sha256(docs)}, indent=1))
        publish(tmp, final)
    return final


def embedded_domain(domain: str, cap: int, cache_dir: str) -> list[str]:
    """The documents of one embedded domain, built once into ``cache_dir/corpus/`` and reused."""
    return _read_jsonl(_embedded_dir(domain, cap, cache_dir) / "docs.jsonl")


def embedded_manifest(domain: str, cap: int, cache_dir: str) -> dict:
    """The manifest (meta.json) of one embedded domain: Python version it was built with, document
    and byte counts, content sha256 (hashed from docs.jsonl for caches that predate the field)."""
    final = _embedded_dir(domain, cap, cache_dir)
    meta = json.loads((final / "meta.json").read_text())
    if "sha256" not in meta:
        meta["sha256"] = hashlib.sha256((final / "docs.jsonl").read_bytes()).hexdigest()
    meta.setdefault("python_version", meta["python"].split()[0])
    return meta


def local_domain_files(corpus_dir: str, domain: str) -> list[Path]:
    """The sorted ``<dir>/<domain>/*.txt`` files; fails naming the path and what was expected."""
    d = Path(os.path.expanduser(corpus_dir)) / domain
    files = sorted(d.glob("*.txt")) if d.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"data.corpus={corpus_dir!r}: expected text files {d}/*.txt (one document per file) "
            f"for domain {domain!r}, but {'the directory has none' if d.is_dir() else 'it is missing'}")
    return files


JSONL_DEFAULT_DOMAIN = "text"


def jsonl_documents(path: str) -> dict[str, list[str]]:
    """A JSONL corpus: one ``{"text": ..., "domain": ...}`` object per line (``domain`` optional,
    default ``"text"``) -> documents per domain, in file order."""
    out: dict[str, list[str]] = {}
    with open(os.path.expanduser(path), encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"data.corpus={path!r} line {i}: expected an object with a string "
                                 '"text" field (and optionally "domain")')
            out.setdefault(str(row.get("domain", JSONL_DEFAULT_DOMAIN)), []).append(row["text"])
    return out


def local_fingerprint(corpus_dir: str, domains: Iterable[str]) -> list:
    """Names, sizes and mtimes of a local corpus: a changed file invalidates its cached tokens."""
    if corpus_dir.endswith(".jsonl"):
        st = Path(os.path.expanduser(corpus_dir)).stat()
        return [[corpus_dir, st.st_size, st.st_mtime_ns]]
    out = []
    for dom in domains:
        for f in local_domain_files(corpus_dir, dom):
            st = f.stat()
            out.append([dom, f.name, st.st_size, st.st_mtime_ns])
    return out


def load_documents(corpus: str, domain: str, cap: int, cache_dir: str) -> list[str]:
    """Documents of ``domain``: the embedded corpus, one per ``<corpus>/<domain>/*.txt`` file, or
    the rows of a ``*.jsonl`` corpus whose domain matches."""
    if corpus == "embedded":
        return embedded_domain(domain, cap, cache_dir)
    if corpus.endswith(".jsonl"):
        by_domain = jsonl_documents(corpus)
        if domain not in by_domain:
            raise ValueError(f"data.corpus={corpus!r} has no rows of domain {domain!r} (it has "
                             f"{sorted(by_domain)}); set data.domains accordingly")
        texts = by_domain[domain]
    else:
        texts = [f.read_text(encoding="utf-8") for f in local_domain_files(corpus, domain)]
    docs, seen = [], set()
    for text in texts:
        if text.strip() and text not in seen:  # exact duplicates would leak across the split
            seen.add(text)
            docs.append(text)
    return docs


def split_documents(docs: list[str], domain: str, val_fraction: float,
                    seed: int) -> tuple[list[str], list[str]]:
    """(train, val): a seeded shuffle of document order; the last ``val_fraction`` is held out."""
    if len(docs) < 2:
        raise ValueError(f"domain {domain!r} has {len(docs)} document(s); a train/val split needs >= 2")
    order = list(range(len(docs)))
    random.Random(f"{seed}/{domain}").shuffle(order)
    n_val = min(max(1, round(len(docs) * val_fraction)), len(docs) - 1)
    cut = len(docs) - n_val
    return [docs[i] for i in order[:cut]], [docs[i] for i in order[cut:]]


# -- provenance -----------------------------------------------------------------------------------

def _local_manifest(cfg: "DataConfig", domain: str) -> dict:
    """Document/byte counts and content sha256 of one domain of a local corpus, cached under
    ``cache_dir/corpus/`` by the files' names, sizes and mtimes (re-hashed when a file changes)."""
    source = str(Path(os.path.expanduser(cfg.corpus)).resolve())
    key = stable_hash({"v": CORPUS_VERSION, "corpus": source, "domain": domain,
                       "files": local_fingerprint(cfg.corpus, [domain])})
    path = cache_root(cfg.cache_dir) / "corpus" / f"provenance-{domain}-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    docs = load_documents(cfg.corpus, domain, cfg.corpus_bytes_per_domain, cfg.cache_dir)
    meta = {"domain": domain, "docs": len(docs), "bytes": sum(len(d.encode()) for d in docs),
            "sha256": documents_sha256(docs)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path)
    return meta


def corpus_provenance(cfg: "DataConfig") -> dict:
    """What a run trained on, for reports and summary.json: the corpus, the Python version it was
    built with (the embedded corpus is the interpreter's own standard library, so its content
    differs between Python versions), and per domain the documents, bytes and content sha256, plus
    one sha256 over all domains. Builds the corpus if it is not cached yet."""
    from moejax.data.prepare import is_prepared, prepared_provenance

    if is_prepared(cfg.corpus):
        return prepared_provenance(cfg.corpus, cfg.domains)
    embedded = cfg.corpus == "embedded"
    metas = {dom: embedded_manifest(dom, cfg.corpus_bytes_per_domain, cfg.cache_dir) if embedded
             else _local_manifest(cfg, dom) for dom in cfg.domains}
    domains = {dom: {k: m[k] for k in ("docs", "bytes", "sha256")} for dom, m in metas.items()}
    combined = json.dumps([[dom, m["sha256"]] for dom, m in domains.items()])
    return {
        "corpus": cfg.corpus,
        "python_version": (metas[cfg.domains[0]]["python_version"] if embedded
                           else platform.python_version()),
        "corpus_version": CORPUS_VERSION,
        "corpus_bytes_per_domain": cfg.corpus_bytes_per_domain if embedded else None,
        "sha256": hashlib.sha256(combined.encode()).hexdigest(),
        "domains": domains,
    }
