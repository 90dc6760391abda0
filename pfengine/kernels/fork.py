"""Fork after resampling, on the block manager's tensors: gather tables by ancestor, move refcounts,
free dead blocks, and copy-on-write the shared partial last blocks of the children that write next.

State (as in :class:`pfengine.cache.block_manager.BlockManager`, with ``num_free`` a tensor):
``tables [R_max, max_blocks] int32`` (-1: none), ``lens [R_max] int64``, ``ref_counts [num_blocks]
int32``, ``free_stack [num_blocks] int32`` whose first ``num_free[0]`` entries are free, the top last.

The result equals ``BlockManager.assign(rows, rows[ancestors])`` followed by the copy-on-write that
``BlockManager.reserve(rows[writes], 1)`` would do lazily, child order standing for reserve's row
order: dead blocks are pushed in ascending block order; the k-th copying child (by index) gets the
k-th block from the top of the stack; when every holder of a shared partial block writes, the
lowest-index writer keeps it in place. Nothing is read back to the host on the Triton path.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from pfengine.kernels import cdiv, cpp_ops, lazy_jit, next_pow2, profiled, use_cpp, use_triton

tl = None  # triton.language, bound by lazy_jit when a kernel is first launched


class BlockState(NamedTuple):
    """The block manager's tensors, as the fork kernels take (and update in place) them."""

    tables: torch.Tensor
    lens: torch.Tensor
    ref_counts: torch.Tensor
    free_stack: torch.Tensor
    num_free: torch.Tensor


class ForkResult(NamedTuple):
    cow_pairs: torch.Tensor
    """``[2, M] int64``: the first ``num_cow`` columns are (src, dst) block pairs to copy before the
    children write (:func:`pfengine.kernels.copy_blocks.copy_blocks` skips the -1 padding)."""
    num_cow: torch.Tensor
    """``[1] int64``: copy-on-write copies done."""
    missing: torch.Tensor
    """``[1] int64``: how many more free blocks the copies needed; when > 0 no copy was done (the
    fork itself was, and the state is consistent: a later ``reserve`` would meet the shared blocks
    and raise ``OutOfBlocks``)."""


def fork(state: BlockState, rows: torch.Tensor, ancestors: torch.Tensor, writes: torch.Tensor,
         block_size: int) -> ForkResult:
    """Child ``i`` (row ``rows[i]``, distinct rows) becomes a copy of row ``rows[ancestors[i]]``;
    ``writes[i]`` marks the children that append next (only they get a private copy of a shared,
    partially filled last block). Updates the state tensors in place."""
    if use_triton(state.tables):
        return fork_triton(state, rows, ancestors, writes, block_size)
    if use_cpp(state.tables) and _cpp_layout(state):
        return fork_cpp(state, rows, ancestors, writes, block_size)
    return fork_ref(state, rows, ancestors, writes, block_size)


def _cpp_layout(state: BlockState) -> bool:
    """The block manager's dtypes, which the C++ kernel takes (anything else runs the reference)."""
    tables, lens, ref_counts, free_stack, num_free = state
    return (tables.dtype == torch.int32 and lens.dtype == torch.int64 and ref_counts.dtype == torch.int32
            and free_stack.dtype == torch.int32 and num_free.dtype == torch.int64
            and ref_counts.is_contiguous() and free_stack.is_contiguous())


def fork_cpp(state: BlockState, rows: torch.Tensor, ancestors: torch.Tensor, writes: torch.Tensor,
             block_size: int) -> ForkResult:
    """C++ CPU kernel (``csrc/cache_ops.cpp``): :func:`fork_ref` as one sequential pass over the
    children (same tables, refcounts, free stack and pairs)."""
    with profiled("fork"):
        return ForkResult(*cpp_ops().fork(*state, rows, ancestors, writes, int(block_size)))


def _empty_result(m: int, dev: torch.device) -> ForkResult:
    """No pairs yet (-1 padded), no copies, nothing missing."""
    return ForkResult(torch.full((2, m), -1, dtype=torch.int64, device=dev),
                      torch.zeros(1, dtype=torch.int64, device=dev), torch.zeros(1, dtype=torch.int64, device=dev))


