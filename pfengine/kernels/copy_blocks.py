"""Copy-on-write block copy: duplicate (src, dst) block pairs in every layer, K and V."""
from __future__ import annotations

import torch


def copy_blocks(kv_cache: torch.Tensor, pairs: torch.Tensor) -> None:
    """``kv_cache [2, layers, num_blocks, B, Hkv, D]``; ``pairs [2, P]`` rows (src, dst)."""
    copy_blocks_ref(kv_cache, pairs)


def copy_blocks_ref(kv_cache: torch.Tensor, pairs: torch.Tensor) -> None:
    if pairs.shape[1]:
        kv_cache[:, :, pairs[1]] = kv_cache[:, :, pairs[0]]
