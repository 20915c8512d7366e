"""Helpful preference pairs: the correct answer is chosen over a worse one (helpful reward model).

Rows: {prompt, chosen, rejected, flaw}. The rejected answer is one of three flaws, in equal shares:
  wrong       — a plausible but incorrect answer to the same task,
  irrelevant  — a correct answer to a different task, or an evasive non-answer,
  truncated   — the correct answer cut off part-way.
`flaw` is kept so evaluation can report accuracy per flaw.

Split: by the underlying chat task (same keys as the chat data), so held-out pairs are unseen tasks.
"""

import random

from align.data.chat import chat_task
from align.data.common import Split, rng_for, sample_rows, split_of

EVASIVE = [
    "I am not sure what you mean.",
    "That is an interesting question. Let me know if you have others.",
    "Sorry, I would rather talk about something else.",
    "Words are fun, aren't they?",
]
FLAWS = ("wrong", "irrelevant", "truncated")


def _truncate(answer: str, r: random.Random) -> str:
    """Cut an answer to a strict, non-empty prefix, at a word boundary when there is one."""
    words = answer.split(" ")
    if len(words) > 1:
        return " ".join(words[: r.randint(1, len(words) - 1)])
    return answer[: max(1, len(answer) // 2)]


def _make(r: random.Random) -> tuple[Split, dict]:
    key, prompt, answer, wrong = chat_task(r)
    flaw = r.choice(FLAWS)
    if flaw == "wrong":
        rejected = wrong
    elif flaw == "irrelevant":
        if r.random() < 0.5:
            rejected = r.choice(EVASIVE)
        else:
            rejected = answer
            while rejected == answer:
                rejected = chat_task(r)[2]
    else:
        rejected = _truncate(answer, r)
    return split_of(key), {"prompt": prompt, "chosen": answer, "rejected": rejected, "flaw": flaw}


def helpful_pair_rows(split: str = "train", n: int = 1000, seed: int = 0) -> list[dict]:
    """`n` preference pairs {prompt, chosen, rejected, flaw}; chosen != rejected always."""
    return sample_rows(_make, split, n, rng_for("helpful_pairs", split, seed))
