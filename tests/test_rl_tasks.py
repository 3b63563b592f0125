"""Verifiable RL tasks: generators, splits, answer checking, demonstrations, task files,
tokenization and pass@k (pure Python, no jit)."""

from __future__ import annotations

import itertools
import json
import random
from fractions import Fraction
from math import comb

import numpy as np
import pytest

from moejax.config_checks import ConfigError
from moejax.data import BPETokenizer, ByteTokenizer
from moejax.rl import encode, passk, rewards, tasks
from moejax.rl.rewards import RewardConfig
from moejax.rl.tasks import TaskConfig, TaskItem, Tier

ALL = TaskConfig(families=tasks.FAMILIES, digits=(1, 2, 3), countdown_sizes=(3, 4),
                 sort_lengths=(3, 5))


def _all_tiers(cfg=ALL):
    return tasks.train_tiers(cfg) + tasks.ood_tiers(cfg)


# -- generators and splits --------------------------------------------------------------------

def test_same_seed_same_items_other_seed_other_items():
    a = tasks.train_batch(ALL, step=3, batch_size=32)
    assert a == tasks.train_batch(ALL, step=3, batch_size=32)
    assert a != tasks.train_batch(TaskConfig(**{**vars(ALL), "seed": 1}), step=3, batch_size=32)
    assert a[5] == tasks.train_item(ALL, 3 * 32 + 5)  # a pure function of the index: resumable
    assert tasks.eval_sets(ALL, 8) == tasks.eval_sets(ALL, 8)


def test_tier_names_and_ood_one_size_larger():
    cfg = TaskConfig(families=tasks.FAMILIES, digits=(2, 4), multi_steps=(2, 3),
                     countdown_sizes=(3, 4), sort_lengths=(4,))
    names = [t.name for t in tasks.train_tiers(cfg)]
    assert names[:2] == ["add-d2", "add-d4"] and "multi-d4s3" in names and "mul-d2" in names
    assert {"countdown-n3", "countdown-n4", "sort-n4"} <= set(names)
    ood = {t.name for t in tasks.ood_tiers(cfg)}
    assert ood == {"add-d5", "sub-d5", "mul-d5", "multi-d5s2", "multi-d5s3", "countdown-n5",
                   "sort-n5"}
    assert all(t.ood for t in tasks.ood_tiers(cfg))
    for t in tasks.ood_tiers(cfg):
        for it in tasks.eval_items(cfg, t, 10):
            if t.family in tasks.ARITH_OPS or t.family == "multi":
                assert max(len(str(n)) for n in it.numbers) == max(cfg.digits) + 1
                assert all(len(str(n)) == t.size for n in it.numbers)
            else:
                assert len(it.numbers) == t.size


def test_operands_have_exact_digits_and_answers_are_right():
    rng = random.Random(0)
    for t in tasks.train_tiers(TaskConfig(digits=(1, 2, 6), multi_steps=(2, 3))):
        for _ in range(50):
            it = tasks.make_item(rng, t)
            assert all(len(str(n)) == t.size for n in it.numbers), it
            a = list(it.numbers)
            expected = {"add": lambda: a[0] + a[1], "sub": lambda: a[0] - a[1],
                        "mul": lambda: a[0] * a[1]}.get(it.family)
            if expected is None:  # multi: products first, by hand
                terms, signs = [a[0]], []
                for op, n in zip(it.ops, a[1:]):
                    if op == "*":
                        terms[-1] *= n
                    else:
                        terms.append(n)
                        signs.append(1 if op == "+" else -1)
                value = terms[0] + sum(s * x for s, x in zip(signs, terms[1:]))
            else:
                value = expected()
            assert it.answer == str(value) and it.prompt == f"Q: {tasks._join(a, it.ops)}="
            if it.family == "sub":
                assert value >= 0


