"""Batch building: sampled rollouts -> the arrays the trainer scores (right-padded prompt + completion).

Every array has one row per completion. Shifted arrays ([B, T-1], position t scores input t+1) are
what the engine's Forward works in; behavior_logp is the rollout's log-prob of each sampled token
placed at its shifted position.
"""
from __future__ import annotations

import numpy as np

from engine.sampling import Rollout


def build_batch(rollouts: list[Rollout], advantages: np.ndarray, mask_truncated: bool, pad_id: int,
                replay: bool, temperature: float | None = None) -> dict[str, np.ndarray]:
    """input_ids, attention_mask, loss_mask (completion tokens, aligned with input_ids), advantages;
    behavior_logp [B, T-1] when every rollout has log-probs; routed_experts [B, n_moe_layers, T, k]
    (compact dtype, as the rollout sent it) when replay is on and every rollout has them; temperature
    (a scalar the engine divides logits by) when given."""
    T = max(len(r.prompt_token_ids) + len(r.token_ids) for r in rollouts)
    B = len(rollouts)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    attn = np.zeros((B, T), dtype=np.int64)
    loss_mask = np.zeros((B, T), dtype=np.float32)
    for i, r in enumerate(rollouts):
        p, c = len(r.prompt_token_ids), len(r.token_ids)
        ids[i, :p + c] = r.prompt_token_ids + r.token_ids
        attn[i, :p + c] = 1
        if not (mask_truncated and r.finish_reason == "length"):
            loss_mask[i, p:p + c] = 1
    batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask,
             "advantages": advantages.astype(np.float32)}
    if temperature is not None:
        batch["temperature"] = np.asarray(temperature, dtype=np.float32)
    if all(r.logprobs is not None for r in rollouts):
        behavior = np.zeros((B, T - 1), dtype=np.float32)
        for i, r in enumerate(rollouts):
            p = len(r.prompt_token_ids)
            behavior[i, p - 1:p - 1 + len(r.token_ids)] = r.logprobs
        batch["behavior_logp"] = behavior
    if replay and all(r.routed_experts is not None for r in rollouts):
        first = rollouts[0].routed_experts
        L, k = len(first), first[0].shape[-1]
        routed = np.zeros((B, L, T, k), dtype=first[0].dtype)
        for i, r in enumerate(rollouts):
            for layer, idx in enumerate(r.routed_experts):
                routed[i, layer, :idx.shape[0]] = idx
        batch["routed_experts"] = routed
    return batch


def without_replay(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch for a model that routes on its own (the reference, unless routing_replay_ref)."""
    return {k: v for k, v in batch.items() if k != "routed_experts"}


def expert_load_imbalance(rollouts: list[Rollout]) -> float:
    """Mean over MoE layers of max/mean expert load over the sampled tokens."""
    loads = [np.bincount(np.concatenate([r.routed_experts[layer].ravel().astype(np.int64) for r in rollouts]))
             for layer in range(len(rollouts[0].routed_experts))]
    return float(np.mean([ld.max() / max(ld.mean(), 1e-9) for ld in loads]))
