"""Per-token log-probs and entropies straight from final hidden states and the LM head, chunk by chunk.

Full logits [B, T, V] in float32 are the largest tensor of an RL step (V2: 102400 x 4 B per token).
Here each chunk of tokens computes its logits [chunk, V], turns them into log p(label) and entropy
in float32, and keeps only those two numbers per token: under autograd every chunk is
checkpointed, so its logits are recomputed in the backward instead of being stored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint


def _chunk_stats(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, inv_temperature: float):
    """h [n, D], weight [V, D], labels [n] -> (log p(labels) [n], entropy [n]), float32."""
    z = F.linear(h, weight).float() * inv_temperature                         # [n, V]
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, labels[:, None]).squeeze(-1) - lse
    ent = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return logp, ent


def chunked_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 4096,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, T, D] scoring labels [B, T] through the LM head weight [V, D] -> (logp, entropy) [B, T] float32.

    Logits are divided by temperature (when > 0). Gradients flow to hidden and weight through both
    outputs; each chunk's logits are recomputed in the backward (activation checkpointing)."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"chunked_logprobs: hidden {tuple(hidden.shape)} does not match labels {tuple(labels.shape)}")
    inv_t = 1.0 / temperature if temperature > 0 else 1.0
    flat_h = hidden.reshape(-1, hidden.shape[-1])                             # [N, D]
    flat_y = labels.reshape(-1).long()                                         # [N]
    logps, ents = [], []
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for start in range(0, flat_h.shape[0], chunk_tokens):
        s = slice(start, start + chunk_tokens)
        if grad:
            lp, en = torch.utils.checkpoint.checkpoint(_chunk_stats, flat_h[s], weight, flat_y[s], inv_t,
                                                       use_reentrant=False)
        else:
            lp, en = _chunk_stats(flat_h[s], weight, flat_y[s], inv_t)
        logps.append(lp)
        ents.append(en)
    if not logps:
        empty = hidden.new_zeros(labels.shape, dtype=torch.float32)
        return empty, empty.clone()
    return torch.cat(logps).view(labels.shape), torch.cat(ents).view(labels.shape)
