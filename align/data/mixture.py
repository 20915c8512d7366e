"""The SFT mixture (chat + worked reasoning + code solutions + safety) and the tokenizer corpus.

Every row is conversational: {messages: [{role, content}, ...], source}. Reasoning rows answer with the
worked solution ending in `#### <answer>`; code rows answer with a ```python block; safety rows
answer harmful requests with a refusal and benign look-alikes helpfully.
"""

import random
from collections.abc import Iterator

from align.data.chat import SYSTEM_PROMPTS, chat_rows
from align.data.code import code_rows
from align.data.common import check_split, rng_for
from align.data.preference import helpful_pair_rows
from align.data.reasoning import LEVELS, reasoning_rows
from align.data.safety import safety_rows

DEFAULT_WEIGHTS = {"chat": 0.35, "reasoning": 0.35, "code": 0.15, "safety": 0.15}


def _turns(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


# How a bare (`direct`) demonstration states its answer: GSM8K's '#### n' (the worked solutions' own last
# line) or 'Answer: n' (a marker of its own; the math reward reads both).
BARE_FORMATS = {"hash": "#### {}", "answer": "Answer: {}"}


def reasoning_sft_rows(
    split: str = "train", n: int = 1000, seed: int = 0, levels: tuple[int, ...] | list[int] = LEVELS,
    direct: int = 0, bare: str = "hash",
) -> list[dict]:
    """Reasoning problems answered with their worked solution (`... #### <answer>`), except `direct`
    percent of them (chosen by a seeded draw), answered with the bare `#### <answer>`: demonstrations of
    mixed quality, as real SFT data has. Without the steps a small model mostly gets multi-digit sums
    wrong, so the SFT model answers part of the prompts in the style that fails, and rule-reward RL has
    a style to move away from (RL amplifies the behaviour in its SFT data that earns reward)."""
    if not 0 <= direct <= 100:
        raise ValueError(f"direct must be a percentage in [0, 100], got {direct}")
    if bare not in BARE_FORMATS:
        raise ValueError(f"bare must be one of {sorted(BARE_FORMATS)}, got {bare!r}")
    rng = rng_for("reasoning_sft_direct", split, seed)
    rows = []
    for r in reasoning_rows(split, n, seed, levels):
        answer = BARE_FORMATS[bare].format(r["answer"]) if rng.random() * 100 < direct else r["solution"]
        rows.append({"messages": _turns(r["prompt"], answer), "source": "reasoning"})
    return rows


def code_sft_rows(split: str = "train", n: int = 200, seed: int = 0) -> list[dict]:
    """Coding tasks answered with the reference solution in a ```python block."""
    return [{"messages": _turns(r["prompt"], f"```python\n{r['solution']}```"), "source": "code"}
            for r in code_rows(split, n, seed)]


def safety_sft_rows(split: str = "train", n: int = 1000, seed: int = 0) -> list[dict]:
    """Harmful requests answered with a refusal, benign look-alikes answered helpfully."""
    return [{"messages": _turns(r["prompt"], r["chosen"]), "source": "safety"} for r in safety_rows(split, n, seed)]


def chat_sft_rows(split: str = "train", n: int = 1000, seed: int = 0) -> list[dict]:
    return [{"messages": r["messages"], "source": "chat"} for r in chat_rows(split, n, seed)]


_SOURCES = {"chat": chat_sft_rows, "reasoning": reasoning_sft_rows, "code": code_sft_rows, "safety": safety_sft_rows}


def sft_mixture_rows(
    split: str = "train", n: int = 2000, seed: int = 0, weights: dict[str, float] | None = None
) -> list[dict]:
    """About `n` conversations mixed by `weights` (shuffled deterministically)."""
    check_split(split)
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("SFT mixture weights must sum to a positive number")
    rows: list[dict] = []
    for name, w in sorted(weights.items()):
        if name not in _SOURCES:
            raise ValueError(f"unknown SFT mixture source {name!r}; known: {sorted(_SOURCES)}")
        if round(n * w / total) > 0:
            rows += _SOURCES[name](split, round(n * w / total), seed)
    rng = rng_for("sft_mixture", split, seed)
    rng.shuffle(rows)
    return rows


def tokenizer_corpus(seed: int = 0, n_per_source: int = 2000) -> Iterator[str]:
    """Texts covering everything the bundled data can say, to train the tokenizer on (train split only)."""
    yield from SYSTEM_PROMPTS
    for row in sft_mixture_rows("train", 4 * n_per_source, seed, {k: 1.0 for k in DEFAULT_WEIGHTS}):
        for m in row["messages"]:
            yield m["content"]
    for row in helpful_pair_rows("train", n_per_source, seed) + safety_rows("train", n_per_source, seed):
        yield row["rejected"]
    rng = random.Random(seed)
    yield " ".join(str(rng.randint(0, 999)) for _ in range(200))  # plain numbers, in case data lacks some
