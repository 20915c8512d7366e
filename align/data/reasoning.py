"""Arithmetic and word problems with verifiable answers, at six difficulty levels.

Rows: {prompt, answer, difficulty, solution}. `answer` is a plain integer string (the gold for the
math reward); `solution` is a short worked answer ending in `#### <answer>` (the SFT target).
Level 1 (single-digit a + b) is deliberately tiny so a ~5M-parameter model learns it in minutes.
Level 6 (two-digit a + b, worked digit by digit with the carry) is the demo's RL task: 8100 problems,
so the held-out split has ~1600 distinct ones (enough for a 1000-prompt evaluation), and a tiny model
after a few minutes of SFT gets only part of them right (the carry step is where it fails), which is
the headroom rule-reward GRPO works on.

Split: by the problem itself (numbers and operation), not its wording, so a held-out problem is
never seen in training under another phrasing. Level 1 holds out only sums a + b with a < b whose
mirror b + a is trained on (see `problem_split`): with 100 facts in all, recalling an unseen fact
from nothing is not learnable, but applying a learned sum in the other order is.
"""

import random

from align.data.common import Split, rng_for, sample_rows, split_of

LEVELS = (1, 2, 3, 4, 5, 6)
ANSWER_FORMAT = "End your answer with '#### <number>'."

_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Mo", "Nia"]
_ITEMS = ["apples", "books", "coins", "pencils", "stickers", "marbles", "cards", "shells", "stamps", "eggs"]
_PHRASES_ADD = ["What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}."]
_PHRASES_SUB = ["What is {a} - {b}?", "Compute {a} - {b}.", "Subtract {b} from {a}."]
_PHRASES_MUL = ["What is {a} * {b}?", "Compute {a} * {b}.", "Multiply {a} by {b}."]


def _finish(question: str, answer: int, steps: str, difficulty: int) -> dict:
    return {
        "prompt": f"{question}\n{ANSWER_FORMAT}",
        "answer": str(answer),
        "difficulty": difficulty,
        "solution": f"{steps}\n#### {answer}",
    }


def _level1(rng: random.Random) -> tuple[str, dict]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    q = rng.choice(_PHRASES_ADD).format(a=a, b=b)
    return f"add1:{a}:{b}", _finish(q, a + b, f"{a} + {b} = {a + b}.", 1)


def _level2(rng: random.Random) -> tuple[str, dict]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        q = rng.choice(_PHRASES_ADD).format(a=a, b=b)
        return f"add2:{a}:{b}", _finish(q, a + b, f"{a} + {b} = {a + b}.", 2)
    a, b = max(a, b), min(a, b)
    q = rng.choice(_PHRASES_SUB).format(a=a, b=b)
    return f"sub2:{a}:{b}", _finish(q, a - b, f"{a} - {b} = {a - b}.", 2)


def _level3(rng: random.Random) -> tuple[str, dict]:
    if rng.random() < 0.5:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        q = rng.choice(_PHRASES_MUL).format(a=a, b=b)
        return f"mul3:{a}:{b}", _finish(q, a * b, f"{a} * {b} = {a * b}.", 3)
    a, b, c = rng.randint(2, 20), rng.randint(2, 20), rng.randint(2, 9)
    s = a + b
    q = f"What is ({a} + {b}) * {c}?"
    return f"addmul3:{a}:{b}:{c}", _finish(q, s * c, f"{a} + {b} = {s}. {s} * {c} = {s * c}.", 3)


def _level4(rng: random.Random) -> tuple[str, dict]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.choice(["buy", "give", "boxes"])
    if kind == "buy":
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        q = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
        return f"buy4:{a}:{b}", _finish(q, a + b, f"{a} + {b} = {a + b}.", 4)
    if kind == "give":
        a = rng.randint(10, 60)
        b = rng.randint(1, a)
        q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        return f"give4:{a}:{b}", _finish(q, a - b, f"{a} - {b} = {a - b}.", 4)
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    q = f"{name} has {a} boxes with {b} {item} in each box. How many {item} is that in total?"
    return f"boxes4:{a}:{b}", _finish(q, a * b, f"{a} * {b} = {a * b}.", 4)


def _level5(rng: random.Random) -> tuple[str, dict]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, p, c = rng.randint(0, 30), rng.randint(2, 6), rng.randint(2, 12)
    bought = p * c
    d = rng.randint(1, a + bought)
    left = a + bought - d
    q = (
        f"{name} has {a} {item}, buys {p} packs of {c} {item}, then gives away {d}. "
        f"How many {item} does {name} have at the end?"
    )
    steps = f"{p} * {c} = {bought}. {a} + {bought} = {a + bought}. {a + bought} - {d} = {left}."
    return f"packs5:{a}:{p}:{c}:{d}", _finish(q, left, steps, 5)


def carry_steps(a: int, b: int) -> str:
    """The worked solution of a + b (two digits each): ones column, carry, tens column."""
    ones = a % 10 + b % 10
    carry = ones // 10
    tens = a // 10 + b // 10 + carry
    first = f"{a % 10} + {b % 10} = {ones}" + (", carry 1." if carry else ".")
    second = f"{a // 10} + {b // 10} + {carry} = {tens}." if carry else f"{a // 10} + {b // 10} = {tens}."
    return f"{first} {second}"


def _level6(rng: random.Random) -> tuple[str, dict]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    q = rng.choice(_PHRASES_ADD).format(a=a, b=b)
    # level 2's sums are the same problems (worked in one line): the same key keeps them in the same split
    return f"add2:{a}:{b}", _finish(q, a + b, carry_steps(a, b), 6)


def problem_split(key: str) -> Split:
    """The split of a problem. Level 1 has only 100 facts, so it holds out some a + b with a < b
    (40% of those) and always trains on the mirror b + a: held-out accuracy then shows the model
    learned the sum, not the string. Other levels: 20% of problems by hash."""
    if key.startswith("add1:"):
        a, b = map(int, key.split(":")[1:])
        return split_of(key, test_percent=40) if a < b else "train"
    return split_of(key)


_MAKERS = {1: _level1, 2: _level2, 3: _level3, 4: _level4, 5: _level5, 6: _level6}


def reasoning_rows(
    split: str = "train", n: int = 1000, seed: int = 0, levels: tuple[int, ...] | list[int] = LEVELS
) -> list[dict]:
    """`n` problems drawn evenly across `levels`; same arguments give the same rows."""
    levels = tuple(int(lv) for lv in levels)
    bad = [lv for lv in levels if lv not in _MAKERS]
    if bad or not levels:
        raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {levels}")
    rng = rng_for("reasoning", split, seed)

    def make(r: random.Random) -> tuple[Split, dict, str]:
        key, row = _MAKERS[r.choice(levels)](r)
        return problem_split(key), row, key

    return sample_rows(make, split, n, rng)
