"""Trainer -> rollout weight sync, one interface for every placement and device.

    transport = choose_transport(cfg.rollout.weight_sync, use_gpu, placement)
        object_store  CPU, any placement: numpy bytes through Ray's object store (object_store.py)
        cuda_ipc      GPU, colocated: CUDA IPC handles to the engine on the same GPU (cuda_ipc.py)
        nccl          GPU, split: NCCL broadcast from training rank 0 over a refit-only group (nccl.py)

All of them move the same buckets (base.py): checkpoint-named tensors packed flat in the dtype the
engine serves, of a configurable size, with an optional checksum, each transfer under a timeout.
The driver (engine/driver.py) orchestrates; the training rank sends (TrainWorker.sync_send) and the
rollout worker receives (RolloutWorker.receive_bucket).
"""
from __future__ import annotations

from .base import BucketMeta, WeightSyncError, checksum, pack_buckets, unpack, verify

TRANSPORTS = ("object_store", "cuda_ipc", "nccl")


def choose_transport(wanted: str, use_gpu: bool, placement: str) -> str:
    """auto: the object store on CPU, CUDA IPC when colocated on GPUs, NCCL when split on GPUs."""
    if wanted == "auto":
        return "object_store" if not use_gpu else ("cuda_ipc" if placement == "colocated" else "nccl")
    if wanted not in TRANSPORTS:
        raise ValueError(f"rollout.weight_sync must be auto|{'|'.join(TRANSPORTS)}, got {wanted!r}")
    if wanted != "object_store" and not use_gpu:
        raise ValueError(f"rollout.weight_sync={wanted} needs GPUs; this cluster has none (use object_store)")
    if wanted == "cuda_ipc" and placement != "colocated":
        raise ValueError("rollout.weight_sync=cuda_ipc needs cluster.placement=colocated (same GPU)")
    return wanted


__all__ = ["BucketMeta", "TRANSPORTS", "WeightSyncError", "checksum", "choose_transport", "pack_buckets",
           "unpack", "verify"]
