"""HybridEngine: the driver-side API align/ uses to generate, score, train and sync weights.

    with HybridEngine(cluster, rollout, optim, train, model_dir, run_dir) as eng:
        rollouts = eng.generate(prompts, SamplingConfig(n=4))
        eng.train_step(batch, loss_fn)          # loss_fn(fwd, micro_batch) -> (loss, metrics)
        eng.sync_weights()                      # trainer -> rollout engine, bucketed numpy

Every call enters an offload phase first (rollout, policy, reference, train, refit), so with a
shared GPU only what the call needs is resident. Global batches are split across the data-parallel
ranks by rows; see engine/train/batching.py for the loss contract that keeps that exact. Actor deaths and
timeouts become a one-line EngineError, after which the engine refuses further calls.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray

from .cluster import Cluster, EngineError
from .config import ClusterConfig, EngineConfig, OffloadConfig, OptimConfig, RolloutConfig, TrainConfig
from .offload import Item, OffloadScheduler, resolve_mode
from .refit import RefitStats
from .rollout_worker import RolloutWorker
from .scorer_worker import ScorerHandle, ScorerWorker
from .sampling import Rollout, SamplingConfig
from .train import LossFn, ModelFactory, TrainWorker, even_slices, num_rows, split_rows

log = logging.getLogger(__name__)

__all__ = ["EngineError", "HybridEngine", "pretrained_factory"]


def _from_pretrained(model_dir: str):
    from model import from_pretrained

    return from_pretrained(model_dir)


def pretrained_factory(model_dir: str | os.PathLike) -> ModelFactory:
    """The default policy factory: our network loaded from an HF checkpoint dir (picklable for Ray)."""
    return functools.partial(_from_pretrained, str(model_dir))


_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Exit)): (.+)$")


def init_failure_cause(e: BaseException) -> str:
    """One line naming what an actor's constructor raised: `Type: first line of its message`.

    Ray wraps the constructor's exception (traceback text included) in an ActorDiedError; the
    original exception is its `.cause` (or the cause's `.cause`) when Ray could pickle it, else we
    take the last `SomethingError: message` line of the traceback text.
    """
    cause: Any = e
    for _ in range(4):
        inner = getattr(cause, "cause", None)
        if not isinstance(inner, BaseException) or inner is cause:
            break
        cause = inner
    if cause is not e and not hasattr(cause, "actor_init_failed"):
        text = str(cause).strip()
        first = text.splitlines()[0].strip() if text else ""
        return f"{type(cause).__name__}: {first}" if first else type(cause).__name__
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    found = [m for m in map(_ERROR_LINE.match, lines) if m and m.group(1) not in ("RayTaskError", "ActorDiedError")]
    if found:
        return f"{found[-1].group(1)}: {found[-1].group(2)}"
    return lines[-1] if lines else type(e).__name__


class HybridEngine:
    """Rollout actor + N data-parallel training actors on a placement group, driven from here."""

    def __init__(self, cluster_cfg: ClusterConfig, rollout_cfg: RolloutConfig, optim_cfg: OptimConfig,
                 train_cfg: TrainConfig, model_dir: str | os.PathLike, run_dir: str | os.PathLike,
                 offload_cfg: OffloadConfig | None = None, *, model_factory: ModelFactory | None = None,
                 ref_factory: ModelFactory | None = None,
                 rollout_backend: str | Callable[..., Any] | None = None):
        self.cluster_cfg, self.rollout_cfg = cluster_cfg, rollout_cfg
        self.optim_cfg, self.train_cfg = optim_cfg, train_cfg
        self.offload_cfg = offload_cfg or OffloadConfig()
        self.model_dir, self.run_dir = str(model_dir), Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._broken: str | None = None
        self.cluster = Cluster(cluster_cfg, run_dir, train_cfg.world_size)
        try:
            self._start(model_factory or pretrained_factory(model_dir), ref_factory, rollout_backend)
        except BaseException:
            self.cluster.shutdown()
            raise

    @classmethod
    def from_config(cls, cfg: EngineConfig, model_dir: str | os.PathLike, run_dir: str | os.PathLike,
                    **kwargs: Any) -> HybridEngine:
        return cls(cfg.cluster, cfg.rollout, cfg.optim, cfg.train, model_dir, run_dir, cfg.offload, **kwargs)

    # -- start-up --------------------------------------------------------------------------------
    def _start(self, model_factory: ModelFactory, ref_factory: ModelFactory | None,
               rollout_backend: str | Callable[..., Any] | None) -> None:
        c, n = self.cluster, self.train_cfg.world_size
        if ref_factory is None and self.train_cfg.reference:
            ref_factory = model_factory
        gpu = c.use_gpu
        mode = resolve_mode(self.offload_cfg.mode, cuda=gpu)
        backend = rollout_backend if rollout_backend is not None else self.rollout_cfg.backend
        self.rollout = c.track(ray.remote(RolloutWorker).options(**c.rollout_options()).remote(
            backend, self.model_dir, self.rollout_cfg.vllm.constructor_kwargs(), **self.rollout_cfg.kwargs))
        train_cls = ray.remote(TrainWorker)
        self.workers = [c.track(train_cls.options(**c.train_options(r)).remote(
            model_factory, ref_factory, self.optim_cfg, self.train_cfg, r, n, mode)) for r in range(n)]
        timeout = self.cluster_cfg.startup_timeout_s
        self.rollout_info = self._get(self.rollout.ready.remote(), "rollout actor start-up", timeout)
        self.worker_info = self._get([w.ready.remote() for w in self.workers], "training actors start-up", timeout)
        if n > 1 or self.train_cfg.sharding == "fsdp2":
            addr, port = self._get(self.workers[0].master_address.remote(), "rendezvous", timeout)
            self._get([w.init_distributed.remote(addr, port, timeout) for w in self.workers],
                      "torch.distributed init", timeout)
        self.has_ref = ref_factory is not None
        self.policy_version = self._get(self.workers[0].get_generation.remote(), "get_generation", timeout)
        self.rollout_version = 0
        self.scorers: dict[str, Any] = {}
        self.offload = self._offload_scheduler(mode)
        log.info("engine up: rollout %s on node %s, %d training rank(s), placement %s, offload %s",
                 self.rollout_info["backend"], self.rollout_info["node_id"], n, self.cluster_cfg.placement,
                 mode if self.offload else "off")

    def _offload_scheduler(self, mode: str) -> OffloadScheduler | None:
        """Colocated + enabled: every item registered with its size and how to move it."""
        if not (self.offload_cfg.enabled and self.cluster_cfg.placement == "colocated"):
            return None
        sched = OffloadScheduler(mode=mode)  # type: ignore[arg-type]
        self._refresh_sizes()
        names = ["policy", "optimizer"] + (["ref"] if self.has_ref and self.train_cfg.lora is None else [])
        for name in names:
            sched.register(Item(name, functools.partial(self._sizes.get, name, 0),
                                functools.partial(self._on_workers, "offload", name),
                                functools.partial(self._on_workers, "reload", name)))
        rollout_bytes = self._get(self.rollout.resident_bytes.remote(), "rollout resident_bytes")
        sched.register(Item("rollout_engine", rollout_bytes, self.vllm_sleep, self.vllm_wake))
        return sched

    def _refresh_sizes(self) -> None:
        per_rank = self._get(self.workers[0].offload_sizes.remote(), "offload sizes")
        self._sizes = {k: v * len(self.workers) for k, v in per_rank.items()}

    def _on_workers(self, method: str, name: str) -> None:
        self._get([getattr(w, method).remote([name]) for w in self.workers], f"{method} {name}")

    def vllm_sleep(self) -> None:
        """Rollout engine off the GPU: vLLM's sleep mode (untestable without a GPU; thin by design)."""
        self._get(self.rollout.sleep.remote(), "rollout sleep", role="rollout")

    def vllm_wake(self) -> None:
        self._get(self.rollout.wake.remote(), "rollout wake", role="rollout")

    # -- plumbing --------------------------------------------------------------------------------
    def _get(self, refs: Any, what: str, timeout: float | None = None, role: str | None = None) -> Any:
        """ray.get that turns actor deaths and timeouts into one-line EngineErrors (and marks us broken)."""
        timeout = self.cluster_cfg.call_timeout_s if timeout is None else timeout
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            self._broken = f"{what} timed out after {timeout:.0f}s"
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            who = role or ("rollout" if "rollout" in what else "training")
            if getattr(e, "actor_init_failed", False):      # the constructor raised: say what it raised
                self._broken = f"{who} actor failed to start: {init_failure_cause(e)}"
            else:
                self._broken = f"{who} actor died during {what} ({type(e).__name__}); restart the run to continue"
        raise EngineError(self._broken) from None

    def _check(self) -> None:
        if self._broken is not None:
            raise EngineError(f"engine is unusable: {self._broken}")

    def enter_phase(self, phase: str) -> None:
        """Make exactly what `phase` declared resident (align calls this around reward scoring)."""
        self._check()
        if self.offload is not None and self.offload.current != phase:
            self.offload.enter(phase)

    def _shards(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        return split_rows(batch, even_slices(num_rows(batch), len(self.workers)))

    # -- the API -------------------------------------------------------------------------------
    def generate(self, prompts_token_ids: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        """Sample completions with the rollout engine (which may be stale: see sync_weights)."""
        self.enter_phase("rollout")
        return self._get(self.rollout.generate.remote(prompts_token_ids, sampling), "generate", role="rollout")

    def train_step(self, batch: dict[str, np.ndarray], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step on the global batch, split by rows over the ranks; metrics are global."""
        self.enter_phase("train")
        shards = self._shards(batch)
        metrics = self._get([w.train_step.remote(s, loss_fn) for w, s in zip(self.workers, shards)],
                            "train_step")[0]
        self.policy_version = int(metrics["step"])          # a skipped (non-finite) step changes nothing
        if self.offload is not None and not self._sizes.get("optimizer"):
            self._refresh_sizes()                           # AdamW state exists only after the first step
        return metrics

    def compute_logprobs(self, batch: dict[str, np.ndarray], which: str = "policy", mode: str = "eval") -> np.ndarray:
        """Per-token log-probs [B, T-1] of the shifted input_ids under the policy or the reference model;
        mode="train" scores in training mode (what the next train_step's forward computes)."""
        if which not in ("policy", "ref"):
            raise ValueError(f"compute_logprobs: which must be 'policy' or 'ref', got {which!r}")
        if which == "ref" and not self.has_ref:
            raise ValueError("compute_logprobs(which='ref') but the engine has no reference model (train.reference)")
        self.enter_phase("policy" if which == "policy" else "reference")
        parts = self._get([w.compute_logprobs.remote(s, which, mode) for w, s in zip(self.workers, self._shards(batch))],
                          f"compute_logprobs({which})")
        return np.concatenate(parts)

    def sync_weights(self, bucket_mb: float | None = None) -> RefitStats:
        """Stream the trainer's weights (checkpoint names, float32 numpy buckets) into the rollout engine:
        rank 0 streams them; under fsdp2 the other ranks join each tensor's all-gather (refit_peer)."""
        self.enter_phase("refit")
        payload, load = self._refit_payload()            # LoRA: adapters or merged layers (engine/lora_sync.py)
        peers = [w.refit_peer.remote(payload) for w in self.workers[1:]] if self.train_cfg.sharding == "fsdp2" else []
        bucket_bytes = int((bucket_mb or self.rollout_cfg.refit_bucket_mb) * 1e6)
        start = time.perf_counter()
        gen = self.workers[0].weight_buckets.options(     # rank 0 stays at most 2 buckets ahead
            num_returns="streaming", _generator_backpressure_num_objects=2).remote(bucket_bytes, payload)
        pending, tensors, nbytes, nbuckets = [], 0, 0, 0
        try:
            for ref in gen:
                pending.append(load.remote(ref))
                nbuckets += 1
                if len(pending) >= 2:                       # at most two buckets in flight
                    t, b = self._get(pending.pop(0), "refit load_weights", role="rollout")
                    tensors, nbytes = tensors + t, nbytes + b
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            self._broken = f"training actor died during refit ({type(e).__name__}); restart the run to continue"
            raise EngineError(self._broken) from None
        for t, b in self._get(pending, "refit load_weights", role="rollout"):
            tensors, nbytes = tensors + t, nbytes + b
        self._get(peers, "refit (gathering ranks)")
        self._get(self.rollout.finish_refit.remote(self.policy_version), "refit finish", role="rollout")
        self.rollout_version = self.policy_version
        stats = RefitStats(seconds=time.perf_counter() - start, bytes=nbytes, num_tensors=tensors,
                           num_buckets=nbuckets)
        log.info("%s -> rollout version %d", stats, self.rollout_version)
        return stats

    def _refit_payload(self) -> tuple[str, Any]:
        """(payload, rollout method): full weights without LoRA; with it, lora.sync resolved for the backend."""
        from .lora_sync import refit_payload

        if self.train_cfg.lora is None:
            return "full", self.rollout.load_weights
        if getattr(self, "_applies_adapters", None) is None:
            self._applies_adapters = self._get(self.rollout.supports_adapters.remote(), "rollout supports_adapters")
        payload = refit_payload(self.train_cfg.lora.sync, self._applies_adapters)
        return payload, self.rollout.load_adapter if payload == "adapter" else self.rollout.load_weights

    def save(self, path: str | os.PathLike) -> None:
        """Checkpoint model + optimizer + scheduler + every rank's RNG (path shared by all ranks): rank 0
        writes it, or under fsdp2 every rank writes its shards."""
        self.enter_phase("train")
        rngs = self._get([w.rng_state.remote() for w in self.workers], "rng_state")
        writers = self.workers if self.train_cfg.sharding == "fsdp2" else self.workers[:1]
        self._get([w.save.remote(str(Path(path).resolve()), rngs) for w in writers], "save")
        log.info("saved training state (version %d) to %s", self.policy_version, path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint on every rank; call sync_weights() before the next generate."""
        self.enter_phase("train")
        steps = self._get([w.load.remote(str(Path(path).resolve())) for w in self.workers], "load")
        self.policy_version = steps[0]
        if self.offload is not None:
            self._refresh_sizes()
        log.info("loaded training state (version %d) from %s; rollout engine is stale until sync_weights()",
                 self.policy_version, path)

    def export_hf(self, path: str | os.PathLike) -> None:
        """Write the policy as an HF checkpoint dir (for evaluation or a fresh rollout engine)."""
        self.enter_phase("policy")
        self._get([w.export_hf.remote(str(Path(path).resolve())) for w in self.workers], "export_hf")

    def add_scorer(self, name: str, factory: Callable[[], Any]) -> ScorerHandle:
        """Host a scoring model (e.g. a reward model) in its own actor, resident only in the 'reward' phase."""
        self._check()
        actor = self.cluster.track(ray.remote(ScorerWorker).options(**self.cluster.scorer_options()).remote(factory))
        self._get(actor.ready.remote(), f"scorer {name} start-up", self.cluster_cfg.startup_timeout_s, role="scorer")
        self.scorers[name] = actor
        if self.offload is not None:
            item = f"scorer:{name}"
            size = self._get(actor.resident_bytes.remote(), "scorer resident_bytes")
            self.offload.register(Item(item, size, functools.partial(self._get_call, actor.offload, item),
                                       functools.partial(self._get_call, actor.reload, item)), resident=False)
            self.offload.declare("reward", self.offload.phases.get("reward", frozenset()) | {item})
        return ScorerHandle(self, name, actor)

    def _get_call(self, method, what: str) -> None:
        self._get(method.remote(), what, role="scorer")

    def node_ids(self) -> dict[str, Any]:
        return {"rollout": self.rollout_info["node_id"], "train": [i["node_id"] for i in self.worker_info]}

    def shutdown(self) -> None:
        """Stop every actor and the placement group (and Ray, if we started it). Idempotent."""
        self.cluster.shutdown()

    def __enter__(self) -> HybridEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
