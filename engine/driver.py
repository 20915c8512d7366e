"""HybridEngine: the driver-side API align/ uses to generate, score, train and sync weights.

    with HybridEngine(cluster, rollout, optim, train, model_dir, run_dir) as eng:
        rollouts = eng.generate(prompts, SamplingConfig(n=4))   # spread over rollout.num_engines engines
        eng.train_step(batch, loss_fn)          # loss_fn(fwd, micro_batch) -> (loss, metrics)
        eng.sync_weights()                      # trainer -> every engine, buckets via engine/weight_sync

Every call enters an offload phase first (rollout, policy, reference, train, refit), so with a
shared GPU only what the call needs is resident: one scheduler per GPU that a training rank shares
with an engine; the engine's weights come back for the refit, its KV cache only for the rollout. Global batches are split across the data-parallel
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
from .weight_sync import choose_transport
from .rollout_worker import RolloutWorker
from .scorer_worker import ScorerHandle, ScorerWorker
from .sampling import Rollout, SamplingConfig, spread_prompts
from .train import LossFn, ModelFactory, TrainWorker, even_slices, num_rows, split_rows

log = logging.getLogger(__name__)

__all__ = ["EngineError", "HybridEngine", "pretrained_factory"]


def _from_pretrained(model_dir: str, weights: bool = True):
    from model import from_pretrained

    return from_pretrained(model_dir, weights=weights)


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
        self.cluster = Cluster(cluster_cfg, run_dir, train_cfg.world_size, rollout_cfg.num_engines,
                               rollout_cfg.tensor_parallel_size)
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
        rc = self.rollout_cfg
        engine_kwargs = dict(rc.kwargs)
        if rc.tensor_parallel_size > 1 or rc.expert_parallel:     # vLLM only; native refuses the unknown kwargs
            engine_kwargs.update(tensor_parallel_size=rc.tensor_parallel_size, enable_expert_parallel=rc.expert_parallel)
        self.rollouts = [c.track(ray.remote(RolloutWorker).options(**c.rollout_options(k)).remote(
            backend, self.model_dir, rc.vllm.constructor_kwargs(), name=f"rollout engine {k}", **engine_kwargs))
            for k in range(rc.num_engines)]
        self.rollout = self.rollouts[0]
        train_cls = ray.remote(TrainWorker)
        self.workers = [c.track(train_cls.options(**c.train_options(r)).remote(
            model_factory, ref_factory, self.optim_cfg, self.train_cfg, r, n, mode)) for r in range(n)]
        timeout = self.cluster_cfg.startup_timeout_s
        self.rollout_infos = [self._get(r.ready.remote(), "rollout actor start-up", timeout, role=f"rollout engine {k}")
                              for k, r in enumerate(self.rollouts)]
        self.rollout_info = self.rollout_infos[0]
        self.worker_info = self._get([w.ready.remote() for w in self.workers], "training actors start-up", timeout)
        if n > 1 or self.train_cfg.sharding == "fsdp2":
            addr, port = self._get(self.workers[0].master_address.remote(), "rendezvous", timeout)
            self._get([w.init_distributed.remote(addr, port, timeout) for w in self.workers],
                      "torch.distributed init", timeout)
        self.has_ref = ref_factory is not None
        self.policy_version = self._get(self.workers[0].get_generation.remote(), "get_generation", timeout)
        self.rollout_version = 0
        self.scorers: dict[str, Any] = {}
        self._expected_len: dict[tuple[int, ...], float] = {}    # mean completion length per prompt seen
        self.transport = choose_transport(self.rollout_cfg.weight_sync, gpu, self.cluster_cfg.placement)
        self._nccl_ready = False
        self.offloads = self._offload_schedulers(mode)
        self.offload = self.offloads.get(0)
        log.info("engine up: %d rollout engine(s) (%s) on node(s) %s, %d training rank(s), placement %s, offload %s, "
                 "weight sync %s", len(self.rollouts), self.rollout_info["backend"],
                 sorted({str(i["node_id"]) for i in self.rollout_infos}), n, self.cluster_cfg.placement,
                 mode if self.offloads else "off", self.transport)

    def _offload_schedulers(self, mode: str) -> dict[int, OffloadScheduler]:
        """Colocated + enabled: one scheduler per GPU that a training rank shares with a rollout engine
        (rank g and engine g on GPU g); only those ranks offload, and each GPU's bytes are that rank's own
        (sharded: its shards), never a sum over ranks. Ranks on a GPU of their own keep everything resident."""
        if not (self.offload_cfg.enabled and self.cluster_cfg.placement == "colocated"):
            return {}
        self._refresh_sizes()
        scheds = {}
        for g in range(len(self.rollouts)):
            sched = OffloadScheduler(mode=mode)  # type: ignore[arg-type]
            for name in ["policy", "optimizer"] + (["ref"] if self.has_ref and self.train_cfg.lora is None else []):
                sched.register(Item(name, functools.partial(self._size_of, g, name),
                                    functools.partial(self._on_rank, g, "offload", name),
                                    functools.partial(self._on_rank, g, "reload", name)))
            engine = self.rollouts[g]
            nbytes = self._get(engine.resident_bytes.remote(), "rollout resident_bytes", role=f"rollout engine {g}")
            # one engine, two items: its weights come back before a refit, its KV cache only before rollout
            sched.register(Item("rollout_weights", nbytes, functools.partial(self.engine_release, g),
                                functools.partial(self.engine_restore, g, ["weights"])))
            sched.register(Item("rollout_kv", 0, functools.partial(self.engine_release, g),
                                functools.partial(self.engine_restore, g, ["kv_cache"])))
            scheds[g] = sched
        return scheds

    def _refresh_sizes(self) -> None:
        self._sizes = self._get([w.offload_sizes.remote() for w in self.workers], "offload sizes")

    def _size_of(self, rank: int, name: str) -> int:
        return int(self._sizes[rank].get(name, 0))

    def _on_rank(self, rank: int, method: str, name: str) -> None:
        self._get(getattr(self.workers[rank], method).remote([name]), f"{method} {name} on rank {rank}")

    def engine_release(self, k: int) -> None:
        """Rollout engine k's weights and KV cache off its GPU (vLLM: sleep level 1; a no-op elsewhere)."""
        self._get(self.rollouts[k].sleep.remote(), "rollout release", role=f"rollout engine {k}")

    def engine_restore(self, k: int, tags: list[str] | None = None) -> None:
        """Bring back rollout engine k's memory: tags "weights" (before refit) and/or "kv_cache" (before rollout)."""
        self._get(self.rollouts[k].wake.remote(tags), f"rollout restore {tags or 'all'}", role=f"rollout engine {k}")

    # -- plumbing --------------------------------------------------------------------------------
    def _get(self, refs: Any, what: str, timeout: float | None = None, role: str | None = None,
             task_errors: bool = False) -> Any:
        """ray.get that turns actor deaths and timeouts into one-line EngineErrors (and marks us broken);
        task_errors: so does an exception the call raised (refit: a failed checksum, a transport error)."""
        timeout = self.cluster_cfg.call_timeout_s if timeout is None else timeout
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.RayTaskError as e:
            if not task_errors or isinstance(e, ray.exceptions.RayActorError):
                raise
            self._broken = f"{what} failed on {role or 'an actor'}: {init_failure_cause(e)}"
        except ray.exceptions.GetTimeoutError:
            self._broken = f"{what} timed out after {timeout:.0f}s" + (f" ({role})" if role else "")
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            who = role or ("rollout" if "rollout" in what else "training")
            name = ""
            if who.startswith("rollout engine"):              # which of the N engines
                who, name = "rollout", f"{who}, "
            if getattr(e, "actor_init_failed", False):      # the constructor raised: say what it raised
                self._broken = f"{who} actor failed to start ({name.rstrip(', ')}): {init_failure_cause(e)}" \
                    if name else f"{who} actor failed to start: {init_failure_cause(e)}"
            else:
                self._broken = (f"{who} actor died during {what} ({name}{type(e).__name__}); "
                                "restart the run to continue")
        raise EngineError(self._broken) from None

    def _check(self) -> None:
        if self._broken is not None:
            raise EngineError(f"engine is unusable: {self._broken}")

    def enter_phase(self, phase: str) -> None:
        """Make exactly what `phase` declared resident (align calls this around reward scoring)."""
        self._check()
        for sched in self.offloads.values():
            if sched.current != phase:
                sched.enter(phase)

    def _shards(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        return split_rows(batch, even_slices(num_rows(batch), len(self.workers)))

    # -- the API -------------------------------------------------------------------------------
    def generate(self, prompts_token_ids: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        """Sample completions with the rollout engine(s) (which may be stale: see sync_weights).

        With N engines the prompts are spread over them (equal counts, the longest expected completions
        first: engine.sampling.spread_prompts) and the results merged back in prompt order; every completion's
        seed depends only on (sampling.seed, global prompt index, sample index), so the result is the same
        for any N."""
        self.enter_phase("rollout")
        if len(self.rollouts) == 1:
            out = self._get(self.rollout.generate.remote(prompts_token_ids, sampling), "generate",
                            role="rollout engine 0")
        else:
            costs = [len(p) + self._expected_len.get(tuple(p), sampling.max_tokens) for p in prompts_token_ids]
            parts = spread_prompts(costs, len(self.rollouts))
            refs = {k: self.rollouts[k].generate.remote([prompts_token_ids[i] for i in part], sampling, part)
                    for k, part in enumerate(parts) if part}
            out = []
            for k, rollouts in self._gather(refs, "generate").items():
                for r in rollouts:
                    r.prompt_index = parts[k][r.prompt_index]
                out += rollouts
            out.sort(key=lambda r: r.prompt_index)          # stable: a prompt's samples keep their order
        lengths: dict[int, list[int]] = {}
        for r in out:
            lengths.setdefault(r.prompt_index, []).append(len(r.token_ids))
        if len(self._expected_len) > 100_000:
            self._expected_len.clear()
        for i, ls in lengths.items():
            self._expected_len[tuple(prompts_token_ids[i])] = float(np.mean(ls))
        return out

    def _gather(self, refs: dict[int, Any], what: str, timeout: float | None = None) -> dict[int, Any]:
        """Results of one call per rollout engine {k: ref}; the first engine to die or the deadline ends the wait
        with one line naming the engine(s)."""
        timeout = self.cluster_cfg.call_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        pending, out = {ref: k for k, ref in refs.items()}, {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = ", ".join(f"rollout engine {k}" for k in sorted(pending.values()))
                self._broken = f"{what} timed out after {timeout:.0f}s waiting for {late}"
                raise EngineError(self._broken)
            for ref in ready:
                k = pending.pop(ref)
                out[k] = self._get(ref, what, role=f"rollout engine {k}")
        return out

    def train_step(self, batch: dict[str, np.ndarray], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step on the global batch, split by rows over the ranks; metrics are global."""
        self.enter_phase("train")
        shards = self._shards(batch)
        metrics = self._get([w.train_step.remote(s, loss_fn) for w, s in zip(self.workers, shards)],
                            "train_step")[0]
        self.policy_version = int(metrics["step"])          # a skipped (non-finite) step changes nothing
        if self.offloads and not self._sizes[0].get("optimizer"):
            self._refresh_sizes()                           # AdamW state exists only after the first step
        return metrics

    def compute_logprobs(self, batch: dict[str, np.ndarray], which: str = "policy", mode: str = "eval") -> np.ndarray:
        """Per-token log-probs [B, T-1] of the shifted input_ids under the policy or the reference model;
        mode="train" scores in training mode (what the next train_step's forward computes)."""
        if which not in ("policy", "ref"):
            raise ValueError(f"compute_logprobs: which must be 'policy' or 'ref', got {which!r}")
        if which == "ref" and not self.has_ref:
            raise ValueError("compute_logprobs(which='ref') but the engine has no reference model (train.reference)")
        base_as_ref = which == "ref" and self.train_cfg.lora is not None    # LoRA: the policy, adapters off
        self.enter_phase("policy" if which == "policy" or base_as_ref else "reference")
        parts = self._get([w.compute_logprobs.remote(s, which, mode) for w, s in zip(self.workers, self._shards(batch))],
                          f"compute_logprobs({which})")
        return np.concatenate(parts)

    def _next(self, gen: Any, timeout: float) -> Any:
        """The next ref of a streaming generator, waited for at most timeout (StopIteration at its end)."""
        ready, _ = ray.wait([gen], timeout=timeout)
        if not ready:
            self._broken = f"refit send timed out after {timeout:.0f}s (training rank streaming buckets)"
            raise EngineError(self._broken)
        return next(gen)

    def _refit_payload(self) -> tuple[str, bool]:
        """(payload, load as adapter): full weights without LoRA; with it, lora.sync resolved for the backend
        (engine/lora_sync.py): "adapter" = the engines apply the LoRA factors themselves (load_adapter)."""
        from .lora_sync import refit_payload

        if self.train_cfg.lora is None:
            return "full", False
        if getattr(self, "_applies_adapters", None) is None:
            self._applies_adapters = all(self._gather({k: r.supports_adapters.remote() for k, r in
                                                       enumerate(self.rollouts)}, "rollout supports_adapters").values())
        payload = refit_payload(self.train_cfg.lora.sync, self._applies_adapters)
        return payload, payload == "adapter"

    def _refit_dtype(self) -> str | None:
        """The dtype refit buckets travel in: refit_dtype, else what the engines serve (None = as trained)."""
        if self.rollout_cfg.refit_dtype != "auto":
            return self.rollout_cfg.refit_dtype
        served = {i.get("serve_dtype") for i in self.rollout_infos}
        if len(served) > 1:
            raise EngineError(f"rollout engines serve different dtypes {sorted(map(str, served))}")
        return served.pop()

    def _init_nccl(self) -> None:
        """The refit-only NCCL group: training rank 0 (rank 0) + every engine's TP workers (engine k's worker w is
        rank 1 + k * tp + w), joined concurrently."""
        host, port = self._get(self.workers[0].master_address.remote(), "refit rendezvous")   # a fresh free port
        tp, t = self.rollout_cfg.tensor_parallel_size, self.rollout_cfg.refit_timeout_s
        world = 1 + len(self.rollouts) * tp
        self._nccl_kwargs = {"host": host, "port": port, "world_size": world, "timeout_s": t}
        self._nccl_joins = {k: r.nccl_join.remote(host, port, world, 1 + k * tp, t)
                            for k, r in enumerate(self.rollouts)}
        self._nccl_ready = True

    def sync_weights(self, bucket_mb: float | None = None) -> RefitStats:
        """Stream the trainer's weights (checkpoint names) into every rollout engine, bucket by bucket, in the
        dtype the engines serve, through the placement's transport (engine/weight_sync): the object store on
        CPU (one copy of each bucket read by all engines), CUDA IPC from the rank on each engine's GPU, or an
        NCCL broadcast from rank 0. Under fsdp2 the other ranks join each tensor's all-gather (refit_peer).
        Every transfer waits at most rollout.refit_timeout_s; a failure is one EngineError line."""
        self.enter_phase("refit")
        payload, adapter = self._refit_payload()            # LoRA: adapters or merged layers (engine/lora_sync.py)
        rc = self.rollout_cfg
        bucket_bytes = int((bucket_mb or rc.refit_bucket_mb) * 1e6)
        dtype, timeout, transport = self._refit_dtype(), rc.refit_timeout_s, self.transport
        if transport == "nccl" and not self._nccl_ready:
            self._init_nccl()
        # (sending rank, engines it feeds): IPC pairs each engine with the rank on its GPU
        routes = [(k, [k]) for k in range(len(self.rollouts))] if transport == "cuda_ipc" else \
            [(0, list(range(len(self.rollouts))))]
        senders = {r for r, _ in routes}
        peers = [w.refit_peer.remote(payload) for r, w in enumerate(self.workers)
                 if r not in senders and self.train_cfg.sharding == "fsdp2"]
        start = time.perf_counter()
        tensors = nbytes = nbuckets = 0
        # each sender streams meta, payload, meta, payload, ... (nccl: meta only; the bytes are broadcast):
        # the small meta comes to the driver, the payload stays an object ref that every engine reads
        streams = [(self.workers[r].sync_send.options(num_returns="streaming", _generator_backpressure_num_objects=4)
                    .remote(transport, bucket_bytes, dtype, rc.refit_checksum,
                            getattr(self, "_nccl_kwargs", None), payload), engines) for r, engines in routes]
        try:
            pending: list[tuple[int, Any]] = []
            iters = list(streams)
            while iters:
                still = []
                for it, engines in iters:
                    try:
                        meta_ref = self._next(it, timeout)
                        data = None if transport == "nccl" else self._next(it, timeout)
                    except StopIteration:
                        continue
                    still.append((it, engines))
                    meta = self._get(meta_ref, "refit send", timeout, role="training", task_errors=True)
                    for k in engines:
                        pending.append((k, self.rollouts[k].receive_bucket.remote(transport, meta, data, adapter)))
                    nbuckets += 1
                    while len(pending) > 2 * len(self.rollouts):   # at most two buckets in flight per engine
                        k, ref = pending.pop(0)
                        t, b = self._get(ref, "refit load", timeout, role=f"rollout engine {k}", task_errors=True)
                        tensors, nbytes = tensors + (t if k == 0 else 0), nbytes + (b if k == 0 else 0)
                iters = still
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            self._broken = f"training actor died during refit ({type(e).__name__}); restart the run to continue"
            raise EngineError(self._broken) from None
        for k, ref in pending:
            t, b = self._get(ref, "refit load", timeout, role=f"rollout engine {k}", task_errors=True)
            tensors, nbytes = tensors + (t if k == 0 else 0), nbytes + (b if k == 0 else 0)
        self._get(peers, "refit (gathering ranks)", timeout)
        joins, self._nccl_joins = getattr(self, "_nccl_joins", None), None
        if joins:
            self._gather(joins, "refit NCCL group join", timeout)
        if transport == "cuda_ipc":
            self._get([self.workers[r].sync_release.remote() for r in senders], "refit release", timeout)
        self._gather({k: r.finish_refit.remote(self.policy_version) for k, r in enumerate(self.rollouts)},
                     "refit finish", timeout)
        self.rollout_version = self.policy_version
        stats = RefitStats(seconds=time.perf_counter() - start, bytes=nbytes, num_tensors=tensors,
                           num_buckets=nbuckets // len(routes))
        log.info("%s (%s, %s) -> %d engine(s) at version %d", stats, transport, dtype or "as trained",
                 len(self.rollouts), self.rollout_version)
        return stats

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
        if self.offloads:
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
