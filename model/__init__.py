"""deepalign's DeepSeek-V2 network (MLA + DeepSeekMoE), checkpoint-compatible with transformers and vLLM.

    from model import build, from_pretrained
    net = build("tiny")                      # or build(config)
    net.save_pretrained("ckpt"); net = from_pretrained("ckpt")
    net(input_ids, attention_mask).logits
"""
from __future__ import annotations

import os

import torch
from transformers import DeepseekV2Config

from .attention import LatentCache
from .checkpoint import from_checkpoint_tensors, load_config, read_checkpoint_tensors, to_checkpoint_tensors
from .network import DeepseekV2LM, DeepseekV2RewardModel, LMOutput
from .presets import PRESETS, make_config, parameter_counts

__all__ = ["DeepseekV2LM", "DeepseekV2RewardModel", "LMOutput", "LatentCache", "PRESETS", "build",
           "from_pretrained", "make_config", "parameter_counts", "to_checkpoint_tensors", "from_checkpoint_tensors"]


def build(config: str | DeepseekV2Config = "tiny", reward_model: bool = False, seed: int | None = None, **overrides):
    """A freshly initialised network from a preset name or a config."""
    if isinstance(config, str):
        config = make_config(config, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return (DeepseekV2RewardModel if reward_model else DeepseekV2LM)(config)


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    reward_model: bool | None = None, weights: bool = True, **config_overrides):
    """Load an HF DeepseekV2 checkpoint directory (ours, transformers' or DeepSeek's layout).
    weights=False: the architecture only, on the meta device (nothing read or allocated), for a training
    rank that receives its shards from rank 0."""
    config = load_config(path)
    for k, v in config_overrides.items():
        setattr(config, k, v)
    if reward_model is None:
        reward_model = any("SequenceClassification" in a for a in (config.architectures or []))
    cls = DeepseekV2RewardModel if reward_model else DeepseekV2LM
    with torch.device("meta"):
        network = cls(config)
    if not weights:
        return network.to(dtype=dtype)
    state = from_checkpoint_tensors(read_checkpoint_tensors(path))
    if not reward_model:
        state = {k: v for k, v in state.items() if not k.startswith("score.")}
    network.load_state_dict(state, strict=False, assign=True)
    if reward_model and network.score.weight.is_meta:  # a fresh value head on a causal-LM checkpoint
        network.score.weight = torch.nn.Parameter(torch.empty(network.score.weight.shape))
        network.score.weight.data.normal_(0.0, config.initializer_range)
    missing = [n for n, p in network.named_parameters() if p.is_meta]
    missing += [n for n, b in network.named_buffers() if b.is_meta and not n.endswith(("inv_freq", ".load"))]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    # Non-persistent buffers (rotary frequencies, load counters) are rebuilt rather than loaded.
    for module in network.modules():
        if hasattr(module, "inv_freq") and module.inv_freq.is_meta:
            from .rope import inv_frequencies
            module.inv_freq = inv_frequencies(config)[0]
        if hasattr(module, "load") and isinstance(module.load, torch.Tensor) and module.load.is_meta:
            module.load = torch.zeros(module.n_experts)
    return network.to(device=device, dtype=dtype).eval()
