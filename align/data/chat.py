"""Templated instruction-following conversations with answers computed exactly (helpful chat SFT).

Rows: {messages: [{role, content}, ...]} — an optional system turn, one user turn, one assistant turn.
Tasks: reverse / sort / capitalise / upper-case words, count letters or words, pick the last word,
join items with commas, repeat a word. `chat_task` also returns a plausible wrong answer, which the
helpful preference pairs use as a "rejected" response.

Split: by (task, the words involved).
"""

import random

from align.data.common import Split, rng_for, sample_rows, split_of

WORDS = (
    "apple river cloud stone tiger maple piano orange lemon garden window rocket silver forest candle "
    "planet yellow bridge summer winter ocean pepper violin castle dragon marble rabbit sunset basket "
    "mirror engine island jacket ladder meadow needle pillow quartz saddle tunnel velvet wagon zebra"
).split()
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a concise, accurate assistant."]


def _words(r: random.Random, lo: int = 2, hi: int = 5) -> list[str]:
    return r.sample(WORDS, r.randint(lo, hi))


def _count_phrase(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def chat_task(r: random.Random) -> tuple[str, str, str, str]:
    """One task: (key, user prompt, correct answer, a plausible wrong answer)."""
    kind = r.choice(["reverse", "sort", "upper", "capitalise", "count_letter", "count_words", "last", "join", "repeat"])
    ws = _words(r)
    text = " ".join(ws)
    if kind == "reverse":
        rev = list(reversed(ws))
        wrong = ws if ws != rev else ws[1:] + ws[:1]
        return f"reverse:{text}", f"Reverse the order of these words: {text}", " ".join(rev), " ".join(wrong)
    if kind == "sort":
        s = sorted(ws)
        wrong = sorted(ws, reverse=True)
        return f"sort:{text}", f"Sort these words alphabetically: {text}", " ".join(s), " ".join(wrong)
    if kind == "upper":
        return f"upper:{text}", f"Write this in capital letters: {text}", text.upper(), text
    if kind == "capitalise":
        return f"cap:{text}", f"Capitalise every word: {text}", " ".join(w.capitalize() for w in ws), text
    if kind == "count_letter":
        w = ws[0]
        c = r.choice(sorted(set(w)))
        n = w.count(c)
        ans = f"The letter '{c}' appears {_count_phrase(n, 'time')} in '{w}'."
        bad = f"The letter '{c}' appears {_count_phrase(n + r.choice([1, 2]), 'time')} in '{w}'."
        return f"letter:{w}:{c}", f"How many times does the letter '{c}' appear in '{w}'?", ans, bad
    if kind == "count_words":
        n = len(ws)
        ans = f"There are {_count_phrase(n, 'word')}."
        bad = f"There are {_count_phrase(n + r.choice([-1, 1]), 'word')}."
        return f"nwords:{text}", f"How many words are in this list: {text}?", ans, bad
    if kind == "last":
        ans = f"The last word is '{ws[-1]}'."
        return f"last:{text}", f"What is the last word in: {text}?", ans, f"The last word is '{ws[0]}'."
    if kind == "join":
        return f"join:{text}", f"List these items separated by commas: {text}", ", ".join(ws), text
    w, n = ws[0], r.randint(2, 5)
    return (
        f"repeat:{w}:{n}",
        f"Repeat the word '{w}' {n} times, separated by spaces.",
        " ".join([w] * n),
        " ".join([w] * (n + 1)),
    )


def _make(r: random.Random) -> tuple[Split, dict]:
    key, prompt, answer, _ = chat_task(r)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    if r.random() < 0.3:
        messages.insert(0, {"role": "system", "content": r.choice(SYSTEM_PROMPTS)})
    return split_of(key), {"messages": messages, "prompt": prompt}


def chat_rows(split: str = "train", n: int = 1000, seed: int = 0) -> list[dict]:
    """`n` single-turn conversations {messages}."""
    rows = sample_rows(_make, split, n, rng_for("chat", split, seed))
    return [{"messages": row["messages"]} for row in rows]
