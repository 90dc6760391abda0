"""Rotary position embeddings (default, linear, Llama-3 and LongRoPE short-factor scaling, partial
rotation), half-rotation layout as in HF."""
from __future__ import annotations

import math

import torch

from pfengine.model.checkpoint import RopeConfig


def inv_frequencies(rope: RopeConfig) -> torch.Tensor:
    exponents = torch.arange(0, rope.rotary_dim, 2, dtype=torch.float64) / rope.rotary_dim
    inv_freq = 1.0 / rope.theta ** exponents
    s = rope.scaling
    if rope.kind == "default":
        return inv_freq.float()
    if rope.kind == "linear":
        return (inv_freq / s["factor"]).float()
    if rope.kind == "longrope":
        return (inv_freq / torch.tensor(s["short_factor"], dtype=torch.float64)).float()
    assert rope.kind == "llama3", f"unsupported rope {rope.kind!r}"
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled).float()


def rope_table(rope: RopeConfig, max_positions: int) -> torch.Tensor:
    """``[max_positions, 2, rotary_dim // 2]``: cos and sin per position."""
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_frequencies(rope))
    table = torch.stack([freqs.cos(), freqs.sin()], dim=1)
    return table * rope.attention_factor if rope.attention_factor != 1.0 else table


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """``x [T, heads, D]``, ``cos_sin [T, 2, R/2]`` (already gathered by position): rotates the first
    R dimensions of each head (all of them unless the rotary is partial)."""
    rotary_dim = 2 * cos_sin.shape[-1]
    if rotary_dim == x.shape[-1]:
        return _rotate(x, cos_sin)
    return torch.cat([_rotate(x[..., :rotary_dim], cos_sin), x[..., rotary_dim:]], dim=-1)


def _rotate(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_sin[:, None, 0], cos_sin[:, None, 1]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
