"""The weight-sync wire format: checkpoint-named tensors packed into flat byte buckets in the served dtype.

A bucket is one flat uint8 buffer (numpy on CPU, a torch tensor on a GPU) plus its metadata:

    BucketMeta(index, entries=[(name, dtype, shape, offset, nbytes), ...], nbytes, checksum)

Every tensor is cast to the dtype the rollout engine serves before packing (bf16 stays bf16: 2 bytes
per weight on the wire, never an fp32 up-cast; numpy has no bf16, so the bytes travel as uint8 and
are viewed back as torch.bfloat16 on arrival). A tensor larger than the bucket size travels alone.
The optional checksum (CRC-32 of the bytes on CPU; a position-weighted sum on a GPU, computed the
same way on both ends) turns a silently corrupted bucket into a WeightSyncError.

Transports (object_store.py, cuda_ipc.py, nccl.py) only move (meta, buffer) pairs; packing and
unpacking live here so all of them agree on the format.
"""
from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WeightSyncError(RuntimeError):
    """A refit transfer failed (timeout, checksum mismatch, a peer died); the message is one line."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class BucketMeta:
    index: int
    entries: list[tuple[str, str, tuple[int, ...], int, int]] = field(default_factory=list)  # name, dtype, shape, off, n
    nbytes: int = 0
    checksum: int | None = None

    @property
    def names(self) -> list[str]:
        return [e[0] for e in self.entries]


def checksum(buf: torch.Tensor | np.ndarray) -> int:
    """CRC-32 of a CPU buffer; on a GPU sum(int32 word * (position mod 65521 + 1)) in int64, which catches
    flipped bits and swapped words without copying the bucket to the host."""
    if isinstance(buf, np.ndarray):
        return zlib.crc32(memoryview(np.ascontiguousarray(buf).view(np.uint8)))
    if buf.device.type == "cpu":
        return zlib.crc32(memoryview(buf.contiguous().numpy().view(np.uint8)))
    pad = (-buf.numel()) % 4
    words = torch.cat([buf, buf.new_zeros(pad)]).view(torch.int32).to(torch.int64) if pad else \
        buf.view(torch.int32).to(torch.int64)
    weights = torch.arange(words.numel(), device=buf.device, dtype=torch.int64) % 65521 + 1
    return int((words * weights).sum().item())


def verify(meta: BucketMeta, buf: torch.Tensor | np.ndarray, who: str) -> None:
    size = buf.nbytes if isinstance(buf, np.ndarray) else buf.numel() * buf.element_size()
    if size != meta.nbytes:
        raise WeightSyncError(f"refit bucket {meta.index} arrived at {who} with {size} bytes, expected {meta.nbytes}")
    if meta.checksum is not None and checksum(buf) != meta.checksum:
        raise WeightSyncError(f"refit bucket {meta.index} ({len(meta.entries)} tensors, first {meta.names[:1]}) "
                              f"failed its checksum at {who}: corrupted in transit")


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 tensor (a view when contiguous)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def pack_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, dtype: torch.dtype | None,
                 with_checksum: bool = False, device: str | torch.device = "cpu") -> Iterator[tuple[BucketMeta, torch.Tensor]]:
    """Yield (meta, flat uint8 buffer on `device`) buckets of about bucket_bytes; dtype None keeps each
    tensor's own dtype. Floating tensors are cast to dtype; integer buffers (if any) keep theirs."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    pending: list[tuple[str, torch.Tensor]] = []
    size, index = 0, 0

    def flush() -> tuple[BucketMeta, torch.Tensor]:
        meta = BucketMeta(index)
        buf = torch.empty(size, dtype=torch.uint8, device=device)
        off = 0
        for name, t in pending:
            raw = _raw_bytes(t)
            buf[off:off + raw.numel()].copy_(raw)
            meta.entries.append((name, dtype_name(t.dtype), tuple(t.shape), off, raw.numel()))
            off += raw.numel()
        meta.nbytes = off
        meta.checksum = checksum(buf) if with_checksum else None
        return meta, buf

    for name, t in named:
        t = t.detach()
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        n = t.numel() * t.element_size()
        if pending and size + n > bucket_bytes:
            yield flush()
            pending, size, index = [], 0, index + 1
        pending.append((name, t))
        size += n
    if pending:
        yield flush()


def unpack(meta: BucketMeta, buf: torch.Tensor | np.ndarray) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) views into buf, in the dtype and shape they were packed with (no copy)."""
    if isinstance(buf, np.ndarray):
        with warnings.catch_warnings():      # object-store arrays are read-only; the loaders only read them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            buf = torch.from_numpy(np.ascontiguousarray(buf).view(np.uint8))
    out = []
    for name, dt, shape, off, n in meta.entries:
        out.append((name, buf[off:off + n].view(DTYPES.get(dt) or getattr(torch, dt)).reshape(shape)))
    return out


def to_wire(buf: torch.Tensor) -> np.ndarray:
    """A CPU bucket as numpy uint8 (what Ray's object store ships zero-copy)."""
    return buf.cpu().numpy()
