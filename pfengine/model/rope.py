"""Rotary position embeddings (default, linear and Llama-3 scaling), half-rotation layout as in HF."""
from __future__ import annotations

import math

import torch


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    assert kind == "llama3", f"unsupported rope scaling {kind!r}"
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled).float()


def rope_table(head_dim: int, theta: float, scaling: dict | None, max_positions: int) -> torch.Tensor:
    """``[max_positions, 2, head_dim // 2]``: cos and sin per position."""
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_frequencies(head_dim, theta, scaling))
    return torch.stack([freqs.cos(), freqs.sin()], dim=1)


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """``x [T, heads, D]``, ``cos_sin [T, 2, D/2]`` (already gathered by position)."""
    cos, sin = cos_sin[:, None, 0], cos_sin[:, None, 1]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
