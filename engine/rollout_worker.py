"""The rollout actor shell: one generation backend behind a fixed generate/load_weights/sleep/wake API.

Backends are imported lazily inside the actor so the driver never needs vLLM: "vllm" is
engine.rollout_vllm.VLLMRollout, "native" is engine.rollout_native.NativeRollout (our absorbed-MLA
decode), "auto" picks vLLM when it is importable. A callable may be passed instead of a name
(tests use an HF-generate stand-in); it is called as backend(model_dir, **kwargs).
Plain class so it can run in-process; the driver wraps it with ray.remote.

Routing replay alignment: whatever layers a backend returns routed experts for (vLLM: every
decoder layer, dense ones included; native: the MoE layers), the worker hands back exactly the MoE
layers, in MoE-layer order (model.network.moe_layer_indices of the checkpoint's config), as compact
integer arrays, which is how the trainer's model indexes replay.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .sampling import Rollout, SamplingConfig, compact_experts

log = logging.getLogger(__name__)


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None else "native"
    if backend not in ("vllm", "native"):
        raise ValueError(f"rollout backend must be auto|vllm|native, got {backend!r}")
    return backend


def moe_layout(model_dir: str | os.PathLike | None) -> tuple[int, list[int], int | None] | None:
    """(num_hidden_layers, MoE layer indices, n_routed_experts) from the checkpoint's config.json, or None."""
    from types import SimpleNamespace

    from model.network import moe_layer_indices

    path = Path(model_dir) / "config.json" if model_dir is not None else None
    if path is None or not path.is_file():
        return None
    cfg = SimpleNamespace(**json.loads(path.read_text()))
    return cfg.num_hidden_layers, moe_layer_indices(cfg), getattr(cfg, "n_routed_experts", None)


def align_routing(routed: list[np.ndarray], layout: tuple[int, list[int], int | None] | None) -> list[np.ndarray]:
    """Routed experts per MoE layer in MoE-layer order, from per-decoder-layer or per-MoE-layer lists."""
    if layout is None:
        return compact_experts(routed, None) if routed else routed
    num_layers, moe_layers, n_experts = layout
    if len(routed) == len(moe_layers):
        picked = routed
    elif len(routed) == num_layers:
        picked = [routed[i] for i in moe_layers]
    else:
        raise ValueError(f"rollout returned routed experts for {len(routed)} layers; the model has {num_layers} "
                         f"decoder layers of which {len(moe_layers)} are MoE")
    return compact_experts(picked, n_experts)


def build_backend(backend: str | Callable[..., Any], model_dir: str | os.PathLike | None,
                  vllm_options: dict[str, Any] | None = None, **kwargs):
    """Instantiate a backend by name (lazy import) or by calling a factory.

    vllm_options (engine.vllm_mode.VLLMOptions as a dict) go to the vLLM backend only; kwargs win over them.
    """
    if callable(backend):
        return backend(model_dir, **kwargs)
    name = resolve_backend(backend)
    if name == "vllm":
        from .rollout_vllm import VLLMRollout

        return VLLMRollout(model_dir, **{**(vllm_options or {}), **kwargs})
    from .rollout_native import NativeRollout

    return NativeRollout(model_dir, **kwargs)


