"""Hugging Face DeepseekV2 checkpoints: config.json + safetensors with per-expert names.

In memory, routed experts are 3-D params (`mlp.experts.gate_up_proj [E, 2I, H]`,
`mlp.experts.down_proj [E, H, I]`), as in transformers. On disk, and for vLLM, each expert
is named on its own as in DeepSeek-V2-Lite: `mlp.experts.{e}.{gate,up,down}_proj.weight`.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, DeepseekV2Config

from .atomic import atomic_write

FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
SAFE_INDEX = "model.safetensors.index.json"


def to_checkpoint_tensors(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """In-memory names -> checkpoint names. Expert tensors are views into the fused params (no copy)."""
    for name, t in state.items():
        m = FUSED.match(name)
        if m is None:
            yield name, t
            continue
        prefix, kind = m.groups()
        if t.dim() != 3 or (kind == "gate_up_proj" and t.shape[1] % 2):
            raise ValueError(f"{name}: expected a 3-D [experts, ...] expert tensor, got shape {tuple(t.shape)}")
        if kind == "gate_up_proj":                                      # [E, 2I, H]: gate rows first, then up
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.gate_proj.weight", t[e, :inter]
                yield f"{prefix}.{e}.up_proj.weight", t[e, inter:]
        else:                                                           # [E, H, I]
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.down_proj.weight", t[e]


def from_checkpoint_tensors(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint names -> in-memory names (stacks per-expert weights; fused names pass through)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in named.items():
        m = PER_EXPERT.match(name)
        if m is None:
            out[name] = t
            continue
        prefix, e, kind = m.groups()
        experts.setdefault(prefix, {}).setdefault(int(e), {})[kind] = t
    for prefix, by_expert in experts.items():
        ids = sorted(by_expert)
        if ids != list(range(len(ids))):
            raise ValueError(f"checkpoint experts under {prefix} are not numbered 0..{len(ids) - 1}")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([by_expert[e]["gate_proj"], by_expert[e]["up_proj"]]) for e in ids])
        out[f"{prefix}.down_proj"] = torch.stack([by_expert[e]["down_proj"] for e in ids])
    return out


def save_checkpoint(network, directory: str | os.PathLike, state_dict: dict | None = None,
                    max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json and (sharded) safetensors in the HF DeepseekV2 layout, each file atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else network.state_dict()
    tensors = {n: t.detach().to("cpu").contiguous().clone() for n, t in to_checkpoint_tensors(state)}

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        if size and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        atomic_write(directory / "model.safetensors", lambda p: save_file(shards[0], p, metadata=meta))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(directory / fname, lambda p, s=shard: save_file(s, p, metadata=meta))
            weight_map.update({n: fname for n in shard})
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
        atomic_write(directory / SAFE_INDEX, lambda p: Path(p).write_text(json.dumps(index, indent=2)))

    config = network.config
    config.architectures = [network.hf_architecture]
    atomic_write(directory / "config.json", lambda p: Path(p).write_text(config.to_json_string()))


def read_checkpoint_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    index = directory / SAFE_INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    named = {}
    for fname in files:
        with safe_open(directory / fname, framework="pt") as f:
            for k in f.keys():
                named[k] = f.get_tensor(k)
    return named


def load_config(directory: str | os.PathLike) -> DeepseekV2Config:
    """DeepseekV2 config; a deepseek_v3 checkpoint maps onto it with sigmoid gating."""
    config = AutoConfig.from_pretrained(directory)
    if config.model_type == "deepseek_v3":
        fields = config.to_dict()
        fields.pop("model_type", None)
        fields.setdefault("scoring_func", "sigmoid")
        fields["topk_method"] = "noaux_tc"
        config = DeepseekV2Config(**fields)
    return config
