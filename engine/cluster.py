"""Ray start-up, placement and clean shutdown for the hybrid engine.

address=None starts a private local Ray whose temp dir lives in the run dir (so logs stay with the
run); otherwise the driver joins an existing cluster. If Ray is already initialised in this process
(a test session, a notebook) it is reused and left running on shutdown.

Placement groups pin actors to resources:
- colocated: one bundle per training rank; rank i lives in bundle i and rollout engine i (there are
  at most as many engines as ranks) shares it (same GPU), each taking half of it: they alternate, the
  offload scheduler makes room. With one rank this is exactly one shared bundle.
- split: bundles 0..E-1 are the E rollout engines' own (each with tensor_parallel_size GPUs), bundles
  E..E+N-1 one per training rank. Custom resources
  (rollout_resources / train_resources, e.g. {"train_node": 1} declared by `ray start --resources`)
  pin bundles to nodes; they are per bundle, so a node hosting two ranks needs 2 units.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .config import ClusterConfig
from .errors import EngineError  # noqa: F401  (re-exported: engine.cluster.EngineError)

log = logging.getLogger(__name__)

# Ray puts unix sockets at <temp>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store.<n>,
# and AF_UNIX paths are limited to 107 bytes on Linux.
_SOCKET_SUFFIX = "/session_2025-01-01_00-00-00_000000_4194304/sockets/plasma_store.99"
MAX_TEMP_DIR_LEN = 107 - len(_SOCKET_SUFFIX)


def ray_temp_dir(cfg: ClusterConfig, run_dir: str | os.PathLike) -> str:
    """<run_dir>/ray unless that path is too long for Ray's unix sockets; then a short dir under /tmp."""
    wanted = Path(cfg.temp_dir) if cfg.temp_dir else Path(run_dir) / "ray"
    wanted = wanted.resolve()
    if len(str(wanted)) <= MAX_TEMP_DIR_LEN:
        return str(wanted)
    short = f"/tmp/deepalign-ray-{hashlib.sha1(str(wanted).encode()).hexdigest()[:10]}"
    log.warning("Ray temp dir %s is longer than %d chars (unix socket limit); using %s (linked from there)",
                wanted, MAX_TEMP_DIR_LEN, short)
    Path(short).mkdir(parents=True, exist_ok=True)
    if not wanted.exists() and not wanted.is_symlink():         # keep the logs findable from the run dir
        wanted.parent.mkdir(parents=True, exist_ok=True)
        wanted.symlink_to(short, target_is_directory=True)
    return short


def plan_bundles(cfg: ClusterConfig, num_train_ranks: int, use_gpu: bool, num_engines: int = 1,
                 engine_gpus: int = 1) -> list[dict[str, float]]:
    """Placement-group bundles: colocated = one per rank (engine i shares bundle i); split = one per engine
    (engine_gpus GPUs each) + one per rank."""
    gpu = {"GPU": 1.0} if use_gpu else {}
    if cfg.placement == "colocated":
        if num_engines > num_train_ranks:
            raise EngineError(f"colocated placement puts rollout engine i on training rank i's GPU: "
                              f"rollout.num_engines={num_engines} exceeds train.world_size={num_train_ranks} "
                              "(use cluster.placement=split)")
        if engine_gpus > 1:
            raise EngineError(f"colocated placement shares one GPU per engine; rollout.tensor_parallel_size="
                              f"{engine_gpus} needs cluster.placement=split")
        merged = dict(cfg.train_resources)
        for k, v in cfg.rollout_resources.items():
            merged[k] = max(v, merged.get(k, 0.0))
        first = {"CPU": max(cfg.train_num_cpus, cfg.rollout_num_cpus), **gpu, **merged}
        rest = {"CPU": cfg.train_num_cpus, **gpu, **cfg.train_resources}
        return [first] + [dict(rest) for _ in range(num_train_ranks - 1)]
    egpu = {"GPU": float(engine_gpus)} if use_gpu else {}
    rollout = {"CPU": cfg.rollout_num_cpus, **egpu, **cfg.rollout_resources}
    return [dict(rollout) for _ in range(num_engines)] + \
        [{"CPU": cfg.train_num_cpus, **gpu, **cfg.train_resources} for _ in range(num_train_ranks)]


