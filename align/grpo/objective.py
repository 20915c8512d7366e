"""GRPO's objective (DeepSeekMath §4.1), read as the paper writes it, with the options of later work.

    J(θ) = E[ 1/G Σ_i 1/|o_i| Σ_t { w_{i,t} min( r_{i,t} Â_{i,t}, clip(r_{i,t}, 1-ε_low, 1+ε_high) Â_{i,t} )
                                    - β D_KL[π_θ || π_ref] } ]
    r_{i,t} = π_θ(o_{i,t} | q, o_{i,<t}) / π_θold(o_{i,t} | q, o_{i,<t})
    D_KL    = π_ref/π_θ - log(π_ref/π_θ) - 1            (the unbiased, non-negative k3 estimator)
    Â_{i,t} = (r_i - mean(r)) / (std(r) + eps)          (outcome supervision: the same for every t)
    w_{i,t} = 1                                         (no rollout/trainer mismatch correction)

The loss is -J. Options (defaults reproduce the formula above exactly):

- clip-higher (DAPO): ε_high > ε_low.
- `agg`: token-level aggregation (DAPO) and Dr. GRPO's constant length normaliser; Dr. GRPO's
  unscaled advantages are `group_advantages(scale="none")`.
- `ratio_level="sequence"` (GSPO, Zheng et al. 2025): one length-normalised ratio per sequence,

      s_i = exp( 1/|o_i| Σ_t (log π_θ(o_{i,t}) - log π_θold(o_{i,t})) )       (masked tokens only)

  and every token of sequence i gets min(s_i Â_i, clip(s_i, 1-ε_low, 1+ε_high) Â_i); GSPO's clip range
  is tiny (ε_low = 3e-4, ε_high = 4e-4) because s_i is a geometric mean.
- `is_correction` (rollout/trainer mismatch; Yao et al. 2025 "off-policy RL with vLLM", Liu et al. 2025):
  the sampler π_behavior (vLLM, bf16) is not the trainer's π_θold. With
      ρ_{i,t} = π_θold(o_{i,t}) / π_behavior(o_{i,t}) = exp(old_logp - behavior_logp),   C = is_cap:
      "tis"     (truncated IS, token):   w_{i,t} = min(ρ_{i,t}, C)
      "mis"     (masked IS, token):      w_{i,t} = 1[1/C <= ρ_{i,t} <= C]
      "seq-tis" (truncated IS, sequence): w_{i,t} = min(Π_t ρ_{i,t}, C) = min(exp(Σ_t log ρ_{i,t}), C)
      "seq-mis" (masked IS, sequence):   w_{i,t} = 1[1/C <= exp(Σ_t log ρ_{i,t}) <= C]
      "geo-mis" (geometric-mean mask):   w_{i,t} = 1[1/C <= exp(1/|o_i| Σ_t log ρ_{i,t}) <= C]
  (sums and means over the sequence's masked tokens; geo-mis does not saturate on long completions as
  the product does). w is a constant (no gradient), multiplies whichever surrogate `ratio_level` gives
  (so it composes with GSPO) and never multiplies the KL term.
- `kl_estimator` (Schulman's k1/k2/k3, x = log π_θ - log π_ref, samples o ~ π_θ): as a loss term
      "k1" = x                      its gradient ∇x = ∇log π_θ has zero expectation: it does NOT pull
                                    π_θ towards π_ref (the value estimates KL, the gradient is noise);
      "k2" = x² / 2                 gradient x ∇log π_θ, whose expectation is ∇ KL(π_θ || π_ref) (reverse KL);
      "k3" = e^{-x} + x - 1         gradient (1 - π_ref/π_θ) ∇log π_θ, whose expectation is
                                    ∇ KL(π_ref || π_θ) (the forward KL), as DeepSeekMath uses it.
"""
from __future__ import annotations

from typing import Literal

import torch

Scale = Literal["group", "batch", "none"]
Agg = Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]
RatioLevel = Literal["token", "sequence"]
ISCorrection = Literal["none", "tis", "mis", "seq-tis", "seq-mis", "geo-mis"]
KLEstimator = Literal["k1", "k2", "k3"]

