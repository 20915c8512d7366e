"""Rewards in the loop: model-backed rewards hosted by the engine, and the per-step failure check."""
from __future__ import annotations

import functools

import numpy as np

from rewards.combine import RewardComponent, RewardOutput


def host_model_rewards(engine, components: list[RewardComponent]) -> list[RewardComponent]:
    """Model-backed rewards (classes with offload hooks, e.g. reward_model) move into their own engine
    actor, resident only during the reward phase; the component then calls that actor."""
    from rewards.registry import register, resolve

    out = []
    for c in components:
        obj = resolve(c.spec)
        if isinstance(obj, type) and hasattr(obj, "offload"):
            handle = engine.add_scorer(c.label, functools.partial(obj, **c.kwargs))
            name = f"engine-scorer-{c.label}"
            register(name)(handle)
            c = c.model_copy(update={"spec": name, "kwargs": {}, "name": c.label})
        out.append(c)
    return out


def check_failures(scored: RewardOutput, max_share: float) -> None:
    """Stop the run (RewardError naming the component) when a component failed or timed out on more than
    max_share of the step's samples (rewards.combine.check_failure_share)."""
    from rewards.combine import check_failure_share

    check_failure_share(scored, max_share)


def merge_scores(outputs: list[RewardOutput]) -> tuple[list[float], dict[str, list[float]], dict[str, float]]:
    """Several scoring rounds (dynamic sampling) as one: (totals, raw per component, metrics). Moments are
    recomputed over all samples, counts (failures, timeouts) summed, running totals taken from the last."""
    totals = [t for o in outputs for t in o.total]
    raw = {k: [x for o in outputs for x in o.raw[k]] for k in outputs[0].raw}
    if len(outputs) == 1:
        return totals, raw, dict(outputs[0].metrics)
    metrics: dict[str, float] = {}
    for key in outputs[-1].metrics:
        values = [o.metrics[key] for o in outputs if key in o.metrics]
        metrics[key] = float(sum(values)) if key.endswith(("/failures", "/timeouts")) else float(values[-1])
    for label, xs in [*raw.items(), ("total", totals)]:
        mean = float(np.mean(xs))
        metrics[f"rewards/{label}/mean"], metrics[f"rewards/{label}/std"] = mean, float(np.std(xs))
    return totals, raw, metrics
