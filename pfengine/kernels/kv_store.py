"""KV store: write a forward's new K/V rows into their cache slots."""
from __future__ import annotations

import torch

from pfengine.kernels import cdiv, cpp_ops, lazy_jit, next_pow2, profiled, use_cpp, use_triton

tl = None  # triton.language, bound by lazy_jit when a kernel is first launched


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """``k, v [T, Hkv, D]``; caches ``[num_blocks, B, Hkv, D]``; ``slots [T]`` = block*B + offset,
    -1 skips the token."""
    if use_triton(k):
        store_kv_triton(k, v, k_cache, v_cache, slots)
    elif use_cpp(k) and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1:
        store_kv_cpp(k, v, k_cache, v_cache, slots)
    else:
        store_kv_ref(k, v, k_cache, v_cache, slots)


def store_kv_cpp(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slots: torch.Tensor) -> None:
    """C++ CPU kernel (``csrc/cache_ops.cpp``): converts K/V to the cache dtype as the reference does,
    then copies each token's rows to its slot."""
    with profiled("store_kv"):
        cpp_ops().store_kv(k, v, k_cache, v_cache, slots)


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slots: torch.Tensor) -> None:
    keep = slots >= 0
    slots = slots[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slots: torch.Tensor, block: int | None = None) -> None:
    """Grid ``(T, cdiv(Hkv*D, BLOCK))``: each program copies one chunk of one token's K and V row."""
    t, hkv, d = k.shape
    if t == 0:
        return
    block = block or min(1024, next_pow2(hkv * d))
    grid = (t, cdiv(hkv * d, block))
    with profiled("store_kv"):
        _store_kv_kernel[grid](
            k, v, k_cache, v_cache, slots,
            *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(), slots.stride(0),
            k_cache.shape[1], hkv * d,
            HEAD_DIM=d, BLOCK=block,
        )


@lazy_jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr,
                     s_kt, s_kh, s_kd, s_vt, s_vh, s_vd,
                     s_kcb, s_kcs, s_kch, s_kcd, s_vcb, s_vcs, s_vch, s_vcd, s_slot,
                     block_size, row_numel,
                     HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(slots_ptr + tok * s_slot).to(tl.int64)
    # (a scalar condition is broadcast before the '&': the interpreter mishandles vector & scalar)
    mask = (e < row_numel) & ((e * 0 + slot) >= 0)
    h = e // HEAD_DIM
    d = e % HEAD_DIM
    blk = slot // block_size
    off = slot % block_size
    kv = tl.load(k_ptr + tok * s_kt + h * s_kh + d * s_kd, mask=mask)
    tl.store(kc_ptr + blk * s_kcb + off * s_kcs + h * s_kch + d * s_kcd,
             kv.to(kc_ptr.dtype.element_ty), mask=mask)
    vv = tl.load(v_ptr + tok * s_vt + h * s_vh + d * s_vd, mask=mask)
    tl.store(vc_ptr + blk * s_vcb + off * s_vcs + h * s_vch + d * s_vcd,
             vv.to(vc_ptr.dtype.element_ty), mask=mask)
