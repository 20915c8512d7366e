"""GPU weight sync, colocated: CUDA IPC handles per bucket, training rank -> the engine on the same GPU.

The sender packs each bucket into a flat uint8 CUDA buffer and ships only its IPC handle
(torch.multiprocessing.reductions.reduce_tensor: the (rebuild function, args) pair torch itself
uses to share CUDA tensors between processes); the receiver maps the same device memory, checks
the bucket and copies the weights into its own parameters. The sender keeps the last `keep`
buffers alive (more than the buckets that can be in flight), and frees them all in release()
after the driver has seen every load finish. Both ends must be on the same physical GPU.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .base import BucketMeta, pack_buckets


class IpcSender:
    def __init__(self, keep: int = 6):
        self.alive: deque[torch.Tensor] = deque(maxlen=keep)

    def send(self, named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, dtype: torch.dtype | None,
             with_checksum: bool, device: torch.device) -> Iterator[BucketMeta | Any]:
        """meta, handle, meta, handle, ...: two stream items per bucket."""
        from torch.multiprocessing.reductions import reduce_tensor

        for meta, buf in pack_buckets(named, bucket_bytes, dtype, with_checksum, device=device):
            torch.cuda.current_stream(device).synchronize()     # the bytes are there before the handle leaves
            self.alive.append(buf)
            yield meta
            yield reduce_tensor(buf)

    def release(self) -> None:
        self.alive.clear()
        torch.cuda.empty_cache()


def receive(meta: BucketMeta, handle: Any) -> torch.Tensor:
    """The sender's bucket mapped into this process (same device memory; copy out before acking)."""
    rebuild, args = handle
    args = list(args)
    args[6] = torch.cuda.current_device()    # the device index as this process numbers it (same physical GPU)
    return rebuild(*args)
