"""DeepSeekMoE (DeepSeek-V2 §2.2): shared experts plus fine-grained routed experts.

Adds what transformers' DeepseekV2 lacks, with the same parameter names:
- group-limited ("device-limited") routing, softmax (V2) or sigmoid + bias (V3) gating;
- the three balance losses of §2.2.3 (expert, device, communication level);
- capacity-based token dropping (§2.2.4), training only; capacity per batch or per sequence;
- routing capture and replay (the experts chosen at rollout can be forced in training);
- per-layer load statistics and the V3 auxiliary-loss-free bias update;
- routed experts as grouped GEMM (torch._grouped_mm, no host sync) where device and dtype allow, else a loop;
  a `dispatch` hook lets expert parallelism (engine/train/expert_parallel.py) run them on other ranks;
- packed rows (segments from the position ids): per-sequence terms follow the packed sequences.
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


def grouped_mm_ok(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs x [N, H] against these [E, out, in] weights: fp32 (CPU only) or bf16,
    with every row stride a multiple of 16 bytes; CUDA needs sm90+. Otherwise the per-expert loop runs."""
    if not hasattr(torch, "_grouped_mm") or any(w.dtype != x.dtype for w in weights):
        return False
    if x.device.type == "cpu":
        dtypes = (torch.float32, torch.bfloat16)
    elif x.device.type == "cuda":
        dtypes = (torch.bfloat16,) if torch.cuda.get_device_capability(x.device)[0] >= 9 else ()
    else:
        return False
    return x.dtype in dtypes and all(w.shape[-1] * w.element_size() % 16 == 0 and
                                     w.shape[-2] * w.element_size() % 16 == 0 for w in weights)


