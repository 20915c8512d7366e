"""DeepSeekMoE (DeepSeek-V2 §2.2): shared experts plus fine-grained routed experts.

Adds what transformers' DeepseekV2 lacks, with the same parameter names:
- group-limited ("device-limited") routing, softmax (V2) or sigmoid + bias (V3) gating;
- the three balance losses of §2.2.3 (expert, device, communication level);
- capacity-based token dropping (§2.2.4), training only; capacity per batch or per sequence;
- routing capture and replay (the experts chosen at rollout can be forced in training);
- per-layer load statistics and the V3 auxiliary-loss-free bias update.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """SwiGLU feed-forward: dense layers and the shared experts."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class Routing:
    scores: torch.Tensor    # [N, E] affinities s_{i,t} (softmax or sigmoid), float32
    indices: torch.Tensor   # [N, k] chosen experts
    weights: torch.Tensor   # [N, k] gate values g_{i,t} applied to expert outputs


class Router(nn.Module):
    """Top-k gate. Group-limited routing first keeps the `topk_group` best of `n_group` expert groups."""

    def __init__(self, config):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group or 1
        self.topk_group = config.topk_group or self.n_group
        self.sigmoid = getattr(config, "scoring_func", "softmax") == "sigmoid"
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        if self.sigmoid:  # V3: biases steer selection only, never the gate values
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts))

    def forward(self, x: torch.Tensor, replay: torch.Tensor | None = None) -> Routing:
        """x [N, D] -> Routing. `replay` [N, k] forces the experts; gate values still follow the router."""
        with torch.autocast(x.device.type, enabled=False):                    # the router stays fp32 under autocast
            logits = F.linear(x.float(), self.weight.float())                  # [N, E]
        scores = logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1)
        if replay is None:
            choice = scores + self.e_score_correction_bias if self.sigmoid else scores
            if self.n_group > 1 and self.topk_group < self.n_group:
                grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
                group_score = grouped.topk(2, dim=-1).values.sum(-1) if self.sigmoid else grouped.amax(-1)
                keep = torch.zeros_like(group_score).scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, 1.0)
                keep = keep.bool()[:, :, None].expand_as(grouped).reshape_as(choice)
                choice = choice.masked_fill(~keep, float("-inf"))
            indices = choice.topk(self.top_k, dim=-1).indices                   # [N, k]
        else:
            indices = replay.to(device=x.device, dtype=torch.long).reshape(-1, self.top_k)
        weights = scores.gather(1, indices)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return Routing(scores, indices, weights * self.scaling)


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as 3-D params, as transformers does: gate_up [E, 2I, H], down [E, H, I]."""

    def __init__(self, config):
        super().__init__()
        E, H, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """x [N, H]; indices, weights, keep [N, k] -> [N, H]. Tokens are sorted by expert and run per expert."""
        N, k = indices.shape
        flat_expert = indices.reshape(-1)                                       # [N*k]
        flat_token = torch.arange(N, device=x.device).repeat_interleave(k)     # [N*k]
        flat_weight = weights.reshape(-1)
        if keep is not None:  # dropped assignments never reach their expert
            kept = keep.reshape(-1)
            flat_expert, flat_token, flat_weight = flat_expert[kept], flat_token[kept], flat_weight[kept]
        order = flat_expert.argsort(stable=True)
        flat_expert, flat_token, flat_weight = flat_expert[order], flat_token[order], flat_weight[order]
        counts = torch.bincount(flat_expert, minlength=self.gate_up_proj.shape[0]).tolist()

        gate_up, down = self.gate_up_proj, self.down_proj
        chunks = []
        for e, tokens in enumerate(flat_token.split(counts)):
            if tokens.numel() == 0:
                continue
            g, u = F.linear(x[tokens], gate_up[e]).chunk(2, dim=-1)            # [n_e, I] each
            chunks.append(F.linear(F.silu(g) * u, down[e]))                   # [n_e, H]
        out = torch.zeros_like(x)
        if chunks:
            y = torch.cat(chunks) * flat_weight[:, None].to(x.dtype)
            out.index_add_(0, flat_token, y)
        return out


def capacity_keep(routing: Routing, n_experts: int, capacity_factor: float,
                  token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Token dropping: each expert keeps its C highest-affinity assignments. -> [N, k] bool.

    Without token_mask: C = ceil(cf * N * k / E) over the whole batch (DeepSeek-V2 §2.2.4). With
    token_mask [B, T] (N = B*T): per sequence b, C_b = ceil(cf * T_b * k / E) with T_b its valid
    tokens, and padding never takes a slot, so a sequence's decisions do not depend on which other
    sequences share its micro-batch (RL needs that: log-prob and training passes split differently)."""
    N, k = routing.indices.shape
    expert = routing.indices.reshape(-1)
    device = expert.device
    if token_mask is None:
        group, n_groups = expert, n_experts
        capacity = torch.full((n_experts,), math.ceil(capacity_factor * N * k / n_experts), device=device)
        valid = torch.ones_like(expert, dtype=torch.bool)
    else:
        B = token_mask.shape[0]
        seq = torch.arange(B, device=device).repeat_interleave(N // B * k)
        group, n_groups = seq * n_experts + expert, B * n_experts
        per_seq = torch.ceil(capacity_factor * token_mask.reshape(B, -1).sum(1).double() * k / n_experts).long()
        capacity = per_seq.repeat_interleave(n_experts)
        valid = token_mask.reshape(-1, 1).expand(N, k).reshape(-1).bool()
    affinity = routing.scores.gather(1, routing.indices).reshape(-1)
    affinity = torch.where(valid, affinity, torch.full_like(affinity, -1.0))    # padding ranks last
    by_affinity = affinity.argsort(descending=True, stable=True)
    by_group = by_affinity[group[by_affinity].argsort(stable=True)]            # grouped, best first
    counts = torch.bincount(group, minlength=n_groups)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(group)
    rank[by_group] = torch.arange(group.numel(), device=device) - starts[group[by_group]]
    return ((rank < capacity[group]) & valid).view(N, k)


def balance_losses(routing: Routing, token_mask: torch.Tensor, batch: int, n_devices: int, m_devices: int,
                   alphas: tuple[float, float, float]) -> dict[str, torch.Tensor]:
    """DeepSeek-V2 eqs. (23)-(31), computed per sequence (T = its valid tokens) and averaged over sequences.

    f_i  = E/(K T) * #tokens choosing expert i      P_i  = mean_t s_{i,t}
    expert: a1 * sum_i f_i P_i
    device: a2 * sum_d f'_d P'_d,   f'_d = mean_{i in d} f_i,          P'_d = sum_{i in d} P_i
    comm:   a3 * sum_d f''_d P''_d, f''_d = D/(M T) * #tokens sent to d, P''_d = sum_{i in d} P_i
    """
    N, E = routing.scores.shape
    K = routing.indices.shape[1]
    mask = token_mask.reshape(batch, -1).float()                                # [B, T]
    T = mask.sum(1).clamp(min=1)                                                # [B]
    scores = routing.scores
    if scores.sum(-1).mean() > 1 + 1e-3:  # sigmoid affinities: normalise per token as V3 does
        scores = scores / scores.sum(-1, keepdim=True)
    chosen = torch.zeros(N, E, device=scores.device).scatter_(1, routing.indices, 1.0).view(batch, -1, E)
    s = scores.view(batch, -1, E)
    P = (s * mask[..., None]).sum(1) / T[:, None]                                # [B, E]
    f = (chosen * mask[..., None]).sum(1) * E / (K * T[:, None])                 # [B, E]
    out: dict[str, torch.Tensor] = {}
    a1, a2, a3 = alphas
    if a1:
        out["expert"] = a1 * (f * P).sum(-1).mean()
    if a2 or a3:
        P_dev = P.view(batch, n_devices, E // n_devices).sum(-1)                 # [B, D]
        if a2:
            f_dev = f.view(batch, n_devices, E // n_devices).mean(-1)
            out["device"] = a2 * (f_dev * P_dev).sum(-1).mean()
        if a3:
            sent = chosen.view(batch, -1, n_devices, E // n_devices).amax(-1)    # [B, T, D] token t reaches device d
            f_comm = (sent * mask[..., None]).sum(1) * n_devices / (m_devices * T[:, None])
            out["comm"] = a3 * (f_comm * P_dev).sum(-1).mean()
    return out


class MoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.gate = Router(config)
        self.experts = RoutedExperts(config)
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts) \
            if config.n_shared_experts else None
        self.alphas = (getattr(config, "expert_balance_alpha", 0.0), getattr(config, "device_balance_alpha", 0.0),
                       getattr(config, "comm_balance_alpha", 0.0))
        self.n_devices = getattr(config, "balance_devices", None) or (config.n_group or 1)
        self.m_devices = min(config.topk_group or self.n_devices, self.n_devices)
        self.capacity_factor = getattr(config, "capacity_factor", None)
        self.capacity_per_sequence = bool(getattr(config, "capacity_per_sequence", False))
        self.register_buffer("load", torch.zeros(self.n_experts), persistent=False)  # assignments since reset

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor, replay: torch.Tensor | None = None,
                count_load: bool = True):
        """x [B, T, H], token_mask [B, T] -> (y [B, T, H], indices [B, T, k], balance-loss dict).
        count_load=False leaves the load counter to the caller (activation checkpointing recomputes this)."""
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        routing = self.gate(flat, replay)
        keep = None
        if self.training and self.capacity_factor:
            keep = capacity_keep(routing, self.n_experts, self.capacity_factor,
                                 token_mask if self.capacity_per_sequence else None)
        y = self.experts(flat, routing.indices, routing.weights, keep)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if count_load:
            self.record_load(routing.indices, token_mask)
        losses = balance_losses(routing, token_mask, B, self.n_devices, self.m_devices, self.alphas) \
            if self.training and any(self.alphas) else {}
        return y.view(B, T, H), routing.indices.view(B, T, -1), losses

    @torch.no_grad()
    def record_load(self, indices: torch.Tensor, token_mask: torch.Tensor) -> None:
        """Add the assignments of valid tokens (indices [..., k], token_mask [...]) to the load counter."""
        indices = indices.reshape(-1, indices.shape[-1])
        valid = token_mask.reshape(-1, 1).expand_as(indices)
        self.load += torch.bincount(indices[valid], minlength=self.n_experts).float()

    @torch.no_grad()
    def update_bias(self, speed: float) -> None:
        """V3 auxiliary-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones."""
        if self.gate.sigmoid and self.load.sum() > 0:
            self.gate.e_score_correction_bias += speed * torch.sign(self.load.mean() - self.load)
