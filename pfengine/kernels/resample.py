"""Resampling: ancestor indices for every particle, per request segment, from normalised weights."""
from __future__ import annotations

import torch

from pfengine.kernels import cpp_ops, lazy_jit, next_pow2, profiled, use_cpp, use_triton

tl = None  # triton.language, bound by lazy_jit when a kernel is first launched

METHODS = {"systematic": 0, "stratified": 1, "multinomial": 2}


def resample(weights: torch.Tensor, seg_starts: torch.Tensor, uniforms: torch.Tensor, method: str,
             *, active: torch.Tensor | None = None) -> torch.Tensor:
    """``weights [M]`` sum to 1 within each segment ``[seg_starts[r], seg_starts[r+1])``;
    ``uniforms [M]`` in [0, 1) drawn by each request's own generator (systematic reads only the
    first of its segment). Returns global ancestor indices ``[M]`` (int64).

    ``active [R]`` (bool, optional): segments where it is False are not resampled (each particle is
    its own ancestor) -- e.g. ``ess >= threshold * n`` computed on the device, without a host sync."""
    if use_triton(weights):
        return resample_triton(weights, seg_starts, uniforms, method, active=active)
    if use_cpp(weights):
        return resample_cpp(weights, seg_starts, uniforms, method, active=active)
    return resample_ref(weights, seg_starts, uniforms, method, active=active)


def resample_cpp(weights: torch.Tensor, seg_starts: torch.Tensor, uniforms: torch.Tensor, method: str,
                 *, active: torch.Tensor | None = None) -> torch.Tensor:
    """C++ CPU kernel (``csrc/cache_ops.cpp``): the reference's fp64 cumsum, normalisation and
    ``searchsorted(right=True)`` per segment, in one call (identical ancestors)."""
    if method not in METHODS:
        raise ValueError(f"unknown resampling method {method!r}")
    with profiled("resample"):
        return cpp_ops().resample(weights, seg_starts, uniforms, METHODS[method], active)


def resample_ref(weights: torch.Tensor, seg_starts: torch.Tensor, uniforms: torch.Tensor, method: str,
                 *, active: torch.Tensor | None = None) -> torch.Tensor:
    if method not in METHODS:
        raise ValueError(f"unknown resampling method {method!r}")
    out = torch.arange(weights.shape[0], dtype=torch.int64, device=weights.device)
    flags = [True] * (seg_starts.numel() - 1) if active is None else active.tolist()
    for lo, hi, on in zip(seg_starts[:-1].tolist(), seg_starts[1:].tolist(), flags):
        n = hi - lo
        if n == 0 or not on:
            continue
        cdf = torch.cumsum(weights[lo:hi].double(), 0)
        cdf = cdf / cdf[-1]
        i = torch.arange(n, device=weights.device, dtype=torch.float64)
        if method == "systematic":
            points = (i + uniforms[lo].double()) / n
        elif method == "stratified":
            points = (i + uniforms[lo:hi].double()) / n
        else:
            points = uniforms[lo:hi].double()
        out[lo:hi] = lo + torch.searchsorted(cdf, points, right=True).clamp(max=n - 1)
    return out


def resample_triton(weights: torch.Tensor, seg_starts: torch.Tensor, uniforms: torch.Tensor, method: str,
                    *, active: torch.Tensor | None = None, block: int | None = None) -> torch.Tensor:
    """One program per segment. Pass 1: chunked ``tl.cumsum`` of the weights (fp64, carried across
    chunks of ``BLOCK``) into a scratch CDF. Pass 2: each slot's point is located by a vectorised
    binary search over that CDF (``searchsorted(right=True)``, clamped to ``n - 1``). Segment sizes
    are read on the device, so any size works without a host round trip; ``BLOCK`` and the number
    of search steps derive from ``M`` only."""
    if method not in METHODS:
        raise ValueError(f"unknown resampling method {method!r}")
    m = weights.shape[0]
    n_seg = seg_starts.numel() - 1
    out = torch.empty(m, dtype=torch.int64, device=weights.device)
    if m == 0 or n_seg == 0:
        return out
    block = block or min(1024, max(16, next_pow2(m)))
    cdf = torch.empty(m, dtype=torch.float64, device=weights.device)
    seg_starts = seg_starts.contiguous()
    act = out if active is None else active.to(torch.uint8).contiguous()
    with profiled("resample"):
        _resample_kernel[(n_seg,)](weights, uniforms, seg_starts, act, cdf, out,
                                   weights.stride(0), uniforms.stride(0),
                                   METHOD=METHODS[method], HAS_ACTIVE=active is not None,
                                   BLOCK=block, SEARCH_STEPS=m.bit_length() + 1)
    return out


@lazy_jit
def _resample_kernel(w_ptr, u_ptr, seg_ptr, active_ptr, cdf_ptr, out_ptr, s_w, s_u,
                     METHOD: tl.constexpr, HAS_ACTIVE: tl.constexpr, BLOCK: tl.constexpr,
                     SEARCH_STEPS: tl.constexpr):
    seg = tl.program_id(0).to(tl.int64)
    lo = tl.load(seg_ptr + seg)
    hi = tl.load(seg_ptr + seg + 1)
    n = hi - lo
    offs = tl.arange(0, BLOCK)
    if HAS_ACTIVE:
        on = tl.load(active_ptr + seg) != 0
    else:
        on = n >= 0

    # Pass 1: unnormalised CDF in fp64; the weights are non-negative, so the running maximum of a
    # chunk's valid prefix sums is its last one (the carry).
    carry = tl.zeros([1], tl.float64).sum(0)
    for start in range(lo, hi, BLOCK):
        idx = start + offs
        ok = idx < hi
        w = tl.load(w_ptr + idx * s_w, mask=ok, other=0.0).to(tl.float64)
        c = tl.cumsum(w, 0) + carry
        tl.store(cdf_ptr + idx, c, mask=ok)
        carry = tl.max(tl.where(ok, c, 0.0), 0)
    total = carry
    tl.debug_barrier()  # the CDF written above is read below by other threads of this program

    nf = n.to(tl.float64)
    u0 = tl.load(u_ptr + lo * s_u, mask=n > 0, other=0.0).to(tl.float64)
    for start in range(lo, hi, BLOCK):
        idx = start + offs
        ok = idx < hi
        i = (idx - lo).to(tl.float64)
        if METHOD == 0:  # systematic: one uniform per segment
            p = (i + u0) / nf
        elif METHOD == 1:  # stratified: one uniform per stratum
            p = (i + tl.load(u_ptr + idx * s_u, mask=ok, other=0.0).to(tl.float64)) / nf
        else:  # multinomial: the uniforms are the points
            p = tl.load(u_ptr + idx * s_u, mask=ok, other=0.0).to(tl.float64)
        # searchsorted(cdf / total, p, right=True): the number of j with cdf[j] / total <= p.
        a = tl.zeros([BLOCK], tl.int64)
        b = tl.zeros([BLOCK], tl.int64) + n
        for _ in range(SEARCH_STEPS):
            live = ok & (a < b)
            mid = (a + b) // 2
            c = tl.load(cdf_ptr + lo + mid, mask=live, other=0.0) / total
            right = c <= p
            a = tl.where(live & right, mid + 1, a)
            b = tl.where(live & (~right), mid, b)
        anc = lo + tl.minimum(a, n - 1)
        tl.store(out_ptr + idx, tl.where(on, anc, idx), mask=ok)
