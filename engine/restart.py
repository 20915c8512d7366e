"""Replacing a rollout engine that died during generate (HybridEngine(..., restart_dead_engines=N)).

    restart_engine(eng, k)       # called by HybridEngine.generate_stream, which then retries engine k's share

A fresh actor is started in engine k's placement bundle (Ray frees a dead actor's resources), exactly as the
original was, and refit with the trainer's weights, but only when those are the weights the engines serve
(policy_version == rollout_version, checked under the lock train_step holds, so a train step running
concurrently, as in async GRPO, cannot slip newer weights in). The retried share is then sampled by the same
weights with the same per-completion seeds: the step's result is what it would have been without the death.

Refused with one EngineError line naming the engine: the trainer already ahead of the engines (async GRPO
trained while the engine was down), the NCCL transport (the dead engine is a member of the refit group),
offload on (the colocated memory phases would have to be replayed).
"""
from __future__ import annotations

import logging
from typing import Any

import ray

from .errors import EngineError

log = logging.getLogger(__name__)


def _refuse(eng: Any, k: int, why: str) -> None:
    eng._broken = f"rollout actor died during generate (rollout engine {k}) and cannot be restarted: {why}"
    raise EngineError(eng._broken)


def restart_engine(eng: Any, k: int) -> None:
    """Replace dead rollout engine k by a new actor serving the same weights (see the module doc)."""
    if eng.transport == "nccl":
        _refuse(eng, k, "its NCCL refit group cannot take a new member")
    if eng.offloads:
        _refuse(eng, k, "offload is on (the colocated memory phases would need replaying)")
    log.warning("rollout engine %d died during generate: restarting it and retrying its prompts", k)
    try:
        ray.kill(eng.rollouts[k], no_restart=True)
    except Exception:  # noqa: BLE001 - it is dead already
        pass
    actor = eng._new_rollout(k)
    info = eng._get(actor.ready.remote(), "rollout actor restart", eng.cluster_cfg.startup_timeout_s,
                    role=f"rollout engine {k}")
    eng.rollouts[k], eng.rollout_infos[k] = actor, info
    if k == 0:
        eng.rollout, eng.rollout_info = actor, info
    with eng._weights_lock:
        if eng.policy_version != eng.rollout_version:
            _refuse(eng, k, f"the trainer is at weight version {eng.policy_version}, the engines serve "
                            f"{eng.rollout_version} (a train step ran meanwhile)")
        eng._refit.sync(engines=[k])
