"""Per-token log-probs and entropies from logits: model-forward utilities, no RL maths.

Both work in float32 (bf16 log-softmax is too coarse for importance ratios) over chunks of
tokens, so the float32 copy of a [tokens, vocab] slab never exceeds chunk_tokens rows. The
log-prob is logit[label] - logsumexp(logits): no full log-softmax tensor is materialised.
"""

from __future__ import annotations

import torch


def _chunks(n: int, chunk_tokens: int):
    for start in range(0, n, chunk_tokens):
        yield slice(start, min(start + chunk_tokens, n))


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 4096) -> torch.Tensor:
    """log p(labels[b, t] | logits[b, t]) as float32 [B, T]. labels must be valid ids (mask them yourself)."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"token_logprobs: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    flat = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1, 1).long()
    out = []
    for s in _chunks(flat.shape[0], chunk_tokens):
        z = flat[s].float()
        out.append(z.gather(-1, flat_labels[s]).squeeze(-1) - torch.logsumexp(z, dim=-1))
    return torch.cat(out).reshape(labels.shape) if out else flat.new_zeros(labels.shape, dtype=torch.float32)


def entropy(logits: torch.Tensor, chunk_tokens: int = 4096) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim as float32 [...]: logsumexp(z) - sum(p * z)."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = []
    for s in _chunks(flat.shape[0], chunk_tokens):
        z = flat[s].float()
        out.append(torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1))
    shape = logits.shape[:-1]
    return torch.cat(out).reshape(shape) if out else flat.new_zeros(shape, dtype=torch.float32)