def fork_ref(state: BlockState, rows: torch.Tensor, ancestors: torch.Tensor, writes: torch.Tensor,
             block_size: int) -> ForkResult:
    tables, lens, ref_counts, free_stack, num_free = state
    B = block_size
    dev = tables.device
    m = rows.numel()
    pairs, num_cow, missing = _empty_result(m, dev)
    if m == 0:
        return ForkResult(pairs, num_cow, missing)
    rows = rows.long()
    src_rows = rows[ancestors.long()]

    # The fork: gather, add the new references, then drop the old ones and free what died.
    new_tables, new_lens = tables[src_rows].clone(), lens[src_rows].clone()
    added = new_tables[new_tables >= 0].long()
    ref_counts.index_add_(0, added, torch.ones_like(added, dtype=ref_counts.dtype))
    old = tables[rows]
    old = old[old >= 0].long()
    ref_counts.index_add_(0, old, torch.full_like(old, -1, dtype=ref_counts.dtype))
    uniq = old.unique()
    dead = uniq[ref_counts[uniq] == 0].to(free_stack.dtype)
    nf = int(num_free[0])
    free_stack[nf:nf + dead.numel()] = dead
    nf += dead.numel()
    tables[rows] = new_tables
    lens[rows] = new_lens

    # Copy-on-write of shared, partially filled last blocks of writing children.
    idx = torch.arange(m, device=dev)
    cols = new_lens // B
    partial = writes.bool() & (new_lens % B != 0)
    blk = torch.where(partial, new_tables[idx, cols.clamp(max=tables.shape[1] - 1)].long(), -1)
    cand = partial & (ref_counts[blk.clamp(min=0)] > 1)
    cow = cand.clone()
    cow[cand] = must_copy(blk[cand], ref_counts)
    n = int(cow.sum())
    if n > nf:
        missing[0] = n - nf
        num_free[0] = nf
        return ForkResult(pairs, num_cow, missing)
    dst = free_stack[nf - 1 - torch.arange(n, device=dev)]
    c_src = blk[cow]
    tables[rows[cow], cols[cow]] = dst
    ref_counts.index_add_(0, c_src, torch.full_like(c_src, -1, dtype=ref_counts.dtype))
    ref_counts[dst.long()] = 1
    num_free[0] = nf - n
    pairs[0, :n], pairs[1, :n] = c_src, dst.long()
    num_cow[0] = n
    return ForkResult(pairs, num_cow, missing)


def must_copy(blocks: torch.Tensor, ref_counts: torch.Tensor) -> torch.Tensor:
    """Writers of shared, partially filled blocks (``blocks[i]``, in writer order): which of them
    copy before writing. When every holder of a block writes now, the first writer keeps it in
    place; every other writer copies."""
    uniq, inverse, writers = blocks.unique(return_inverse=True, return_counts=True)
    order = torch.arange(blocks.numel(), device=blocks.device)
    first = torch.full_like(uniq, blocks.numel(), dtype=torch.int64).scatter_reduce(0, inverse, order, reduce="amin")
    keeps = (order == first[inverse]) & (ref_counts[blocks.long()] == writers[inverse])
    return ~keeps


