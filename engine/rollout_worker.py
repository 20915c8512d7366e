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
    """Holds one backend; the weight version counts refits so the driver can tell stale rollouts."""

    def __init__(self, backend: str | Callable[..., Any] = "auto", model_dir: str | os.PathLike | None = None,
                 vllm_options: dict[str, Any] | None = None, **kwargs: Any):
        self.model_dir = model_dir
        self.backend_name = backend if isinstance(backend, str) else getattr(backend, "__name__", "custom")
        self.impl = build_backend(backend, model_dir, vllm_options, **kwargs)
        self.layout = moe_layout(model_dir)
        self.version = 0
        self.asleep = False

    def ready(self) -> dict[str, Any]:
        """Where this actor runs (node id, pid) and which backend it built; also a liveness probe."""
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return {"node_id": node, "pid": os.getpid(), "backend": self.backend_name}

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[Rollout]:
        if self.asleep:
            raise RuntimeError("rollout engine is asleep; wake() it (enter the rollout phase) before generate")
        rollouts = self.impl.generate(prompt_token_ids, sampling)
        for r in rollouts:
            if r.routed_experts is not None:
                r.routed_experts = align_routing(r.routed_experts, self.layout)
        return rollouts

    def load_weights(self, named: Iterable[tuple[str, np.ndarray]]) -> tuple[int, int]:
        """Load one bucket of checkpoint-named arrays; returns (tensors, bytes) for refit stats."""
        named = list(named)
        self.impl.load_weights(iter(named))
        return len(named), int(sum(a.nbytes for _, a in named))

    def supports_adapters(self) -> bool:
        """Whether the backend applies LoRA factors itself (load_adapter); see engine/lora_sync.py."""
        return callable(getattr(self.impl, "load_adapter", None))

    def load_adapter(self, named: Iterable[tuple[str, np.ndarray]]) -> tuple[int, int]:
        """Load one bucket of LoRA factors (`<tensor>.lora_lhs` / `.lora_rhs`); returns (tensors, bytes)."""
        named = list(named)
        self.impl.load_adapter(iter(named))
        return len(named), int(sum(a.nbytes for _, a in named))

    def finish_refit(self, version: int) -> None:
        """Called after the last bucket: backends that stage weights may finalise here."""
        done = getattr(self.impl, "finish_refit", None)
        if done is not None:
            done()
        self.version = version

    def get_version(self) -> int:
        return self.version

    def sleep(self) -> None:
        """vLLM sleep mode (release weights + KV cache from the GPU). Backends without it: nothing to release."""
        fn = getattr(self.impl, "sleep", None)
        if fn is None:
            log.info("rollout backend %s has no sleep(); nothing released", self.backend_name)
        else:
            fn()
        self.asleep = True

    def wake(self) -> None:
        """vLLM wake_up (weights + KV cache back on the GPU)."""
        fn = getattr(self.impl, "wake", None)
        if fn is not None:
            fn()
        self.asleep = False

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
