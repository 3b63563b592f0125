"""The embedded default corpus (code / prose / math) built from text already on the machine.

Nothing is downloaded: ``code`` is the standard library's ``.py`` source, ``prose`` its docstrings
plus ``pydoc_data.topics``, ``math`` generated problems with exact answers. Each domain is a list of
documents (strings), deterministic for a given Python version, built once and cached as JSON lines.
A local directory of ``<domain>/*.txt`` files can replace it (``DataConfig.corpus="<dir>"``).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import random
import shutil
import sys
import sysconfig
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from moejax.config import DataConfig

EMBEDDED_DOMAINS = ("code", "prose", "math")
CODE_ORDER_SEED = 1234
CORPUS_VERSION = 2  # bump when the build recipe changes: invalidates every cached corpus
MATH_SEED = 1234  # the math domain is fixed; DataConfig.seed only drives splits and sampling
MIN_PROSE_CHARS = 200
_AST_LOCK = threading.Lock()  # CPython 3.11's ast.parse is not thread-safe (recursion-depth check)
# Parts of the stdlib that are not representative source (tests, vendored tools, the generated
# codec tables of encodings/) or that duplicate the prose domain (pydoc_data holds the reference
# topics as one giant string); files named test_* and the machine-specific _sysconfigdata* too.
EXCLUDED_PARTS = frozenset({"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages",
                            "dist-packages", "pydoc_data", "encodings", "__pycache__"})


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


# -- stdlib sources ---------------------------------------------------------------------------

def stdlib_files() -> list[tuple[str, Path]]:
    """(relative path, path) of the stdlib's ``.py`` files, excluded parts pruned, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_PARTS]
        for f in filenames:
            if f.endswith(".py") and not f.startswith(("test_", "_sysconfigdata")):
                p = Path(dirpath) / f
                out.append((p.relative_to(root).as_posix(), p))
    return sorted(out)


