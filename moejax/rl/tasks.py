"""Verifiable tasks for RL: seeded generators, disjoint train / eval splits, solver demonstrations,
and a user's JSONL task file (tokenization: ``moejax.rl.encode``).

Families and prompt formats (answers are checked in ``moejax.rl.rewards``):
- ``add`` / ``sub`` / ``mul``: ``Q: 37*48=`` -> ``1776``; operands have exactly d digits (d=1:
  0..9); ``sub`` puts the larger operand first (answers >= 0). Tier ``mul-d3``.
- ``multi``: ``Q: 12+3*45=`` with s operators from ``+ - *`` (usual precedence; may be negative).
  Tier ``multi-d2s2`` (d digits, s steps: ``a op b op c`` is s=2).
- ``countdown``: ``Q: make 75 from 3 7 25 50\\nA: `` -> ``50+25=75``; n numbers in 1..25, only
  solvable instances (the target comes from a random expression over a subset; a solver finds a
  solution). Tier ``countdown-n4``.
- ``sort``: ``Q: sort 31 7 2 15=`` -> ``2 7 15 31``; n values in 0..99. Tier ``sort-n5``.
- ``file``: a local JSONL of ``{"prompt", "answer"}`` rows (GSM8K, MATH, ...); tier ``file:<stem>``.
OOD tiers have one more digit (arithmetic) or one more number (countdown, sort) than the largest
training tier; they are eval-only. Train and held-out eval items never overlap: an item's split is a
hash of its canonical key (operands of ``+``/``*`` sorted, countdown numbers sorted), independent
of the seed; sampling is a pure function of (seed, index), so resuming needs only a counter.
A 1-digit tier's eval split is small (a few distinct items): its pass@1 is coarse.
Demonstrations (``demonstration``): column addition / subtraction lines, long-multiplication partial
products and their running sum, or one line per multi-step operation, each ending in the line
``<question>=<answer>``; a solver's expression ``expr=target`` for countdown; the sorted list.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from fractions import Fraction
from typing import Sequence

from moejax.config_checks import ConfigError
from moejax.rl import rewards

ARITH_OPS = {"add": "+", "sub": "-", "mul": "*"}
FAMILIES = ("add", "sub", "mul", "multi", "countdown", "sort")
MAX_DIGITS = 6  # training tiers; the OOD tier may use MAX_DIGITS + 1
COUNTDOWN_MAX_NUMBERS = 5  # training tiers; the OOD tier may use 6 (solver cost grows fast)
COUNTDOWN_VALUES = (1, 25)
COUNTDOWN_TARGETS = (10, 999)
SORT_VALUES = (0, 99)
SPLIT_SALT = "moejax-rl-split-v1"


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Which task tiers a run trains and evaluates on."""

    families: tuple[str, ...] = ("add", "sub", "mul", "multi")
    digits: tuple[int, ...] = (1, 2, 3)  # arithmetic training tiers (operand digits, 1..6)
    multi_steps: tuple[int, ...] = (2,)  # operators per multi-step item
    countdown_sizes: tuple[int, ...] = (3, 4)  # numbers given per countdown item (2..5)
    sort_lengths: tuple[int, ...] = (3, 4, 5)  # list lengths (2..12)
    eval_fraction: float = 0.1  # share of each tier's item space held out for evaluation
    seed: int = 0

    def __post_init__(self):
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise ConfigError(f"tasks.families={self.families!r} is invalid: choose a non-empty "
                              f"subset of {FAMILIES}")
        for field, values, lo, hi in (("digits", self.digits, 1, MAX_DIGITS),
                                      ("multi_steps", self.multi_steps, 2, 4),
                                      ("countdown_sizes", self.countdown_sizes, 2,
                                       COUNTDOWN_MAX_NUMBERS),
                                      ("sort_lengths", self.sort_lengths, 2, 12)):
            if not values or any(not lo <= v <= hi for v in values):
                raise ConfigError(f"tasks.{field}={values!r} is invalid: give one or more "
                                  f"integers in {lo}..{hi}")
        if not 0.0 < self.eval_fraction < 0.5:
            raise ConfigError(f"tasks.eval_fraction={self.eval_fraction!r} is invalid: must be in "
                              "(0, 0.5)")


