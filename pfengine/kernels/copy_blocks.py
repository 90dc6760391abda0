"""Copy-on-write block copy: duplicate (src, dst) block pairs in every layer, K and V."""
from __future__ import annotations

import torch

from pfengine.kernels import cdiv, cpp_ops, lazy_jit, next_pow2, profiled, use_cpp, use_triton

tl = None  # triton.language, bound by lazy_jit when a kernel is first launched


def copy_blocks(kv_cache: torch.Tensor, pairs: torch.Tensor) -> None:
    """``kv_cache [2, layers, num_blocks, B, Hkv, D]``; ``pairs [2, P]`` rows (src, dst).

    Columns holding a negative block (the -1 padding of :func:`pfengine.kernels.fork.fork`'s
    output) are skipped. Destinations must be distinct and disjoint from the sources (as COW
    destinations, freshly popped free blocks, are)."""
    if use_triton(kv_cache) and kv_cache.is_contiguous():
        copy_blocks_triton(kv_cache, pairs)
    elif use_cpp(kv_cache) and kv_cache.is_contiguous():
        copy_blocks_cpp(kv_cache, pairs)
    else:
        copy_blocks_ref(kv_cache, pairs)


def copy_blocks_cpp(kv_cache: torch.Tensor, pairs: torch.Tensor) -> None:
    """C++ CPU kernel (``csrc/cache_ops.cpp``): one ``memcpy`` per (pair, K/V x layer) plane."""
    if pairs.shape[1]:
        with profiled("copy_blocks"):
            cpp_ops().copy_blocks(kv_cache, pairs)


def copy_blocks_ref(kv_cache: torch.Tensor, pairs: torch.Tensor) -> None:
    if pairs.shape[1]:
        pairs = pairs[:, (pairs >= 0).all(0)]
        kv_cache[:, :, pairs[1]] = kv_cache[:, :, pairs[0]]


def copy_blocks_triton(kv_cache: torch.Tensor, pairs: torch.Tensor, block: int | None = None) -> None:
    """Grid ``(P, 2*layers, cdiv(B*Hkv*D, BLOCK))``, one launch for all layers, K and V."""
    assert kv_cache.is_contiguous(), "copy_blocks_triton: kv_cache must be contiguous"
    p = pairs.shape[1]
    if p == 0:
        return
    two, layers, num_blocks = kv_cache.shape[:3]
    block_numel = kv_cache[0, 0, 0].numel()
    block = block or min(1024, next_pow2(block_numel))
    grid = (p, two * layers, cdiv(block_numel, block))
    with profiled("copy_blocks"):
        _copy_blocks_kernel[grid](kv_cache, pairs, pairs.stride(0), pairs.stride(1), num_blocks, block_numel,
                                  BLOCK=block)


@lazy_jit
def _copy_blocks_kernel(cache_ptr, pairs_ptr, s_pr, s_pc, num_blocks, block_numel, BLOCK: tl.constexpr):
    pair = tl.program_id(0).to(tl.int64)
    plane = tl.program_id(1).to(tl.int64)  # (K or V) * layers + layer
    e = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    src = tl.load(pairs_ptr + pair * s_pc).to(tl.int64)
    dst = tl.load(pairs_ptr + s_pr + pair * s_pc).to(tl.int64)
    # (a scalar condition is broadcast before the '&': the interpreter mishandles vector & scalar)
    mask = (e < block_numel) & ((e * 0 + tl.minimum(src, dst)) >= 0)
    src_base = (plane * num_blocks + src) * block_numel
    dst_base = (plane * num_blocks + dst) * block_numel
    x = tl.load(cache_ptr + src_base + e, mask=mask)
    tl.store(cache_ptr + dst_base + e, x, mask=mask)