def _read_source(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _is_english(text: str) -> bool:
    """A cheap filter: long enough, mostly letters and spaces, and made of words."""
    if len(text) < MIN_PROSE_CHARS:
        return False
    letters = sum(c.isascii() and (c.isalpha() or c.isspace()) for c in text)
    return letters / len(text) >= 0.75 and len(text.split()) >= 30


def _capped(docs: Iterable[str], cap: int, bar: tqdm) -> list[str]:
    """Documents in order, skipping exact duplicates and ones that would overflow ``cap`` bytes."""
    out, seen, used = [], set(), 0
    for doc in docs:
        n = len(doc.encode("utf-8"))
        if not doc.strip() or doc in seen or used + n > cap:
            continue
        seen.add(doc)
        out.append(doc)
        used += n
        bar.update(n)
        if cap - used < 64:
            break
    return out


def code_docs(cap: int, bar: tqdm) -> list[str]:
    """One document per stdlib source file, in a fixed-seed shuffle of the sorted paths, so a
    byte cap samples the whole library instead of the alphabetically first packages."""
    files = stdlib_files()
    random.Random(CODE_ORDER_SEED).shuffle(files)
    return _capped((s for _, p in files if (s := _read_source(p)) is not None), cap, bar)


def _docstrings() -> Iterable[str]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    for key in sorted(topics):
        yield topics[key].strip()
    for _, path in stdlib_files():
        src = _read_source(path)
        if src is None:
            continue
        try:
            with _AST_LOCK:
                tree = ast.parse(src)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    yield doc


def prose_docs(cap: int, bar: tqdm) -> list[str]:
    """``pydoc_data`` topics, then stdlib docstrings (module/class/function), English and >= 200 chars."""
    return _capped((d for d in _docstrings() if _is_english(d)), cap, bar)


# -- generated math ---------------------------------------------------------------------------

_NAMES = ("Ann", "Ben", "Mia", "Sam", "Lea", "Omar", "Ivy", "Raj", "Zoe", "Tom", "Ada", "Kai")
_ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells")


def _num(rng: random.Random) -> int:
    return rng.randint(1, 10 ** rng.randint(1, 4) - 1)


def _expr(rng: random.Random, depth: int) -> str:
    """A random integer expression over + - * with parentheses, e.g. ``(12 + 7) * 3 - 5``."""
    if depth == 0:
        return str(rng.randint(1, 99))
    left, right = _expr(rng, depth - 1), _expr(rng, rng.randint(0, depth - 1))
    op = rng.choice("+-*")
    if op == "*" and depth > 1:
        left = f"({left})" if any(c in left for c in "+-") else left
    if op in "-*" and any(c in right for c in "+-"):
        right = f"({right})"
    return f"{left} {op} {right}"


def math_problem(rng: random.Random) -> str:
    """One problem with its exact answer; the answer line is checkable by evaluating it."""
    kind = rng.random()
    if kind < 0.35:
        a, b, op = _num(rng), _num(rng), rng.choice("+-*")
        return f"Q: What is {a} {op} {b}?\nA: {eval(f'{a} {op} {b}')}"
    if kind < 0.45:
        a, b = _num(rng), rng.randint(2, 99)
        return f"Q: What is {a} divided by {b}?\nA: {a // b} remainder {a % b}"
    if kind < 0.7:
        e = _expr(rng, rng.randint(2, 3))
        return f"Q: What is {e}?\nA: {eval(e)}"
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    t = rng.randrange(4)
    if t == 0:
        a, n, k = rng.randint(5, 60), rng.randint(2, 9), rng.randint(2, 12)
        g = rng.randint(1, a)
        return (f"Q: {name} has {a} {item}. {name} buys {n} bags with {k} {item} in each bag, then "
                f"gives {g} {item} to a friend. How many {item} does {name} have now?\n"
                f"A: {a} + {n} * {k} - {g} = {a + n * k - g}")
    if t == 1:
        price, n = rng.randint(2, 40), rng.randint(2, 9)
        paid = (price * n // 10 + 1 + rng.randint(0, 5)) * 10
        return (f"Q: One notebook costs {price} dollars. {name} buys {n} notebooks and pays with "
                f"{paid} dollars. How much change does {name} get?\n"
                f"A: {paid} - {n} * {price} = {paid - n * price}")
    if t == 2:
        per, kids = rng.randint(2, 15), rng.randint(2, 12)
        return (f"Q: {name} shares {per * kids} {item} equally among {kids} children. How many "
                f"{item} does each child get?\nA: {per * kids} / {kids} = {per}")
    speed, hours, extra = rng.randint(20, 120), rng.randint(2, 9), rng.randint(1, 50)
    return (f"Q: A train travels at {speed} km per hour for {hours} hours, then {extra} km more. "
            f"How far does it travel in total?\nA: {speed} * {hours} + {extra} = "
            f"{speed * hours + extra}")


def math_docs(cap: int, bar: tqdm) -> list[str]:
    """Generated problems from a fixed-seed ``random.Random`` until ``cap`` bytes (deterministic)."""
    rng = random.Random(MATH_SEED)

    def gen():
        while True:
            yield math_problem(rng)

    return _capped(gen(), cap, bar)


BUILDERS: dict[str, Callable[[int, tqdm], list[str]]] = {
    "code": code_docs, "prose": prose_docs, "math": math_docs}


# -- cached build -----------------------------------------------------------------------------

def embedded_key(domain: str, cap: int) -> str:
    return stable_hash({"v": CORPUS_VERSION, "domain": domain, "cap": cap, "python": sys.version,
                        "math_seed": MATH_SEED})


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
    if domain not in BUILDERS:
        raise ValueError(f"data.domains: {domain!r} is not an embedded domain; choose from "
                         f"{EMBEDDED_DOMAINS} or set data.corpus to a directory of <domain>/*.txt")
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