def test_train_and_eval_never_overlap():
    cfg = TaskConfig(families=tasks.FAMILIES, digits=(1, 2), countdown_sizes=(3,),
                     sort_lengths=(2,), eval_fraction=0.2)
    train_keys = {tasks.split_key(it) for it in tasks.train_batch(cfg, 0, 4000)}
    ev = tasks.eval_sets(cfg, 50)
    eval_keys = {tasks.split_key(it) for t in tasks.train_tiers(cfg) for it in ev[t.name]}
    assert train_keys and eval_keys and not train_keys & eval_keys
    # the tiny add-d1 space: every item on exactly one side, commuted operands on the same side
    for a, b in itertools.product(range(10), repeat=2):
        x = TaskItem("add", "add-d1", f"Q: {a}+{b}=", str(a + b), (a, b), ("+",))
        y = TaskItem("add", "add-d1", f"Q: {b}+{a}=", str(a + b), (b, a), ("+",))
        assert tasks.is_eval(x, 0.2) == tasks.is_eval(y, 0.2)
    share = np.mean([tasks.is_eval(tasks.make_item(random.Random(i), Tier("mul", 4)), 0.2)
                     for i in range(3000)])
    assert 0.16 < share < 0.24


def test_task_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="tasks.digits"):
        TaskConfig(digits=(0, 2))
    with pytest.raises(ConfigError, match="tasks.families"):
        TaskConfig(families=("add", "div"))
    with pytest.raises(ConfigError, match="tasks.countdown_sizes"):
        TaskConfig(countdown_sizes=(6,))
    with pytest.raises(ConfigError, match="tasks.eval_fraction"):
        TaskConfig(eval_fraction=0.0)


# -- extraction and checking ------------------------------------------------------------------

@pytest.mark.parametrize("text,value,clean", [
    ("1776", 1776, True), (" 1776 ", 1776, True), ("1776\n", 1776, True),
    ("\n37*8=296\n37*40=1480\n296+1480=1776", 1776, True), ("=  1776", 1776, True),
    ("1776 is my answer", 1776, False), ("1776.", 1776, False), ("1776abc", 1776, False),
    ("-42", -42, True), ("= -42", -42, True), ("+7", 7, True), ("1,776", 1776, True),
    ("x=3\nso 5", 3, False), ("", None, False), ("abc", None, False), ("=", None, False),
    ("12=", None, False), ("17 76", 17, False), ("007", 7, True),
])
def test_integer_extraction_table(text, value, clean):
    assert rewards.extract_integer(text) == (value, clean)


@pytest.mark.parametrize("completion,correct,well_formed", [
    ("1776", True, True), ("1776<eos>garbage=5", True, True), ("1776\nQ: 2*3=6", True, True),
    ("1776</s>", True, True), ("1775", False, True), ("1776 done", True, False),
    ("no idea", False, False), ("\n37*8=296\n37*48=1776", True, True),
])
def test_arithmetic_verdicts(completion, correct, well_formed):
    it = TaskItem("mul", "mul-d2", "Q: 37*48=", "1776", (37, 48), ("*",))
    assert rewards.verdict(it, completion) == rewards.Verdict(correct, well_formed)


@pytest.mark.parametrize("completion,correct,well_formed", [
    ("1 3 5 9", True, True), ("1, 3, 5, 9", True, True), ("[1, 3, 5, 9]", True, True),
    ("=1 3 5 9", True, True), ("1 3 5 9 done", True, False), ("1 3 5", False, True),
    ("1 3 5 9 9", False, True), ("9 5 3 1", False, True), ("", False, False),
    ("1 3 5 9\nmore", True, True),
])
def test_sort_verdicts(completion, correct, well_formed):
    it = TaskItem("sort", "sort-n4", "Q: sort 5 3 9 1=", "1 3 5 9", (5, 3, 9, 1))
    assert rewards.verdict(it, completion) == rewards.Verdict(correct, well_formed)


