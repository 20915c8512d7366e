"""Numerics and memory switches of a training rank: precision (accelerate's autocast for sharding=none;
fsdp2 uses MixedPrecisionPolicy, see sharding.py), gradient checkpointing, and whether the network
scores tokens itself (chunked log-probs from hidden states, model/logprobs.py)."""
from __future__ import annotations

import torch
from torch import nn


def accelerator_for(mixed_precision: str):
    """accelerate's Accelerator for autocast + fp16 loss scaling; its state is per process, reset if it differs."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def resolve_precision(mixed_precision: str) -> str:
    cuda = torch.cuda.is_available()
    if mixed_precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if mixed_precision == "fp16" and not cuda:
        raise ValueError("train.mixed_precision=fp16 needs a CUDA device (use bf16 or no on CPU)")
    return mixed_precision


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward (ours: Backbone's flag; transformers': its own API)."""
    from model.network import Backbone

    ours = [m for m in model.modules() if isinstance(m, Backbone)]
    for m in ours:
        m.gradient_checkpointing = True
    if not ours:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def scores_in_forward(model: nn.Module) -> bool:
    from model.network import DeepseekV2LM

    return isinstance(model, DeepseekV2LM)
