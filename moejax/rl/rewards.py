"""Verifiable rewards: exact-answer extraction and checking per task family, reward 1/0 plus an
optional format term.

Answer formats (the prompts are built in ``moejax.rl.tasks``):
- arithmetic (add/sub/mul/multi): the integer after the last ``=`` of the completion (a bare
  completion with no ``=`` continues the prompt's ``=``); whitespace before it and any text after
  it are tolerated, a scratchpad before it is expected.
- countdown: the expression on the last non-empty line (text from the first ``=`` on that line is
  ignored, so ``50+25=75`` works). Parsed by a whitelist recursive-descent parser (integers,
  ``+ - * /``, parentheses; no unary minus), evaluated exactly with ``Fraction``. Rule: each given
  number is used at most once, a division must be exact (every intermediate value is an integer;
  negative intermediates are allowed), division by zero is invalid, the result equals the target.
- sort: the integers after the last ``=`` on that line, ``1 3 5``, ``1, 3, 5`` or ``[1, 3, 5]``.
- file (a user's JSONL): the last ``\\boxed{...}`` (nested braces), else the text after the last
  ``####`` (GSM8K), else the last number of the completion; compared numerically (commas, ``$``,
  ``%``, trailing ``.0``, ``3/4`` = ``0.75`` = ``\\frac{3}{4}``, negatives), else as normalised text.

The completion is first cut at the earliest stop string (EOS texts, a new ``\\nQ:``).
Reward: 1 when correct, else ``format_coef`` when well formed (the answer sits in the expected
format with nothing after it), else 0. A correct answer scores exactly 1 with or without the term.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from fractions import Fraction
from typing import Any, Sequence

import numpy as np

from moejax.config_checks import ConfigError

ARITHMETIC_FAMILIES = ("add", "sub", "mul", "multi")
DEFAULT_STOPS = ("\nQ:", "<eos>", "</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>",
                 "<|end_of_text|>")
MAX_EXPRESSION_CHARS = 256
MAX_NESTING = 32
_INT = r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)"
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """How a completion is scored: the format bonus and where a completion ends."""

    format_coef: float = 0.0  # reward of a well-formed wrong answer; 0 switches the term off
    stop_strings: tuple[str, ...] = DEFAULT_STOPS
    countdown_exact_division: bool = True  # False: non-integer intermediates are allowed

    def __post_init__(self):
        if not 0.0 <= self.format_coef < 1.0:
            raise ConfigError(f"reward.format_coef={self.format_coef!r} is invalid: must be in "
                              "[0, 1) so a correct answer (reward 1) always outranks a format bonus")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The check of one completion: the answer is right; it is in the expected format."""

    correct: bool
    well_formed: bool