@pytest.mark.parametrize("expr,correct,well_formed,reason", [
    ("50+25", True, True, "ok"), ("(50+25)*3/3", False, True, "used more often"),
    ("25*3", True, True, "ok"), ("75", False, True, "not one of the given"),
    ("50+25+3-3", False, True, "used more often"), ("(7-7)+75", False, True, "7 used more often"),
    ("50/(7-7)", False, True, "division by zero"), ("50/(3*7)", False, True, "non-integer"),
    ("50+24+1", False, True, "not one of"), ("50+7", False, True, "evaluates to 57"),
    ("-3+78", False, False, "expected a number"), ("2**3", False, False, "expected a number"),
    ("__import__('os')", False, False, "unexpected character"), ("(50+25", False, False, "end"),
    ("50+25)", False, False, "unexpected ')'"), ("", False, False, "empty"),
    ("50 + 25", True, True, "ok"), ("50×3÷(7-5)", False, True, "not one of"),
    ("(" * 40 + "50" + ")" * 40, False, False, "nested"),
])
def test_countdown_checker_rules(expr, correct, well_formed, reason):
    ok, wf, why = rewards.check_countdown_expression(expr, (3, 7, 25, 50), 75)
    assert (ok, wf) == (correct, well_formed) and reason in why, why


def test_countdown_division_rule_switch_and_completion_lines():
    # 7/2*4 = 14 has a non-integer intermediate: rejected by default, allowed with the switch off
    assert rewards.check_countdown_expression("7/2*4", (7, 2, 4), 14)[:2] == (False, True)
    assert rewards.check_countdown_expression("7/2*4", (7, 2, 4), 14, False)[0]
    it = TaskItem("countdown", "countdown-n3", "Q: make 14 from 7 2 4\nA: ", "14", (7, 2, 4))
    lenient = RewardConfig(countdown_exact_division=False)
    assert not rewards.verdict(it, "7/2*4=14").correct and rewards.verdict(it, "7/2*4", lenient).correct
    assert rewards.verdict(it, "let me think\n7*2=14").correct  # last line, text after '=' dropped
    assert rewards.verdict(it, "7*2<|im_end|>\nblah").correct


def test_countdown_solver_finds_solutions_for_generated_instances():
    rng = random.Random(5)
    for n in (2, 3, 4, 5):
        for _ in range(15):
            it = tasks.make_item(rng, Tier("countdown", n))
            expr = tasks.solve_countdown(it.numbers, int(it.answer))
            assert expr is not None, it
            assert rewards.check_countdown_expression(expr, it.numbers, int(it.answer))[0], expr
    assert tasks.solve_countdown((2, 3), 7) is None  # unreachable target
    # 24 from 1 6 6 8 needs the fraction 6/8: found only when inexact division is allowed
    assert tasks.solve_countdown((1, 6, 6, 8), 24) is None
    expr = tasks.solve_countdown((1, 6, 6, 8), 24, exact_division=False)
    assert rewards.check_countdown_expression(expr, (1, 6, 6, 8), 24, False)[0], expr
    assert not rewards.check_countdown_expression(expr, (1, 6, 6, 8), 24)[0]


def test_boxed_and_final_answer_extraction():
    assert rewards.extract_boxed(r"so \boxed{\frac{3}{4}} and") == r"\frac{3}{4}"
    assert rewards.extract_boxed(r"\boxed{1} then \boxed{ {2}+{3} }") == "{2}+{3}"
    assert rewards.extract_boxed(r"\boxed{unclosed {") is None
    assert rewards.extract_boxed("no box") is None
    assert rewards.extract_final_answer("steps...\n#### 1,234\nmore") == ("1,234", True)
    assert rewards.extract_final_answer(r"#### 3 \boxed{4}") == ("4", True)
    assert rewards.extract_final_answer("I think 12 then 15.") == ("15", False)
    assert rewards.extract_final_answer("nothing") == (None, False)
    assert rewards.reference_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"


