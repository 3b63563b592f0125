"""The embedded corpus's documents: what each domain is made of, built from text already on the
machine (``moejax.data.corpus`` caches them, reads local corpora and records provenance).

``code`` is the standard library's ``.py`` source, ``prose`` its docstrings plus
``pydoc_data.topics``, ``math`` generated problems with exact answers; each builder is
``(cap bytes, progress bar) -> documents``, deterministic for a given Python version. Finer
domains for data-mixture methods (``FINE_DOMAINS``, by group ``embedded_domain_groups()``) split
code by package family and prose into reference topics vs docstrings, generate math by operation
and difficulty, and add structureless ``noise``. Their sub-skills are shared on purpose (the
planted structure mixture methods should find): ``math-add`` helps ``math-word`` and ``math-mul``
helps ``math-mul3``; see the fine math section.
"""

from __future__ import annotations

import ast
import os
import random
import sysconfig
import threading
from pathlib import Path
from typing import Callable, Iterable

from tqdm.auto import tqdm

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


def _reference_topics() -> Iterable[str]:
    """The ``pydoc_data`` reference topics (the language reference's prose), sorted by name."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    for key in sorted(topics):
        yield topics[key].strip()


def _file_docstrings(files: Iterable[tuple[str, Path]]) -> Iterable[str]:
    """Module, class and function docstrings of the given source files (file, then AST order)."""
    for _, path in files:
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


def _docstrings() -> Iterable[str]:
    yield from _reference_topics()
    yield from _file_docstrings(stdlib_files())


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


# -- fine domains -----------------------------------------------------------------------------
# Finer splits of the three coarse domains, for data-mixture methods (RegMix, Aioli, DGA) that need
# more domains with real structure between them. They have their own cache keys
# (FINE_CORPUS_VERSION), so the coarse domains' caches and provenance hashes are untouched.

FINE_CORPUS_VERSION = 1  # bump when a fine domain's recipe changes (coarse domains' keys ignore it)
FINE_MATH_PATIENCE = 20_000  # a generator ends after this many repeated draws in a row

# Code families by the top-level package/module name of a stdlib file (``json/decoder.py`` -> json).
# A name listed nowhere belongs to ``code-other``, so every file is in exactly one family.
#
#   family       top-level names
#   -----------  ----------------------------------------------------------------------------------
CODE_FAMILIES: dict[str, frozenset[str]] = {
    "code-text": frozenset({  # strings, regexes, text formats, tokenizing, option parsing
        "string", "re", "sre_compile", "sre_constants", "sre_parse", "textwrap", "difflib",
        "stringprep", "codecs", "locale", "gettext", "shlex", "fnmatch", "pprint", "reprlib",
        "html", "_markupbase", "tokenize", "token", "keyword", "tabnanny", "argparse", "optparse",
        "getopt", "cmd", "_strptime", "calendar"}),
    "code-net": frozenset({  # protocols, mail, the web, sockets
        "http", "email", "urllib", "socket", "socketserver", "ssl", "smtplib", "smtpd", "poplib",
        "imaplib", "nntplib", "ftplib", "telnetlib", "xmlrpc", "wsgiref", "mailbox", "mailcap",
        "mimetypes", "webbrowser", "ipaddress", "cgi", "cgitb", "netrc", "nturl2path", "uu",
        "quopri", "base64"}),
    "code-data": frozenset({  # serialisation, file formats, archives, compression, hashing
        "json", "csv", "sqlite3", "pickle", "pickletools", "_compat_pickle", "copyreg", "shelve",
        "dbm", "struct", "xml", "plistlib", "configparser", "tomllib", "zipfile", "tarfile", "gzip",
        "bz2", "lzma", "_compression", "xdrlib", "chunk", "wave", "aifc", "sunau", "sndhdr",
        "imghdr", "hashlib", "hmac", "secrets", "zipapp"}),
    "code-sys": frozenset({  # files, paths, processes, the interpreter, imports and packaging
        "os", "pathlib", "shutil", "subprocess", "posixpath", "ntpath", "genericpath", "stat",
        "filecmp", "fileinput", "glob", "tempfile", "platform", "sysconfig", "site",
        "_sitebuiltins", "pty", "tty", "signal", "getpass", "_osx_support", "_aix_support",
        "_bootsubprocess", "io", "_pyio", "importlib", "pkgutil", "runpy", "zipimport", "imp",
        "modulefinder", "venv", "ensurepip", "distutils", "compileall", "py_compile", "ctypes",
        "curses", "crypt", "pipes", "linecache", "tracemalloc"}),
    "code-async": frozenset({  # event loops, threads, processes, scheduling
        "asyncio", "concurrent", "threading", "_threading_local", "multiprocessing", "queue",
        "sched", "selectors", "asyncore", "asynchat", "contextvars"}),
}
CODE_OTHER = "code-other"  # everything else: collections, typing, unittest, tkinter, numbers, ...


def code_family(rel_path: str) -> str:
    """The code family of a stdlib file given its path relative to the stdlib root."""
    top = rel_path.split("/", 1)[0].removesuffix(".py")
    return next((fam for fam, names in CODE_FAMILIES.items() if top in names), CODE_OTHER)


def code_family_files(family: str) -> list[tuple[str, Path]]:
    """The family's stdlib files in the code domain's fixed-seed order (a subsequence of it)."""
    files = stdlib_files()
    random.Random(CODE_ORDER_SEED).shuffle(files)
    return [(rel, p) for rel, p in files if code_family(rel) == family]


def _code_family_builder(family: str) -> Callable[[int, tqdm], list[str]]:
    def build(cap: int, bar: tqdm) -> list[str]:
        files = code_family_files(family)
        return _capped((s for _, p in files if (s := _read_source(p)) is not None), cap, bar)

    return build


def _until_full(docs: Iterable[str], cap: int) -> Iterable[str]:
    """Documents until the next one would overflow ``cap`` bytes (an endless stream then ends,
    where ``_capped`` would keep skipping long documents forever)."""
    used = 0
    for doc in docs:
        used += len(doc.encode("utf-8"))
        if used > cap:
            return
        yield doc


def prose_reference_docs(cap: int, bar: tqdm) -> list[str]:
    """The ``pydoc_data`` topics that pass the prose filter (the first part of ``prose``)."""
    return _capped((d for d in _reference_topics() if _is_english(d)), cap, bar)


def prose_docstring_docs(cap: int, bar: tqdm) -> list[str]:
    """Stdlib docstrings that pass the prose filter, files in the code domain's fixed-seed order
    (so a byte cap samples the whole library, unlike ``prose`` which walks paths alphabetically)."""
    files = stdlib_files()
    random.Random(CODE_ORDER_SEED).shuffle(files)
    docs = (d for d in _file_docstrings(files) if _is_english(d))
    return _capped(_until_full(docs, cap), cap, bar)  # stop parsing once full


# Fine math: every document is ``Q: <question>\nA: <e0> = <e1> = ... = <int>`` where each ``e`` is a
# Python expression (+ - * / and parentheses) of equal value, so answers are checked by evaluation.
# Planted helper structure (what Aioli/DGA should find): ``math-word`` problems are additions whose
# operands are drawn exactly like ``math-add``'s, and whose answer line ``A: a + b = c`` has the
# very form of ``math-add``'s, so learning math-add teaches math-word's arithmetic; ``math-mul3``
# (3-digit x 3-digit) asks the same question in the same form as ``math-mul`` (2-digit x 2-digit),
# so the product skill transfers; ``math-sub`` and ``noise`` share neither. ``math-div`` is exact
# division (the inverse of a 2-digit product), ``math-expr`` evaluates nested expressions step by
# step (one operation per step).

_ADD_ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells")
_WORD_TEMPLATES = (
    "{n1} has {a} {item}. {n2} gives {n1} {b} more {item}. How many {item} does {n1} have now?",
    "{n1} has {a} {item} and {n2} has {b} {item}. How many {item} do they have together?",
    "{n1} read {a} pages on Monday and {b} pages on Tuesday. How many pages did {n1} read in "
    "total?",
    "A farm has {a} cows and {b} sheep. How many animals does the farm have?",
    "{n1} walks {a} meters to the park and then {b} meters to school. How many meters does {n1} "
    "walk?",
    "A shop sold {a} {item} in the morning and {b} {item} in the afternoon. How many {item} did "
    "the shop sell that day?",
)
_NOISE_CHARS = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ ")


def _add_operand(rng: random.Random) -> int:
    """1 to 3 digits, the digit count uniform: the operands of math-add, math-sub and math-word."""
    return rng.randint(1, 10 ** rng.randint(1, 3) - 1)


def _binary_problem(a: int, op: str, b: int, answer: int) -> str:
    return f"Q: What is {a} {op} {b}?\nA: {a} {op} {b} = {answer}"


def math_add_problem(rng: random.Random) -> str:
    a, b = _add_operand(rng), _add_operand(rng)
    return _binary_problem(a, "+", b, a + b)


def math_sub_problem(rng: random.Random) -> str:
    a, b = sorted((_add_operand(rng), _add_operand(rng)), reverse=True)
    return _binary_problem(a, "-", b, a - b)


def math_mul_problem(rng: random.Random) -> str:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return _binary_problem(a, "*", b, a * b)


def math_mul3_problem(rng: random.Random) -> str:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return _binary_problem(a, "*", b, a * b)


def math_div_problem(rng: random.Random) -> str:
    divisor, quotient = rng.randint(2, 99), rng.randint(2, 99)
    return _binary_problem(divisor * quotient, "/", divisor, quotient)


def math_word_problem(rng: random.Random) -> str:
    a, b = _add_operand(rng), _add_operand(rng)
    n1, n2 = rng.sample(_NAMES, 2)
    item = rng.choice(_ADD_ITEMS)
    question = rng.choice(_WORD_TEMPLATES).format(n1=n1, n2=n2, a=a, b=b, item=item)
    return f"Q: {question}\nA: {a} + {b} = {a + b}"


_PRECEDENCE = {"+": 1, "-": 1, "*": 2}


def _random_tree(rng: random.Random, depth: int):
    """A random expression tree over + - * with leaves 1..99: an int or (op, left, right)."""
    if depth == 0:
        return rng.randint(1, 99)
    left, right = _random_tree(rng, depth - 1), _random_tree(rng, rng.randint(0, depth - 1))
    return (rng.choice("+-*"), left, right)


def _render(node) -> str:
    """Infix text with the parentheses precedence needs (kept on a right operand of equal rank)."""
    if isinstance(node, int):
        return f"({node})" if node < 0 else str(node)
    op, left, right = node
    ls, rs = _render(left), _render(right)
    if not isinstance(left, int) and _PRECEDENCE[left[0]] < _PRECEDENCE[op]:
        ls = f"({ls})"
    if not isinstance(right, int) and _PRECEDENCE[right[0]] <= _PRECEDENCE[op]:
        rs = f"({rs})"
    return f"{ls} {op} {rs}"


def _reduce_once(node):
    """The tree with its leftmost innermost operation computed (one evaluation step)."""
    op, left, right = node
    if not isinstance(left, int):
        return (op, _reduce_once(left), right)
    if not isinstance(right, int):
        return (op, left, _reduce_once(right))
    return left + right if op == "+" else left - right if op == "-" else left * right


def math_expr_problem(rng: random.Random) -> str:
    tree = _random_tree(rng, rng.randint(2, 3))
    steps = [_render(tree)]
    while not isinstance(tree, int):
        tree = _reduce_once(tree)
        steps.append(_render(tree))
    steps[-1] = str(tree)  # the answer without the parentheses of a negative operand
    return f"Q: What is {steps[0]}?\nA: {' = '.join(steps)}"


def noise_document(rng: random.Random) -> str:
    """64 to 512 printable characters drawn independently and uniformly: nothing to learn but their
    frequencies (the DGA distractor)."""
    return "".join(rng.choices(_NOISE_CHARS, k=rng.randint(64, 512)))


FINE_GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "math-add": math_add_problem, "math-sub": math_sub_problem, "math-mul": math_mul_problem,
    "math-mul3": math_mul3_problem, "math-div": math_div_problem, "math-expr": math_expr_problem,
    "math-word": math_word_problem, "noise": noise_document}


def _distinct_draws(make: Callable[[random.Random], str], rng: random.Random) -> Iterable[str]:
    """New documents from ``make(rng)``; ends once FINE_MATH_PATIENCE draws in a row were repeats,
    i.e. a small problem space (2-digit products: 8100) is exhausted instead of looping forever."""
    seen, repeats = set(), 0
    while repeats < FINE_MATH_PATIENCE:
        doc = make(rng)
        if doc in seen:
            repeats += 1
            continue
        seen.add(doc)
        repeats = 0
        yield doc


def _generated_builder(domain: str) -> Callable[[int, tqdm], list[str]]:
    make = FINE_GENERATORS[domain]

    def build(cap: int, bar: tqdm) -> list[str]:
        draws = _distinct_draws(make, random.Random(f"{MATH_SEED}/{domain}"))
        return _capped(_until_full(draws, cap), cap, bar)

    return build


_FINE_GROUPS: dict[str, tuple[str, ...]] = {
    "code": (*CODE_FAMILIES, CODE_OTHER),
    "prose": ("prose-reference", "prose-docstrings"),
    "math": ("math-add", "math-sub", "math-mul", "math-mul3", "math-div", "math-expr", "math-word"),
    "noise": ("noise",),
}
FINE_DOMAINS = tuple(d for group in _FINE_GROUPS.values() for d in group)


def embedded_domain_groups() -> dict[str, tuple[str, ...]]:
    """The fine embedded domains by group (code, prose, math, noise); ``FINE_DOMAINS`` is all of
    them in this order, e.g. for ``data.domains``."""
    return dict(_FINE_GROUPS)


BUILDERS: dict[str, Callable[[int, tqdm], list[str]]] = {
    "code": code_docs, "prose": prose_docs, "math": math_docs,
    **{family: _code_family_builder(family) for family in _FINE_GROUPS["code"]},
    "prose-reference": prose_reference_docs, "prose-docstrings": prose_docstring_docs,
    **{domain: _generated_builder(domain) for domain in FINE_GENERATORS}}
