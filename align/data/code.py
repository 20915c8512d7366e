"""Small function-writing tasks with unit tests (for the code rule reward and SFT).

Rows: {prompt, tests, entry_point, solution}. `tests` is Python source made of `assert` lines that
call `entry_point`; `solution` is a reference implementation that passes them. Expected values
in the asserts are computed here by an independent Python expression, not by running `solution`.

Each task family takes a small integer parameter `k`; the split is by (family, k).
"""

import random
from collections.abc import Callable
from dataclasses import dataclass

from align.data.common import Split, rng_for, sample_rows, split_of


@dataclass(frozen=True)
class _Family:
    name: str  # function name template, formatted with k
    doc: str  # task text, formatted with k and c (a letter picked by k)
    body: str  # reference solution body (one expression), formatted the same way
    oracle: Callable[[object, int], object]  # expected output for (input, k)
    inputs: Callable[[random.Random], object]  # a random input
    arg: str  # the parameter's name


def _ints(r: random.Random) -> list[int]:
    return [r.randint(-9, 20) for _ in range(r.randint(0, 6))]


def _letter(k: int) -> str:
    return "abcdeiou"[k % 8]


def _word(r: random.Random) -> str:
    return "".join(r.choice("abcdeiou") for _ in range(r.randint(2, 10)))


_FAMILIES = [
    _Family("add_{k}", "returns a new list with {k} added to every element of the list `xs`",
            "[x + {k} for x in xs]", lambda xs, k: [x + k for x in xs], _ints, "xs"),
    _Family("times_{k}", "returns a new list with every element of the list `xs` multiplied by {k}",
            "[x * {k} for x in xs]", lambda xs, k: [x * k for x in xs], _ints, "xs"),
    _Family("count_above_{k}", "returns how many elements of the list `xs` are greater than {k}",
            "sum(1 for x in xs if x > {k})", lambda xs, k: len([x for x in xs if x > k]), _ints, "xs"),
    _Family("keep_multiples_of_{k}", "returns the elements of the list `xs` that are divisible by {k}, in order",
            "[x for x in xs if x % {k} == 0]", lambda xs, k: [x for x in xs if x % k == 0], _ints, "xs"),
    _Family("sum_plus_{k}", "returns the sum of the list `xs` plus {k}",
            "sum(xs) + {k}", lambda xs, k: sum(xs) + k, _ints, "xs"),
    _Family("repeat_{k}", "returns the string `s` repeated {k} times",
            "s * {k}", lambda s, k: s * k, _word, "s"),
    _Family("first_{k}_chars", "returns the first {k} characters of the string `s` (all of it if shorter)",
            "s[:{k}]", lambda s, k: s[:k], _word, "s"),
    _Family("count_char_{k}", "returns how many times the letter '{c}' occurs in the string `s`",
            "s.count('{c}')", lambda s, k: s.count("abcdeiou"[k % 8]), _word, "s"),
]
_K_RANGE = range(1, 21)


def _make(r: random.Random) -> tuple[Split, dict]:
    fam = r.choice(_FAMILIES)
    k = r.choice(_K_RANGE)
    name = fam.name.format(k=k)
    arg = fam.arg
    prompt = (
        f"Write a Python function `{name}({arg})` that {fam.doc.format(k=k, c=_letter(k))}.\n"
        "Reply with the code in a ```python block."
    )
    solution = f"def {name}({arg}):\n    return {fam.body.format(k=k, c=_letter(k))}\n"
    cases = []
    for _ in range(4):
        x = fam.inputs(r)
        cases.append(f"assert {name}({x!r}) == {fam.oracle(x, k)!r}")
    return split_of(f"code:{fam.name}:{k}"), {
        "prompt": prompt,
        "tests": "\n".join(cases) + "\n",
        "entry_point": name,
        "solution": solution,
    }


def code_rows(split: str = "train", n: int = 200, seed: int = 0) -> list[dict]:
    """`n` coding tasks; the test split holds whole (family, k) tasks never seen in train."""
    return sample_rows(_make, split, n, rng_for("code", split, seed), unique=False if split == "train" else None)
