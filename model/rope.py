"""Decoupled rotary embeddings for MLA, with YaRN context extension.

Only the d_R-dim "rope" slice of each query/key is rotated (DeepSeek-V2 §2.1.3).
DeepSeek checkpoints lay the rotated dims out as interleaved pairs (x0,x1),(x2,x3),...
so we rotate in the complex plane: pair j turns by angle position * inv_freq[j].
"""
from __future__ import annotations

import math

import torch


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_parameters(config) -> dict:
    """The config's rope settings as one dict (transformers 5 `rope_parameters`, or the legacy fields)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None) or {}
    for k, v in legacy.items():
        params.setdefault(k, v)
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def inv_frequencies(config) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies [d_R/2] and the cos/sin magnitude (YaRN's attention factor)."""
    p = rope_parameters(config)
    dim, base = config.qk_rope_head_dim, float(p["rope_theta"])
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    inv_freq = 1.0 / (base ** exponents)                                   # [d_R/2]
    if p["rope_type"] != "yarn":
        return inv_freq, 1.0

    factor = float(p["factor"])
    original_max = p.get("original_max_position_embeddings") or config.max_position_embeddings
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        # The dim index whose wavelength completes `num_rotations` turns over the original context.
        return dim * math.log(original_max / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # High-frequency dims keep their frequency (extrapolate); low-frequency dims are interpolated.
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


def softmax_scale(config) -> float:
    """1/sqrt(d_h + d_R), times YaRN's mscale(factor, mscale_all_dim)^2 when context is extended."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    p = rope_parameters(config)
    if p["rope_type"] == "yarn" and p.get("mscale_all_dim"):
        m = yarn_mscale(float(p["factor"]), float(p["mscale_all_dim"]))
        scale = scale * m * m
    return scale


class RotaryEmbedding(torch.nn.Module):
    """Maps position ids [B, T] to complex rotations [B, T, d_R/2]."""

    def __init__(self, config):
        super().__init__()
        inv_freq, self.magnitude = inv_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        angles = position_ids[..., None].float() * self.inv_freq              # [B, T, d_R/2]
        return torch.polar(torch.full_like(angles, self.magnitude), angles)  # [B, T, d_R/2] complex


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, H, T, d_R] by rotation [B, T, d_R/2] (complex)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))     # [B, H, T, d_R/2]
    return torch.view_as_real(xc * rotation[:, None]).flatten(-2).type_as(x)
