"""GRPO's objective (DeepSeekMath §4.1), read as the paper writes it.

    J(θ) = E[ 1/G Σ_i 1/|o_i| Σ_t { min( r_{i,t} Â_{i,t}, clip(r_{i,t}, 1-ε_low, 1+ε_high) Â_{i,t} )
                                    - β D_KL[π_θ || π_ref] } ]
    r_{i,t} = π_θ(o_{i,t} | q, o_{i,<t}) / π_θold(o_{i,t} | q, o_{i,<t})
    D_KL    = π_ref/π_θ - log(π_ref/π_θ) - 1            (the unbiased, non-negative k3 estimator)
    Â_{i,t} = (r_i - mean(r)) / (std(r) + eps)          (outcome supervision: the same for every t)

The loss is -J. Options from later work: clip-higher (DAPO: ε_high > ε_low), token-level
aggregation (DAPO) and Dr. GRPO's unscaled advantages and constant length normaliser.
"""
from __future__ import annotations

from typing import Literal

import torch

Scale = Literal["group", "batch", "none"]
Agg = Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]


def group_advantages(rewards: torch.Tensor, group_size: int, scale: Scale = "group", eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean_group) / (std_group + eps) for rewards [n_prompts * G], grouped consecutively.

    scale="batch" divides by the std of the whole batch instead; "none" (Dr. GRPO) only centres.
    """
    r = torch.as_tensor(rewards, dtype=torch.float32)
    if r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    groups = r.view(-1, group_size)
    centred = (groups - groups.mean(dim=1, keepdim=True)).view(-1)
    if scale == "group":
        return centred / (groups.std(dim=1, keepdim=True).expand_as(groups).reshape(-1) + eps)
    if scale == "batch":
        return centred / (r.std() + eps)
    if scale == "none":
        return centred
    raise ValueError(f"unknown advantage scale {scale!r}")


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token π_ref/π - log(π_ref/π) - 1 (>= 0, zero iff π = π_ref)."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: Agg, max_len: int | None = None,
              num_seqs: float | None = None, num_tokens: float | None = None) -> torch.Tensor:
    """Reduce [B, T] to a scalar. num_seqs / num_tokens override the batch's own counts so that
    micro-batches (or data-parallel ranks) of one global batch sum to the global aggregate."""
    mask = mask.to(per_token.dtype)
    if agg == "token-mean":
        return (per_token * mask).sum() / (num_tokens if num_tokens is not None else mask.sum().clamp(min=1))
    if agg == "seq-mean-token-mean":
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.sum() / (num_seqs if num_seqs is not None else per_token.shape[0])
    if agg == "seq-mean-token-sum-norm":
        per_seq = (per_token * mask).sum(-1) / (max_len or per_token.shape[1])
        return per_seq.sum() / (num_seqs if num_seqs is not None else per_token.shape[0])
    raise ValueError(f"unknown loss aggregation {agg!r}")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                advantages: torch.Tensor, mask: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2,
                beta: float = 0.04, agg: Agg = "seq-mean-token-mean", max_len: int | None = None,
                num_seqs: float | None = None, num_tokens: float | None = None) -> tuple[torch.Tensor, dict]:
    """-J(θ) for per-token log-probs [B, T] of the sampled tokens; advantages [B] or [B, T]; mask [B, T]."""
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    surrogate = torch.minimum(unclipped, clipped)
    per_token = -surrogate
    kl = None
    if beta != 0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs reference log-probs")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, agg, max_len, num_seqs, num_tokens)

    with torch.no_grad():
        m = mask.bool()
        clip_active = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
        metrics = {
            "pg_loss": float(aggregate(-surrogate, mask, agg, max_len)),
            "clip_frac": float(clip_active[m].float().mean()) if m.any() else 0.0,
            "ratio_mean": float(ratio[m].mean()) if m.any() else 1.0,
            "kl": float(kl[m].mean()) if kl is not None and m.any() else 0.0,
        }
    return loss, metrics
