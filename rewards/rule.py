"""Rule rewards: math answer correctness, exact match, output format, length penalty.

All follow the reward protocol (see rewards/registry.py) and are registered by name.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Sequence
from typing import Any, Literal

from rewards.combine import SampleScores, own_timeouts
from rewards.proc_pool import ProcessPool, TaskTimeout
from rewards.registry import register

_GSM8K = re.compile(r"####\s*([^\n]+)")
_ANSWER = re.compile(r"answer(?:\s+is)?\s*[:=]\s*([^\n]+)", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def final_answer(text: str) -> str:
    """Where a solution states its answer: the last \\boxed{..}, else GSM8K's '#### x', else the
    last 'answer: x' line; else the whole text (math-verify then takes its last expression)."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (_GSM8K, _ANSWER):
        hits = pattern.findall(text)
        if hits:
            return hits[-1].strip().rstrip(".").strip()
    return text


_pools: dict[int, ProcessPool] = {}
_pools_lock = threading.Lock()


def math_pool(workers: int) -> ProcessPool:
    """The process-wide pool of math-verify workers (spawned on first use, kept warm)."""
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ProcessPool(workers, preload=("rewards.rule", "math_verify"))
        return _pools[workers]


@register("math_accuracy")
@own_timeouts
def math_accuracy(prompts: list[str], completions: list[str], answer: list[Any], timeout_s: float = 5.0,
                  workers: int = 2, **_: Any) -> SampleScores:
    """1.0 if the completion's final answer is mathematically equal to the gold `answer` column
    (\\boxed{}, '#### 42' or 'answer: 42'; 1/2 == 0.5 == \\frac{1}{2}), else 0.0.

    Each sample is parsed and verified in a worker process (rewards/proc_pool.py) that is killed
    when it runs past `timeout_s` (sympy can hang on inputs like 10^{10^{10}}): such a sample
    scores 0 and is reported as a timeout. A gold answer that cannot be parsed is a data error."""
    got = math_pool(workers).map("rewards.rule:score_math", [(c, str(g)) for c, g in zip(completions, answer,
                                                                                        strict=True)], timeout_s)
    scores, timed_out = [], []
    for i, r in enumerate(got):
        if isinstance(r, ValueError):
            raise ValueError(f"sample {i}: {r}")
        if isinstance(r, Exception):
            if not isinstance(r, TaskTimeout):
                raise r
            timed_out.append(i)
            r = 0.0
        scores.append(r)
    return SampleScores(scores, timed_out=timed_out)


def score_math(completion: str, gold: str) -> float:
    """One sample, in a math worker: no math-verify timeout of its own, the pool kills overruns."""
    import logging  # noqa: PLC0415

    from math_verify import parse, verify  # noqa: PLC0415  (sympy: only in the workers)

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled" warnings
    gold_parsed = _parse_math(parse, final_answer(gold))
    if not gold_parsed:
        raise ValueError(f"cannot parse the gold answer {gold[:80]!r}")
    pred = _parse_math(parse, final_answer(completion))
    return float(bool(pred) and verify(gold_parsed, pred, timeout_seconds=None))


def _parse_math(parse, snippet: str) -> list:
    # Re-box the snippet so LaTeX answers get math-verify's boxed handling; plain text parses too.
    parsed = parse(f"\\boxed{{{snippet}}}", parsing_timeout=None)
    return parsed or parse(snippet, parsing_timeout=None)


def _normalize(text: str) -> str:
    return " ".join(text.split()).casefold().rstrip(".")


@register("exact_match")
def exact_match(prompts: list[str], completions: list[str], answer: list[Any], normalize: bool = True,
                extract: bool = True, **_: Any) -> list[float]:
    """1.0 if the (extracted, see final_answer) completion equals the `answer` column.
    normalize: collapse whitespace, ignore case and a trailing period."""
    scores = []
    for completion, gold in zip(completions, answer, strict=True):
        pred, gold = (final_answer(completion) if extract else completion), str(gold)
        if normalize:
            pred, gold = _normalize(pred), _normalize(gold)
        scores.append(float(pred == gold))
    return scores


