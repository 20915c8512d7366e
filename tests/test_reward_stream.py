"""Per-group reward scoring (RewardSet.araw, any order, concurrently) + the ordered combine step gives
bit-identical totals, per-component outputs, metrics and running-normaliser state to one batch call, with a
zscore-running component, a `where`-scoped one and a component that fails on some samples (fallback)."""
from __future__ import annotations

import asyncio
import random

from rewards.combine import RewardSet
from rewards.raw_scores import RawScores

G = 3
HERE = "tests.test_reward_stream"


def length(prompts, completions, **columns) -> list[float]:
    return [len(c) * 0.37 + 0.01 * len(p) for p, c in zip(prompts, completions)]


async def vowels(prompts, completions, **columns) -> list[float]:
    await asyncio.sleep(0)
    return [sum(ch in "aeiou" for ch in c) / (1 + len(c)) for c in completions]


def no_z(prompts, completions, **columns) -> list[float]:
    if any("z" in c for c in completions):
        raise ValueError("cannot score a completion with a z")
    return [1.0 + 0.1 * len(c) for c in completions]


COMPONENTS = [
    {"spec": f"{HERE}:length", "name": "len", "weight": 0.7, "normalize": "zscore-running"},
    {"spec": f"{HERE}:vowels", "name": "chat", "weight": 1.3, "normalize": "zscore-running",
     "where": {"data_source": ["chat"]}},
    {"spec": f"{HERE}:no_z", "name": "noz", "weight": 0.5, "fallback": -1.0},
]


def batch(seed: int, groups: int = 6):
    rng = random.Random(seed)
    prompts, completions, sources = [], [], []
    for g in range(groups):
        for _ in range(G):
            prompts.append(f"prompt {g} " + "x" * rng.randrange(5))
            completions.append("".join(rng.choice("abcdeiouz ") for _ in range(rng.randrange(1, 30))))
            sources.append("chat" if g % 3 else "math")
    return prompts, completions, {"data_source": sources}


async def per_group(rs: RewardSet, prompts, completions, columns, order: list[int]) -> list[RawScores]:
    """Raw scores of each group, started in `order`, concurrently; returned in prompt order."""
    def one(g: int):
        s = slice(g * G, (g + 1) * G)
        return rs.araw(prompts[s], completions[s], **{k: v[s] for k, v in columns.items()})

    done = await asyncio.gather(*(one(g) for g in order))
    by_group = dict(zip(order, done))
    return [by_group[g] for g in sorted(by_group)]


def test_per_group_scoring_in_any_order_equals_the_batch_call_bit_for_bit():
    whole, grouped = RewardSet(COMPONENTS), RewardSet(COMPONENTS)
    for step in range(3):                                    # the running normalisers carry over steps
        prompts, completions, columns = batch(step)
        want = whole.score(prompts, completions, **columns)
        order = list(range(len(prompts) // G))
        random.Random(step).shuffle(order)
        before = grouped.state_dict()
        parts = asyncio.run(per_group(grouped, prompts, completions, columns, order))
        assert grouped.state_dict() == before                # raw scoring touches no state
        got = grouped.combine(parts)
        assert got.total == want.total and got.raw == want.raw and got.scaled == want.scaled
        assert got.failures == want.failures and got.timeouts == want.timeouts and got.metrics == want.metrics
        assert grouped.state_dict() == whole.state_dict()
    assert want.failures["noz"] and any(x == 0.0 for x in want.raw["chat"])   # fallbacks and scoping exercised
    assert whole.stats["chat"].count < whole.stats["len"].count             # `where` kept math out of its stats


def test_shares_of_interleaved_groups_are_put_back_in_prompt_order():
    """What generate_stream hands out: each engine's prompts are interleaved (0, 2, 4 | 1, 3, 5)."""
    prompts, completions, columns = batch(7)
    whole, parts = RewardSet(COMPONENTS), RewardSet(COMPONENTS)
    want = whole.score(prompts, completions, **columns)
    shares = [[g for g in range(6) if g % 2 == k] for k in (1, 0)]      # engine 1 finished first
    raws, samples = [], []
    for share in shares:
        idx = [g * G + j for g in share for j in range(G)]
        raws.append(asyncio.run(parts.araw([prompts[i] for i in idx], [completions[i] for i in idx],
                                           data_source=[columns["data_source"][i] for i in idx])))
        samples += idx
    order = sorted(range(len(samples)), key=samples.__getitem__)
    got = parts.combine(RawScores.concat(raws).take(order))
    assert got.total == want.total and got.metrics == want.metrics and parts.state_dict() == whole.state_dict()
