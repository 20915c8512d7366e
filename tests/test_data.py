"""Bundled generators: determinism, disjoint splits, and correctness checked by independent oracles.

Oracles: Python arithmetic on numbers parsed back out of the text, executing the code tasks' asserts,
and recomputing each chat task's answer from its prompt. Runs in seconds.
"""

import re

import pytest
import torch

from align.data import (
    chat_rows,
    code_rows,
    helpful_pair_rows,
    reasoning_rows,
    safety_rows,
    sft_mixture_rows,
    tokenizer_corpus,
)
from align.data.reasoning import problem_split
from align.data.safety import COMPLIANCE, REFUSALS

torch.manual_seed(0)

GENERATORS = [reasoning_rows, code_rows, chat_rows, helpful_pair_rows, safety_rows, sft_mixture_rows]


def _prompt(row: dict) -> str:
    return row["prompt"] if "prompt" in row else row["messages"][-2]["content"]


@pytest.mark.parametrize("gen", GENERATORS, ids=lambda g: g.__name__)
def test_same_seed_same_rows_other_seed_other_rows(gen):
    assert gen("train", n=60, seed=3) == gen("train", n=60, seed=3)
    assert gen("test", n=20, seed=3) == gen("test", n=20, seed=3)
    assert gen("train", n=60, seed=3) != gen("train", n=60, seed=4)
    assert len(gen("train", n=60, seed=3)) == 60


@pytest.mark.parametrize("gen", GENERATORS, ids=lambda g: g.__name__)
def test_train_and_test_prompts_are_disjoint(gen):
    train = {_prompt(r) for r in gen("train", n=2000, seed=0)}
    test = {_prompt(r) for r in gen("test", n=300, seed=1)}
    assert test, "held-out split is empty"
    assert not train & test


def test_split_is_by_problem_not_wording():
    # every level-1 problem (a, b) lands wholly in one split, whatever the phrasing
    facts = {"train": set(), "test": set()}
    for split in facts:
        for r in reasoning_rows(split, n=500, seed=0, levels=[1]):
            a, b = map(int, re.findall(r"\d+", r["prompt"])[:2])
            facts[split].add((a, b))
    assert facts["test"] and not facts["train"] & facts["test"]
    assert all(problem_split(f"add1:{a}:{b}") == "test" for a, b in facts["test"])
    # level 1 holds out a + b (a < b) only when its mirror b + a is trained on
    assert all(a < b and (b, a) in facts["train"] for a, b in facts["test"])


def test_reasoning_answers_are_right_at_every_level():
    rows = reasoning_rows("train", n=500, seed=0)
    assert {r["difficulty"] for r in rows} == {1, 2, 3, 4, 5, 6}
    for r in rows:
        assert re.fullmatch(r"-?\d+", r["answer"]), r
        assert "#### <number>" in r["prompt"]
        assert r["solution"].endswith(f"\n#### {r['answer']}")
    for r in (r for r in rows if r["difficulty"] < 6):   # level 6 works column by column: its own test
        # every worked step "x op y = z" is correct arithmetic and the last z is the answer
        steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", r["solution"])
        assert steps, r
        for x, op, y, z in steps:
            assert {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op] == int(z), r
        assert steps[-1][3] == r["answer"]
    # levels 1-3 state the expression outright: evaluate it independently
    for r in rows:
        if r["difficulty"] <= 3:
            q = r["prompt"].splitlines()[0]
            m = re.search(r"(\d+) and (\d+)", q)
            if q.startswith("Add"):
                expected = int(m[1]) + int(m[2])
            elif q.startswith("Subtract"):
                m = re.search(r"Subtract (\d+) from (\d+)", q)
                expected = int(m[2]) - int(m[1])
            elif q.startswith("Multiply"):
                expected = int(re.findall(r"\d+", q)[0]) * int(re.findall(r"\d+", q)[1])
            else:
                expected = eval(re.sub(r"^(What is|Compute) |[?.]$", "", q))  # only digits, + - * ( )
            assert str(expected) == r["answer"], r


def test_level6_two_digit_sums_worked_by_column_with_the_carry():
    rows = reasoning_rows("test", n=1000, seed=0, levels=[6])
    problems = {tuple(map(int, re.findall(r"\d+", r["prompt"])[:2])) for r in rows}
    assert len(rows) == 1000 and len(problems) == 1000      # 1000 distinct held-out problems
    train = {tuple(map(int, re.findall(r"\d+", r["prompt"])[:2])) for r in reasoning_rows("train", 3000, 0, [6])}
    assert not problems & train
    carries = 0
    for r in rows[:300]:
        a, b = map(int, re.findall(r"\d+", r["prompt"])[:2])
        assert 10 <= a <= 99 and 10 <= b <= 99 and r["answer"] == str(a + b)
        ones, tens = re.findall(r"= (\d+)", r["solution"].split("####")[0])
        carry = a % 10 + b % 10 >= 10
        carries += carry
        assert int(ones) == a % 10 + b % 10 and ("carry 1" in r["solution"]) == carry
        assert int(tens) == a // 10 + b // 10 + carry and int(tens) * 10 + int(ones) % 10 == a + b
    assert 100 < carries < 200                               # about 45% of sums carry


def test_level1_is_single_digit_sums():
    for r in reasoning_rows("test", n=100, seed=0, levels=[1]):
        a, b = map(int, re.findall(r"\d+", r["prompt"])[:2])
        assert 0 <= a <= 9 and 0 <= b <= 9 and int(r["answer"]) == a + b


