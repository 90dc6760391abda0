"""Refcounted paged-KV block manager with copy-on-write forks.

All state is tensors so a fork is a gather plus a scatter-add, never a per-block Python loop:
``tables[row, i]`` is the block holding tokens ``[i*B, (i+1)*B)`` of particle row ``row`` (-1: none),
``lens[row]`` the tokens it holds, ``ref_counts[b]`` how many table entries point at block ``b``, and
``free_stack[:num_free]`` the blocks nobody references.
"""
from __future__ import annotations

import torch

from pfengine.kernels import cdiv
from pfengine.kernels.fork import BlockState, fork as fork_kernel, must_copy


class OutOfBlocks(RuntimeError):
    """Raised before any state changes when a reservation needs more blocks than are free."""

    def __init__(self, needed: int, free: int, message: str = "") -> None:
        super().__init__(f"KV cache exhausted: need {needed} free blocks, {free} available" + (f"; {message}" if message else ""))
        self.needed, self.free = needed, free


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, max_rows: int, max_blocks_per_row: int,
                 device: str | torch.device = "cpu") -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.tables = torch.full((max_rows, max_blocks_per_row), -1, dtype=torch.int32, device=device)
        self.lens = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.ref_counts = torch.zeros(num_blocks, dtype=torch.int32, device=device)
        self.free_stack = torch.arange(num_blocks - 1, -1, -1, dtype=torch.int32, device=device)
        self.num_free = num_blocks
        self.device = self.tables.device

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_needed(self, rows: torch.Tensor, n_new: torch.Tensor) -> int:
        """Upper bound on the blocks :meth:`reserve` takes: new blocks plus one COW copy per row."""
        rows, n_new = rows.to(self.device), torch.as_tensor(n_new, device=self.device)
        start = self.lens[rows]
        grow = cdiv(start + n_new, self.block_size) - cdiv(start, self.block_size)
        partial = (start % self.block_size != 0) & (n_new > 0)
        return int(grow.sum() + partial.sum())

    def reserve(self, rows: torch.Tensor, n_new: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """Make room for ``n_new[i]`` more tokens in ``rows[i]`` (``n_new=1``: one token each, the
        decode step's case, computed without per-token expansion).

        Returns the slot of every new token (row-major, ``block * B + offset``) and the ``[2, P]``
        (src, dst) block pairs the caller must copy first: a shared, partially filled last block is
        copied for every writer but one (none if a reader outside ``rows`` still holds it).
        """
        rows = rows.to(self.device)
        B = self.block_size
        one = isinstance(n_new, int) and n_new == 1
        n_new = torch.ones_like(rows) if one else torch.as_tensor(n_new, device=self.device).long().expand(rows.shape)
        start = self.lens[rows]
        end = start + n_new
        assert rows.numel() == 0 or int(cdiv(end.max(), B)) <= self.tables.shape[1], \
            "reserve: row longer than max_blocks_per_row"
        assert rows.numel() == rows.unique().numel(), "reserve: rows must be distinct"
        if one:
            grow = start % B == 0
            grow_rows, grow_cols = rows[grow], start[grow] // B
        else:
            first_new = cdiv(start, B)
            n_fresh = cdiv(end, B) - first_new
            grow_rows = rows.repeat_interleave(n_fresh)
            grow_cols = first_new.repeat_interleave(n_fresh) + _segment_arange(n_fresh)
        cow_rows, cow_src = self._cow_writers(rows, start, n_new)
        needed = grow_rows.numel() + cow_rows.numel()
        if needed > self.num_free:
            raise OutOfBlocks(needed, self.num_free)
        fresh = self._pop(needed)

        cow_dst, fresh = fresh[:cow_rows.numel()], fresh[cow_rows.numel():]
        self.tables[cow_rows, (self.lens[cow_rows] // B)] = cow_dst
        self.ref_counts.index_add_(0, cow_src.long(), torch.full_like(cow_src, -1))
        self.ref_counts[cow_dst.long()] = 1
        self.tables[grow_rows, grow_cols] = fresh
        self.ref_counts[fresh.long()] = 1

        if one:
            tok_rows, pos = rows, start
        else:
            tok_rows = rows.repeat_interleave(n_new)
            pos = start.repeat_interleave(n_new) + _segment_arange(n_new)
        slots = self.tables[tok_rows, pos // B].long() * B + pos % B
        self.lens[rows] = end
        return slots, torch.stack([cow_src, cow_dst]).long()

    def _cow_writers(self, rows: torch.Tensor, start: torch.Tensor, n_new: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows that must copy their shared partial last block before writing, and that block."""
        B = self.block_size
        partial = (start % B != 0) & (n_new > 0)
        w_rows = rows[partial]
        blocks = self.tables[w_rows, start[partial] // B]
        shared = self.ref_counts[blocks.long()] > 1
        w_rows, blocks = w_rows[shared], blocks[shared]
        if blocks.numel() == 0:
            return w_rows, blocks
        copy = must_copy(blocks, self.ref_counts)
        return w_rows[copy], blocks[copy]

    def assign(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Make each ``dst[i]`` a copy of ``src[i]`` (a fork; rows may overlap, as in resampling).

        New references are added before old ones are dropped, so no live block is freed mid-way.
        """
        dst, src = dst.to(self.device), src.to(self.device)
        new_tables, new_lens = self.tables[src].clone(), self.lens[src].clone()
        new_refs = new_tables[new_tables >= 0].long()
        self.ref_counts.index_add_(0, new_refs, torch.ones_like(new_refs, dtype=torch.int32))
        self._release(self.tables[dst])
        self.tables[dst], self.lens[dst] = new_tables, new_lens

    def fork(self, rows: torch.Tensor, ancestors: torch.Tensor, writes: torch.Tensor) -> torch.Tensor:
        """Resampling in one kernel: row ``rows[i]`` becomes a copy of ``rows[ancestors[i]]``, and
        each writing child whose last block is partial and shared gets its private copy now.
        Returns the ``[2, P]`` (src, dst) pairs to copy (-1 padded); copies it could not get
        blocks for are left to :meth:`reserve`, which copies lazily or raises."""
        num_free = torch.tensor([self.num_free], dtype=torch.int64, device=self.device)
        state = BlockState(self.tables, self.lens, self.ref_counts, self.free_stack, num_free)
        result = fork_kernel(state, rows.to(self.device), ancestors.to(self.device), writes.to(self.device),
                             self.block_size)
        self.num_free = int(num_free)
        return result.cow_pairs

    def free(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.device)
        self._release(self.tables[rows])
        self.tables[rows] = -1
        self.lens[rows] = 0

    def truncate(self, rows: torch.Tensor, n: int) -> None:
        """Forget the last ``n`` tokens of each row (e.g. a scored PRM step tag)."""
        rows = rows.to(self.device)
        new_lens = self.lens[rows] - n
        assert bool((new_lens >= 0).all()), "truncate: more tokens than the row holds"
        cols = torch.arange(self.tables.shape[1], device=rows.device)
        drop = cols[None, :] >= cdiv(new_lens, self.block_size)[:, None]
        tables = self.tables[rows]
        self._release(tables[drop])
        self.tables[rows] = tables.masked_fill(drop, -1)
        self.lens[rows] = new_lens

    def _release(self, entries: torch.Tensor) -> None:
        blocks = entries[entries >= 0].long()
        if blocks.numel() == 0:
            return
        self.ref_counts.index_add_(0, blocks, torch.full_like(blocks, -1, dtype=torch.int32))
        uniq = blocks.unique()
        dead = uniq[self.ref_counts[uniq] == 0].to(torch.int32)
        self.free_stack[self.num_free:self.num_free + dead.numel()] = dead
        self.num_free += dead.numel()

    def _pop(self, n: int) -> torch.Tensor:
        self.num_free -= n
        return self.free_stack[self.num_free:self.num_free + n].flip(0).clone()

    def check_invariants(self) -> None:
        """Refcount == table references; free and used are disjoint; tables cover lens exactly."""
        used = self.tables[self.tables >= 0].long()
        counted = torch.bincount(used, minlength=self.num_blocks).to(torch.int32)
        assert torch.equal(counted, self.ref_counts), "refcounts differ from table references"
        free = self.free_stack[:self.num_free].long()
        assert free.unique().numel() == free.numel(), "a block is on the free stack twice"
        assert bool((self.ref_counts[free] == 0).all()), "a referenced block is on the free stack"
        assert self.num_free + int((self.ref_counts > 0).sum()) == self.num_blocks, "a block leaked"
        cols = torch.arange(self.tables.shape[1], device=self.tables.device)
        covered = cols[None, :] < cdiv(self.lens, self.block_size)[:, None]
        assert torch.equal(covered, self.tables >= 0), "a block table does not cover its row's length"


def _segment_arange(counts: torch.Tensor) -> torch.Tensor:
    """``[0..c0), [0..c1), ...`` concatenated."""
    total = int(counts.sum())
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(total, device=counts.device) - starts.repeat_interleave(counts)