def fork_triton(state: BlockState, rows: torch.Tensor, ancestors: torch.Tensor, writes: torch.Tensor,
                block_size: int, *, block_w: int | None = None, block_m: int | None = None,
                block_nb: int | None = None) -> ForkResult:
    """Five launches, ordered on the stream, none waiting on the host:

    1. ``(M,)`` gather each child's new table and length into scratch, add their references
       (atomics), count the partial-block writers per block and the lowest writer index;
    2. ``(M,)`` drop the references of the old tables (atomics; the decrement that sees 1 marks the
       block dead and counts it in its chunk of blocks), write the new tables and lengths;
    3. ``(cdiv(num_blocks, BLOCK_NB),)`` push the dead blocks in ascending order (per-chunk
       exclusive prefix + ``tl.cumsum``);
    4. ``(1,)`` decide which writers copy, rank them (``tl.cumsum`` over children), check that the
       stack holds enough blocks, update ``num_free``;
    5. ``(cdiv(M, BLOCK_M),)`` pop the destinations, repoint the tables, fix refcounts, emit pairs.
    """
    tables, lens, ref_counts, free_stack, num_free = state
    dev = tables.device
    m = rows.numel()
    pairs, num_cow, missing = _empty_result(m, dev)
    if m == 0:
        return ForkResult(pairs, num_cow, missing)
    assert ref_counts.is_contiguous() and free_stack.is_contiguous() and lens.is_contiguous()
    nb = ref_counts.numel()
    width = tables.shape[1]
    block_w = block_w or min(256, max(16, next_pow2(width)))
    block_m = block_m or min(1024, max(16, next_pow2(m)))
    block_nb = block_nb or min(1024, max(16, next_pow2(nb)))
    n_chunks = cdiv(nb, block_nb)
    block_ch = min(1024, max(16, next_pow2(n_chunks)))

    rows = rows.long().contiguous()
    ancestors = ancestors.long().contiguous()
    writes_u8 = writes.to(torch.uint8).contiguous()
    # One zero-filled int32 workspace: writer counts, lowest-writer code (M - i, via atomic max),
    # dead flags (all per block), dead count per chunk of blocks.
    work = torch.zeros(3 * nb + n_chunks, dtype=torch.int32, device=dev)
    writers, first_code, dead, chunk_dead = work[:nb], work[nb:2 * nb], work[2 * nb:3 * nb], work[3 * nb:]
    new_tables = torch.empty((m, width), dtype=tables.dtype, device=dev)
    new_lens = torch.empty(m, dtype=torch.int64, device=dev)
    cand_blk = torch.empty(m, dtype=torch.int64, device=dev)
    rank = torch.empty(m, dtype=torch.int64, device=dev)
    state = torch.empty(2, dtype=torch.int64, device=dev)
    s_tr, s_tc = tables.stride()

    with profiled("fork"):
        _fork_gather_kernel[(m,)](tables, lens, ref_counts, rows, ancestors, writes_u8, new_tables, new_lens,
                                  cand_blk, writers, first_code, m, width, s_tr, s_tc, block_size,
                                  BLOCK_W=block_w)
        _fork_release_kernel[(m,)](tables, lens, ref_counts, rows, new_tables, new_lens, dead, chunk_dead,
                                   width, s_tr, s_tc, BLOCK_W=block_w, BLOCK_NB=block_nb)
        _fork_push_kernel[(n_chunks,)](dead, chunk_dead, free_stack, num_free, nb, n_chunks,
                                       BLOCK_NB=block_nb, BLOCK_CH=block_ch)
        _fork_rank_kernel[(1,)](cand_blk, ref_counts, writers, first_code, chunk_dead, num_free, rank, state,
                                num_cow, missing, m, n_chunks, BLOCK_M=block_m, BLOCK_CH=block_ch)
        _fork_cow_kernel[(cdiv(m, block_m),)](tables, ref_counts, free_stack, rows, new_lens, cand_blk, rank,
                                              state, pairs, m, s_tr, s_tc, pairs.stride(0), block_size,
                                              BLOCK_M=block_m)
    return ForkResult(pairs, num_cow, missing)


