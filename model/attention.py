"""Multi-head Latent Attention (DeepSeek-V2 §2.1).

Keys and values are compressed jointly into a latent c_KV (d_c = kv_lora_rank) plus one
shared rotary key k_R (d_R = qk_rope_head_dim). Two ways to attend:

- `forward` (training / prefill): up-project c_KV to per-head keys and values, then
  ordinary attention. Cheapest when every position is a query.
- `decode` (generation): never materialise per-head K/V. W_UK is folded into the
  query and W_UV into the output, so attention runs directly against the cached
  latents: the cache holds only (d_c + d_R) values per token per layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .norm import RMSNorm
from .rope import apply_rotary, softmax_scale


class LatentCache:
    """Per-layer cache of c_KV [B, S, d_c] and rotated k_R [B, S, d_R], preallocated to S = max_len."""

    def __init__(self, num_layers: int, batch: int, max_len: int, d_c: int, d_r: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.c_kv = torch.zeros(num_layers, batch, max_len, d_c, dtype=dtype, device=device)
        self.k_pe = torch.zeros(num_layers, batch, max_len, d_r, dtype=dtype, device=device)
        self.length = 0  # positions filled so far (shared by all rows; padding is masked, not skipped)

    @staticmethod
    def values_per_token_per_layer(config) -> int:
        return config.kv_lora_rank + config.qk_rope_head_dim

    @classmethod
    def bytes_per_token(cls, config, dtype: torch.dtype = torch.bfloat16) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return cls.values_per_token_per_layer(config) * config.num_hidden_layers * itemsize

    def nbytes(self) -> int:
        return self.c_kv.nbytes + self.k_pe.nbytes


class MLA(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.d_nope = config.qk_nope_head_dim        # d_h: per-head dims without position
        self.d_rope = config.qk_rope_head_dim        # d_R: decoupled rotary dims
        self.d_v = config.v_head_dim
        self.d_c = config.kv_lora_rank               # d_c: KV latent
        self.q_lora_rank = config.q_lora_rank        # d'_c: query latent, or None (V2-Lite)
        d_qk = self.d_nope + self.d_rope
        bias = getattr(config, "attention_bias", False)

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, self.n_heads * d_qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * d_qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, self.d_c + self.d_rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.d_c)
        self.kv_b_proj = nn.Linear(self.d_c, self.n_heads * (self.d_nope + self.d_v), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.d_v, config.hidden_size, bias=bias)
        self.scale = softmax_scale(config)

    def _queries(self, x: torch.Tensor, rotation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.d_nope + self.d_rope).transpose(1, 2)   # [B, H, T, d_h + d_R]
        q_nope, q_pe = q.split([self.d_nope, self.d_rope], dim=-1)
        return q_nope, apply_rotary(q_pe, rotation)

    def _latents(self, x: torch.Tensor, rotation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.d_c, self.d_rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)                                             # [B, T, d_c]
        k_pe = apply_rotary(k_pe[:, None], rotation)[:, 0]                            # [B, T, d_R]
        return c_kv, k_pe

    def forward(self, x: torch.Tensor, rotation: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], rotation [B, T, d_R/2], additive mask [B, 1, T, T] -> [B, T, D]."""
        B, T, _ = x.shape
        q_nope, q_pe = self._queries(x, rotation)
        c_kv, k_pe = self._latents(x, rotation)
        kv = self.kv_b_proj(c_kv).view(B, T, self.n_heads, self.d_nope + self.d_v).transpose(1, 2)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)                      # [B, H, T, d_h], [B, H, T, d_v]
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None].expand(-1, self.n_heads, -1, -1)], dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # [B, H, T, d_v]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.d_v))

    def decode(self, x: torch.Tensor, rotation: torch.Tensor, mask: torch.Tensor, cache: LatentCache) -> torch.Tensor:
        """Absorbed attention for new tokens x [B, T, D] against the cache; mask [B, 1, T, S_total]."""
        B, T, _ = x.shape
        q_nope, q_pe = self._queries(x, rotation)                                     # [B, H, T, d_h], [B, H, T, d_R]
        c_new, k_new = self._latents(x, rotation)
        start, end = cache.length, cache.length + T
        cache.c_kv[self.layer_idx, :, start:end] = c_new
        cache.k_pe[self.layer_idx, :, start:end] = k_new
        c_kv, k_pe = cache.c_kv[self.layer_idx, :, :end], cache.k_pe[self.layer_idx, :, :end]  # [B, S, d_c], [B, S, d_R]

        w = self.kv_b_proj.weight.view(self.n_heads, self.d_nope + self.d_v, self.d_c)
        w_uk, w_uv = w[:, : self.d_nope], w[:, self.d_nope:]                          # [H, d_h, d_c], [H, d_v, d_c]
        q_latent = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)                       # [B, H, T, d_c]
        scores = (torch.einsum("bhtc,bsc->bhts", q_latent, c_kv)
                  + torch.einsum("bhtr,bsr->bhts", q_pe, k_pe)) * self.scale           # [B, H, T, S]
        probs = torch.softmax(scores.float() + mask, dim=-1).type_as(x)
        o_latent = torch.einsum("bhts,bsc->bhtc", probs, c_kv)                        # [B, H, T, d_c]
        y = torch.einsum("bhtc,hvc->bthv", o_latent, w_uv)                            # [B, T, H, d_v]
        return self.o_proj(y.reshape(B, T, self.n_heads * self.d_v))