@dataclasses.dataclass(frozen=True)
class Tier:
    """One difficulty level of one family: size = digits (arithmetic) or count (countdown, sort)."""

    family: str
    size: int
    steps: int = 1
    ood: bool = False

    @property
    def name(self) -> str:
        if self.family == "multi":
            return f"multi-d{self.size}s{self.steps}"
        if self.family in ARITH_OPS:
            return f"{self.family}-d{self.size}"
        return f"{self.family}-n{self.size}"


@dataclasses.dataclass(frozen=True)
class TaskItem:
    """One verifiable problem. ``answer`` is the canonical answer text (the integer, the sorted
    list, the countdown target, a file's final answer); ``numbers`` the operands / given numbers /
    list; ``solution`` a file row's worked solution when it has one."""

    family: str
    tier: str
    prompt: str
    answer: str
    numbers: tuple[int, ...] = ()
    ops: tuple[str, ...] = ()
    solution: str | None = None


def train_tiers(cfg: TaskConfig) -> list[Tier]:
    """The training tiers of ``cfg`` in a fixed order."""
    out = []
    for fam in cfg.families:
        if fam in ARITH_OPS:
            out += [Tier(fam, d) for d in cfg.digits]
        elif fam == "multi":
            out += [Tier(fam, d, s) for d in cfg.digits for s in cfg.multi_steps]
        elif fam == "countdown":
            out += [Tier(fam, n) for n in cfg.countdown_sizes]
        else:
            out += [Tier(fam, n) for n in cfg.sort_lengths]
    return out


def ood_tiers(cfg: TaskConfig) -> list[Tier]:
    """One tier per family (and step count) one size beyond the largest training tier."""
    out = []
    for fam in cfg.families:
        if fam in ARITH_OPS:
            out.append(Tier(fam, max(cfg.digits) + 1, ood=True))
        elif fam == "multi":
            out += [Tier(fam, max(cfg.digits) + 1, s, ood=True) for s in cfg.multi_steps]
        elif fam == "countdown":
            out.append(Tier(fam, max(cfg.countdown_sizes) + 1, ood=True))
        else:
            out.append(Tier(fam, max(cfg.sort_lengths) + 1, ood=True))
    return out


# -- generators -------------------------------------------------------------------------------

def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def _arithmetic_item(rng: random.Random, tier: Tier) -> TaskItem:
    if tier.family == "multi":
        nums = [_operand(rng, tier.size) for _ in range(tier.steps + 1)]
        ops = [rng.choice("+-*") for _ in range(tier.steps)]
    else:
        nums, ops = [_operand(rng, tier.size), _operand(rng, tier.size)], [ARITH_OPS[tier.family]]
        if tier.family == "sub" and nums[0] < nums[1]:
            nums.reverse()
    expr = _join(nums, ops)
    value = _eval_chain(nums, ops)
    return TaskItem(tier.family, tier.name, f"Q: {expr}=", str(value), tuple(nums), tuple(ops))


def _join(nums: Sequence[int], ops: Sequence[str]) -> str:
    return str(nums[0]) + "".join(f"{op}{n}" for op, n in zip(ops, nums[1:]))


def _eval_chain(nums: Sequence[int], ops: Sequence[str]) -> int:
    """``n0 op n1 op n2 ...`` with ``*`` before ``+``/``-`` (the whitelist parser, no eval)."""
    value, _ = rewards.evaluate_expression(_join(nums, ops))
    return int(value)


