"""LoRA on the policy: peft adapters injected in place, the frozen base as the reference, merged views.

    attach(model, cfg)                      # peft's inject_adapter_in_model; only the adapters train
    with adapters_disabled(model): ...      # the base model (= the reference: no second copy)
    merged_named_tensors(model, gather)     # (checkpoint name, W + ΔW): export, full or changed-only refit
    adapter_factors(model, gather)          # (in-memory name, L, R) with ΔW = L @ R: adapter-only refit

Injection keeps our network's class (so sharding, chunked log-probs and checkpointing see the same
model); peft renames a wrapped weight `<m>.base_layer.weight` (`<experts>.base_layer[.base_layer].<p>`
for the routed experts' 3-D tensors: one nested ParamWrapper per targeted tensor) and adds
`<m>.lora_A.default.weight` [r·E, in] and `<m>.lora_B.default.weight` [out, r·E] (E = 1 for a linear).

ΔW, as peft computes it (LoraLayer.get_delta_weight, ParamWrapper.get_delta_factors), s = alpha / r:
    linear:                  ΔW = s · B @ A                                              [out, in]
    3-D experts [E, out, in]: ΔW_e = s · B_e @ A_e, A_e = A.view(E, r, in)[e], B_e = B.view(out, r, E)[..., e]
(our RoutedExperts stores [E, out, in], so peft swaps in/out; a [E, in, out] module would be transposed).
The factors are gathered with `gather` (a DTensor's full_tensor under fsdp2) and multiplied here,
not by peft, so the same code runs on sharded parameters; tests compare it with peft's merge.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..config import LoraConfig

ADAPTER = "default"
_BASE = re.compile(r"\.base_layer(?=\.|$)")
Gather = Callable[[torch.Tensor], torch.Tensor]


def to_peft(cfg: LoraConfig):
    """peft.LoraConfig for our network: linear targets by suffix, expert tensors by parameter name."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.target_modules) or None,
                          target_parameters=[f"mlp.experts.{p}" for p in cfg.target_experts] or None)