@pytest.mark.parametrize("a,b,same", [
    ("3/4", "0.75", True), (r"\frac{3}{4}", "0.75", True), (r"\dfrac{3}{4}", "3/4", True),
    (r"-\frac{1}{2}", "-0.5", True), (r"\frac12", "0.5", True), ("1,234", "1234", True),
    ("72.0", "72", True), ("72.", "72", True), ("$72", "72", True), ("50%", "50", True),
    ("-5", "5", False), ("0.333", "1/3", False), (r"\text{ }7", "7", True),
    (r"x^2 + 1", "x^2+1", True), (r"\left( 1, 2 \right)", "(1,2)", True), ("", "", False),
    ("1/0", "0", False), ("abc", "abd", False),
])
def test_answers_match_table(a, b, same):
    assert rewards.answers_match(a, b) is same


# -- rewards and demonstrations ---------------------------------------------------------------

def test_every_demonstration_scores_one():
    items = [it for t in _all_tiers() for it in tasks.eval_items(ALL, t, 12)]
    items += tasks.train_batch(ALL, 0, 64)
    for scratch in (True, False):
        demos = [tasks.demonstration(it, scratch) for it in items]
        for cfg in (RewardConfig(), RewardConfig(format_coef=0.1)):
            out = rewards.score_batch(items, demos, cfg)
            bad = [(it.prompt, d) for it, d, c in zip(items, demos, out["correct"]) if not c]
            assert not bad and np.all(out["reward"] == 1.0) and out["well_formed"].all()
    mul = TaskItem("mul", "mul-d3", "Q: 725*891=", "645975", (725, 891), ("*",))
    assert tasks.demonstration(mul) == ("\n725*1=725\n725*90=65250\n725*800=580000\n"
                                        "725+65250=65975\n65975+580000=645975\n725*891=645975")
    add = TaskItem("add", "add-d3", "Q: 546+467=", "1013", (546, 467), ("+",))
    assert tasks.demonstration(add) == "\n6+7+0=13\n4+6+1=11\n5+4+1=10\ncarry 1\n546+467=1013"


def test_reward_format_term_and_batch_contract():
    it = TaskItem("add", "add-d2", "Q: 11+74=", "85", (11, 74), ("+",))
    items, comps = [it] * 4, ["85", "84", "84 or so", "dunno"]
    off = rewards.score_batch(items, comps)
    assert off["reward"].tolist() == [1, 0, 0, 0] and off["reward"].dtype == np.float32
    on = rewards.score_batch(items, comps, RewardConfig(format_coef=0.1))
    assert on["reward"].tolist() == pytest.approx([1, 0.1, 0, 0])
    assert on["correct"].tolist() == [True, False, False, False]
    assert on["well_formed"].tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="repeat each item"):
        rewards.score_batch(items, comps[:3])
    with pytest.raises(ConfigError, match="reward.format_coef"):
        RewardConfig(format_coef=1.0)


# -- a user's task file -----------------------------------------------------------------------

def test_task_file_loading_checking_and_split(tmp_path):
    rows = [{"prompt": "Natalia sold 48 clips...", "answer": "48/2 = 24\n48+24 = 72\n#### 72"},
            {"prompt": "What is 3/4 as a decimal?", "answer": r"We get \boxed{0.75}."},
            {"prompt": "Half of 1?", "answer": r"\frac{1}{2}"},
            {"prompt": "Debt?", "answer": -1234},
            {"prompt": "Pairs?", "answer": r"\boxed{\{1, 2\}}"}]
    path = tmp_path / "gsm.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = tasks.load_task_file(str(path))
    assert [it.answer for it in items] == ["72", "0.75", r"\frac{1}{2}", "-1234", r"\{1, 2\}"]
    assert items[0].tier == "file:gsm" and items[0].solution == rows[0]["answer"]
    assert items[2].solution is None
    comps = ["so #### 72", r"\boxed{3/4}", "0.5", "It is -1,234.", r"\boxed{\{1,2\}}"]
    assert rewards.score_batch(items, comps)["correct"].all()
    wrong = rewards.score_batch(items, ["#### 71", "0.7", "1/3", "1234", "{1,2}"])
    assert not wrong["correct"].any()
    demos = [tasks.demonstration(it) for it in items]
    assert demos[0] == rows[0]["answer"] and demos[2] == r"The answer is \boxed{\frac{1}{2}}."
    assert rewards.score_batch(items, demos)["reward"].tolist() == [1.0] * 5
    train, ev = tasks.split_file_items(items * 3, 0.5)
    assert len(train) + len(ev) == 15 and not {i.prompt for i in train} & {i.prompt for i in ev}


