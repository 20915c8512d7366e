"""User-style reward functions for tests/test_rewards_combine.py, resolved by dotted path."""

import asyncio
import time

CALLS: list[dict] = []


def keyword_overlap(prompts, completions, keywords, bonus=0.0, **columns):
    """Fraction of this sample's `keywords` column found in the completion, plus `bonus`."""
    CALLS.append({"prompts": list(prompts), "keywords": list(keywords), "columns": sorted(columns)})
    return [sum(k in c for k in ks) / len(ks) + bonus for c, ks in zip(completions, keywords)]


async def async_length(prompts, completions, **_):
    await asyncio.sleep(0)
    return [float(len(c)) for c in completions]


def explode_on_bad(prompts, completions, **_):
    """Raises (with a multi-line message) on any completion containing 'bad'."""
    for c in completions:
        if "bad" in c:
            raise ValueError("cannot score\nthis sample")
    return [1.0] * len(completions)


def hang_on_slow(prompts, completions, **_):
    """Sleeps (far past any test timeout) on a completion containing 'slow'."""
    if any("slow" in c for c in completions):
        time.sleep(3)
    return [1.0] * len(completions)


async def async_hang_on_slow(prompts, completions, **_):
    if any("slow" in c for c in completions):
        await asyncio.sleep(30)
    return [2.0] * len(completions)


def wrong_length(prompts, completions, **_):
    return [1.0] * (len(completions) + 1)


def none_for_empty(prompts, completions, **_):
    return [None if not c else 1.0 for c in completions]


class Scaled:
    """A class spec: RewardSet builds it once with the component kwargs."""

    def __init__(self, factor):
        self.factor = factor

    def __call__(self, prompts, completions, **_):
        return [self.factor * len(c) for c in completions]


NOT_CALLABLE = 42