def _countdown_item(rng: random.Random, tier: Tier) -> TaskItem:
    """Numbers, then a target reached by a random expression over a random subset of them."""
    lo, hi = COUNTDOWN_TARGETS
    while True:
        nums = [rng.randint(*COUNTDOWN_VALUES) for _ in range(tier.size)]
        pool = [Fraction(n) for n in rng.sample(nums, rng.randint(2, tier.size))]
        try:
            while len(pool) > 1:
                a, b = pool.pop(), pool.pop()
                pool.append(rewards.apply_op(rng.choice("+-*/"), a, b))
        except rewards.ExpressionError:
            continue
        target = pool[0]
        if lo <= target <= hi and target not in nums:
            break
    prompt = f"Q: make {int(target)} from {' '.join(map(str, nums))}\nA: "
    return TaskItem("countdown", tier.name, prompt, str(int(target)), tuple(nums))


def _sort_item(rng: random.Random, tier: Tier) -> TaskItem:
    nums = [rng.randint(*SORT_VALUES) for _ in range(tier.size)]
    return TaskItem("sort", tier.name, f"Q: sort {' '.join(map(str, nums))}=",
                    " ".join(map(str, sorted(nums))), tuple(nums))


def make_item(rng: random.Random, tier: Tier) -> TaskItem:
    """One random item of ``tier`` drawn from ``rng``."""
    if tier.family == "countdown":
        return _countdown_item(rng, tier)
    if tier.family == "sort":
        return _sort_item(rng, tier)
    return _arithmetic_item(rng, tier)


def split_key(item: TaskItem) -> str:
    """Canonical identity of a problem: commutative operands and countdown numbers are sorted."""
    if item.family in ("add", "mul"):
        return f"{item.family}:{sorted(item.numbers)}"
    if item.family == "countdown":
        return f"countdown:{sorted(item.numbers)}->{item.answer}"
    return f"{item.family}:{item.prompt}"