GSPO_CLIP = (3e-4, 4e-4)          # GSPO's (ε_low, ε_high)


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


def kl_term(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-token KL estimate with x = log π - log π_ref: k1 = x, k2 = x²/2, k3 = e^{-x} + x - 1 (see module doc)."""
    x = logp - ref_logp
    if estimator == "k1":
        return x
    if estimator == "k2":
        return 0.5 * x * x
    if estimator == "k3":
        return k3_kl(logp, ref_logp)
    raise ValueError(f"unknown kl_estimator {estimator!r}")


def seq_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1/|o_i| Σ_t x_{i,t} over the masked tokens of each row: [B, T] -> [B]."""
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def sequence_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's s_i = exp(1/|o_i| Σ_t (logp - old_logp)), broadcast to every token: [B, T]."""
    return torch.exp(seq_mean(logp - old_logp, mask))[:, None].expand_as(logp)


def importance_weights(old_logp: torch.Tensor, behavior_logp: torch.Tensor, mask: torch.Tensor,
                       correction: ISCorrection, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [B, T], corrected [B, T] bool) for ρ = exp(old_logp - behavior_logp); see the module docstring.
    `corrected` marks tokens whose weight was truncated (tis) or masked to 0 (mis); no gradient flows."""
    with torch.no_grad():
        log_rho = (old_logp - behavior_logp).float() * mask
        inside = lambda v: (v >= 1 / cap) & (v <= cap)  # noqa: E731
        if correction == "tis":
            rho = torch.exp(log_rho)
            return rho.clamp(max=cap), rho > cap
        if correction == "mis":
            keep = inside(torch.exp(log_rho))
            return keep.float(), ~keep
        per_seq = {"seq-tis": log_rho.sum(-1), "seq-mis": log_rho.sum(-1), "geo-mis": seq_mean(log_rho, mask)}
        if correction not in per_seq:
            raise ValueError(f"unknown is_correction {correction!r}")
        rho_seq = torch.exp(per_seq[correction])[:, None].expand_as(log_rho)
        if correction == "seq-tis":
            return rho_seq.clamp(max=cap), rho_seq > cap
        keep = inside(rho_seq)
        return keep.float(), ~keep


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
                num_seqs: float | None = None, num_tokens: float | None = None, *,
                ratio_level: RatioLevel = "token", behavior_logp: torch.Tensor | None = None,
                is_correction: ISCorrection = "none", is_cap: float = 2.0,
                kl_estimator: KLEstimator = "k3") -> tuple[torch.Tensor, dict]:
    """-J(θ) for per-token log-probs [B, T] of the sampled tokens; advantages [B] or [B, T]; mask [B, T].

    behavior_logp [B, T]: the rollout engine's log-probs of the same tokens (needed unless
    is_correction="none"). Returns (loss, metrics)."""
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    if ratio_level == "token":
        ratio = torch.exp(logp - old_logp)
    elif ratio_level == "sequence":
        ratio = sequence_ratio(logp, old_logp, mask)
    else:
        raise ValueError(f"unknown ratio_level {ratio_level!r}")
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    surrogate = torch.minimum(unclipped, clipped)
    weights = corrected = None
    if is_correction != "none":
        if behavior_logp is None:
            raise ValueError(f"is_correction={is_correction!r} needs behavior_logp (the rollout's log-probs)")
        weights, corrected = importance_weights(old_logp, behavior_logp, mask, is_correction, is_cap)
        surrogate = weights * surrogate
    per_token = -surrogate
    kl = None
    if beta != 0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs reference log-probs")
        kl = kl_term(logp, ref_logp, kl_estimator)
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
        if weights is not None:
            metrics["is/weight_mean"] = float(weights[m].mean()) if m.any() else 1.0
            metrics["is/corrected_share"] = float(corrected[m].float().mean()) if m.any() else 0.0
    return loss, metrics
