"""KV store: write a forward's new K/V rows into their cache slots."""
from __future__ import annotations

import torch


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """``k, v [T, Hkv, D]``; caches ``[num_blocks, B, Hkv, D]``; ``slots [T]`` = block*B + offset,
    -1 skips the token."""
    store_kv_ref(k, v, k_cache, v_cache, slots)


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slots: torch.Tensor) -> None:
    keep = slots >= 0
    slots = slots[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)
