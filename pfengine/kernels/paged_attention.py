"""Paged decode attention: one query token per particle against its KV blocks."""
from __future__ import annotations

import torch


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """``q [N, Hq, D]``; caches ``[num_blocks, B, Hkv, D]``; tables ``[N, max_blocks]`` (-1 unused);
    ``context_lens [N]`` tokens to attend to (including the query's own, already stored). Returns
    ``[N, Hq, D]`` in ``q.dtype``; softmax and accumulation in fp32."""
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    n, hq, d = q.shape
    if n == 0:
        return q.new_empty(q.shape)
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    n_blocks = (int(context_lens.max()) + block_size - 1) // block_size
    tables = block_tables[:, :n_blocks].clamp(min=0).long()
    k = k_cache[tables].reshape(n, n_blocks * block_size, hkv, d).float()
    v = v_cache[tables].reshape(n, n_blocks * block_size, hkv, d).float()
    qg = q.float().view(n, hkv, hq // hkv, d)
    scores = torch.einsum("nhgd,nthd->nhgt", qg, k) * scale
    pos = torch.arange(n_blocks * block_size, device=q.device)
    scores.masked_fill_((pos[None, :] >= context_lens[:, None])[:, None, None, :], float("-inf"))
    out = torch.einsum("nhgt,nthd->nhgd", scores.softmax(-1), v)
    return out.reshape(n, hq, d).to(q.dtype)
