"""Worker-side half of weight refit, mixed into vLLM's Worker via LLM(worker_extension_cls=...).

Why not `model.load_weights`: vLLM post-processes weights after loading (CPU repacks linears and
MoE experts into kernel layouts, MLA derives its absorbed matrices), so checkpoint-format tensors
cannot be copied straight into the live parameters. vLLM's layerwise reload handles that: it puts
every layer back into checkpoint format, buffers the incoming tensors, and re-runs each layer's
post-processing once the layer is complete. We drive it in three RPCs (begin, load bucket*, finish)
instead of one `reload_weights` call so buckets can stream in from another process; one
begin/finish pair also guarantees a layer split across buckets is processed only when whole.

On CPU one step is missing upstream: on a weight *update* the unquantized MoE method copies the
new experts into the existing (already prepacked) storage but skips the CPU kernel's prepack,
so refit_finish re-runs that prepack; without it the experts would compute with garbage.

Expected log noise per refit: "RotaryEmbedding: Failed to load weights" (its cos/sin cache is no
checkpoint tensor; vLLM puts the existing one back untouched).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


class RefitExtension:
    """Methods run inside the vLLM worker; call them with llm.collective_rpc("refit_...")."""

    def refit_begin(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model_runner.get_model())
        self._refit_loaded: set[str] = set()

    def refit_load(self, named_arrays: list[tuple[str, np.ndarray]]) -> int:
        """Load one bucket of checkpoint-named arrays or tensors (any dtype: the loaders cast); returns how many."""
        if not hasattr(self, "_refit_loaded"):
            raise RuntimeError("refit_load called before refit_begin")
        with warnings.catch_warnings():
            # Arrays from Ray's object store are read-only; the loaders only read them.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            weights = [(name, arr if isinstance(arr, torch.Tensor) else torch.from_numpy(arr))
                       for name, arr in named_arrays]
        loaded = self.model_runner.get_model().load_weights(iter(weights))
        self._refit_loaded |= set(loaded or ())
        return len(weights)

    def refit_nccl_init(self, host: str, port: int, world_size: int, first_rank: int, timeout_s: float) -> None:
        """Join the refit NCCL group (engine/weight_sync/nccl.py) as rank first_rank + this worker's TP rank."""
        from engine.weight_sync.nccl import NcclGroup

        self._refit_nccl = NcclGroup(host, port, world_size, first_rank + int(getattr(self, "rank", 0)),
                                     torch.device("cuda", torch.cuda.current_device()), timeout_s)

    def refit_nccl_load(self, meta) -> int:
        """Receive one bucket by broadcast from training rank 0, check it, load it (between begin and finish)."""
        from engine.weight_sync import unpack, verify

        buf = self._refit_nccl.receive(meta)
        verify(meta, buf, f"vLLM worker {getattr(self, 'rank', 0)}")
        return self.refit_load(unpack(meta, buf))

    def refit_finish(self) -> int:
        """Process every layer that was not completed during loading; returns #params loaded."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
        from vllm.platforms import current_platform

        model = self.model_runner.get_model()
        finalize_layerwise_reload(model, self.model_runner.model_config)
        if current_platform.is_cpu():
            _reprepack_cpu_moe(model)
        n = len(self._refit_loaded)
        del self._refit_loaded
        return n


def _reprepack_cpu_moe(model: torch.nn.Module) -> None:
    """Re-run the CPU experts' prepack on each routed-experts layer (see module docstring)."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts):
            experts.process_weights_after_loading(module)
