"""CPU weight sync (any placement): buckets travel as numpy uint8 through Ray's object store.

The sending training rank is a Ray streaming generator yielding meta then bytes per bucket; the driver
hands each bucket's object ref to every rollout engine (one copy in the store, read by all) and
waits for each load with the refit timeout.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from .base import BucketMeta, pack_buckets, to_wire


def send(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, dtype: torch.dtype | None,
         with_checksum: bool) -> Iterator[BucketMeta | np.ndarray]:
    """meta, bytes, meta, bytes, ...: two stream items per bucket, so the driver fetches only the meta."""
    for meta, buf in pack_buckets(named, bucket_bytes, dtype, with_checksum, device="cpu"):
        yield meta
        yield to_wire(buf)


def receive(meta: BucketMeta, payload: np.ndarray) -> np.ndarray:
    return payload
