"""The rollout and reward phases of a step, with DAPO's dynamic sampling (Yu et al. 2025) and refill.

A group whose G rewards all tie has zero advantage everywhere: it adds no gradient, only shrinks the
effective batch. With dynamic_sampling on, such groups are dropped and more prompts are sampled until
`prompts_per_step` groups with differing rewards are in hand, for at most
`dynamic_sampling_max_rounds` rounds; the surplus of the last round is discarded. A refill round
asks for the deficit divided by the keep rate seen so far (at most 2 x prompts_per_step prompts).

Within a round (generate_and_score), each rollout engine's groups are raw-scored as soon as that engine
finishes, while the others still generate; the running reward normalisers are then updated once, in
prompt order, so the result does not depend on which engine finished first.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from align.grpo.prompts import encode_prompts, reward_inputs
from align.grpo.reward_hosting import check_failures, merge_scores
from engine.sampling import Rollout
from rewards.raw_scores import RawScores

ROUND_SEED_STRIDE = 7919


@dataclass
class Groups:
    rows: list[dict]                 # prompt rows of every round; rollout.prompt_index indexes them
    rollouts: list[Rollout]          # every sampled completion, groups consecutive
    totals: list[float]              # combined reward per completion
    raw: dict[str, list[float]]      # per reward component
    reward_metrics: dict[str, float]
    kept: list[int]                  # group indices trained on (at most prompts_per_step)
    tied: list[bool]                 # per sampled group: all G rewards equal
    rounds: int
    seconds: dict[str, float] = field(default_factory=dict)   # rollout (to the last engine), reward (the rest)

    def kept_rollouts(self, group_size: int) -> list[Rollout]:
        return [self.rollouts[g * group_size + j] for g in self.kept for j in range(group_size)]

    def kept_totals(self, group_size: int) -> list[float]:
        return [self.totals[g * group_size + j] for g in self.kept for j in range(group_size)]


class _ScoringLoop:
    """An event loop in a daemon thread: raw scoring of one engine's share runs there while the driver
    thread keeps waiting on the other engines (several shares score concurrently, like components do)."""

    def __enter__(self) -> _ScoringLoop:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpo-reward-scoring", daemon=True)
        self.thread.start()
        return self

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def __exit__(self, *exc) -> None:
        def stop() -> None:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.stop()

        self.loop.call_soon_threadsafe(stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


def generate_and_score(engine, prompt_ids: list[list[int]], rows: list[dict], sampling, rewards
                       ) -> tuple[list[Rollout], object, float]:
    """(rollouts in prompt order, their RewardOutput, the time generation ended). Each engine's share of the
    groups (engine.generate_stream) is raw-scored (rewards.araw: no normaliser touched) as soon as it arrives;
    once all are in, the raw scores are put in prompt order and combined (rewards.combine: the running
    normalisers updated in prompt order), so the result equals one batch call whatever the arrival order.
    With offload on, scoring waits for the rollout to end (a hosted reward model would take the GPU back)."""
    stream = getattr(engine, "generate_stream", None)
    shards = stream(prompt_ids, sampling) if stream is not None else \
        [(list(range(len(prompt_ids))), sorted(engine.generate(prompt_ids, sampling), key=lambda r: r.prompt_index))]
    overlap = not getattr(engine, "offloads", None)
    parts: list[list[Rollout]] = []
    futures = []
    with _ScoringLoop() as scoring:
        def score(part: list[Rollout]):
            prompts, completions, columns = reward_inputs(rows, part)
            return scoring.submit(rewards.araw(prompts, completions, **columns))

        for _, part in shards:                               # part: sorted by (global) prompt_index
            parts.append(part)
            if overlap:
                futures.append(score(part))
        t_generated = time.perf_counter()
        if not overlap:
            futures = [score(part) for part in parts]
        raws = [f.result() for f in futures]
    flat = [r for part in parts for r in part]
    order = sorted(range(len(flat)), key=lambda i: (flat[i].prompt_index, i))   # stable within a group
    scored = rewards.combine(RawScores.concat(raws).take(order))
    return [flat[i] for i in order], scored, t_generated


def tied_groups(totals: list[float], group_size: int) -> list[bool]:
    groups = np.asarray(totals, dtype=np.float64).reshape(-1, group_size)
    return list(groups.max(1) - groups.min(1) < 1e-8)


def sample_groups(engine, tokenizer, cfg, stream, rewards, seed: int | None) -> Groups:
    """Sample and score groups of G completions until the step's batch is in hand (see module doc)."""
    G, want = cfg.group_size, cfg.prompts_per_step
    rows: list[dict] = []
    rollouts: list[Rollout] = []
    outputs, tied = [], []
    take, rounds = want, cfg.dynamic_sampling_max_rounds if cfg.dynamic_sampling else 1
    seconds = {"rollout": 0.0, "reward": 0.0}
    for rnd in range(rounds):
        t0 = time.perf_counter()
        new_rows = stream.take(take)
        sampling = cfg.sampling.model_copy(update={
            "n": G, "seed": None if seed is None else seed + rnd * ROUND_SEED_STRIDE})
        new, scored, t1 = generate_and_score(engine, encode_prompts(tokenizer, new_rows, cfg.system_prompt),
                                             new_rows, sampling, rewards)   # groups consecutive, prompt order
        check_failures(scored, cfg.max_reward_failure_share)
        seconds["rollout"] += t1 - t0
        seconds["reward"] += time.perf_counter() - t1
        outputs.append(scored)
        tied += tied_groups(scored.total, G)
        rollouts += [dataclasses.replace(r, prompt_index=r.prompt_index + len(rows)) for r in new]
        rows += new_rows
        n_kept = sum(not t for t in tied) if cfg.dynamic_sampling else len(tied)
        if n_kept >= want:
            break
        rate = max(n_kept / len(tied), 1 / want)
        take = min(math.ceil((want - n_kept) / rate), 2 * want)
    totals, raw, metrics = merge_scores(outputs)
    kept = [g for g, t in enumerate(tied) if not (cfg.dynamic_sampling and t)][:want]
    return Groups(rows, rollouts, totals, raw, metrics, kept, tied, rnd + 1, seconds)
