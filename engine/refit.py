"""Trainer -> rollout weight transfer (refit): checkpoint names, float32 buckets, timing.

transformers' DeepseekV2 keeps each layer's routed experts as two 3-D parameters
(experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]) while checkpoints and vLLM
name them per expert (experts.{e}.gate_proj.weight [I, H], .up_proj.weight [I, H],
.down_proj.weight [H, I]). hf_named_tensors() renames by slicing, so nothing is copied;
buckets() groups tensors into float32 numpy chunks of bounded size, the unit sent to a
rollout worker (numpy because Ray ships it zero-copy, unlike torch tensors).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from model.checkpoint import to_checkpoint_tensors

NamedArray = tuple[str, np.ndarray]


def hf_named_tensors(state_dict_or_module: nn.Module | Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (checkpoint name, tensor) with fused 3-D experts split per expert (views, no copies).

    The naming itself lives in model.checkpoint (the same code writes our safetensors files).
    """
    state = state_dict_or_module.state_dict() if isinstance(state_dict_or_module, nn.Module) else state_dict_or_module
    for name, t in to_checkpoint_tensors(state):
        yield name, t.detach()


def to_float32_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """Contiguous float32 numpy; a view (no copy) when t already is contiguous float32 on CPU."""
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t, dtype=np.float32)
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def buckets(named: Iterable[tuple[str, torch.Tensor | np.ndarray]], bucket_bytes: int) -> Iterator[list[NamedArray]]:
    """Group (name, tensor) pairs into lists of float32 numpy arrays of about bucket_bytes each.

    A tensor larger than bucket_bytes travels alone. The arrays may alias the trainer's
    parameters, so consume each bucket before the next optimizer step.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[NamedArray] = []
    size = 0
    for name, t in named:
        arr = to_float32_numpy(t)
        if bucket and size + arr.nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, arr))
        size += arr.nbytes
    if bucket:
        yield bucket


@dataclass
class RefitStats:
    """How long one refit took and how much it moved."""

    seconds: float
    bytes: int
    num_tensors: int
    num_buckets: int

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        return (
            f"refit {self.num_tensors} tensors in {self.num_buckets} buckets, "
            f"{self.bytes / 1e6:.1f} MB in {self.seconds * 1e3:.1f} ms ({self.mb_per_s:.0f} MB/s)"
        )