class Cluster:
    """Owns the Ray connection, the placement group and every actor created through it."""

    def __init__(self, cfg: ClusterConfig, run_dir: str | os.PathLike, num_train_ranks: int, num_engines: int = 1,
                 engine_gpus: int = 1):
        self.cfg = cfg
        self.num_train_ranks, self.num_engines = num_train_ranks, num_engines
        self.actors: list[Any] = []
        self.pg: PlacementGroup | None = None
        self.owns_ray = False
        self._closed = False
        self._prev_sigterm = None
        self._connect(run_dir)
        self._install_handlers()
        try:
            self.use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
            self.bundles = plan_bundles(cfg, num_train_ranks, self.use_gpu, num_engines, engine_gpus)
            self.pg = self._placement_group()
        except BaseException:
            self.shutdown()
            raise

    # -- connection ------------------------------------------------------------------------------
    def _connect(self, run_dir: str | os.PathLike) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if ray.is_initialized():
            log.info("reusing the Ray session already initialised in this process")
            return
        if self.cfg.address is not None:
            ray.init(address=self.cfg.address, _node_ip_address=self.cfg.node_ip_address)
            log.info("joined Ray cluster at %s", self.cfg.address)
        else:
            temp = ray_temp_dir(self.cfg, run_dir)
            Path(temp).mkdir(parents=True, exist_ok=True)
            ray.init(address="local", _temp_dir=temp, include_dashboard=False, num_cpus=self.cfg.num_cpus,
                     num_gpus=self.cfg.num_gpus, object_store_memory=self.cfg.object_store_memory,
                     _node_ip_address=self.cfg.node_ip_address)
            log.info("started local Ray (temp dir %s)", temp)
        self.owns_ray = True

    def _install_handlers(self) -> None:
        """SIGTERM -> SystemExit so `with`/finally blocks (and our atexit hook) tear the actors down."""
        atexit.register(self.shutdown)
        if threading.current_thread() is threading.main_thread():
            def on_term(signum, frame):
                raise SystemExit(128 + signum)

            self._prev_sigterm = signal.signal(signal.SIGTERM, on_term)

    # -- placement -------------------------------------------------------------------------------
    def _placement_group(self) -> PlacementGroup:
        pg = placement_group(self.bundles, strategy=self.cfg.strategy)
        try:
            ray.get(pg.ready(), timeout=self.cfg.startup_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            raise EngineError(f"placement group {self.bundles} not schedulable within "
                              f"{self.cfg.startup_timeout_s:.0f}s; cluster has {ray.cluster_resources()}") from None
        return pg

    def _options(self, bundle: int, share: float) -> dict[str, Any]:
        b = self.bundles[bundle]
        threads = self.cfg.actor_threads or max(1, int(b["CPU"]))
        return {
            "num_cpus": b["CPU"] * share,
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}},
            "num_gpus": b.get("GPU", 0.0) * share,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=bundle,
                placement_group_capture_child_tasks=True),
        }

    def rollout_options(self, engine: int = 0) -> dict[str, Any]:
        if self.cfg.placement == "colocated":
            return self._options(engine, 0.5)
        return self._options(engine, 1.0)

    def train_options(self, rank: int) -> dict[str, Any]:
        if self.cfg.placement == "colocated":
            return self._options(rank, 0.5 if rank < self.num_engines else 1.0)
        return self._options(rank + self.num_engines, 1.0)

    def shares_gpu(self, rank: int) -> int | None:
        """The rollout engine on training rank `rank`'s GPU (colocated), or None."""
        return rank if self.cfg.placement == "colocated" and rank < self.num_engines else None

    def scorer_options(self) -> dict[str, Any]:
        """Scoring actors share the rollout's bundle and take turns with it (the offload phases)."""
        return self._options(0, 0.0)

    def track(self, actor: Any) -> Any:
        self.actors.append(actor)
        return actor

    # -- teardown --------------------------------------------------------------------------------
    def shutdown(self, graceful_timeout_s: float = 15.0) -> None:
        """Ask actors to shut down, kill them, drop the placement group; stop Ray if we started it."""
        if self._closed:
            return
        self._closed = True
        if ray.is_initialized():
            pending = []
            for a in self.actors:
                try:
                    pending.append(a.shutdown.remote())
                except Exception:  # noqa: BLE001 - a dead actor cannot be asked anything
                    pass
            if pending:
                ray.wait(pending, num_returns=len(pending), timeout=graceful_timeout_s)
            for a in self.actors:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
            if self.pg is not None:
                try:
                    remove_placement_group(self.pg)
                except Exception:  # noqa: BLE001
                    pass
            if self.owns_ray:
                ray.shutdown()
        self.actors.clear()
        if self._prev_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._prev_sigterm)
            self._prev_sigterm = None
        atexit.unregister(self.shutdown)
        log.info("cluster shut down")

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
