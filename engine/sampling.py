"""What a rollout backend is asked to do (SamplingConfig) and what it hands back (Rollout).

Both are backend-neutral so GRPO code never touches vLLM types: a Rollout carries token ids
(not only text) because the trainer must score exactly the tokens that were sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class SamplingConfig(BaseModel):
    """How to sample completions. top_k=0 and top_p=1.0 disable those filters."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(1, ge=1, description="samples per prompt (the GRPO group size)")
    temperature: float = Field(1.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = no top-k filter")
    max_tokens: int = Field(256, ge=1, description="completion length cap")
    min_tokens: int = Field(0, ge=0, description="no stop (EOS or stop tokens) before this many completion tokens "
                                                 "(vLLM's min_tokens); for runs that must sample fixed lengths")
    stop: list[str] = Field(default_factory=list, description="stop strings (need a tokenizer)")
    stop_token_ids: list[int] = Field(default_factory=list, description="extra stop tokens besides EOS")
    seed: int | None = Field(None, description="makes a generate() call reproducible")
    logprobs: bool = Field(True, description="return the log-prob of each sampled token")


FinishReason = Literal["stop", "length"]


@dataclass
class Rollout:
    """One sampled completion of one prompt.

    logprobs are the sampling engine's log-probs of the sampled tokens (float32 values, one per
    token in token_ids) under the distribution it sampled from (after temperature; vLLM's
    processed_logprobs), or None when not requested. routed_experts, when the backend can capture
    them, is one compact int array (uint8/int16, see compact_experts) [tokens run through the model
    (prompt + completion), k] per MoE layer, in MoE-layer order: backends that return every decoder
    layer (vLLM sizes it by num_hidden_layers) are cut down to the MoE layers by the rollout worker.
    """

    prompt_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float] | None
    text: str
    finish_reason: FinishReason
    routed_experts: list[np.ndarray] | None = None


def compact_dtype(n_experts: int | None) -> np.dtype:
    """The smallest integer type that holds expert ids 0..n_experts-1 (uint8 up to 256 experts)."""
    if n_experts is not None and n_experts <= 256:
        return np.dtype(np.uint8)
    if n_experts is not None and n_experts <= 32768:
        return np.dtype(np.int16)
    return np.dtype(np.int32)


def compact_experts(routed: list[np.ndarray], n_experts: int | None) -> list[np.ndarray]:
    """Routed-expert arrays in compact_dtype(n_experts) (they travel rollout -> driver -> trainer)."""
    dtype = compact_dtype(n_experts)
    return [np.ascontiguousarray(np.asarray(r), dtype=dtype) for r in routed]


# -- per-completion seeds and spreading prompts over engines --------------------------------------
_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijective scramble of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def prompt_seed(seed: int, prompt_index: int) -> int:
    """The seed of a prompt's group: a function of the call's seed (run seed, step, round) and the prompt's
    global index in that call only, so it does not depend on which engine or batch the prompt lands in.
    Sample j of the prompt uses prompt_seed + j (what vLLM does with one request of n > 1)."""
    return _mix64(_mix64(seed & _MASK64) ^ prompt_index) >> 2        # < 2**62: room for + j, fits int64


def completion_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    return prompt_seed(seed, prompt_index) + sample_index


def spread_prompts(costs: list[float], num_engines: int) -> list[list[int]]:
    """Prompt indices per engine: equal counts (differing by at most one), the costliest prompts spread
    first, each to the engine with the least cost so far that still has room (longest-processing-time
    first under a count cap). Each engine's list is in ascending prompt order."""
    n = len(costs)
    caps = [n // num_engines + (k < n % num_engines) for k in range(num_engines)]
    load, parts = [0.0] * num_engines, [[] for _ in range(num_engines)]
    for i in sorted(range(n), key=lambda i: (-costs[i], i)):
        k = min((k for k in range(num_engines) if len(parts[k]) < caps[k]), key=lambda k: (load[k], k))
        parts[k].append(i)
        load[k] += costs[i]
    return [sorted(p) for p in parts]
