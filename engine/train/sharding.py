"""FSDP2 (torch.distributed.fsdp.fully_shard): parameters, gradients and AdamW state sharded over ranks.

    mesh = device_mesh(world_size, replicas=1, device_type="cpu")     # replicas > 1: HSDP, a 2-D mesh
    shard(model, mesh, "bf16")        # each decoder layer, then the root (the rest: embeddings, norm, LM head)

We call fully_shard directly, not accelerate's FSDP2 plugin: the plugin takes its layout from the
process-wide Accelerator state that `accelerate launch` sets up, wraps one model per Accelerator
(we shard a frozen reference too) and hides the gradient-divide factor, which must be 1 here: the
engine's loss is already each rank's share of the global loss, so gradients are SUMMED over ranks.

Mixed precision: parameters are stored (and AdamW runs) in fp32; each unsharded forward copy is
bf16, gradients are reduced in fp32. MoE routers get their own fp32 group (the gate stays fp32).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


def device_mesh(world_size: int, replicas: int, device_type: str) -> DeviceMesh:
    """1-D mesh ("shard",) or, for HSDP, 2-D ("replicate", "shard"): shard within a group, replicate across."""
    if replicas > 1:
        if world_size % replicas:
            raise ValueError(f"train.replicas={replicas} does not divide train.world_size={world_size}")
        return init_device_mesh(device_type, (replicas, world_size // replicas), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of our network or transformers' (both under `.model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"sharding=fsdp2: {type(model).__name__} has no .model.layers to shard per decoder layer")
    return list(layers)


def shard(model: nn.Module, mesh: DeviceMesh, compute: str = "no", cpu_offload: bool = False,
          reshard_after_forward: bool = True, expert_mesh: DeviceMesh | None = None) -> nn.Module:
    """fully_shard every MoE router (fp32), every decoder layer and the root, in place; returns the model.
    expert_mesh: expert parallelism (expert_parallel.py): the routed experts are sharded over it first."""
    from model.moe import RoutedExperts, Router

    dtype = DTYPES[compute]
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    offload: OffloadPolicy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    if dtype != torch.float32:
        for module in model.modules():
            if isinstance(module, Router):
                fully_shard(module, mesh=mesh, mp_policy=fp32, offload_policy=offload,
                            reshard_after_forward=reshard_after_forward)
    if expert_mesh is not None:
        for module in model.modules():
            if isinstance(module, RoutedExperts):
                fully_shard(module, mesh=expert_mesh, mp_policy=mp, offload_policy=offload,
                            reshard_after_forward=reshard_after_forward)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard_after_forward)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)       # SUM: the loss already is this rank's share
            module.set_force_sum_reduction_for_comms(True)   # plain SUM collectives (gloo has no PREMUL_SUM)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather, called on every rank alike, for a DTensor shard)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard (the tensor itself when not sharded)."""
    return t.to_local() if isinstance(t, DTensor) else t


def nbytes(tensors) -> int:
    return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """What this rank holds: parameters and optimizer state (local shards only)."""
    params = list(model.parameters())
    state = [v for s in (optimizer.state.values() if optimizer is not None else [])
             for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return {"params": nbytes(params), "optimizer": nbytes(state)}


def build(factory, on_meta: bool, device: torch.device) -> nn.Module:
    """The factory's network on `device`, or, with on_meta and a factory that takes `weights=False`, only its
    architecture on the meta device (nothing read or allocated: a sharded rank > 0 takes rank 0's weights)."""
    if on_meta and takes_weights_flag(factory):
        with torch.device("meta"):
            return factory(weights=False)
    return factory().to(device)


def takes_weights_flag(factory) -> bool:
    import inspect

    try:
        return "weights" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def load_from_rank0(model: nn.Module, full_state: dict[str, torch.Tensor], device: torch.device) -> None:
    """After fully_shard on every rank: rank 0's full weights (its state dict taken before sharding; the other
    ranks pass {}) scattered into every rank's shards, whatever their mesh (fsdp2, ep). Ranks built on the
    meta device are materialised first; buffers (rotary frequencies, load counters) come from rank 0 too."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model.to_empty(device=device)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for b in model.buffers():
            dist.broadcast(b.data, src=0)