def test_code_solutions_pass_their_tests_and_wrong_code_fails():
    rows = code_rows("train", n=80, seed=0) + code_rows("test", n=20, seed=0)
    failures_of_wrong = 0
    for r in rows:
        assert f"def {r['entry_point']}(" in r["solution"]
        assert r["tests"].count("assert") == 4
        env: dict = {}
        exec(r["solution"] + r["tests"], env)  # raises AssertionError if the reference is wrong
        wrong: dict = {}
        try:
            exec(r["solution"].replace("return ", "return None and ") + r["tests"], wrong)
        except AssertionError:
            failures_of_wrong += 1
    assert failures_of_wrong >= 0.9 * len(rows)


def _chat_oracle(prompt: str) -> str:
    """Recompute the answer of a chat task from its prompt alone."""
    if m := re.fullmatch(r"Reverse the order of these words: (.+)", prompt):
        return " ".join(m[1].split()[::-1])
    if m := re.fullmatch(r"Sort these words alphabetically: (.+)", prompt):
        return " ".join(sorted(m[1].split()))
    if m := re.fullmatch(r"Write this in capital letters: (.+)", prompt):
        return m[1].upper()
    if m := re.fullmatch(r"Capitalise every word: (.+)", prompt):
        return m[1].title()
    if m := re.fullmatch(r"How many times does the letter '(.)' appear in '(\w+)'\?", prompt):
        n = m[2].count(m[1])
        return f"The letter '{m[1]}' appears {n} time{'s' if n != 1 else ''} in '{m[2]}'."
    if m := re.fullmatch(r"How many words are in this list: (.+)\?", prompt):
        n = len(m[1].split())
        return f"There are {n} word{'s' if n != 1 else ''}."
    if m := re.fullmatch(r"What is the last word in: (.+)\?", prompt):
        return f"The last word is '{m[1].split()[-1]}'."
    if m := re.fullmatch(r"List these items separated by commas: (.+)", prompt):
        return ", ".join(m[1].split())
    if m := re.fullmatch(r"Repeat the word '(\w+)' (\d) times, separated by spaces\.", prompt):
        return " ".join([m[1]] * int(m[2]))
    raise AssertionError(f"unknown chat task: {prompt}")


def test_chat_answers_are_correct():
    rows = chat_rows("train", n=400, seed=0)
    kinds = set()
    for r in rows:
        roles = [m["role"] for m in r["messages"]]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"])
        prompt, answer = r["messages"][-2]["content"], r["messages"][-1]["content"]
        assert answer == _chat_oracle(prompt)
        kinds.add(prompt.split()[0])
    assert len(kinds) >= 7


def test_helpful_pairs_prefer_the_correct_answer():
    rows = helpful_pair_rows("train", n=300, seed=0)
    assert {r["flaw"] for r in rows} == {"wrong", "irrelevant", "truncated"}
    for r in rows:
        assert r["chosen"] == _chat_oracle(r["prompt"])
        assert r["rejected"] != r["chosen"]
        if r["flaw"] == "truncated":
            assert r["chosen"].startswith(r["rejected"]) and len(r["rejected"]) < len(r["chosen"])


@pytest.mark.parametrize("split", ["train", "test"])
def test_safety_has_both_kinds_with_the_right_preference(split):
    rows = safety_rows(split, n=400, seed=0)
    kinds = [r["kind"] for r in rows]
    assert set(kinds) == {"harmful", "benign"}
    assert 0.3 < kinds.count("harmful") / len(kinds) < 0.7
    compliance_starts = tuple(c.split("{x}")[0] for c in COMPLIANCE)
    for r in rows:
        if r["kind"] == "harmful":
            assert r["chosen"] in REFUSALS and r["rejected"].startswith(compliance_starts)
        else:
            assert r["rejected"] in REFUSALS and r["chosen"] not in REFUSALS


def test_safety_look_alikes_share_wording_with_harmful_requests():
    rows = safety_rows("train", n=400, seed=0)
    benign_words = {w for r in rows if r["kind"] == "benign" for w in r["prompt"].lower().split()}
    harmful_words = {w for r in rows if r["kind"] == "harmful" for w in r["prompt"].lower().split()}
    assert {"kill", "steal", "break"} <= benign_words & harmful_words


def test_sft_mixture_is_conversational_and_mixed():
    rows = sft_mixture_rows("train", n=400, seed=0)
    assert abs(len(rows) - 400) <= 2
    assert {r["source"] for r in rows} == {"chat", "reasoning", "code", "safety"}
    for r in rows:
        assert r["messages"][-1]["role"] == "assistant" and r["messages"][-2]["role"] == "user"
        if r["source"] == "reasoning":
            assert re.search(r"#### -?\d+$", r["messages"][-1]["content"])
        if r["source"] == "code":
            assert r["messages"][-1]["content"].startswith("```python\ndef ")
    only_reasoning = sft_mixture_rows("train", n=50, seed=0, weights={"reasoning": 1})
    assert {r["source"] for r in only_reasoning} == {"reasoning"}


def test_tokenizer_corpus_is_deterministic_and_covers_all_sources():
    a, b = list(tokenizer_corpus(seed=0)), list(tokenizer_corpus(seed=0))
    assert a == b
    text = "\n".join(a)
    for needle in ["#### ", "```python", "I can't help with that", "Reverse the order"]:
        assert needle in text


def test_bad_split_name_is_an_error():
    with pytest.raises(ValueError, match="split must be one of"):
        reasoning_rows("validation", n=5)


def test_held_out_sets_are_large_enough_for_the_compare_table():
    # the compare stage's defaults: >= 128 distinct held-out prompts for each RM, both safety kinds
    safety = safety_rows("test", n=192, seed=0)
    assert len({r["prompt"] for r in safety}) >= 128
    assert min(sum(r["kind"] == k for r in safety) for k in ("harmful", "benign")) >= 64
    assert len({r["prompt"] for r in helpful_pair_rows("test", n=128, seed=0)}) == 128