def truncate_at_stop(text: str, stops: Sequence[str] = DEFAULT_STOPS) -> str:
    """The completion up to the earliest stop string (an EOS text, the start of a new question)."""
    cut = min((i for s in stops if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def _after_last_eq(text: str) -> str:
    return text.rsplit("=", 1)[-1]


# -- arithmetic -------------------------------------------------------------------------------

def extract_integer(text: str) -> tuple[int | None, bool]:
    """(integer after the last ``=``, nothing but whitespace follows it); (None, False) if none."""
    m = re.match(rf"\s*({_INT})(.*)", _after_last_eq(text), re.S)
    if m is None:
        return None, False
    return int(m.group(1).replace(",", "")), m.group(2).strip() == ""


def check_arithmetic(item, completion: str) -> Verdict:
    value, clean = extract_integer(completion)
    return Verdict(value is not None and value == int(item.answer), value is not None and clean)


# -- sorting ----------------------------------------------------------------------------------

def extract_int_list(text: str) -> tuple[list[int], bool]:
    """(leading run of integers after the last ``=`` on its line, the line is exactly a list)."""
    line = _after_last_eq(text).split("\n", 1)[0].strip()
    inner = line[1:-1] if line.startswith("[") and line.endswith("]") else line
    values = []
    for tok in re.split(r"[\s,]+", inner.strip()):
        if not re.fullmatch(r"[+-]?\d+", tok):
            return values, False
        values.append(int(tok))
    return values, bool(values)


def check_sort(item, completion: str) -> Verdict:
    values, clean = extract_int_list(completion)
    return Verdict(values == sorted(item.numbers), clean)


# -- countdown --------------------------------------------------------------------------------

class ExpressionError(ValueError):
    """A countdown expression that breaks the rules; the message says which."""


class ExpressionSyntaxError(ExpressionError):
    """Text that is not an expression of integers, ``+ - * /`` and parentheses."""


def apply_op(op: str, a: Fraction, b: Fraction, exact_division: bool = True) -> Fraction:
    """``a op b`` under the countdown rule (division by zero and inexact division are invalid)."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        raise ExpressionError("division by zero")
    out = a / b
    if exact_division and out.denominator != 1:
        raise ExpressionError(f"non-integer intermediate {a}/{b}")
    return out


class _Parser:
    """expr := term (('+'|'-') term)*; term := factor (('*'|'/') factor)*; factor := INT | (expr)."""

    def __init__(self, text: str, exact_division: bool):
        text = text.replace("×", "*").replace("÷", "/")
        self.tokens = re.findall(r"\d+|[-+*/()]|\S", text)
        bad = [t for t in self.tokens if not re.fullmatch(r"\d+|[-+*/()]", t)]
        if bad:
            raise ExpressionSyntaxError(f"unexpected character {bad[0]!r}")
        self.pos, self.depth, self.exact = 0, 0, exact_division
        self.used: list[int] = []

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise ExpressionSyntaxError("unexpected end of expression")
        self.pos += 1
        return tok

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = apply_op(self.take(), value, self.term(), self.exact)
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            value = apply_op(self.take(), value, self.factor(), self.exact)
        return value

    def factor(self) -> Fraction:
        tok = self.take()
        if tok == "(":
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise ExpressionSyntaxError(f"more than {MAX_NESTING} nested parentheses")
            value = self.expr()
            if self.take() != ")":
                raise ExpressionSyntaxError("missing ')'")
            self.depth -= 1
            return value
        if not tok.isdigit():
            raise ExpressionSyntaxError(f"expected a number or '(' but got {tok!r}")
        self.used.append(int(tok))
        return Fraction(int(tok))


def evaluate_expression(text: str, exact_division: bool = True) -> tuple[Fraction, list[int]]:
    """(exact value, numbers used in order) of a whitelisted arithmetic expression; never eval()."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionSyntaxError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    parser = _Parser(text, exact_division)
    if not parser.tokens:
        raise ExpressionSyntaxError("empty expression")
    value = parser.expr()
    if parser.peek() is not None:
        raise ExpressionSyntaxError(f"unexpected {parser.peek()!r} after the expression")
    return value, parser.used


def check_countdown_expression(expression: str, numbers: Sequence[int], target: int,
                               exact_division: bool = True) -> tuple[bool, bool, str]:
    """(correct, well_formed, reason): ``expression`` parses (well formed), uses only ``numbers``
    (each at most once), follows the division rule and evaluates exactly to ``target``."""
    try:
        value, used = evaluate_expression(expression, exact_division)
    except ExpressionSyntaxError as e:
        return False, False, str(e)
    except ExpressionError as e:
        return False, True, str(e)
    over = Counter(used) - Counter(numbers)
    if over:
        n = next(iter(over))
        return False, True, (f"number {n} used more often than given" if n in numbers
                             else f"number {n} is not one of the given numbers")
    if value != target:
        return False, True, f"evaluates to {value}, not {target}"
    return True, True, "ok"


def countdown_answer_line(completion: str) -> str:
    """The expression part of the last non-empty line (text from its first ``=`` is dropped)."""
    lines = [ln for ln in completion.split("\n") if ln.strip()]
    return lines[-1].split("=", 1)[0].strip() if lines else ""


def check_countdown(item, completion: str, exact_division: bool = True) -> Verdict:
    correct, well_formed, _ = check_countdown_expression(
        countdown_answer_line(completion), item.numbers, int(item.answer), exact_division)
    return Verdict(correct, well_formed)


# -- a user's task file: numeric / boxed answers ----------------------------------------------

def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces matched."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start:i - 1].strip()
    return None


def extract_final_answer(text: str) -> tuple[str | None, bool]:
    """(answer text, found in an explicit format): boxed, else ``#### x``, else the last number."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed, True
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
        return (tail, True) if tail else (None, False)
    numbers = _NUMBER.findall(text)
    return (numbers[-1], False) if numbers else (None, False)


def reference_answer(answer: str) -> str:
    """The final answer of a reference: after ``####`` (GSM8K), inside ``\\boxed{}`` (MATH), or as is."""
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip()
    boxed = extract_boxed(answer)
    return boxed if boxed is not None else answer.strip()


def parse_number(text: str) -> Fraction | None:
    """A numeric answer as an exact Fraction (``1,234``, ``-3``, ``2.50``, ``3/4``, ``\\frac{3}{4}``,
    ``$5``, ``50%`` -> 50); None when the text is not a single number."""
    s = text.strip().rstrip(".").strip()
    s = re.sub(r"\\text\{\s*\}|\\[,!;: ]|\\left|\\right|\\\$|\$|\\%|%", "", s).replace(" ", "")
    m = re.fullmatch(r"(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}", s) or re.fullmatch(
        r"(-?)\\[dt]?frac(\d)(\d)", s)
    if m:
        den = int(m.group(3))
        return None if den == 0 else Fraction(int(m.group(2)), den) * (-1 if m.group(1) else 1)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    m = re.fullmatch(r"(-?\d+)/(-?\d+)", s)
    if m:
        return None if int(m.group(2)) == 0 else Fraction(int(m.group(1)), int(m.group(2)))
    if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", s):
        return Fraction(s)
    return None


def _normalise_text(text: str) -> str:
    s = re.sub(r"\\left|\\right|\\[,!;: ]|\$|\s+", "", text).replace("\\dfrac", "\\frac")
    return s.replace("\\tfrac", "\\frac").rstrip(".").lower()


def answers_match(predicted: str, reference: str) -> bool:
    """Numeric equality when both parse as numbers, else equality of normalised text."""
    p, r = parse_number(predicted), parse_number(reference)
    if p is not None and r is not None:
        return p == r
    return _normalise_text(predicted) == _normalise_text(reference) != ""


def check_file_answer(item, completion: str) -> Verdict:
    predicted, explicit = extract_final_answer(completion)
    return Verdict(predicted is not None and answers_match(predicted, item.answer), explicit)


# -- batches ----------------------------------------------------------------------------------

def verdict(item, completion: str, cfg: RewardConfig = RewardConfig()) -> Verdict:
    """Check one completion of ``item`` (a ``TaskItem``: family, answer, numbers)."""
    text = truncate_at_stop(completion, cfg.stop_strings)
    if item.family in ARITHMETIC_FAMILIES:
        return check_arithmetic(item, text)
    if item.family == "countdown":
        return check_countdown(item, text, cfg.countdown_exact_division)
    if item.family == "sort":
        return check_sort(item, text)
    if item.family == "file":
        return check_file_answer(item, text)
    raise ValueError(f"task {item.tier!r}: unknown family {item.family!r} for reward")


def reward_of(v: Verdict, cfg: RewardConfig = RewardConfig()) -> float:
    """1 if correct, else ``format_coef`` if well formed, else 0."""
    return 1.0 if v.correct else (cfg.format_coef if v.well_formed else 0.0)


def score_batch(items: Sequence[Any], completions: Sequence[str],
                cfg: RewardConfig = RewardConfig()) -> dict[str, np.ndarray]:
    """Rewards of N (item, completion) pairs: {"reward" f32[N], "correct" bool[N],
    "well_formed" bool[N]}. For G completions per prompt repeat each item G times
    (``[it for it in items for _ in range(G)]``), matching the rollout's group layout."""
    if len(items) != len(completions):
        raise ValueError(f"score_batch: {len(items)} items but {len(completions)} completions; "
                         "repeat each item once per completion")
    verdicts = [verdict(it, c, cfg) for it, c in zip(items, completions)]
    return {"reward": np.array([reward_of(v, cfg) for v in verdicts], np.float32),
            "correct": np.array([v.correct for v in verdicts], bool),
            "well_formed": np.array([v.well_formed for v in verdicts], bool)}
