"""Paged attention: one query token per particle against its KV blocks (decode), and several new
tokens per sequence on top of cached context (extend: prompt prefill, the PRM's step extends)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pfengine.kernels import cdiv, cpp_ops, cpu_isa, lazy_jit, next_pow2, profiled, use_cpp, use_triton

tl = None  # triton.language, bound by lazy_jit when a kernel is first launched

LOG2E = 1.4426950408889634
MIN_BLOCKS_PER_SPLIT = 8
"""The split-KV heuristic never gives a partition fewer KV blocks than this."""


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           *, num_splits: int | None = None, max_context_len: int | None = None) -> torch.Tensor:
    """``q [N, Hq, D]``; caches ``[num_blocks, B, Hkv, D]``; tables ``[N, max_blocks]`` (-1 unused);
    ``context_lens [N]`` tokens to attend to (including the query's own, already stored). Returns
    ``[N, Hq, D]`` in ``q.dtype``; softmax and accumulation in fp32.

    Dispatch: Triton (CUDA, or forced), else the C++ kernel on CPU (:func:`pfengine.kernels.use_cpp`),
    else the torch reference. Triton path only: ``num_splits`` partitions each context over that
    many programs (split-KV, merged by log-sum-exp); ``None`` lets :func:`choose_num_splits` decide from the batch size and
    ``max_context_len`` (a host-side bound; the table width when not given). Neither changes the
    result beyond rounding."""
    if use_triton(q):
        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale,
                                             num_splits=num_splits, max_context_len=max_context_len)
    if use_cpp(q):
        return paged_decode_attention_cpp(q, k_cache, v_cache, block_tables, context_lens, scale)
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)


def paged_decode_attention_cpp(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                               *, num_splits: int | None = None, max_context_len: int | None = None) -> torch.Tensor:
    """C++ CPU kernel (``csrc/paged_attention.cpp``): reads each particle's blocks in place through its
    table row (no gather copy); a task is a particle (or some of its kv heads when particles are too
    few for the threads), each kv head serving its GQA group; online softmax in fp32 over fp32 / bf16
    / fp16 storage; AVX2+FMA code unless :func:`pfengine.kernels.cpu_isa` is ``portable``. The split-KV
    arguments are accepted and ignored (each CPU thread already holds many tasks)."""
    with profiled("paged_attention"):
        return cpp_ops().paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, float(scale),
                                                cpu_isa())


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                               *, num_splits: int | None = None, max_context_len: int | None = None) -> torch.Tensor:
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


@dataclass
class ExtendPlan:
    """An extend batch's attention inputs, built once per forward by :func:`plan_extend` and used by
    every layer: one decode row per new token (Triton and C++ paths), or per-sequence tables for the
    torch reference."""

    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_q: list[int]
    as_rows: bool


def plan_extend(block_tables: torch.Tensor, cu_q: list[int], context_lens: torch.Tensor) -> ExtendPlan:
    """Sequence ``s`` has new tokens ``cu_q[s]:cu_q[s+1]`` (their K/V already stored) on top of its
    cache, ``context_lens[s]`` tokens in all, through ``block_tables[s]``. On the Triton and C++ paths
    every new token becomes a decode row of its own that reads its sequence's blocks up to its own
    position: no gather copy of the context, one launch for the whole batch, and a token's result is
    independent of the batch."""
    if not (use_triton(block_tables) or use_cpp(block_tables)):
        return ExtendPlan(block_tables, context_lens, cu_q, as_rows=False)
    dev = block_tables.device
    n = torch.tensor([hi - lo for lo, hi in zip(cu_q[:-1], cu_q[1:])], device=dev)
    seq = torch.repeat_interleave(torch.arange(len(n), device=dev), n)
    index = torch.arange(cu_q[-1], device=dev) - torch.tensor(cu_q[:-1], device=dev)[seq]
    lens = context_lens.to(dev)[seq] - n[seq] + index + 1
    return ExtendPlan(block_tables[seq], lens, cu_q, as_rows=True)


def paged_extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: ExtendPlan,
                           scale: float) -> torch.Tensor:
    """Causal attention of every sequence's new tokens ``q`` over its cache as :func:`plan_extend`
    laid it out. Keys and values are read from the cache, as later decode steps read them (so a bf16
    cache rounds alike)."""
    if plan.as_rows:
        return paged_decode_attention(q, k_cache, v_cache, plan.block_tables, plan.context_lens, scale)
    return paged_extend_attention_ref(q, k_cache, v_cache, plan.block_tables, plan.cu_q, plan.context_lens, scale)


def paged_extend_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, cu_q: list[int], context_lens: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """SDPA per sequence over its context gathered from the cache."""
    out = torch.empty_like(q)
    groups = q.shape[1] // k_cache.shape[2]
    block_size = k_cache.shape[1]
    for s, (lo, hi) in enumerate(zip(cu_q[:-1], cu_q[1:])):
        total = int(context_lens[s])
        blocks = block_tables[s, :(total + block_size - 1) // block_size].long()
        ks = k_cache[blocks].flatten(0, 1)[:total].to(q.dtype)
        vs = v_cache[blocks].flatten(0, 1)[:total].to(q.dtype)
        pos_q = torch.arange(total - (hi - lo), total, device=q.device)
        mask = torch.arange(total, device=q.device)[None, :] <= pos_q[:, None]
        o = F.scaled_dot_product_attention(
            q[lo:hi].transpose(0, 1), ks.repeat_interleave(groups, 1).transpose(0, 1),
            vs.repeat_interleave(groups, 1).transpose(0, 1), attn_mask=mask, scale=scale)
        out[lo:hi] = o.transpose(0, 1)
    return out


def choose_num_splits(n: int, num_kv_heads: int, max_blocks: int, device: torch.device) -> int:
    """Split the KV axis when ``n * Hkv`` programs would leave the GPU's SMs idle: aim at about two
    programs per SM, each partition holding at least :data:`MIN_BLOCKS_PER_SPLIT` blocks."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4
    programs = max(1, n * num_kv_heads)
    if programs >= 2 * sms:
        return 1
    return max(1, min(cdiv(2 * sms, programs), max_blocks // MIN_BLOCKS_PER_SPLIT, 64))


def paged_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                  *, num_splits: int | None = None, max_context_len: int | None = None,
                                  num_warps: int = 4) -> torch.Tensor:
    """One program per (particle, kv head, KV partition) serving the kv head's GQA group of query
    heads: online softmax over the blocks in fp32 (``tl.dot`` on fp32 operands, IEEE precision)."""
    n, hq, d = q.shape
    out = torch.empty((n, hq, d), dtype=q.dtype, device=q.device)
    if n == 0:
        return out
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    assert hq % hkv == 0, "paged attention: query heads must be a multiple of kv heads"
    assert v_cache.shape == k_cache.shape
    group = hq // hkv
    width = block_tables.shape[1]
    max_blocks = width if max_context_len is None else min(width, cdiv(max_context_len, block_size))
    if num_splits is None:
        num_splits = choose_num_splits(n, hkv, max_blocks, q.device)
    num_splits = max(1, min(int(num_splits), max(1, max_blocks)))
    blocks_per_split = cdiv(max(1, max_blocks), num_splits)
    meta = dict(GROUP=group, G_PAD=max(16, next_pow2(group)), HEAD_DIM=d, D_PAD=max(16, next_pow2(d)),
                BLOCK_SIZE=block_size, B_PAD=max(16, next_pow2(block_size)), num_warps=num_warps)
    common = (q, k_cache, v_cache, block_tables, context_lens, scale * LOG2E,
              *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), context_lens.stride(0))
    if num_splits == 1:
        with profiled("paged_attention"):
            _paged_attention_kernel[(n, hkv, 1)](*common, out, *out.stride(), 0, out, 0, 0, 0,
                                                  blocks_per_split, SPLIT=False, **meta)
        return out
    part = torch.empty((n, hq, num_splits, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((n, hq, num_splits), dtype=torch.float32, device=q.device)
    with profiled("paged_attention_split"):
        _paged_attention_kernel[(n, hkv, num_splits)](*common, part, part.stride(0), part.stride(1), part.stride(3),
                                                      part.stride(2), lse, *lse.stride(),
                                                      blocks_per_split, SPLIT=True, **meta)
    with profiled("paged_attention_merge"):
        _merge_splits_kernel[(n, hq)](part, lse, out, *part.stride(), *lse.stride(), *out.stride(), num_splits,
                                      HEAD_DIM=d, D_PAD=next_pow2(d), S_PAD=next_pow2(num_splits))
    return out


@lazy_jit
def _paged_attention_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, qk_scale,
                            s_qn, s_qh, s_qd,
                            s_kb, s_ks, s_kh, s_kd,
                            s_vb, s_vs, s_vh, s_vd,
                            s_tn, s_tb, s_len,
                            out_ptr, s_on, s_oh, s_od, s_os,
                            lse_ptr, s_ln, s_lh, s_ls,
                            blocks_per_split,
                            GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                            BLOCK_SIZE: tl.constexpr, B_PAD: tl.constexpr, SPLIT: tl.constexpr):
    # qk_scale = softmax scale * log2(e): the softmax runs in base 2.
    seq = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    nsplit = tl.num_programs(2)

    ctx = tl.load(lens_ptr + seq * s_len).to(tl.int64)
    n_blocks = (ctx + BLOCK_SIZE - 1) // BLOCK_SIZE
    b_lo = split * blocks_per_split
    b_hi = tl.minimum(b_lo + blocks_per_split, n_blocks)
    b_hi = tl.where(split == nsplit - 1, n_blocks, b_hi)  # the last partition takes any remainder

    g = tl.arange(0, G_PAD)
    dd = tl.arange(0, D_PAD)
    t = tl.arange(0, B_PAD)
    g_ok = g < GROUP
    d_ok = dd < HEAD_DIM
    t_ok = t < BLOCK_SIZE
    head = kvh * GROUP + g

    q = tl.load(q_ptr + seq * s_qn + head[:, None] * s_qh + dd[None, :] * s_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    q = q * qk_scale

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for j in range(b_lo, b_hi):
        blk = tl.load(tables_ptr + seq * s_tn + j * s_tb).to(tl.int64)
        valid = t_ok & (j * BLOCK_SIZE + t < ctx)
        # K^T tile [D_PAD, B_PAD], V tile [B_PAD, D_PAD]; cast to fp32 before tl.dot (any cache dtype).
        kt = tl.load(k_ptr + blk * s_kb + t[None, :] * s_ks + kvh * s_kh + dd[:, None] * s_kd,
                     mask=d_ok[:, None] & valid[None, :], other=0.0).to(tl.float32)
        s = tl.dot(q, kt, input_precision="ieee")
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + blk * s_vb + t[:, None] * s_vs + kvh * s_vh + dd[None, :] * s_vd,
                    mask=valid[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new

    o_mask = g_ok[:, None] & d_ok[None, :]
    if SPLIT:
        # Normalised partial output + base-2 log-sum-exp; an empty partition gives 0 and -inf.
        has = l_i > 0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(out_ptr + seq * s_on + head[:, None] * s_oh + split * s_os + dd[None, :] * s_od, o, mask=o_mask)
        tl.store(lse_ptr + seq * s_ln + head * s_lh + split * s_ls, lse, mask=g_ok)
    else:
        o = acc / l_i[:, None]
        tl.store(out_ptr + seq * s_on + head[:, None] * s_oh + dd[None, :] * s_od,
                 o.to(out_ptr.dtype.element_ty), mask=o_mask)


@lazy_jit
def _merge_splits_kernel(part_ptr, lse_ptr, out_ptr,
                         s_pn, s_ph, s_ps, s_pd, s_ln, s_lh, s_ls, s_on, s_oh, s_od,
                         num_splits,
                         HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    sp = tl.arange(0, S_PAD)
    dd = tl.arange(0, D_PAD)
    s_ok = sp < num_splits
    d_ok = dd < HEAD_DIM
    lse = tl.load(lse_ptr + seq * s_ln + head * s_lh + sp * s_ls, mask=s_ok, other=float("-inf"))
    mx = tl.max(lse, 0)
    w = tl.exp2(lse - mx)
    w = tl.where(s_ok & (lse > float("-inf")), w, 0.0)
    part = tl.load(part_ptr + seq * s_pn + head * s_ph + sp[:, None] * s_ps + dd[None, :] * s_pd,
                   mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    o = tl.sum(w[:, None] * part, 0) / tl.sum(w, 0)
    tl.store(out_ptr + seq * s_on + head * s_oh + dd * s_od, o.to(out_ptr.dtype.element_ty), mask=d_ok)
