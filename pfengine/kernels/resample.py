"""Resampling: ancestor indices for every particle, per request segment, from normalised weights."""
from __future__ import annotations

import torch


def resample(weights: torch.Tensor, seg_starts: torch.Tensor, uniforms: torch.Tensor, method: str) -> torch.Tensor:
    """``weights [M]`` sum to 1 within each segment ``[seg_starts[r], seg_starts[r+1])``;
    ``uniforms [M]`` in [0, 1) drawn by each request's own generator (systematic reads only the
    first of its segment). Returns global ancestor indices ``[M]`` (int64)."""
    return resample_ref(weights, seg_starts, uniforms, method)


def resample_ref(weights: torch.Tensor, seg_starts: torch.Tensor, uniforms: torch.Tensor, method: str) -> torch.Tensor:
    out = torch.empty(weights.shape[0], dtype=torch.int64, device=weights.device)
    for lo, hi in zip(seg_starts[:-1].tolist(), seg_starts[1:].tolist()):
        n = hi - lo
        if n == 0:
            continue
        cdf = torch.cumsum(weights[lo:hi].double(), 0)
        cdf = cdf / cdf[-1]
        i = torch.arange(n, device=weights.device, dtype=torch.float64)
        if method == "systematic":
            points = (i + uniforms[lo].double()) / n
        elif method == "stratified":
            points = (i + uniforms[lo:hi].double()) / n
        elif method == "multinomial":
            points = uniforms[lo:hi].double()
        else:
            raise ValueError(f"unknown resampling method {method!r}")
        out[lo:hi] = lo + torch.searchsorted(cdf, points, right=True).clamp(max=n - 1)
    return out