@functools.lru_cache(maxsize=32)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.DOTALL)


def tagged_pattern(tags: Sequence[str]) -> str:
    """Regex for `<t1>...</t1> <t2>...</t2>` in order, nothing around, each section tag-free."""
    parts = []
    for tag in tags:
        t = re.escape(tag)
        parts.append(f"<{t}>(?:(?!</?{t}>).)*</{t}>")
    return r"\s*" + r"\s*".join(parts) + r"\s*"


@register("format")
def format_reward(prompts: list[str], completions: list[str], pattern: str | None = None,
                  tags: Sequence[str] = ("think", "answer"), **_: Any) -> list[float]:
    """1.0 if the whole completion matches `pattern` (re.fullmatch, DOTALL), or, without a
    pattern, consists of exactly the `tags` sections in order; else 0.0."""
    regex = _compiled(pattern if pattern is not None else tagged_pattern(tuple(tags)))
    return [float(regex.fullmatch(c) is not None) for c in completions]


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer  # noqa: PLC0415  (heavy; only for unit="tokens")

    return AutoTokenizer.from_pretrained(path)


@register("length_penalty")
def length_penalty(prompts: list[str], completions: list[str], target: int = 512,
                   unit: Literal["chars", "tokens"] = "chars", per_unit: float | None = None,
                   max_penalty: float = 1.0, tokenizer: Any = None, **_: Any) -> list[float]:
    """0 up to `target` length, then -per_unit for every char/token beyond it, floored at
    -max_penalty. per_unit defaults to 1/target (twice the target costs 1.0). unit="tokens"
    needs `tokenizer`: a local tokenizer path or an object with .encode()."""
    if target <= 0:
        raise ValueError(f"length_penalty: target must be > 0, got {target}")
    if unit not in ("chars", "tokens"):
        raise ValueError(f"length_penalty: unit must be 'chars' or 'tokens', got {unit!r}")
    slope = per_unit if per_unit is not None else 1.0 / target
    if unit == "tokens":
        if tokenizer is None:
            raise ValueError("length_penalty: unit='tokens' needs a tokenizer (path or object)")
        tok = _load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        lengths = [len(tok.encode(c, add_special_tokens=False)) for c in completions]
    else:
        lengths = [len(c) for c in completions]
    return [0.0 - min(max_penalty, slope * max(0, n - target)) for n in lengths]


@register("reasoning")
@own_timeouts
def reasoning_reward(prompts: list[str], completions: list[str], answer: list[Any] | None = None,
                     tests: list[Any] | None = None, entry_point: list[Any] | None = None, **_: Any) -> SampleScores:
    """Stage 1's rule reward over a math + code mixture: each row is scored by the check its columns
    call for (math-verify against `answer`, or the sandboxed unit `tests`). Both bound each
    sample's time themselves; their timeouts are this reward's failures."""
    from rewards.code_reward import code_reward

    n = len(completions)
    answer = answer if answer is not None else [None] * n
    tests = tests if tests is not None else [None] * n
    entry_point = entry_point if entry_point is not None else [None] * n
    scores, timed_out = [0.0] * n, []
    math_rows = [i for i in range(n) if answer[i] not in (None, "")]
    code_rows = [i for i in range(n) if tests[i] not in (None, "") and i not in set(math_rows)]
    if math_rows:
        got = math_accuracy([prompts[i] for i in math_rows], [completions[i] for i in math_rows],
                            answer=[answer[i] for i in math_rows])
        for k, (i, s) in enumerate(zip(math_rows, got)):
            scores[i] = s
            timed_out += [i] if k in got.timed_out else []
    if code_rows:
        got = code_reward([prompts[i] for i in code_rows], [completions[i] for i in code_rows],
                          tests=[tests[i] for i in code_rows], entry_point=[entry_point[i] for i in code_rows])
        for k, (i, s) in enumerate(zip(code_rows, got)):
            scores[i] = s
            timed_out += [i] if k in got.timed_out else []
    return SampleScores(scores, timed_out=timed_out)
