"""Expert parallelism (train.ep_size): each rank of an EP group holds E/ep_size routed experts of every MoE layer.

    meshes = mesh(world_size=4, ep_size=2, "cpu")   # ("edp", "ep") = (2, 2); meshes.world: the flattened 1-D mesh
    distribute_experts(model, meshes)                # before sharding.shard(..., expert_mesh=meshes.edp)

Layout: ranks r = edp_rank * ep_size + ep_rank. Expert weights are DTensors of the full shape [E, ...]
sharded Shard(0) over "ep" (EP rank i holds experts [i*E/ep, (i+1)*E/ep)), and FSDP2 shards each
rank's experts further over "edp" (the ranks holding the same experts); every other weight is sharded
by FSDP2 over all ranks as before. Every shard is held by exactly one rank, so state dicts, DCP
checkpoints (resharding by name, at any rank count) and the HF export see the full [E, ...] tensors:
per-expert checkpoint names come out as without EP.

Forward of a MoE layer (RoutedExperts.dispatch = ExpertDispatch): routing, token dropping (per-sequence
capacity) and balance losses are computed where the tokens are, exactly as at ep_size 1; then

    rows sorted by expert, counts [E]  --all_to_all (counts, then rows)-->  the experts' ranks
    regroup by local expert, grouped GEMM                                  (model.moe.expert_swiglu)
    outputs  --all_to_all back-->  their tokens' ranks, in the order sent

The backward runs the two all-to-alls in reverse (functional collectives' all_to_all_single_autograd), so
an expert's gradient sums the tokens of every rank; FSDP2 then reduce-scatters it over "edp".
One host sync per layer: the all-to-all split sizes. Device-level and communication balance losses use
config.balance_devices (set it to ep_size for the real layout: devices = EP ranks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor
from torch.distributed.tensor import DTensor, Shard


@dataclass
class Meshes:
    edp: DeviceMesh        # ranks holding the same experts (FSDP2 shards experts over it)
    ep: DeviceMesh         # one EP group (the experts are split over it)
    world: DeviceMesh      # every rank, 1-D (FSDP2 shards the other weights over it)


def mesh(world_size: int, ep_size: int, device_type: str) -> Meshes:
    if world_size % ep_size:
        raise ValueError(f"train.ep_size={ep_size} does not divide train.world_size={world_size}")
    m = init_device_mesh(device_type, (world_size // ep_size, ep_size), mesh_dim_names=("edp", "ep"))
    return Meshes(m["edp"], m["ep"], m._flatten("shard"))


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class ExpertDispatch:
    """RoutedExperts.dispatch under EP: sends rows to their experts' ranks, computes, sends the outputs back."""

    def __init__(self, group: dist.ProcessGroup, ep_size: int):
        self.group, self.ep_size = group, ep_size

    def __call__(self, rows: torch.Tensor, counts: torch.Tensor, experts: nn.Module) -> torch.Tensor:
        """rows [n, H] sorted by expert, counts [E] -> expert outputs [n, H] in the same order."""
        P = self.ep_size
        E_local = counts.numel() // P
        recv_counts = torch.empty_like(counts)                                     # [P * E_local]: source s, expert j
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        send = counts.view(P, E_local).sum(1)                                      # [P] rows to each rank
        recv = recv_counts.view(P, E_local)
        splits = torch.cat([send, recv.sum(1)]).tolist()                           # the one host sync
        send_splits, recv_splits = splits[:P], splits[P:]
        got = wait_tensor(all_to_all_single_autograd(rows.contiguous(), recv_splits, send_splits, self.group))
                                                                                   # [m, H]: by source, then expert
        expert_of = torch.arange(E_local, device=rows.device).repeat(P).repeat_interleave(recv.reshape(-1))
        order = expert_of.argsort(stable=True)                                     # [m] grouped by local expert
        from model.moe import expert_swiglu

        y = expert_swiglu(got[order], recv.sum(0), local(experts.gate_up_proj), local(experts.down_proj),
                          experts.grouped)
        y = y[order.argsort()]                                                     # back to arrival order
        return wait_tensor(all_to_all_single_autograd(y.contiguous(), send_splits, recv_splits, self.group))


def routed_experts(model: nn.Module) -> list[nn.Module]:
    from model.moe import RoutedExperts

    return [m for m in model.modules() if isinstance(m, RoutedExperts)]


@torch.no_grad()
def distribute_experts(model: nn.Module, meshes: Meshes) -> None:
    """Keep this rank's E/ep_size experts of every MoE layer (as Shard(0) DTensors over "ep") and dispatch to them."""
    P, i = meshes.ep.size(), meshes.ep.get_local_rank()
    for m in routed_experts(model):
        E = m.gate_up_proj.shape[0]
        if E % P:
            raise ValueError(f"train.ep_size={P} does not divide the {E} routed experts")
        n = E // P
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(m, name)
            shard = full[i * n:(i + 1) * n].detach().clone()
            setattr(m, name, nn.Parameter(DTensor.from_local(shard, meshes.ep, [Shard(0)], run_check=False),
                                          requires_grad=full.requires_grad))
        m.dispatch = ExpertDispatch(meshes.ep.get_group(), P)


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> float:
    """Global L2 norm of the gradients, clipped to max_norm. Every shard lives on exactly one rank, so the
    norm's square is the sum over ranks of the local squares (torch's clip cannot mix DTensor meshes)."""
    grads = [local(p.grad) for p in params if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float64)
    for g in grads:
        sq += g.detach().double().pow(2).sum().cpu()
    if dist.is_initialized():
        sq_t = sq.to(grads[0].device if grads else "cpu")
        dist.all_reduce(sq_t)
        sq = sq_t.cpu()
    norm = float(sq.sqrt())
    scale = max_norm / (norm + 1e-6)                                               # torch's clip_grads_with_norm_
    if scale < 1:
        for g in grads:
            g.mul_(scale)
    return norm