class RolloutWorker:
    """Holds one backend; the weight version counts refits so the driver can tell stale rollouts.

    Memory states (GPU backends; a no-op on CPU): awake -> sleep() -> asleep (weights and KV cache
    released) -> wake(["weights"]) -> refit -> wake(["kv_cache"]) -> awake; the prefix cache is reset
    (and checked) before the first generate after a refit, when the KV cache is back.
    """

    TAGS = ("weights", "kv_cache")

    def __init__(self, backend: str | Callable[..., Any] = "auto", model_dir: str | os.PathLike | None = None,
                 vllm_options: dict[str, Any] | None = None, name: str = "rollout engine 0", **kwargs: Any):
        self.model_dir = model_dir
        self.name = name
        self.backend_name = backend if isinstance(backend, str) else getattr(backend, "__name__", "custom")
        self.impl = build_backend(backend, model_dir, vllm_options, **kwargs)
        self.layout = moe_layout(model_dir)
        self.version = 0
        self.released: set[str] = set()          # memory tags the driver asked off the accelerator
        self._device_released: set[str] = set()  # and what the backend really released
        self.prefix_stale = False
        self._nccl = None
        gen = getattr(self.impl, "generate", None)
        self.takes_indices = gen is not None and "prompt_indices" in inspect.signature(gen).parameters

    @property
    def asleep(self) -> bool:
        return bool(self.released)

    def ready(self) -> dict[str, Any]:
        """Where this actor runs (node id, pid) and which backend it built; also a liveness probe."""
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return {"node_id": node, "pid": os.getpid(), "backend": self.backend_name, "name": self.name,
                "serve_dtype": self.serve_dtype(), "takes_prompt_indices": self.takes_indices}

    def serve_dtype(self) -> str | None:
        """The dtype the engine computes in ("bfloat16", "float32", ...), refit buckets travel in it; None = unknown."""
        fn = getattr(self.impl, "serve_dtype", None)
        if fn is not None:
            return fn()
        net = getattr(self.impl, "network", None)
        if net is not None:
            return str(next(net.parameters()).dtype).removeprefix("torch.")
        return None

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig,
                 prompt_indices: list[int] | None = None) -> list[Rollout]:
        """Completions of the prompts; prompt_indices are their global indices in the driver's call (they
        pick each completion's seed, see engine.sampling.completion_seed); Rollout.prompt_index stays local."""
        if self.asleep:
            raise RuntimeError(f"{self.name} is asleep ({sorted(self.released)} released); wake() it (enter the "
                               "rollout phase) before generate")
        if self.prefix_stale:
            self.reset_prefix_cache()
        if prompt_indices is not None and not self.takes_indices:
            if list(prompt_indices) != list(range(len(prompt_token_ids))):
                raise ValueError(f"rollout backend {self.backend_name} has no prompt_indices argument, so it "
                                 "cannot seed by global prompt index: use engine.rollout.num_engines=1")
            prompt_indices = None
        extra = {} if prompt_indices is None else {"prompt_indices": list(prompt_indices)}
        rollouts = self.impl.generate(prompt_token_ids, sampling, **extra)
        for r in rollouts:
            if r.routed_experts is not None:
                r.routed_experts = align_routing(r.routed_experts, self.layout)
        return rollouts

    # -- refit -----------------------------------------------------------------------------------
    def load_weights(self, named: Iterable[tuple[str, np.ndarray]]) -> tuple[int, int]:
        """Load one bucket of checkpoint-named arrays; returns (tensors, bytes) for refit stats."""
        self._check_weights_resident()
        named = list(named)
        self.impl.load_weights(iter(named))
        return len(named), int(sum(a.nbytes for _, a in named))

    def supports_adapters(self) -> bool:
        """Whether the backend applies LoRA factors itself (load_adapter); see engine/lora_sync.py."""
        return callable(getattr(self.impl, "load_adapter", None))

    def load_adapter(self, named: Iterable[tuple[str, np.ndarray]]) -> tuple[int, int]:
        """Load one bucket of LoRA factors (`<tensor>.lora_lhs` / `.lora_rhs`); returns (tensors, bytes)."""
        self._check_weights_resident()
        named = list(named)
        self.impl.load_adapter(iter(named))
        return len(named), int(sum(a.nbytes for _, a in named))

    def receive_bucket(self, transport: str, meta: Any, payload: Any = None, adapter: bool = False) -> tuple[int, int]:
        """Load one weight-sync bucket (engine/weight_sync): check its size and checksum, view its bytes as
        the tensors it packs (served dtype, no up-cast), load them (adapter: LoRA factors, load_adapter);
        returns (tensors, bytes)."""
        from .weight_sync import unpack, verify
        from .weight_sync import cuda_ipc

        self._check_weights_resident()
        if transport == "object_store":
            buf = payload
        elif transport == "cuda_ipc":
            buf = cuda_ipc.receive(meta, payload)
        elif transport == "nccl":
            if getattr(self.impl, "receive_nccl", None) is not None:    # vLLM: each TP worker receives itself
                return self.impl.receive_nccl(meta), meta.nbytes
            if self._nccl is None:
                raise RuntimeError(f"{self.name}: nccl bucket before nccl_join")
            buf = self._nccl.receive(meta)
        else:
            raise ValueError(f"unknown weight-sync transport {transport!r}")
        verify(meta, buf, self.name)
        named = unpack(meta, buf)
        (self.impl.load_adapter if adapter else self.impl.load_weights)(iter(named))
        del buf
        return len(named), meta.nbytes

    def nccl_join(self, host: str, port: int, world_size: int, rank: int, timeout_s: float) -> None:
        """Join the refit process group (engine/weight_sync/nccl.py) from rank `rank` on (one rank per TP worker
        of this engine; run concurrently with rank 0). vLLM: its workers join; otherwise this actor does."""
        import torch

        from .weight_sync.nccl import NcclGroup

        join = getattr(self.impl, "nccl_join", None)
        if join is not None:
            join(host, port, world_size, rank, timeout_s)
            self._nccl = "backend"
        elif self._nccl is None:
            self._nccl = NcclGroup(host, port, world_size, rank, torch.device("cuda", torch.cuda.current_device()),
                                   timeout_s)

    def finish_refit(self, version: int) -> None:
        """Called after the last bucket: backends that stage weights may finalise here."""
        done = getattr(self.impl, "finish_refit", None)
        if done is not None:
            done()
        self.version = version
        self.prefix_stale = True

    def _check_weights_resident(self) -> None:
        if "weights" in self.released:
            raise RuntimeError(f"{self.name}: refit while its weights are released; wake(['weights']) first")

    def reset_prefix_cache(self) -> None:
        """Drop KV blocks computed by the old weights; a backend that reports failure is an error."""
        fn = getattr(self.impl, "reset_prefix_cache", None)
        if fn is not None and fn() is False:
            raise RuntimeError(f"{self.name}: prefix cache reset after refit failed (requests still running?)")
        self.prefix_stale = False

    def get_version(self) -> int:
        return self.version

    # -- memory ----------------------------------------------------------------------------------
    def sleep(self, tags: list[str] | None = None) -> None:
        """Release memory tags (None = weights and KV cache). The device is only released when the weights
        go (vLLM sleep level 1 frees both); a KV-only release is recorded but the cache stays allocated (it
        is needed again right after the refit that follows). Backends without sleep(): recorded only."""
        self.released |= set(tags or self.TAGS)
        if "weights" not in self.released or self._device_released:
            return
        fn = getattr(self.impl, "sleep", None)
        if fn is None:
            log.info("rollout backend %s has no sleep(); nothing released", self.backend_name)
        else:
            fn()
        self._device_released = set(self.TAGS)

    def wake(self, tags: list[str] | None = None) -> None:
        """Bring back the named memory (weights and/or kv_cache; None = both), only what really was released."""
        tags = list(tags or self.TAGS)
        self.released -= set(tags)
        on_device = [t for t in self.TAGS if t in tags and t in self._device_released]
        if not on_device:
            return
        fn = getattr(self.impl, "wake", None)
        if fn is not None:
            fn(on_device)
        self._device_released -= set(on_device)

    def resident_bytes(self) -> int:
        """Accelerator bytes the engine holds when awake: the backend's own count, else the checkpoint size."""
        fn = getattr(self.impl, "memory_bytes", None)
        if fn is not None:
            return int(fn())
        if self.model_dir is None or not Path(self.model_dir).is_dir():
            return 0
        return sum(p.stat().st_size for p in Path(self.model_dir).glob("*.safetensors"))

    def shutdown(self) -> None:
        fn = getattr(self.impl, "shutdown", None)
        if fn is not None:
            fn()
