"""Fine embedded domains (code families, prose kinds, math by operation, noise) and the coarse
domains' byte-identity with the recipe they had before the fine ones existed."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tqdm.auto import tqdm

from moejax.config import DataConfig
from moejax.data import FINE_DOMAINS, embedded_domain_groups, prepare_data
from moejax.data import corpus as corpus_lib
from moejax.data import corpus_build as build_lib

FINE_CAP = 40_000  # bytes per fine domain in the build fixtures
NO_CAP = 10 ** 9  # more than any whole domain: the file set "before the byte cap"


def _no_bar() -> tqdm:
    return tqdm(disable=True)


@pytest.fixture(scope="module")
def fine_dirs(tmp_path_factory) -> list[str]:
    return [str(tmp_path_factory.mktemp(f"fine{i}")) for i in range(2)]


@pytest.fixture(scope="module")
def fine_builds(fine_dirs) -> dict[str, list[list[str]]]:
    """Every fine domain built at FINE_CAP into two cache dirs: {domain: [docs_a, docs_b]}."""
    return {dom: [corpus_lib.embedded_domain(dom, FINE_CAP, d) for d in fine_dirs]
            for dom in FINE_DOMAINS}


# -- names and groups -------------------------------------------------------------------------

def test_groups_list_every_fine_domain_once():
    groups = embedded_domain_groups()
    assert list(groups) == ["code", "prose", "math", "noise"]
    flat = [d for g in groups.values() for d in g]
    assert tuple(flat) == FINE_DOMAINS and len(set(flat)) == len(flat)
    assert set(build_lib.BUILDERS) == set(build_lib.EMBEDDED_DOMAINS) | set(FINE_DOMAINS)
    assert not set(build_lib.EMBEDDED_DOMAINS) & set(FINE_DOMAINS)
    assert {"math-mul3", "math-mul", "math-add", "math-word", "noise"} <= set(FINE_DOMAINS)
    groups["code"] = ()  # a copy: callers cannot change the registry
    assert embedded_domain_groups()["code"]


def test_unknown_embedded_domain_lists_every_valid_name(tmp_path):
    with pytest.raises(ValueError) as err:
        corpus_lib.embedded_domain("math-pow", 1000, str(tmp_path))
    msg = str(err.value)
    assert "math-pow" in msg
    for name in build_lib.EMBEDDED_DOMAINS + FINE_DOMAINS:
        assert repr(name) in msg, name
    assert not (tmp_path / "corpus").exists() or not any((tmp_path / "corpus").iterdir())


def test_fine_keys_are_their_own(monkeypatch):
    keys = {d: corpus_lib.embedded_key(d, FINE_CAP) for d in build_lib.BUILDERS}
    assert len(set(keys.values())) == len(keys)
    monkeypatch.setattr(corpus_lib, "FINE_CORPUS_VERSION", corpus_lib.FINE_CORPUS_VERSION + 1)
    for d, key in keys.items():  # a fine recipe change invalidates fine caches only
        assert (corpus_lib.embedded_key(d, FINE_CAP) == key) == (d in build_lib.EMBEDDED_DOMAINS)


# -- every fine domain ------------------------------------------------------------------------

def test_fine_domains_build_deterministic_with_manifest(fine_builds, fine_dirs):
    for dom, (a, b) in fine_builds.items():
        assert a == b, dom
        assert len(a) >= 3, dom
        assert len(set(a)) == len(a) and all(d.strip() for d in a), dom
        assert sum(len(d.encode()) for d in a) <= FINE_CAP, dom
    d = fine_dirs[0]
    for dom in FINE_DOMAINS:
        meta = corpus_lib.embedded_manifest(dom, FINE_CAP, d)
        (cached,) = (Path(d) / "corpus").glob(f"{dom}-{corpus_lib.embedded_key(dom, FINE_CAP)}")
        assert meta["domain"] == dom and meta["docs"] == len(fine_builds[dom][0])
        assert meta["sha256"] == hashlib.sha256((cached / "docs.jsonl").read_bytes()).hexdigest()
        assert meta["sha256"] == corpus_lib.documents_sha256(fine_builds[dom][0])
    # a fine domain that fills its cap does fill it (a long-document stream ends, not spins)
    word = fine_builds["math-word"][0]
    assert FINE_CAP - sum(len(x.encode()) for x in word) < 300  # word problems are < 300 bytes


def test_fine_domains_distinct_content(fine_builds):
    """No document in two fine domains, except a source file the stdlib ships twice, byte for byte,
    in two packages of different families (the partition is by file)."""
    code = set(embedded_domain_groups()["code"])
    seen: dict[str, str] = {}
    for dom, (docs, _) in fine_builds.items():
        for doc in docs:
            other = seen.setdefault(doc, dom)
            if other != dom:
                assert {dom, other} <= code, (dom, other)
                files = [rel for rel, p in build_lib.stdlib_files()
                         if build_lib._read_source(p) == doc]
                assert {build_lib.code_family(rel) for rel in files} >= {dom, other}


# -- code families ----------------------------------------------------------------------------

def test_code_family_table_by_hand():
    names = [n for fam in build_lib.CODE_FAMILIES.values() for n in fam]
    assert len(names) == len(set(names))  # a top-level name is listed in at most one family
    by_hand = {"string.py": "code-text", "re/_parser.py": "code-text", "difflib.py": "code-text",
               "http/client.py": "code-net", "email/message.py": "code-net",
               "urllib/parse.py": "code-net", "socket.py": "code-net",
               "json/decoder.py": "code-data", "csv.py": "code-data",
               "sqlite3/dbapi2.py": "code-data", "pickle.py": "code-data",
               "os.py": "code-sys", "pathlib.py": "code-sys", "shutil.py": "code-sys",
               "subprocess.py": "code-sys", "asyncio/tasks.py": "code-async",
               "concurrent/futures/thread.py": "code-async", "threading.py": "code-async",
               "typing.py": "code-other", "collections/__init__.py": "code-other",
               "unittest/mock.py": "code-other", "stringprep.py": "code-text",
               "strings.py": "code-other"}
    for rel, fam in by_hand.items():
        assert build_lib.code_family(rel) == fam, rel


def test_code_families_partition_the_code_domain():
    every = build_lib.stdlib_files()
    families = embedded_domain_groups()["code"]
    per_family = {f: build_lib.code_family_files(f) for f in families}
    listed = sorted(rel for files in per_family.values() for rel, _ in files)
    assert listed == sorted(rel for rel, _ in every)  # each file in exactly one family
    assert all(per_family.values())
    order = build_lib.stdlib_files()
    random.Random(build_lib.CODE_ORDER_SEED).shuffle(order)
    rank = {rel: i for i, (rel, _) in enumerate(order)}
    for files in per_family.values():  # each family samples in the code domain's order
        ranks = [rank[rel] for rel, _ in files]
        assert ranks == sorted(ranks)
    code = build_lib.BUILDERS["code"](NO_CAP, _no_bar())
    union = [d for f in families for d in build_lib.BUILDERS[f](NO_CAP, _no_bar())]
    assert set(union) == set(code)


def test_code_family_content_matches_its_files(fine_builds):
    for fam in embedded_domain_groups()["code"]:
        sources = {p.read_text(encoding="utf-8") for _, p in build_lib.code_family_files(fam)}
        assert set(fine_builds[fam][0]) <= sources, fam


# -- prose kinds ------------------------------------------------------------------------------

def test_prose_reference_is_the_coarse_prose_head_and_docstrings_differ(fine_builds, tmp_path,
                                                                        coarse_prose_cap):
    reference = build_lib.BUILDERS["prose-reference"](NO_CAP, _no_bar())
    coarse = corpus_lib.embedded_domain("prose", coarse_prose_cap, str(tmp_path))
    assert 0 < len(reference) < len(coarse)
    assert coarse[:len(reference)] == reference  # the coarse prose is topics then docstrings
    docstrings = fine_builds["prose-docstrings"][0]
    assert not set(docstrings) & set(reference)
    assert all(len(d) >= build_lib.MIN_PROSE_CHARS for d in docstrings + reference)


# -- math -------------------------------------------------------------------------------------

def _value(expr: str) -> int:
    """Evaluate an arithmetic expression (digits, + - * /, parentheses only) exactly."""
    assert re.fullmatch(r"[\d+\-*/ ()]+", expr), expr
    value = eval(expr, {"__builtins__": {}})
    assert value == int(value), expr
    return int(value)


def check_fine_math(doc: str) -> tuple[str, list[str]]:
    """Assert every ``=``-separated step of the answer line has the same value and the last one is
    that value as a plain integer; a "What is X?" question asks exactly the first step."""
    m = re.fullmatch(r"Q: ([^\n]+\?)\nA: ([^\n]+)", doc)
    assert m, doc
    question, steps = m.group(1), m.group(2).split(" = ")
    assert len(steps) >= 2 and re.fullmatch(r"-?\d+", steps[-1]), doc
    answer = int(steps[-1])
    assert all(_value(s) == answer for s in steps), doc
    if q := re.fullmatch(r"What is (.+)\?", question):
        assert q.group(1) == steps[0], doc
    return question, steps


def test_math_checker_rejects_wrong_answers():
    check_fine_math("Q: What is 12 * 13?\nA: 12 * 13 = 156")
    for bad in ("Q: What is 12 * 13?\nA: 12 * 13 = 157", "Q: What is 12 * 13?\nA: 12 * 14 = 168",
                "Q: What is (1 + 2) * 3?\nA: (1 + 2) * 3 = 3 * 3 = 6",
                "Q: What is 4 / 3?\nA: 4 / 3 = 1"):
        with pytest.raises(AssertionError):
            check_fine_math(bad)


def _operands(steps: list[str], op: str) -> tuple[int, int]:
    a, b = steps[0].split(f" {op} ")
    return int(a), int(b)


def test_math_answers_verify_by_evaluation(fine_builds):
    for dom in embedded_domain_groups()["math"]:
        docs = fine_builds[dom][0]
        assert len(docs) >= 100, dom
        for doc in docs:
            question, steps = check_fine_math(doc)
            if dom in ("math-add", "math-sub", "math-word"):
                a, b = _operands(steps, "-" if dom == "math-sub" else "+")
                assert len(steps) == 2 and 1 <= min(a, b) and max(a, b) <= 999, doc
                assert dom != "math-sub" or a >= b, doc
            elif dom in ("math-mul", "math-mul3"):
                lo, hi = (10, 99) if dom == "math-mul" else (100, 999)
                assert all(lo <= x <= hi for x in _operands(steps, "*")) and len(steps) == 2, doc
            elif dom == "math-div":
                a, b = _operands(steps, "/")
                assert 2 <= b <= 99 and 2 <= a // b <= 99 and a % b == 0, doc
            else:  # math-expr: evaluated one operation per step
                assert len(steps) >= 3, doc
                ops = [len(re.findall(r"(?<=\S) [+\-*] ", s)) for s in steps[:-1]]
                assert ops == list(range(ops[0], 0, -1)), doc
            if dom == "math-word":  # the operands are the numbers the story gives
                a, b = _operands(steps, "+")
                assert re.findall(r"\d+", question) == [str(a), str(b)], doc
            elif dom != "math-expr":
                assert question.startswith("What is "), doc


def test_math_word_shares_math_add_answer_form(fine_builds):
    """The planted helper: word problems' answer lines are additions drawn like math-add's."""
    add, word = fine_builds["math-add"][0], fine_builds["math-word"][0]
    form = re.compile(r"A: \d+ \+ \d+ = \d+")
    assert all(form.fullmatch(d.split("\n")[1]) for d in add + word)
    digits = lambda docs: Counter(len(str(x)) for d in docs  # noqa: E731
                                  for x in _operands(d.split("\nA: ")[1].split(" = "), "+"))
    da, dw = digits(add), digits(word)
    assert set(da) == set(dw) == {1, 2, 3}
    for k in (1, 2, 3):  # operand digit counts uniform over 1..3 in both (4-sigma binomial bound)
        for c in (da, dw):
            n = sum(c.values())
            assert abs(c[k] / n - 1 / 3) < 4 * np.sqrt(2 / 9 / n)
    mul, mul3 = fine_builds["math-mul"][0], fine_builds["math-mul3"][0]
    assert all(re.fullmatch(r"Q: What is \d+ \* \d+\?\nA: \d+ \* \d+ = \d+", d) for d in mul + mul3)


def test_math_mul_small_space_is_exhausted_not_looped():
    docs = build_lib.BUILDERS["math-mul"](NO_CAP, _no_bar())
    assert len(docs) == 90 * 90  # every 2-digit product once, then the generator ends
    assert len(build_lib.BUILDERS["math-div"](NO_CAP, _no_bar())) == 98 * 98


# -- noise ------------------------------------------------------------------------------------

def test_noise_is_uniform_characters(fine_builds):
    docs = fine_builds["noise"][0]
    alphabet = build_lib._NOISE_CHARS
    assert all(64 <= len(d) <= 512 and set(d) <= set(alphabet) for d in docs)
    counts = Counter("".join(docs))
    n, k = sum(counts.values()), len(set(alphabet))
    expected = n / k
    for ch in alphabet:  # each character's count within 5 sigma of uniform
        assert abs(counts[ch] - expected) < 5 * np.sqrt(expected * (1 - 1 / k)), ch
    assert not any(d.startswith("Q: ") for d in docs)


# -- the coarse domains are unchanged ---------------------------------------------------------
# The recipe of code/prose/math as it was before the fine domains were added, kept verbatim so the
# comparison follows the running Python's stdlib (a hard-coded hash would depend on its version).

_REF_EXCLUDED = frozenset({"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages",
                           "dist-packages", "pydoc_data", "encodings", "__pycache__"})
_REF_NAMES = ("Ann", "Ben", "Mia", "Sam", "Lea", "Omar", "Ivy", "Raj", "Zoe", "Tom", "Ada", "Kai")
_REF_ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells")


def _ref_stdlib_files():
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _REF_EXCLUDED]
        for f in filenames:
            if f.endswith(".py") and not f.startswith(("test_", "_sysconfigdata")):
                p = Path(dirpath) / f
                out.append((p.relative_to(root).as_posix(), p))
    return sorted(out)


def _ref_read(path):
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _ref_is_english(text):
    if len(text) < 200:
        return False
    letters = sum(c.isascii() and (c.isalpha() or c.isspace()) for c in text)
    return letters / len(text) >= 0.75 and len(text.split()) >= 30


def _ref_capped(docs, cap):
    out, seen, used = [], set(), 0
    for doc in docs:
        n = len(doc.encode("utf-8"))
        if not doc.strip() or doc in seen or used + n > cap:
            continue
        seen.add(doc)
        out.append(doc)
        used += n
        if cap - used < 64:
            break
    return out


def _ref_code(cap):
    files = _ref_stdlib_files()
    random.Random(1234).shuffle(files)
    return _ref_capped((s for _, p in files if (s := _ref_read(p)) is not None), cap)


def _ref_docstrings():
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    for key in sorted(topics):
        yield topics[key].strip()
    for _, path in _ref_stdlib_files():
        src = _ref_read(path)
        if src is None:
            continue
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    yield doc


def _ref_prose(cap):
    return _ref_capped((d for d in _ref_docstrings() if _ref_is_english(d)), cap)


def _ref_num(rng):
    return rng.randint(1, 10 ** rng.randint(1, 4) - 1)


def _ref_expr(rng, depth):
    if depth == 0:
        return str(rng.randint(1, 99))
    left, right = _ref_expr(rng, depth - 1), _ref_expr(rng, rng.randint(0, depth - 1))
    op = rng.choice("+-*")
    if op == "*" and depth > 1:
        left = f"({left})" if any(c in left for c in "+-") else left
    if op in "-*" and any(c in right for c in "+-"):
        right = f"({right})"
    return f"{left} {op} {right}"


def _ref_math_problem(rng):
    kind = rng.random()
    if kind < 0.35:
        a, b, op = _ref_num(rng), _ref_num(rng), rng.choice("+-*")
        return f"Q: What is {a} {op} {b}?\nA: {eval(f'{a} {op} {b}')}"
    if kind < 0.45:
        a, b = _ref_num(rng), rng.randint(2, 99)
        return f"Q: What is {a} divided by {b}?\nA: {a // b} remainder {a % b}"
    if kind < 0.7:
        e = _ref_expr(rng, rng.randint(2, 3))
        return f"Q: What is {e}?\nA: {eval(e)}"
    name, item = rng.choice(_REF_NAMES), rng.choice(_REF_ITEMS)
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


def _ref_math(cap):
    rng = random.Random(1234)

    def gen():
        while True:
            yield _ref_math_problem(rng)

    return _ref_capped(gen(), cap)


def _ref_key(domain, cap):
    recipe = {"v": 2, "domain": domain, "cap": cap, "python": sys.version, "math_seed": 1234}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _ref_sha256(docs):
    return hashlib.sha256("".join(json.dumps(d, ensure_ascii=False) + "\n"
                                  for d in docs).encode("utf-8")).hexdigest()


@pytest.fixture(scope="module")
def coarse_prose_cap() -> int:
    """A prose cap past the reference topics (~0.45 MB) into the docstrings that ends exactly on a
    document, so a build stops there instead of parsing the whole stdlib looking for a fit."""
    used, seen = 0, set()
    for doc in _ref_docstrings():
        if _ref_is_english(doc) and doc not in seen:
            seen.add(doc)
            used += len(doc.encode("utf-8"))
            if used > 500_000:
                return used
    raise AssertionError("the stdlib has less than 0.5 MB of prose")


@pytest.mark.parametrize("domain", ["code", "prose", "math"])
def test_coarse_domains_byte_identical_to_old_recipe(domain, tmp_path, coarse_prose_cap):
    cap = {"code": 150_000, "prose": coarse_prose_cap, "math": 60_000}[domain]
    reference = {"code": _ref_code, "prose": _ref_prose, "math": _ref_math}[domain](cap)
    docs = corpus_lib.embedded_domain(domain, cap, str(tmp_path))
    assert docs == reference
    assert corpus_lib.embedded_key(domain, cap) == _ref_key(domain, cap)
    (cached,) = (tmp_path / "corpus").glob(f"{domain}-{_ref_key(domain, cap)}")
    expected = _ref_sha256(reference)
    assert hashlib.sha256((cached / "docs.jsonl").read_bytes()).hexdigest() == expected
    assert corpus_lib.embedded_manifest(domain, cap, str(tmp_path))["sha256"] == expected


# -- the pipeline -----------------------------------------------------------------------------

def test_pretraining_data_with_four_fine_domains(tmp_path):
    domains = ("code-text", "prose-reference", "math-add", "math-word")
    cfg = DataConfig(cache_dir=str(tmp_path), corpus_bytes_per_domain=30_000, seq_len=32,
                     domains=domains, mixture=(1.0, 1.0, 1.0, 1.0), val_fraction=0.05)
    data = prepare_data(cfg, vocab_size=512)
    assert data.domains == domains
    assert all(data.num_tokens(d, s) > cfg.seq_len for d in domains for s in ("train", "val"))
    it = data.train_iterator(global_batch=16)
    batches = [next(it) for _ in range(8)]
    for b in batches:
        assert b["inputs"].shape == (16, cfg.seq_len)
    seen = np.concatenate([b["domain"] for b in batches])
    assert set(seen.tolist()) == {0, 1, 2, 3}
    text = data.tokenizer.decode(data.eval_batches("math-word", 1, 4)[0]["inputs"][0].tolist())
    word = corpus_lib.embedded_domain("math-word", cfg.corpus_bytes_per_domain, cfg.cache_dir)
    assert text.startswith("Q: ") and any(d.startswith(text) for d in word)  # row 0: a doc's head
