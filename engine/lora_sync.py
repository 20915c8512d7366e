"""LoRA weight sync: which payload a refit sends, and applying adapter factors on the rollout side.

Payloads (engine/train/lora.py builds them on the trainer):
- adapter: per adapted tensor `<name>.lora_lhs` L and `<name>.lora_rhs` R (in-memory names, scaling folded
  in), the rollout sets W = W_base + L @ R. r·(in + out) numbers per matrix instead of in·out.
  The native backend applies them (NativeRollout.load_adapter -> AdapterApplier).
- merged: the blocks that hold adapted tensors (a layer's self_attn, its routed experts), W + ΔW under
  checkpoint names, loaded by any backend's load_weights. The other weights never change under LoRA and
  the rollout engine starts from the same base; whole blocks because vLLM fuses inside them (see
  engine/train/lora.py changed_blocks) and rebuilds MLA's absorbed W_UK_T / W_UV from kv_b_proj on refit.
- full: every tensor, merged (what a full fine-tuning refit sends).

vLLM (0.32, checked in its installed source) is sent `merged`, because its LoRA cannot carry our adapters
for DeepSeek-V2:
- linear layers (LinearBase: q_proj, q_a_proj + kv_a_proj_with_mqa as the fused `fused_qkv_a_proj`,
  q_b_proj, o_proj, the dense and shared-expert MLPs) are covered by its punica LoRA layers;
- kv_b_proj is a LinearBase too, but MLA absorbs its weight into W_UK_T / W_UV at load time
  (MLAAttention.process_weights_after_loading) and decodes with those, calling kv_b_proj itself only
  for prefill context: an adapter there would change prefill and not decode, so it is not covered;
- routed experts: FusedMoEWithLoRA wraps the fused MoE (gate/up/down; it reads peft's target_parameters
  layout, `experts.base_layer` = gate_up_proj and `experts` = down_proj; DeepseekV2 declares
  is_3d_moe_weight=False, so they go the per-expert w1/w3/w2 way), but only with the GPU punica kernels
  (punica_cpu has no fused-MoE LoRA ops) and, under vLLM's own expert parallelism, only with the
  allgather_reducescatter all-to-all;
- adapters reach vLLM as LoRARequests read from disk per request, not as in-memory refit buckets.
So sync=adapter is refused for a backend without load_adapter, and auto picks merged there.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

LHS, RHS = ".lora_lhs", ".lora_rhs"


def refit_payload(sync: str, backend_applies_adapters: bool) -> str:
    """lora.sync (auto | adapter | merged | full) -> the payload for this rollout backend."""
    if sync == "auto":
        return "adapter" if backend_applies_adapters else "merged"
    if sync == "adapter" and not backend_applies_adapters:
        raise ValueError("train.lora.sync=adapter: the rollout backend cannot apply adapters (no load_adapter; "
                         "vLLM gets merged layers, see engine/lora_sync.py); use auto, merged or full")
    return sync


class AdapterApplier:
    """Keeps the base value of every adapted tensor of a network and sets W = W_base + L @ R as factor
    pairs arrive (the two halves of a pair may come in different buckets)."""

    def __init__(self, network: torch.nn.Module):
        self.network = network
        self.base: dict[str, torch.Tensor] = {}
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def load(self, named: Iterable[tuple[str, np.ndarray | torch.Tensor]]) -> int:
        """Returns how many tensors were updated by this bucket."""
        params = dict(self.network.named_parameters())
        done = 0
        for key, array in named:
            value = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))
            for suffix in (LHS, RHS):
                if key.endswith(suffix):
                    name = key[: -len(suffix)]
                    break
            else:
                raise KeyError(f"adapter refit sent {key!r}: expected <tensor>{LHS} or <tensor>{RHS}")
            if name not in params:
                raise KeyError(f"adapter refit sent factors for a tensor the rollout model does not have: {name}")
            halves = self.pending.setdefault(name, {})
            halves[suffix] = value
            if len(halves) < 2:
                continue
            del self.pending[name]
            target = params[name]
            base = self.base.setdefault(name, target.detach().clone())
            d = torch.matmul(halves[LHS].float(), halves[RHS].float())          # [out, in] or [E, out, in]
            if d.shape != target.shape:
                raise ValueError(f"adapter for {name}: L @ R has shape {tuple(d.shape)}, the tensor "
                                 f"{tuple(target.shape)}")
            target.copy_((base.float() + d.to(base.device)).to(target.dtype))
            done += 1
        return done
