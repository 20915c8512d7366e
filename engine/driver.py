"""HybridEngine: the driver-side API align/ uses to generate, score, train and sync weights.

    with HybridEngine(cluster, rollout, optim, train, model_dir, run_dir) as eng:
        rollouts = eng.generate(prompts, SamplingConfig(n=4))   # spread over rollout.num_engines engines
        for idx, share in eng.generate_stream(prompts, sampling): ...  # the same, one engine's share as it ends
        eng.train_step(batch, loss_fn)          # loss_fn(fwd, micro_batch) -> (loss, metrics)
        eng.sync_weights()                      # trainer -> every engine, buckets via engine/weight_sync

Every call enters an offload phase first (rollout, policy, reference, train, refit), so with a
shared GPU only what the call needs is resident: one scheduler per GPU that a training rank shares
with an engine; the engine's weights come back for the refit, its KV cache only for the rollout. Global batches are split across the data-parallel
ranks by rows; see engine/train/batching.py for the loss contract that keeps that exact. Actor deaths and
timeouts become a one-line EngineError (engine/ray_errors.py), after which the engine refuses further calls;
with restart_dead_engines a rollout engine that dies during generate is replaced instead (engine/restart.py).
Weight-sync orchestration: engine/weight_sync/orchestrate.py.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray

from .cluster import Cluster, EngineError
from .ray_errors import failure_line
from .config import ClusterConfig, EngineConfig, OffloadConfig, OptimConfig, RolloutConfig, TrainConfig
from .offload import Item, OffloadScheduler, resolve_mode
from .refit import RefitStats
from .weight_sync import choose_transport
from .weight_sync.orchestrate import RefitDriver
from .restart import restart_engine
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


class HybridEngine:
    """Rollout actor + N data-parallel training actors on a placement group, driven from here."""

    def __init__(self, cluster_cfg: ClusterConfig, rollout_cfg: RolloutConfig, optim_cfg: OptimConfig,
                 train_cfg: TrainConfig, model_dir: str | os.PathLike, run_dir: str | os.PathLike,
                 offload_cfg: OffloadConfig | None = None, *, model_factory: ModelFactory | None = None,
                 ref_factory: ModelFactory | None = None,
                 rollout_backend: str | Callable[..., Any] | None = None, restart_dead_engines: int | None = None):
        """restart_dead_engines: how many times one generate call may replace each rollout engine that
        died and retry its share (engine/restart.py); None = rollout.restart_dead_engines (default 0: a death
        ends the call with one line)."""
        self.cluster_cfg, self.rollout_cfg = cluster_cfg, rollout_cfg
        self.restart_dead_engines = int(rollout_cfg.restart_dead_engines if restart_dead_engines is None
                                        else restart_dead_engines)
        self._weights_lock = threading.Lock()       # train_step vs a restarted engine's refit (restart.py)
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
        self._backend, self._engine_kwargs = backend, engine_kwargs     # engine/restart.py builds the same
        self.rollouts = [self._new_rollout(k) for k in range(rc.num_engines)]
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
        self._refit = RefitDriver(self)
        self.offloads = self._offload_schedulers(mode)
        self.offload = self.offloads.get(0)
        log.info("engine up: %d rollout engine(s) (%s) on node(s) %s, %d training rank(s), placement %s, offload %s, "
                 "weight sync %s", len(self.rollouts), self.rollout_info["backend"],
                 sorted({str(i["node_id"]) for i in self.rollout_infos}), n, self.cluster_cfg.placement,
                 mode if self.offloads else "off", self.transport)

    def _new_rollout(self, k: int) -> Any:
        """Rollout engine k's actor, in its placement bundle (started, not yet ready)."""
        c = self.cluster
        return c.track(ray.remote(RolloutWorker).options(**c.rollout_options(k)).remote(
            self._backend, self.model_dir, self.rollout_cfg.vllm.constructor_kwargs(), name=f"rollout engine {k}",
            **self._engine_kwargs))

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
            self._broken = failure_line(e, what, timeout, role)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:   # ActorUnavailable is one
            self._broken = failure_line(e, what, timeout, role)
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
        for any N. The gathered form of generate_stream."""
        out = [r for _, rollouts in self.generate_stream(prompts_token_ids, sampling) for r in rollouts]
        out.sort(key=lambda r: r.prompt_index)              # stable: a prompt's samples keep their order
        return out

    def generate_stream(self, prompts_token_ids: list[list[int]], sampling: SamplingConfig
                        ) -> Iterator[tuple[list[int], list[Rollout]]]:
        """generate, one engine's share at a time: yields (prompt indices, their rollouts) as each engine
        finishes; the indices ascending, each rollout's prompt_index global, sorted by it (a prompt's samples
        in sample order), so a consumer can start on those groups while the other engines still generate.
        A dead engine ends the stream with one EngineError line naming it, or, with restart_dead_engines,
        is replaced (engine/restart.py) and its share generated again, with the same seeds."""
        self.enter_phase("rollout")
        if len(self.rollouts) == 1:
            parts = [list(range(len(prompts_token_ids)))]
        else:
            costs = [len(p) + self._expected_len.get(tuple(p), sampling.max_tokens) for p in prompts_token_ids]
            parts = spread_prompts(costs, len(self.rollouts))

        def submit(k: int) -> Any:
            args = ([prompts_token_ids[i] for i in parts[k]], sampling) + ((parts[k],) if len(parts) > 1 else ())
            return self.rollouts[k].generate.remote(*args)

        restarts = {k: self.restart_dead_engines for k in range(len(parts))}

        def on_death(k: int) -> Any:
            if restarts[k] <= 0:
                return None
            restarts[k] -= 1
            restart_engine(self, k)
            return submit(k)

        refs = {k: submit(k) for k, part in enumerate(parts) if part}
        for k, rollouts in self._as_completed(refs, "generate", on_death=on_death):
            for r in rollouts:
                r.prompt_index = parts[k][r.prompt_index]
            rollouts.sort(key=lambda r: r.prompt_index)
            self._note_lengths(prompts_token_ids, rollouts)
            yield parts[k], rollouts

    def _note_lengths(self, prompts_token_ids: list[list[int]], rollouts: list[Rollout]) -> None:
        """Remember each prompt's mean completion length (spread_prompts puts the longest first next time)."""
        lengths: dict[int, list[int]] = {}
        for r in rollouts:
            lengths.setdefault(r.prompt_index, []).append(len(r.token_ids))
        if len(self._expected_len) > 100_000:
            self._expected_len.clear()
        for i, ls in lengths.items():
            self._expected_len[tuple(prompts_token_ids[i])] = float(np.mean(ls))

    def _gather(self, refs: dict[int, Any], what: str, timeout: float | None = None) -> dict[int, Any]:
        """Results of one call per rollout engine {k: ref}; the first engine to die or the deadline ends the wait
        with one line naming the engine(s)."""
        return dict(self._as_completed(refs, what, timeout))

    def _as_completed(self, refs: dict[int, Any], what: str, timeout: float | None = None,
                      on_death: Callable[[int], Any] | None = None) -> Iterator[tuple[int, Any]]:
        """(k, result) of one call per rollout engine {k: ref}, in the order they finish, under one deadline.
        on_death(k): a new ref for a dead engine k's call (after a restart), or None: the one-line error."""
        timeout = self.cluster_cfg.call_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        pending = {ref: k for k, ref in refs.items()}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = ", ".join(f"rollout engine {k}" for k in sorted(pending.values()))
                self._broken = f"{what} timed out after {timeout:.0f}s waiting for {late}"
                raise EngineError(self._broken)
            for ref in ready:
                k = pending.pop(ref)
                again = None
                if on_death is not None:
                    try:
                        ray.get(ref, timeout=0)                 # ready: no wait; a death raises here
                    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                        again = None if getattr(e, "actor_init_failed", False) else on_death(k)
                    except Exception:  # noqa: BLE001 - reported by _get below
                        pass
                if again is not None:
                    pending[again] = k
                    deadline = max(deadline, time.monotonic() + timeout)   # the retry gets a full timeout
                    continue
                yield k, self._get(ref, what, role=f"rollout engine {k}")

    def train_step(self, batch: dict[str, np.ndarray], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step on the global batch, split by rows over the ranks; metrics are global."""
        self.enter_phase("train")
        shards = self._shards(batch)
        with self._weights_lock:
            metrics = self._get([w.train_step.remote(s, loss_fn) for w, s in zip(self.workers, shards)],
                                "train_step")[0]
            self.policy_version = int(metrics["step"])      # a skipped (non-finite) step changes nothing
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

    def sync_weights(self, bucket_mb: float | None = None) -> RefitStats:
        """Stream the trainer's weights (checkpoint names) into every rollout engine, bucket by bucket, in the
        dtype the engines serve, through the placement's transport (engine/weight_sync): the object store on
        CPU (one copy of each bucket read by all engines), CUDA IPC from the rank on each engine's GPU, or an
        NCCL broadcast from rank 0. Under fsdp2 the other ranks join each tensor's all-gather (refit_peer).
        Every transfer waits at most rollout.refit_timeout_s; a failure is one EngineError line. The
        orchestration is engine/weight_sync/orchestrate.py."""
        return self._refit.sync(bucket_mb)

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