def is_eval(item: TaskItem, eval_fraction: float) -> bool:
    """True when the item belongs to the held-out split (a seed-independent hash of its key)."""
    h = hashlib.sha256(f"{SPLIT_SALT}/{split_key(item)}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64 < eval_fraction


def _draw_in_split(rng: random.Random, tier: Tier, want_eval: bool, eval_fraction: float,
                   attempts: int = 10_000) -> TaskItem:
    for _ in range(attempts):
        item = make_item(rng, tier)
        if is_eval(item, eval_fraction) == want_eval:
            return item
    raise RuntimeError(f"task {tier.name}: no {'eval' if want_eval else 'train'} item in "
                       f"{attempts} draws; the tier is too small for eval_fraction={eval_fraction}")


def train_item(cfg: TaskConfig, index: int) -> TaskItem:
    """Training item number ``index``: a uniform tier, then an item of its train split; a pure
    function of (seed, index), so the data order resumes from a counter."""
    rng = random.Random(f"{cfg.seed}/train/{index}")
    tier = rng.choice(train_tiers(cfg))
    return _draw_in_split(rng, tier, False, cfg.eval_fraction)


def train_batch(cfg: TaskConfig, step: int, batch_size: int) -> list[TaskItem]:
    """The ``batch_size`` training items of step ``step``."""
    return [train_item(cfg, step * batch_size + i) for i in range(batch_size)]


def stream_item(cfg: TaskConfig, file_train: Sequence[TaskItem] | None, index: int,
                offset: int = 0) -> TaskItem:
    """Item ``index`` of a run's training stream: ``train_item(cfg, offset + index)`` for the
    synthetic tasks, or a task file's training split cycled in a seeded order per pass.
    ``offset`` separates streams (the RL prompts from the SFT demonstrations)."""
    if file_train is None:
        return train_item(cfg, offset + index)
    epoch, k = divmod(index, len(file_train))
    order = list(range(len(file_train)))
    random.Random(f"{cfg.seed}/file/{offset}/{epoch}").shuffle(order)
    return file_train[order[k]]


def pool_index(index: int, pool: int) -> int:
    """Where item ``index`` of a stream cycled over its first ``pool`` items comes from
    (``pool`` = 0: the endless stream, ``index`` itself)."""
    return index % pool if pool else index


def mixture_item(cfg: TaskConfig, weights: Sequence[float], index: int) -> TaskItem:
    """Training item ``index`` of a family mixture: family ``f`` with probability
    ``weights[f] / sum(weights)``, then a uniform tier of it, then an item of its train split;
    a pure function of (seed, weights, index), so it resumes from a counter as ``train_item``."""
    if len(weights) != len(cfg.families):
        raise ValueError(f"weights {tuple(weights)}: give one per family of {cfg.families}")
    rng = random.Random(f"{cfg.seed}/mixture/{index}")
    family = rng.choices(cfg.families, weights=weights)[0]
    tier = rng.choice(train_tiers(dataclasses.replace(cfg, families=(family,))))
    return _draw_in_split(rng, tier, False, cfg.eval_fraction)


def eval_items(cfg: TaskConfig, tier: Tier, n: int) -> list[TaskItem]:
    """Up to ``n`` distinct held-out items of ``tier`` (fewer when its eval split is smaller).

    Training tiers draw from the hash-held-out split; OOD tiers are eval-only and draw freely."""
    rng = random.Random(f"{cfg.seed}/eval/{tier.name}")
    out, seen = [], set()
    for _ in range(200 * n + 1000):
        if len(out) == n:
            break
        item = make_item(rng, tier)
        if item.prompt not in seen and (tier.ood or is_eval(item, cfg.eval_fraction)):
            seen.add(item.prompt)
            out.append(item)
    return out


def eval_sets(cfg: TaskConfig, n_per_tier: int) -> dict[str, list[TaskItem]]:
    """Held-out items per tier name: every training tier, then the OOD tiers."""
    return {t.name: eval_items(cfg, t, n_per_tier) for t in train_tiers(cfg) + ood_tiers(cfg)}


# -- solvers and demonstrations ---------------------------------------------------------------

def _column_lines(a: int, b: int, op: str) -> list[str]:
    """Column addition (carries) or subtraction (borrows, a >= b), least significant digit first."""
    xs, ys = str(a)[::-1], str(b)[::-1].ljust(len(str(a)), "0")
    lines, c = [], 0
    for x, y in zip(map(int, xs), map(int, ys)):
        if op == "+":
            lines.append(f"{x}+{y}+{c}={x + y + c}")
            c = (x + y + c) // 10
        else:
            borrow = int(x - y - c < 0)
            lines.append(f"{x + 10 * borrow}-{y}-{c}={x + 10 * borrow - y - c}")
            c = borrow
    if op == "+" and c:
        lines.append(f"carry {c}")
    return lines


def _long_multiplication_lines(a: int, b: int) -> list[str]:
    """Partial products by each digit of b (shifted), then their running sum."""
    parts, lines = [], []
    for i, d in enumerate(map(int, str(b)[::-1])):
        parts.append(a * d * 10 ** i)
        lines.append(f"{a}*{d}{'0' * i}={parts[-1]}")
    total = parts[0]
    for p in parts[1:]:
        lines.append(f"{total}+{p}={total + p}")
        total += p
    return lines


def _chain_lines(nums: Sequence[int], ops: Sequence[str]) -> list[str]:
    """Multi-step evaluation: products first, then + and - left to right, one line per step."""
    nums, ops, lines = list(nums), list(ops), []
    for wanted in ("*", "+-"):
        i = 0
        while i < len(ops):
            if ops[i] in wanted:
                value = int(rewards.apply_op(ops[i], Fraction(nums[i]), Fraction(nums[i + 1])))
                lines.append(f"{nums[i]}{ops[i]}{nums[i + 1]}={value}")
                nums[i:i + 2], ops[i:i + 1] = [value], []
            else:
                i += 1
    return lines


def arithmetic_scratchpad(item: TaskItem) -> list[str]:
    """Worked steps of an arithmetic item (before its final ``expr=answer`` line)."""
    a, b = item.numbers[:2]
    if item.family == "add":
        return _column_lines(a, b, "+")
    if item.family == "sub":
        return _column_lines(a, b, "-")
    if item.family == "mul":
        return _long_multiplication_lines(a, b)
    return _chain_lines(item.numbers, item.ops)


def solve_countdown(numbers: Sequence[int], target: int, exact_division: bool = True) -> str | None:
    """An expression reaching ``target`` from ``numbers`` (each at most once) or None; depth-first
    over pairwise combinations, memoising visited multisets."""
    seen: set[tuple[Fraction, ...]] = set()

    def search(items: list[tuple[Fraction, str]]) -> str | None:
        for value, expr in items:
            if value == target:
                return expr
        key = tuple(sorted(v for v, _ in items))
        if len(items) < 2 or key in seen:
            return None
        seen.add(key)
        for i in range(len(items)):
            for j in range(len(items)):
                if i == j:
                    continue
                (a, ea), (b, eb) = items[i], items[j]
                rest = [items[k] for k in range(len(items)) if k not in (i, j)]
                for op in "+-*/":
                    if (op in "+*" and i > j) or (op == "/" and b == 0):
                        continue  # commutative pairs once; no division by zero
                    try:
                        value = rewards.apply_op(op, a, b, exact_division)
                    except rewards.ExpressionError:
                        continue
                    found = search(rest + [(value, f"({ea}{op}{eb})")])
                    if found is not None:
                        return found
        return None

    found = search([(Fraction(n), str(n)) for n in numbers])
    if found is not None and found.startswith("(") and found.endswith(")"):
        found = found[1:-1]
    return found


def demonstration(item: TaskItem, scratchpad: bool = True) -> str:
    """A correct completion from a programmatic solver (the Prefix-RFT / SFT demonstration)."""
    if item.family in rewards.ARITHMETIC_FAMILIES:
        if not scratchpad:
            return item.answer
        return "\n" + "\n".join(arithmetic_scratchpad(item) + [
            f"{_join(item.numbers, item.ops)}={item.answer}"])
    if item.family == "countdown":
        expr = solve_countdown(item.numbers, int(item.answer))
        if expr is None:
            raise ValueError(f"task {item.tier}: no countdown solution for {item.prompt!r}")
        return f"{expr}={item.answer}"
    if item.family == "sort":
        return item.answer
    if item.solution is not None:
        return item.solution
    return f"The answer is \\boxed{{{item.answer}}}."


# -- a user's task file -----------------------------------------------------------------------

def load_task_file(path: str, name: str | None = None) -> list[TaskItem]:
    """A local (or gs://) JSONL of ``{"prompt": str, "answer": str | number}`` rows as ``file``
    items. An answer holding ``####`` or ``\\boxed{}`` is kept as the worked solution and its final
    answer is extracted. A malformed row fails naming the file and line."""
    from etils import epath

    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"task file {path}: expected a JSONL file of "
                                '{"prompt", "answer"} rows')
    tier = f"file:{name or p.stem}"
    items = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"task file {path} line {i}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object with \"prompt\" and \"answer\"")
        for field in ("prompt", "answer"):
            if field not in row:
                raise ValueError(f"{where}: missing field {field!r}")
        prompt, answer = row["prompt"], row["answer"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: field 'prompt' must be a non-empty string")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise ValueError(f"{where}: field 'answer' must be a string or a number")
        answer = str(answer)
        final = rewards.reference_answer(answer)
        if not final:
            raise ValueError(f"{where}: field 'answer' has an empty final answer")
        worked = answer if ("####" in answer or rewards.extract_boxed(answer) is not None) else None
        items.append(TaskItem("file", tier, prompt, final, solution=worked))
    if not items:
        raise ValueError(f"task file {path}: no rows")
    return items


def split_file_items(items: Sequence[TaskItem], eval_fraction: float) -> tuple[list, list]:
    """(train, eval) of a task file by the hash of each prompt; duplicate prompts share a side."""
    ev = [is_eval(it, eval_fraction) for it in items]
    return ([it for it, e in zip(items, ev) if not e], [it for it, e in zip(items, ev) if e])
