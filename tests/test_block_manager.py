"""Block manager: refcounts, copy-on-write and reuse, checked against a shadow model of each row's contents."""
import random

import pytest
import torch

from pfengine.cache.block_manager import BlockManager, OutOfBlocks
from pfengine.kernels.copy_blocks import copy_blocks

B = 4


class Harness:
    """A block manager plus a fake one-layer KV tensor holding token values, and the truth per row."""

    def __init__(self, num_blocks: int = 64, rows: int = 12) -> None:
        self.bm = BlockManager(num_blocks, B, rows, 16)
        self.kv = torch.full((2, 1, num_blocks, B, 1, 1), -1.0)
        self.truth: dict[int, list[float]] = {}
        self.next_value = 0.0

    def append(self, rows: list[int], n: list[int]) -> None:
        slots, cow = self.bm.reserve(torch.tensor(rows), torch.tensor(n))
        copy_blocks(self.kv, cow)
        values = []
        for r, k in zip(rows, n):
            for _ in range(k):
                self.next_value += 1
                self.truth.setdefault(r, []).append(self.next_value)
                values.append(self.next_value)
        self.kv.view(2, -1)[:, slots] = torch.tensor(values)

    def assign(self, dst: list[int], src: list[int]) -> None:
        self.bm.assign(torch.tensor(dst, dtype=torch.int64), torch.tensor(src, dtype=torch.int64))
        new = {d: list(self.truth.get(s, [])) for d, s in zip(dst, src)}
        self.truth.update(new)

    def free(self, rows: list[int]) -> None:
        self.bm.free(torch.tensor(rows, dtype=torch.int64))
        for r in rows:
            self.truth.pop(r, None)

    def check(self) -> None:
        self.bm.check_invariants()
        for r, values in self.truth.items():
            assert int(self.bm.lens[r]) == len(values)
            if values:
                blocks = self.bm.tables[r, :(len(values) + B - 1) // B].long()
                stored = self.kv[0, 0, blocks].flatten()[:len(values)]
                assert stored.tolist() == values, f"row {r} reads back other tokens"


def test_fork_shares_full_blocks_and_copies_only_the_partial_last_one():
    h = Harness()
    h.append([0], [10])  # blocks: full, full, half
    h.assign([1, 2], [0, 0])
    assert h.bm.blocks_in_use == 3
    h.append([0, 1, 2], [1, 1, 1])
    assert h.bm.blocks_in_use == 5  # two copies of the partial block; one writer keeps it
    h.check()
    h.free([0, 1, 2])
    assert h.bm.blocks_in_use == 0
    h.check()


def test_a_frozen_reader_keeps_the_original_block():
    h = Harness()
    h.append([0], [6])
    h.assign([1], [0])
    h.append([1], [1])  # row 0 still reads the shared block: row 1 must copy
    assert int(h.bm.tables[0, 1]) != int(h.bm.tables[1, 1])
    h.check()


def test_truncate_releases_a_block_the_tag_opened():
    h = Harness()
    h.append([0], [8])
    h.append([0], [1])
    assert h.bm.blocks_in_use == 3
    h.bm.truncate(torch.tensor([0]), 1)
    h.truth[0].pop()
    assert h.bm.blocks_in_use == 2
    h.check()


def test_out_of_blocks_changes_nothing():
    h = Harness(num_blocks=4)
    h.append([0], [12])
    before = (h.bm.tables.clone(), h.bm.ref_counts.clone(), h.bm.num_free)
    with pytest.raises(OutOfBlocks, match="need 2 free blocks, 1 available"):
        h.bm.reserve(torch.tensor([0]), torch.tensor([5]))
    assert torch.equal(before[0], h.bm.tables) and torch.equal(before[1], h.bm.ref_counts)
    assert before[2] == h.bm.num_free
    h.check()


@pytest.mark.parametrize("seed", range(5))
def test_random_fork_append_free(seed):
    rng = random.Random(seed)
    h = Harness(num_blocks=96, rows=12)
    for _ in range(400):
        live = sorted(h.truth)
        empty = [r for r in range(12) if r not in h.truth]
        op = rng.random()
        try:
            if op < 0.35 and live:
                rows = rng.sample(live, rng.randint(1, len(live)))
                h.append(rows, [min(rng.randint(0, 6), 64 - len(h.truth[r])) for r in rows])
            elif op < 0.5 and empty:
                h.append([rng.choice(empty)], [rng.randint(1, 9)])
            elif op < 0.65 and live and empty:
                dst = rng.sample(empty, rng.randint(1, len(empty)))
                h.assign(dst, [rng.choice(live) for _ in dst])
            elif op < 0.85 and len(live) > 1:  # resampling: rows overlap as sources and destinations
                h.assign(live, [rng.choice(live) for _ in live])
            elif op < 0.95 and live:
                h.free(rng.sample(live, rng.randint(1, len(live))))
            elif live:
                r = rng.choice(live)
                k = rng.randint(0, len(h.truth[r]))
                h.bm.truncate(torch.tensor([r]), k)
                del h.truth[r][len(h.truth[r]) - k:]
        except OutOfBlocks:
            pass
        h.check()
    h.free(sorted(h.truth))
    assert h.bm.blocks_in_use == 0
    h.check()