@lazy_jit
def _fork_gather_kernel(tables_ptr, lens_ptr, ref_ptr, rows_ptr, anc_ptr, writes_ptr, new_tables_ptr,
                        new_lens_ptr, cand_ptr, writers_ptr, first_ptr, M, W, s_tr, s_tc, block_size,
                        BLOCK_W: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    src = tl.load(rows_ptr + tl.load(anc_ptr + i))
    cols = tl.arange(0, BLOCK_W)
    for c0 in range(0, W, BLOCK_W):
        c = c0 + cols
        ok = c < W
        t = tl.load(tables_ptr + src * s_tr + c * s_tc, mask=ok, other=-1)
        tl.store(new_tables_ptr + i * W + c, t, mask=ok)
        tl.atomic_add(ref_ptr + t, 1, mask=ok & (t >= 0))
    length = tl.load(lens_ptr + src)
    tl.store(new_lens_ptr + i, length)
    col = length // block_size
    partial = (tl.load(writes_ptr + i) != 0) & (length % block_size != 0) & (col < W)
    blk = tl.load(tables_ptr + src * s_tr + col * s_tc, mask=partial, other=-1).to(tl.int64)
    blk = tl.where(partial, blk, -1)
    tl.store(cand_ptr + i, blk)
    tl.atomic_add(writers_ptr + blk, 1, mask=partial)
    tl.atomic_max(first_ptr + blk, (M - i).to(tl.int32), mask=partial)


@lazy_jit
def _fork_release_kernel(tables_ptr, lens_ptr, ref_ptr, rows_ptr, new_tables_ptr, new_lens_ptr, dead_ptr,
                         chunk_dead_ptr, W, s_tr, s_tc, BLOCK_W: tl.constexpr, BLOCK_NB: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + i)
    cols = tl.arange(0, BLOCK_W)
    for c0 in range(0, W, BLOCK_W):
        c = c0 + cols
        ok = c < W
        t = tl.load(tables_ptr + row * s_tr + c * s_tc, mask=ok, other=-1)
        live = ok & (t >= 0)
        before = tl.atomic_add(ref_ptr + t, -1, mask=live)
        died = live & (before == 1)
        tl.store(dead_ptr + t, 1, mask=died)
        tl.atomic_add(chunk_dead_ptr + t // BLOCK_NB, 1, mask=died)
        tl.store(tables_ptr + row * s_tr + c * s_tc, tl.load(new_tables_ptr + i * W + c, mask=ok), mask=ok)
    tl.store(lens_ptr + row, tl.load(new_lens_ptr + i))


@lazy_jit
def _fork_push_kernel(dead_ptr, chunk_dead_ptr, free_ptr, num_free_ptr, NB, n_chunks,
                      BLOCK_NB: tl.constexpr, BLOCK_CH: tl.constexpr):
    ch = tl.program_id(0)
    before = tl.zeros([BLOCK_CH], tl.int64)
    for k0 in range(0, n_chunks, BLOCK_CH):
        k = k0 + tl.arange(0, BLOCK_CH)
        before += tl.load(chunk_dead_ptr + k, mask=k < ch, other=0).to(tl.int64)
    base = tl.load(num_free_ptr) + tl.sum(before, 0)
    b = ch.to(tl.int64) * BLOCK_NB + tl.arange(0, BLOCK_NB)
    flag = tl.load(dead_ptr + b, mask=b < NB, other=0).to(tl.int64)
    pos = base + tl.cumsum(flag, 0) - flag
    tl.store(free_ptr + pos, b.to(free_ptr.dtype.element_ty), mask=flag != 0)


@lazy_jit
def _fork_rank_kernel(cand_ptr, ref_ptr, writers_ptr, first_ptr, chunk_dead_ptr, num_free_ptr, rank_ptr,
                      state_ptr, num_cow_ptr, missing_ptr, M, n_chunks,
                      BLOCK_M: tl.constexpr, BLOCK_CH: tl.constexpr):
    pushed = tl.zeros([BLOCK_CH], tl.int64)
    for k0 in range(0, n_chunks, BLOCK_CH):
        k = k0 + tl.arange(0, BLOCK_CH)
        pushed += tl.load(chunk_dead_ptr + k, mask=k < n_chunks, other=0).to(tl.int64)
    nf = tl.load(num_free_ptr) + tl.sum(pushed, 0)

    carry = tl.sum(tl.zeros([BLOCK_M], tl.int64), 0)
    for i0 in range(0, M, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M)
        ok = i < M
        blk = tl.load(cand_ptr + i, mask=ok, other=-1)
        has = ok & (blk >= 0)
        refs = tl.load(ref_ptr + blk, mask=has, other=0)
        n_writers = tl.load(writers_ptr + blk, mask=has, other=0)
        first = M - tl.load(first_ptr + blk, mask=has, other=0)
        # Shared and not the in-place keeper (lowest-index writer, when every holder writes).
        keeps = (first == i) & (refs == n_writers)
        cow = has & (refs > 1) & (~keeps)
        c = cow.to(tl.int64)
        tl.store(rank_ptr + i, tl.where(cow, carry + tl.cumsum(c, 0) - c, -1), mask=ok)
        carry += tl.sum(c, 0)
    enough = carry <= nf
    tl.store(state_ptr, nf)
    tl.store(state_ptr + 1, enough.to(tl.int64))
    tl.store(num_free_ptr, tl.where(enough, nf - carry, nf))
    tl.store(num_cow_ptr, tl.where(enough, carry, 0))
    tl.store(missing_ptr, tl.where(enough, 0, carry - nf))


@lazy_jit
def _fork_cow_kernel(tables_ptr, ref_ptr, free_ptr, rows_ptr, new_lens_ptr, cand_ptr, rank_ptr, state_ptr,
                     pairs_ptr, M, s_tr, s_tc, s_pr, block_size, BLOCK_M: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = i < M
    nf = tl.load(state_ptr)
    enough = tl.load(state_ptr + 1)
    rank = tl.load(rank_ptr + i, mask=ok, other=-1)
    do = ok & (rank >= 0) & ((rank * 0 + enough) != 0)
    src = tl.load(cand_ptr + i, mask=do, other=0)
    dst = tl.load(free_ptr + (nf - 1 - rank), mask=do, other=0)
    row = tl.load(rows_ptr + i, mask=do, other=0)
    col = tl.load(new_lens_ptr + i, mask=do, other=0) // block_size
    tl.store(tables_ptr + row * s_tr + col * s_tc, dst, mask=do)
    tl.atomic_add(ref_ptr + src, -1, mask=do)
    tl.store(ref_ptr + dst, 1, mask=do)
    tl.store(pairs_ptr + rank, src, mask=do)
    tl.store(pairs_ptr + s_pr + rank, dst.to(tl.int64), mask=do)