def attach(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Inject the adapters in place (same RNG on every rank gives the same A init); freeze everything else."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(to_peft(cfg), model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    return model


def clean_name(name: str) -> str:
    """peft's wrapped name -> the network's own name (`.base_layer` segments dropped)."""
    return _BASE.sub("", name)


def _layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and ADAPTER in m.lora_A:
            yield name, m


def targets(model: nn.Module) -> dict[str, tuple[str, str, float, int, bool]]:
    """{network name of the adapted tensor: (state key of A, of B, scaling, experts, in/out swapped)}."""
    from peft.tuners.lora import ParamWrapper

    out = {}
    for name, m in _layers(model):
        prefix = f"{name}." if name else ""
        param = m.parameter_name if isinstance(m, ParamWrapper) else "weight"
        out[clean_name(f"{prefix}{param}")] = (f"{prefix}lora_A.{ADAPTER}.weight", f"{prefix}lora_B.{ADAPTER}.weight",
                                               float(m.scaling[ADAPTER]), int(getattr(m, "num_experts", 1)),
                                               bool(getattr(m, "_did_swap_in_out_features", False)))
    return out


def factors(a: torch.Tensor, b: torch.Tensor, scaling: float, experts: int, swapped: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with ΔW = L @ R: [out, r] @ [r, in] for a linear, [E, out, r] @ [E, r, in] for 3-D experts."""
    if experts == 1:
        return b * scaling, a
    a_e = a.reshape(experts, -1, a.shape[-1])                        # [E, r, in]
    b_e = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)        # [E, out, r]
    if swapped:                                                      # param [E, out, in] (ours)
        return b_e * scaling, a_e
    return a_e.transpose(-2, -1) * scaling, b_e.transpose(-2, -1)    # param [E, in, out]


def delta(a, b, scaling: float, experts: int, swapped: bool) -> torch.Tensor:
    lhs, rhs = factors(a, b, scaling, experts, swapped)
    return lhs @ rhs


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model: every LoRA layer bypassed (peft's enable_adapters(False)), restored on exit."""
    layers = [m for _, m in _layers(model)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def changed_blocks(names) -> tuple[str, ...]:
    """The blocks an adapted tensor belongs to, as name prefixes: the module's parent for a linear
    (`layers.i.self_attn.`, `layers.i.mlp.`), the experts module for a 3-D expert tensor."""
    return tuple(sorted({n.rsplit(".", 2)[0] + "." if n.endswith(".weight") else n.rsplit(".", 1)[0] + "."
                         for n in names}))


def merged_state(model: nn.Module, gather: Gather = _identity, only_changed: bool = False
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(network name, full tensor) of the model as if merged: W + ΔW on adapted tensors, the rest as is.
    only_changed = every tensor of the blocks holding an adapted tensor (changed_blocks): whole blocks,
    because vLLM fuses within them (q_a_proj + kv_a_proj_with_mqa, gate + up, all experts in one FusedMoE)
    and its layerwise reload leaves a partly loaded fused layer half-empty. Gathers in state-dict order
    (the same on every rank)."""
    state = model.state_dict()
    tgt = targets(model)
    blocks = changed_blocks(tgt)
    lora_keys = {k for a, b, *_ in tgt.values() for k in (a, b)}
    for key, x in state.items():
        if key in lora_keys:
            continue
        name = clean_name(key)
        if only_changed and not name.startswith(blocks):
            continue
        x = gather(x).detach()
        if name in tgt:
            a_key, b_key, s, experts, swapped = tgt[name]
            d = delta(gather(state[a_key]).detach().float(), gather(state[b_key]).detach().float(), s, experts,
                      swapped)
            x = (x.float() + d).to(x.dtype)
        yield name, x


def merged_named_tensors(model: nn.Module, gather: Gather = _identity, only_changed: bool = False
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """merged_state under checkpoint names (per-expert tensors, as vLLM and our safetensors name them)."""
    from model.checkpoint import to_checkpoint_tensors

    for name, x in merged_state(model, gather, only_changed):
        yield from to_checkpoint_tensors({name: x})


def adapter_factors(model: nn.Module, gather: Gather = _identity) -> Iterator[tuple[str, torch.Tensor]]:
    """The adapter-only refit payload: `<name>.lora_lhs` L then `<name>.lora_rhs` R per adapted tensor
    (in-memory names, scaling folded into the factors), so that the receiver sets W = W_base + L @ R."""
    state = model.state_dict()
    for name, (a_key, b_key, s, experts, swapped) in targets(model).items():
        lhs, rhs = factors(gather(state[a_key]).detach().float(), gather(state[b_key]).detach().float(), s,
                           experts, swapped)
        yield f"{name}.lora_lhs", lhs.contiguous()
        yield f"{name}.lora_rhs", rhs.contiguous()


def adapter_state(model: nn.Module, gather: Gather = _identity) -> dict[str, torch.Tensor]:
    """peft's on-disk adapter keys (`base_model.model.<m>.lora_A.weight`), full tensors on CPU."""
    out = {}
    for name, x in model.state_dict().items():
        if ".lora_" in name:
            key = "base_model.model." + name.replace(f".{ADAPTER}.", ".")
            out[key] = gather(x).detach().to("cpu").contiguous().clone()
    return out


def save_adapter(path: str | Path, cfg: LoraConfig, state: dict[str, torch.Tensor], base: str | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors, loadable with peft.PeftModel.from_pretrained."""
    from safetensors.torch import save_file

    from model.atomic import atomic_write

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pcfg = to_peft(cfg)
    pcfg.base_model_name_or_path = base
    pcfg.save_pretrained(str(path))
    atomic_write(path / "adapter_model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_for(config, cfg: LoraConfig) -> int:
    """Adapter parameters of a network config, from its shapes on the meta device (for align plan)."""
    import model as ours
    from model.moe import RoutedExperts

    with torch.device("meta"):
        net = ours.build(config)
    total = 0
    for name, m in net.named_modules():
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in cfg.target_modules:
            total += cfg.r * (m.in_features + m.out_features)
        if isinstance(m, RoutedExperts):
            for p in cfg.target_experts:
                E, out, inp = getattr(m, p).shape
                total += cfg.r * E * (out + inp)
    return total


def refit_payload(model: nn.Module, kind: str, gather: Gather = _identity) -> Iterator[tuple[str, torch.Tensor]]:
    """What a refit sends: full = every tensor, merged; merged = the blocks holding adapted tensors, merged
    (checkpoint names, any backend's load_weights); adapter = the factors (a backend's load_adapter)."""
    if kind == "adapter":
        return adapter_factors(model, gather)
    if kind in ("full", "merged"):
        return merged_named_tensors(model, gather, only_changed=kind == "merged")
    raise ValueError(f"refit payload must be full, merged or adapter, got {kind!r}")


def export(model: nn.Module, cfg: LoraConfig, path: Path, rank: int, gather: Gather, distributed: bool) -> None:
    """The merged policy as an HF checkpoint directory (transformers and vLLM load it unchanged) with the
    peft adapter in <path>/adapter. Every rank gathers; rank 0 writes, atomically."""
    import torch.distributed as dist

    from model.atomic import atomic_dir

    with torch.no_grad():
        state = {n: x.to("cpu") for n, x in merged_state(model, gather)}
        adapter = adapter_state(model, gather)
    if rank == 0:
        def write(tmp: Path) -> None:
            model.save_pretrained(tmp, state_dict=state)
            save_adapter(Path(tmp) / "adapter", cfg, adapter)
        atomic_dir(Path(path), write)
    if distributed:
        dist.barrier()
