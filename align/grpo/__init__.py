"""GRPO: the objective's formulas and the RL loop on the hybrid engine, one idea per file.

    objective.py         the formulas (GRPO, DAPO, Dr. GRPO, GSPO, IS corrections, KL estimators)
    config.py            the recipe schema (GRPOConfig)
    loss.py              the loss handed to the engine (GRPOLoss) and the rollout/trainer mismatch metrics
    batch.py             rollouts -> trainer arrays (tokens, masks, behavior log-probs, routed experts)
    prompts.py           prompt loading, the resumable prompt stream, chat-template encoding
    dynamic_sampling.py  rollout + reward phases with DAPO's dynamic sampling and refill
    reward_hosting.py    model rewards hosted by the engine, failure-share check
    loop.py              one step and the stage (run_grpo)
    checkpoint.py        save / resume
    metrics.py           metrics.jsonl (+ TensorBoard, W&B) and samples.jsonl

`from align.grpo import group_advantages, policy_loss` needs only torch; the loop's names load lazily.
"""
from __future__ import annotations

from align.grpo.objective import aggregate, group_advantages, k3_kl, kl_term, policy_loss

_LAZY = {"GRPOConfig": "align.grpo.config", "HeldOutConfig": "align.grpo.config", "GRPOLoss": "align.grpo.loss",
         "build_batch": "align.grpo.batch", "run_grpo": "align.grpo.loop", "grpo_step": "align.grpo.loop",
         "host_model_rewards": "align.grpo.reward_hosting"}

__all__ = ["aggregate", "group_advantages", "k3_kl", "kl_term", "policy_loss", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'align.grpo' has no attribute {name!r}")
