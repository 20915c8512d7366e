"""Gradients of one training rank across ranks: the SUM all-reduce of replicated data parallel, and norm
clipping in each layout (replicated, fsdp2 shards, fsdp2 + expert-parallel shards on two meshes)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from . import expert_parallel, sharding


def all_reduce_(params: list[nn.Parameter], bucket_bytes: int = 32 << 20) -> None:
    """SUM every gradient over the ranks of the default process group, in flat buckets (the loss is already
    each rank's share of the global loss). The caller decides whether it is distributed."""
    bucket: list[torch.Tensor] = []
    size = 0
    for g in [p.grad for p in params] + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= bucket_bytes):
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


def clip_(params: list[nn.Parameter], max_norm: float | None, accelerator, sharded: bool, ep_size: int) -> float:
    """Scale gradients so their global L2 norm is at most max_norm (None = no clipping); returns the norm
    before clipping. Replicated: accelerate's clip; fsdp2: torch's over DTensor shards (the norm is global);
    with ep_size > 1 the expert and other shards live on different meshes (expert_parallel.clip_grad_norm_)."""
    limit = max_norm or float("inf")
    if not sharded:
        return float(accelerator.clip_grad_norm_(params, limit))
    if ep_size > 1:
        return expert_parallel.clip_grad_norm_(params, limit)
    return float(sharding.full_tensor(torch.nn.utils.clip_grad_norm_(params, limit)))
