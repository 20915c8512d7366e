"""The loss handed to the engine: GRPO's objective on the engine's Forward, plus mismatch metrics.

The engine runs it per micro-batch on the training actors (so it must be picklable) and knows no RL
maths. π_old: with mu = 1 the policy that sampled is the one being updated, so π_old = π_θ
(detached) exactly and needs no extra forward pass; with mu > 1 the batch carries `old_logp`,
computed in training mode so that the first inner step's ratio is exactly 1.

Mismatch (rollout engine vs trainer), whenever the batch carries the rollout's `behavior_logp`,
with t = log π_old (trainer) and b = log π_behavior (sampler) over the scored tokens:
    mismatch/logp_abs_diff  = mean |t - b|
    mismatch/k3             = mean exp(t - b) - (t - b) - 1     (k3 estimate of KL(π_behavior || π_trainer))
    mismatch/is_weight_mean = mean w (the IS weight in use; ρ = exp(t - b) itself when is_correction="none")
    mismatch/corrected_share = share of tokens whose weight was truncated or masked
All are exact token means over the global batch (Forward.token_mean_metric).

What the sampler's log-prob is: the log-prob after temperature (vLLM's processed_logprobs; the native
backend likewise), and the engine divides the trainer's logits by the same temperature, so on an exact
path (fp32 native) t = b to ~1e-6. Top-k / top-p truncation is not replayed by the trainer: b is under
the truncated, renormalised distribution, t under the full tempered softmax, so for every sampled token
t = b + log Z (Z <= 1: the probability mass the filter kept at that step), i.e. ρ_t = Z. The mismatch
metrics show it; "tis" weights such tokens by Z (down-weighting steps where the filter cut much mass),
"mis"/"geo-mis" drop tokens/sequences whose Z (or mean log Z) falls below 1/C. No weight can restore
the tokens the filter excluded (never sampled: π_behavior = 0), so with truncation the update is the
policy gradient over the kept support, reweighted towards the trainer's π_old.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from align.grpo.objective import importance_weights, policy_loss


@dataclass
class GRPOLoss:
    clip_low: float
    clip_high: float
    beta: float
    agg: str
    max_len: int
    balance_losses: bool
    ratio_level: str = "token"
    is_correction: str = "none"
    is_cap: float = 2.0
    kl_estimator: str = "k3"

    def __call__(self, fwd, mb: dict) -> tuple[torch.Tensor, dict]:
        fwd, mb = fwd.per_sequence(mb)          # packed micro-batch (train.micro_batch_tokens): one row per sequence
        ref = mb.get("ref_logp") if self.beta else None
        old = mb["old_logp"] if "old_logp" in mb else fwd.logp.detach()
        behavior = mb.get("behavior_logp")
        loss, metrics = policy_loss(fwd.logp, old, ref, mb["advantages"], fwd.mask,
                                    self.clip_low, self.clip_high, self.beta, self.agg, self.max_len,
                                    num_seqs=fwd.global_num_seqs, num_tokens=fwd.global_num_tokens,
                                    ratio_level=self.ratio_level, behavior_logp=behavior,
                                    is_correction=self.is_correction, is_cap=self.is_cap,
                                    kl_estimator=self.kl_estimator)
        if self.balance_losses:
            loss = loss + fwd.aux_loss * mb["advantages"].shape[0] / max(fwd.global_num_seqs, 1)
        with torch.no_grad():
            m = fwd.mask.bool()
            metrics["entropy"] = float(fwd.entropy[m].mean()) if m.any() else 0.0
            if behavior is not None:
                metrics.update(self.mismatch_metrics(fwd, old, behavior))
        return loss, metrics

    def mismatch_metrics(self, fwd, old: torch.Tensor, behavior: torch.Tensor) -> dict[str, float]:
        d = (old - behavior).float() * fwd.mask
        if self.is_correction == "none":
            weight, corrected = torch.exp(d), torch.zeros_like(d)
        else:
            weight, corrected = importance_weights(old, behavior, fwd.mask, self.is_correction, self.is_cap)
        return {"mismatch/logp_abs_diff": fwd.token_mean_metric(d.abs()),
                "mismatch/k3": fwd.token_mean_metric(torch.exp(d) - d - 1),
                "mismatch/is_weight_mean": fwd.token_mean_metric(weight),
                "mismatch/corrected_share": fwd.token_mean_metric(corrected.float())}
