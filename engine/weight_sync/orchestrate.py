"""The driver side of a weight sync: which rank sends to which engines, the bucket stream, timeouts, stats.

    refit = RefitDriver(engine)            # HybridEngine holds one; HybridEngine.sync_weights() calls it
    stats = refit.sync(bucket_mb)          # trainer -> every rollout engine (or `engines=[k]`: just those)

Each sender (training rank 0, or under CUDA IPC the rank on each engine's GPU) streams meta, payload,
meta, payload, ... (NCCL: meta only, the bytes are broadcast); the small meta comes to the driver, the
payload stays an object ref every engine it feeds reads. At most two buckets are in flight per engine.
Every wait is bounded by rollout.refit_timeout_s; a failure is one EngineError line (the engine is then
marked unusable). The engine-side halves are TrainWorker.sync_send and RolloutWorker.receive_bucket.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import ray

from ..errors import EngineError
from ..refit import RefitStats

log = logging.getLogger(__name__)


class RefitDriver:
    """Refit state of one HybridEngine: the NCCL group (made on first use), whether engines apply adapters."""

    def __init__(self, engine: Any):
        self.eng = engine
        self.nccl_kwargs: dict[str, Any] | None = None
        self._nccl_joins: dict[int, Any] | None = None
        self._applies_adapters: bool | None = None

    def payload(self) -> tuple[str, bool]:
        """(payload, load as adapter): full weights without LoRA; with it, lora.sync resolved for the backend
        (engine/lora_sync.py): "adapter" = the engines apply the LoRA factors themselves (load_adapter)."""
        from ..lora_sync import refit_payload

        eng = self.eng
        if eng.train_cfg.lora is None:
            return "full", False
        if self._applies_adapters is None:
            self._applies_adapters = all(eng._gather({k: r.supports_adapters.remote() for k, r in
                                                      enumerate(eng.rollouts)}, "rollout supports_adapters").values())
        payload = refit_payload(eng.train_cfg.lora.sync, self._applies_adapters)
        return payload, payload == "adapter"

    def dtype(self) -> str | None:
        """The dtype refit buckets travel in: refit_dtype, else what the engines serve (None = as trained)."""
        eng = self.eng
        if eng.rollout_cfg.refit_dtype != "auto":
            return eng.rollout_cfg.refit_dtype
        served = {i.get("serve_dtype") for i in eng.rollout_infos}
        if len(served) > 1:
            raise EngineError(f"rollout engines serve different dtypes {sorted(map(str, served))}")
        return served.pop()

    def init_nccl(self) -> None:
        """The refit-only NCCL group: training rank 0 (rank 0) + every engine's TP workers (engine k's worker w is
        rank 1 + k * tp + w), joined concurrently (the joins are awaited after the first bucket)."""
        eng = self.eng
        host, port = eng._get(eng.workers[0].master_address.remote(), "refit rendezvous")   # a fresh free port
        tp, t = eng.rollout_cfg.tensor_parallel_size, eng.rollout_cfg.refit_timeout_s
        world = 1 + len(eng.rollouts) * tp
        self.nccl_kwargs = {"host": host, "port": port, "world_size": world, "timeout_s": t}
        self._nccl_joins = {k: r.nccl_join.remote(host, port, world, 1 + k * tp, t)
                            for k, r in enumerate(eng.rollouts)}

    def _next(self, gen: Any, timeout: float) -> Any:
        """The next ref of a streaming generator, waited for at most timeout (StopIteration at its end)."""
        ready, _ = ray.wait([gen], timeout=timeout)
        if not ready:
            self.eng._broken = f"refit send timed out after {timeout:.0f}s (training rank streaming buckets)"
            raise EngineError(self.eng._broken)
        return next(gen)

    def sync(self, bucket_mb: float | None = None, engines: list[int] | None = None) -> RefitStats:
        """Stream the trainer's weights into the rollout engines (all, or `engines`); see the module doc."""
        eng = self.eng
        eng.enter_phase("refit")
        payload, adapter = self.payload()                  # LoRA: adapters or merged layers (engine/lora_sync.py)
        rc = eng.rollout_cfg
        bucket_bytes = int((bucket_mb or rc.refit_bucket_mb) * 1e6)
        dtype, timeout, transport = self.dtype(), rc.refit_timeout_s, eng.transport
        targets = list(range(len(eng.rollouts))) if engines is None else sorted(engines)
        if transport == "nccl":
            if engines is not None:
                raise EngineError("a refit of some engines only needs a per-engine transport; nccl broadcasts to all")
            if self.nccl_kwargs is None:
                self.init_nccl()
        # (sending rank, engines it feeds): IPC pairs each engine with the rank on its GPU
        routes = [(k, [k]) for k in targets] if transport == "cuda_ipc" else [(0, targets)]
        senders = {r for r, _ in routes}
        peers = [w.refit_peer.remote(payload) for r, w in enumerate(eng.workers)
                 if r not in senders and eng.train_cfg.sharding == "fsdp2"]
        start = time.perf_counter()
        tensors = nbytes = nbuckets = 0
        first = targets[0]                                  # stats count one engine's copy
        streams = [(eng.workers[r].sync_send.options(num_returns="streaming", _generator_backpressure_num_objects=4)
                    .remote(transport, bucket_bytes, dtype, rc.refit_checksum, self.nccl_kwargs, payload), feeds)
                   for r, feeds in routes]
        pending: list[tuple[int, Any]] = []

        def settle(k: int, ref: Any) -> None:
            nonlocal tensors, nbytes
            t, b = eng._get(ref, "refit load", timeout, role=f"rollout engine {k}", task_errors=True)
            tensors, nbytes = tensors + (t if k == first else 0), nbytes + (b if k == first else 0)

        try:
            iters = list(streams)
            while iters:
                still = []
                for it, feeds in iters:
                    try:
                        meta_ref = self._next(it, timeout)
                        data = None if transport == "nccl" else self._next(it, timeout)
                    except StopIteration:
                        continue
                    still.append((it, feeds))
                    meta = eng._get(meta_ref, "refit send", timeout, role="training", task_errors=True)
                    for k in feeds:
                        pending.append((k, eng.rollouts[k].receive_bucket.remote(transport, meta, data, adapter)))
                    nbuckets += 1
                    while len(pending) > 2 * len(targets):    # at most two buckets in flight per engine
                        settle(*pending.pop(0))
                iters = still
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            eng._broken = f"training actor died during refit ({type(e).__name__}); restart the run to continue"
            raise EngineError(eng._broken) from None
        for k, ref in pending:
            settle(k, ref)
        eng._get(peers, "refit (gathering ranks)", timeout)
        joins, self._nccl_joins = self._nccl_joins, None
        if joins:
            eng._gather(joins, "refit NCCL group join", timeout)
        if transport == "cuda_ipc":
            eng._get([eng.workers[r].sync_release.remote() for r in senders], "refit release", timeout)
        eng._gather({k: eng.rollouts[k].finish_refit.remote(eng.policy_version) for k in targets},
                    "refit finish", timeout)
        if engines is None:
            eng.rollout_version = eng.policy_version
        stats = RefitStats(seconds=time.perf_counter() - start, bytes=nbytes, num_tensors=tensors,
                           num_buckets=nbuckets // len(routes))
        log.info("%s (%s, %s) -> %d engine(s) at version %d", stats, transport, dtype or "as trained",
                 len(targets), eng.policy_version)
        return stats