@pytest.mark.parametrize("line,msg", [
    ('{"prompt": "a", "answer": "1"', "line 2: not valid JSON"),
    ('["a", "1"]', "line 2: expected an object"),
    ('{"prompt": "a"}', "line 2: missing field 'answer'"),
    ('{"answer": "1"}', "line 2: missing field 'prompt'"),
    ('{"prompt": "", "answer": "1"}', "line 2: field 'prompt'"),
    ('{"prompt": "a", "answer": null}', "line 2: field 'answer'"),
    ('{"prompt": "a", "answer": "#### "}', "line 2: field 'answer' has an empty"),
])
def test_task_file_bad_rows_name_file_and_line(tmp_path, line, msg):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "answer": "1"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl {msg}"):
        tasks.load_task_file(str(path))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        tasks.load_task_file(str(tmp_path / "nope.jsonl"))


# -- tokenization -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> BPETokenizer:
    """A byte-level BPE trained here on task texts, saved so it loads back from a tokenizer.json."""
    items = tasks.train_batch(ALL, 0, 400)
    tok = BPETokenizer.train([it.prompt + tasks.demonstration(it) for it in items], 320)
    tok.save(tmp_path_factory.mktemp("bpe") / "tokenizer.json")
    return tok


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_prompt_and_demo_tokens_round_trip(which, bpe):
    tok = ByteTokenizer() if which == "byte" else bpe
    items = [it for t in _all_tiers() for it in tasks.eval_items(ALL, t, 2)]
    pb = encode.encode_prompts(items, tok)
    assert pb.tokens.dtype == np.int32 and pb.lengths.dtype == np.int32
    assert pb.tokens.shape == (len(items), pb.lengths.max())
    for row, n, it in zip(pb.tokens, pb.lengths, items):
        assert row[0] == tok.bos_id and tok.decode(row[1:n].tolist()) == it.prompt
        assert (row[n:] == tok.pad_id).all()
    db = encode.encode_demonstrations(items, tok, pad_to=400)
    assert db.tokens.shape == (len(items), 400)
    for i, it in enumerate(items):
        n = db.lengths[i]
        prompt, comp = db.tokens[i][db.prompt_mask[i]], db.tokens[i][db.completion_mask[i]]
        assert prompt.tolist() == pb.tokens[i, :pb.lengths[i]].tolist()
        assert comp[-1] == tok.eos_id and tok.decode(comp[:-1].tolist()) == tasks.demonstration(it)
        assert not (db.prompt_mask[i] & db.completion_mask[i]).any()
        assert (db.prompt_mask[i] | db.completion_mask[i]).sum() == n
        assert (db.tokens[i, n:] == tok.pad_id).all()
    with pytest.raises(ValueError, match="pad_to=5"):
        encode.encode_prompts(items, tok, pad_to=5)
    rows = [tok.encode("85") + [tok.eos_id] + tok.encode("junk"), tok.encode("12 3")]
    gen = encode._pad(rows, None, tok.pad_id, "test")
    assert encode.decode_completions(gen, tok) == ["85", "12 3"]