def expert_swiglu(x: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                  grouped: bool | None = None) -> torch.Tensor:
    """Rows of x [n, H] sorted by expert, counts [E] rows per expert (sum = n) -> SwiGLU outputs [n, H].

    Grouped GEMM: one torch._grouped_mm per projection with offsets cumsum(counts) on the device (no
    host sync; an expert with no rows is an empty group). Loop: per expert, needs counts on the host."""
    if x.dtype != gate_up.dtype and torch.is_autocast_enabled(x.device.type):   # what F.linear's autocast does
        dtype = torch.get_autocast_dtype(x.device.type)
        x, gate_up, down = x.to(dtype), gate_up.to(dtype), down.to(dtype)
    if grouped is None:
        grouped = grouped_mm_ok(x, gate_up, down)
    if grouped:
        offs = torch.cumsum(counts, 0, dtype=torch.int32)                            # [E] group ends
        g, u = torch._grouped_mm(x, gate_up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)   # [n, I] each
        return torch._grouped_mm((F.silu(g) * u).contiguous(), down.transpose(-2, -1), offs=offs)  # [n, H]
    chunks = []
    for e, rows in enumerate(x.split(counts.tolist())):
        if rows.shape[0]:
            g, u = F.linear(rows, gate_up[e]).chunk(2, dim=-1)                       # [n_e, I] each
            chunks.append(F.linear(F.silu(g) * u, down[e]))                          # [n_e, H]
    return torch.cat(chunks) if chunks else x.new_zeros(0, down.shape[1])


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as 3-D params, as transformers does: gate_up [E, 2I, H], down [E, H, I].

    `grouped`: None = torch._grouped_mm where the device and dtype allow it (grouped_mm_ok), else the loop;
    True/False force one (tests, benchmarks). Under expert parallelism (engine/train/expert_parallel.py)
    `dispatch` is set: it sends the sorted rows to the ranks holding their experts and back."""

    def __init__(self, config):
        super().__init__()
        E, H, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.n_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        self.grouped: bool | None = None
        self.dispatch = None

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """x [N, H]; indices, weights, keep [N, k] -> [N, H]. Assignments sorted by expert, run as groups.
        A dropped assignment (keep False) sorts after all others and joins the last group with gate value 0:
        it adds exactly 0 to the output and to every gradient, and the shapes stay free of host syncs."""
        N, k = indices.shape
        E = self.n_experts
        flat_expert = indices.reshape(-1)                                            # [N*k]
        weight = weights.reshape(-1)
        if keep is not None:
            flat_expert = torch.where(keep.reshape(-1), flat_expert, E)               # E = the "dropped" bin
            weight = torch.where(keep.reshape(-1), weight, torch.zeros_like(weight))
        order = flat_expert.argsort(stable=True)                                     # [N*k]
        counts = torch.zeros(E + 1, dtype=torch.long, device=x.device).scatter_add_(
            0, flat_expert, torch.ones_like(flat_expert))                             # [E+1], no host sync
        counts = torch.cat([counts[:E - 1], counts[E - 1:].sum(0, keepdim=True)])     # [E] dropped -> last group
        flat_token = order // k                                                       # [N*k] source token
        weight = weight[order]                                                        # [N*k]
        rows = x[flat_token]                                                          # [n, H] sorted by expert
        if self.dispatch is not None:
            y = self.dispatch(rows, counts, self)
        else:
            y = expert_swiglu(rows, counts, self.gate_up_proj, self.down_proj, self.grouped)
        out = torch.zeros_like(x)
        return out.index_add_(0, flat_token, (y * weight[:, None].to(y.dtype)).to(x.dtype))


def sequence_ids(token_mask: torch.Tensor, segments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | int]:
    """Which sequence each token belongs to: (seq [N] long, -1 for padding; number of sequences).

    Padded rows (segments None): one sequence per row, n = B (an all-padding row still counts, as before).
    Packed rows (segments [B, T], 1-based per row, see network.causal_mask): the sequences of all rows
    numbered in order, n = their count (a tensor: no host sync)."""
    B, T = token_mask.shape
    if segments is None:
        seq, n = torch.arange(B, device=token_mask.device)[:, None].expand(B, T), B
    else:
        per_row = segments.amax(1)                                                     # [B]
        seq = segments - 1 + (torch.cumsum(per_row, 0) - per_row)[:, None]
        n = per_row.sum()
    return torch.where(token_mask.bool(), seq, -1).reshape(-1), n


def capacity_keep(routing: Routing, n_experts: int, capacity_factor: float,
                  seq: torch.Tensor | None = None) -> torch.Tensor:
    """Token dropping: each expert keeps its C highest-affinity assignments. -> [N, k] bool.

    Without seq: C = ceil(cf * N * k / E) over the whole batch (DeepSeek-V2 §2.2.4). With seq [N]
    (sequence_ids: -1 = padding): per sequence b, C_b = ceil(cf * T_b * k / E) with T_b its valid tokens,
    and padding never takes a slot, so a sequence's decisions do not depend on which other sequences
    share its micro-batch, its packed row or its rank (RL needs that: log-prob and training passes split
    differently; expert parallelism decides before the all-to-all)."""
    N, k = routing.indices.shape
    expert = routing.indices.reshape(-1)
    device = expert.device
    if seq is None:
        group, n_groups = expert, n_experts
        capacity = torch.full((n_experts,), math.ceil(capacity_factor * N * k / n_experts), device=device)
        valid = torch.ones_like(expert, dtype=torch.bool)
    else:
        valid_tok = seq >= 0
        sid = seq.clamp(min=0)
        valid = valid_tok[:, None].expand(N, k).reshape(-1)
        group, n_groups = sid.repeat_interleave(k) * n_experts + expert, N * n_experts
        tokens = torch.zeros(N, device=device, dtype=torch.float64).index_add_(0, sid, valid_tok.double())
        capacity = torch.ceil(capacity_factor * tokens * k / n_experts).long().repeat_interleave(n_experts)
    affinity = routing.scores.gather(1, routing.indices).reshape(-1)
    affinity = torch.where(valid, affinity, torch.full_like(affinity, -1.0))    # padding ranks last
    by_affinity = affinity.argsort(descending=True, stable=True)
    by_group = by_affinity[group[by_affinity].argsort(stable=True)]            # grouped, best first
    counts = torch.zeros(n_groups, dtype=torch.long, device=device).scatter_add_(0, group, torch.ones_like(group))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(group)
    rank[by_group] = torch.arange(group.numel(), device=device) - starts[group[by_group]]
    return ((rank < capacity[group]) & valid).view(N, k)


def balance_losses(routing: Routing, token_mask: torch.Tensor, batch: int, n_devices: int, m_devices: int,
                   alphas: tuple[float, float, float], segments: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """DeepSeek-V2 eqs. (23)-(31), computed per sequence (T = its valid tokens) and averaged over sequences
    (rows, or with segments [B, T] the packed sequences: see sequence_ids; both give the same values).

    f_i  = E/(K T) * #tokens choosing expert i      P_i  = mean_t s_{i,t}
    expert: a1 * sum_i f_i P_i
    device: a2 * sum_d f'_d P'_d,   f'_d = mean_{i in d} f_i,          P'_d = sum_{i in d} P_i
    comm:   a3 * sum_d f''_d P''_d, f''_d = D/(M T) * #tokens sent to d, P''_d = sum_{i in d} P_i
    """
    N, E = routing.scores.shape
    K = routing.indices.shape[1]
    seq, n_seqs = sequence_ids(token_mask.reshape(batch, -1), segments)
    valid = (seq >= 0).float()[:, None]                                         # [N, 1]
    sid = seq.clamp(min=0)
    per_seq = lambda v: torch.zeros(N, v.shape[1], device=v.device, dtype=v.dtype).index_add_(0, sid, v * valid)  # noqa: E731
    T = per_seq(torch.ones(N, 1, device=seq.device)).clamp(min=1)               # [N, 1] (rows >= n_seqs: empty)
    scores = routing.scores
    if scores.sum(-1).mean() > 1 + 1e-3:  # sigmoid affinities: normalise per token as V3 does
        scores = scores / scores.sum(-1, keepdim=True)
    chosen = torch.zeros(N, E, device=scores.device).scatter_(1, routing.indices, 1.0)   # [N, E]
    P = per_seq(scores) / T                                                      # [S, E]
    f = per_seq(chosen) * E / (K * T)                                            # [S, E]
    out: dict[str, torch.Tensor] = {}
    a1, a2, a3 = alphas
    if a1:
        out["expert"] = a1 * (f * P).sum() / n_seqs
    if a2 or a3:
        P_dev = P.view(N, n_devices, E // n_devices).sum(-1)                     # [S, D]
        if a2:
            f_dev = f.view(N, n_devices, E // n_devices).mean(-1)
            out["device"] = a2 * (f_dev * P_dev).sum() / n_seqs
        if a3:
            sent = chosen.view(N, n_devices, E // n_devices).amax(-1)            # [N, D] token t reaches device d
            f_comm = per_seq(sent) * n_devices / (m_devices * T)
            out["comm"] = a3 * (f_comm * P_dev).sum() / n_seqs
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
                count_load: bool = True, segments: torch.Tensor | None = None):
        """x [B, T, H], token_mask [B, T] -> (y [B, T, H], indices [B, T, k], balance-loss dict).
        segments [B, T]: packed rows (see sequence_ids); per-sequence terms then follow the packed sequences.
        count_load=False leaves the load counter to the caller (activation checkpointing recomputes this)."""
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        routing = self.gate(flat, replay)
        keep = None
        if self.training and self.capacity_factor:
            keep = capacity_keep(routing, self.n_experts, self.capacity_factor,
                                 sequence_ids(token_mask, segments)[0] if self.capacity_per_sequence else None)
        y = self.experts(flat, routing.indices, routing.weights, keep)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if count_load:
            self.record_load(routing.indices, token_mask)
        losses = balance_losses(routing, token_mask, B, self.n_devices, self.m_devices, self.alphas, segments) \
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
