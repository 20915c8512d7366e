"""GPU weight sync, split placement: NCCL broadcast from training rank 0 to every engine's workers.

A process group made for refit only (its own TCPStore rendezvous, so it is independent of the
trainer's and vLLM's default groups): rank 0 is training rank 0, ranks 1.. are the rollout
engines' workers (engine k's TP worker w is 1 + k * tp + w). Per bucket the sender's metadata goes
through the driver (Ray) and the bytes are broadcast in one flat uint8 buffer: the receivers
allocate it from the metadata, join the broadcast, check it and load it. Every collective has the
group's timeout; a receiver that never joins makes the sender's broadcast fail after it, and the
driver's own wait (also timed) names who did not answer.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from .base import BucketMeta, pack_buckets


class NcclGroup:
    """One member of the refit group (rank 0 sends, the others receive)."""

    def __init__(self, host: str, port: int, world_size: int, rank: int, device: torch.device,
                 timeout_s: float = 600.0):
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        timeout = timedelta(seconds=timeout_s)
        torch.cuda.set_device(self.device)
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        self.pg = dist.ProcessGroupNCCL(dist.PrefixStore("deepalign-refit", store), rank, world_size, opts)
        self.timeout = timeout

    def broadcast(self, buf: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        self.pg.broadcast([buf], opts).wait(self.timeout)

    def send(self, named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, dtype: torch.dtype | None,
             with_checksum: bool) -> Iterator[BucketMeta]:
        """Rank 0: yield each bucket's metadata (for the driver), then broadcast its bytes."""
        for meta, buf in pack_buckets(named, bucket_bytes, dtype, with_checksum, device=self.device):
            yield meta
            self.broadcast(buf)

    def receive(self, meta: BucketMeta) -> torch.Tensor:
        buf = torch.empty(meta.nbytes, dtype=torch.uint8, device=self.device)
        self.broadcast(buf)
        return buf

    def close(self) -> None:
        self.pg = None