def _digit_only_tokenizer(tmp_path) -> BPETokenizer:
    from tokenizers import Tokenizer as HF, decoders, models

    chars = list("0123456789+-=Q: \n")
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "[UNK]": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    hf = HF(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    hf.decoder = decoders.Fuse()
    return BPETokenizer(hf, tmp_path / "tokenizer.json")


def test_untokenizable_task_text_names_tier_and_field(tmp_path):
    tok = _digit_only_tokenizer(tmp_path)
    add = TaskItem("add", "add-d2", "Q: 11+74=", "85", (11, 74), ("+",))
    assert encode.encode_prompts([add], tok, chat_template=None).lengths.tolist() == [10]
    mul = TaskItem("mul", "mul-d2", "Q: 19*24=", "456", (19, 24), ("*",))
    with pytest.raises(ValueError, match=r"task mul-d2 field 'prompt'.*'Q: 19\*24='"):
        encode.encode_prompts([add, mul], tok, chat_template=None)
    odd = TaskItem("file", "file:mine", "Q: 1+2=", "π")
    for encode_fn in (encode.encode_prompts, encode.encode_demonstrations):
        with pytest.raises(ValueError, match="task file:mine field 'answer'"):
            encode_fn([odd], tok, chat_template=None)
    with pytest.raises(ValueError, match="task add-d2 field 'demonstration'"):
        carry = TaskItem("add", "add-d2", "Q: 57+68=", "125", (57, 68), ("+",))
        encode.encode_demonstrations([carry], tok, chat_template=None)  # "carry 1": letters


def test_chat_template_from_tokenizer_config(tmp_path, bpe):
    folder = tmp_path / "hf"
    folder.mkdir()
    bpe.save(folder / "tokenizer.json")
    tok = BPETokenizer.from_file(folder / "tokenizer.json")
    item = tasks.eval_items(ALL, Tier("add", 2), 1)[0]
    assert encode.load_chat_template(tok) is None  # no tokenizer_config.json: plain <bos> + prompt
    plain = encode.encode_prompts([item], tok)
    assert plain.tokens[0, :plain.lengths[0]].tolist() == [tok.bos_id] + tok.encode(item.prompt)
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": {"content": "<bos>"}, "eos_token": "<eos>"}))
    chat = encode.encode_prompts([item], tok)
    ids = chat.tokens[0, :chat.lengths[0]].tolist()
    assert ids[0] == tok.bos_id  # the template's bos_token text became the special id
    assert tok.decode(ids) == f"<|user|>{item.prompt}\n<|assistant|>"
    assert encode.encode_prompts([item], tok, chat_template=None).lengths[0] == plain.lengths[0]
    demo = encode.encode_demonstrations([item], tok)
    assert demo.tokens[0][demo.prompt_mask[0]].tolist() == ids
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "chat_template.jinja").write_text("[{{ messages[0]['content'] }}]")
    ids = encode.encode_prompts([item], tok).tokens[0]
    assert tok.decode(ids.tolist()) == f"[{item.prompt}]"


# -- pass@k -----------------------------------------------------------------------------------

def _pass_at_k_brute(n: int, c: int, k: int) -> Fraction:
    """Share of the k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_equals_subset_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = _pass_at_k_brute(n, c, k)
                assert exact == 1 - Fraction(comb(n - c, k), comb(n, k))
                assert passk.pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-14)
        assert passk.pass_at_k(n, 1, 1) == pytest.approx(1 / n)
    # large n: the product form stays finite and accurate where binomials overflow floats
    exact = 1 - Fraction(comb(1900, 100), comb(2000, 100))
    assert passk.pass_at_k(2000, 100, 100) == pytest.approx(float(exact), rel=1e-12)
    with pytest.raises(ValueError, match="k=5"):
        passk.pass_at_k(4, 1, 5)


def test_pass_at_k_by_tier_means_per_tier():
    correct = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    out = passk.pass_at_k_by_tier(["a", "a", "b", "b"], correct, ks=(1, 2, 8))
    assert out["rl/pass@1/a"] == pytest.approx((0.25 + 0.5) / 2)
    assert out["rl/pass@1/b"] == pytest.approx(0.5)
    assert out["rl/pass@2/a"] == pytest.approx((0.5 + 5 / 6) / 2)
    assert "rl/pass@8/a" not in out  # k > n has no unbiased estimate
    np.testing.assert_allclose(passk.pass_at_k_groups(correct, 1), correct.mean(1))
