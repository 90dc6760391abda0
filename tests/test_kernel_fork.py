"""Fork kernel (gather tables by ancestor, refcounts, free stack, copy-on-write of shared partial
last blocks) vs its torch reference, vs the block manager's own assign + lazy COW, and invariants."""
import random

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from pfengine.cache.block_manager import BlockManager  # noqa: E402
from pfengine.kernels.fork import fork, fork_ref, fork_triton  # noqa: E402

pytestmark = pytest.mark.triton



def _num_free(bm) -> int:
    return int(bm.num_free)


def _set_num_free(bm, n: int) -> None:
    if isinstance(bm.num_free, torch.Tensor):
        bm.num_free.fill_(n)
    else:
        bm.num_free = n


def _scenario(seed, num_blocks=48, block_size=4, rows=8, width=8, rounds=4):
    """A block manager after a prompt, a fan-out and a few rounds of appends and random forks, so
    that full, partial, shared and private blocks all occur."""
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, block_size, rows, width)
    all_rows = torch.arange(rows)
    bm.reserve(torch.tensor([0]), torch.tensor([rng.randint(1, 2 * block_size + 1)]))
    bm.assign(all_rows[1:], torch.zeros(rows - 1, dtype=torch.int64))
    for _ in range(rounds):
        sub = torch.tensor(sorted(rng.sample(range(rows), rng.randint(1, rows))))
        room = width * block_size - bm.lens[sub]
        n_new = torch.tensor([rng.randint(0, min(3, int(r))) for r in room])
        if bm.blocks_needed(sub, n_new) <= _num_free(bm):
            bm.reserve(sub, n_new)
        anc = torch.tensor([rng.randrange(rows) for _ in range(rows)])
        bm.assign(all_rows, anc)
    bm.check_invariants()
    return bm


def _state(bm):
    return [bm.tables.clone(), bm.lens.clone(), bm.ref_counts.clone(), bm.free_stack.clone(),
            torch.tensor([_num_free(bm)], dtype=torch.int64)]


def _check_invariants(tables, lens, refs, stack, num_free, block_size):
    nb = refs.numel()
    used = tables[tables >= 0].long()
    assert torch.equal(torch.bincount(used, minlength=nb).to(refs.dtype), refs), "refcount != references"
    nf = int(num_free[0])
    free = stack[:nf].long()
    assert free.unique().numel() == free.numel(), "a block is free twice"
    assert bool((refs[free] == 0).all()), "a referenced block is on the free stack"
    assert nf + int((refs > 0).sum()) == nb, "a block leaked"
    cols = torch.arange(tables.shape[1])
    covered = cols[None, :] < ((lens + block_size - 1) // block_size)[:, None]
    assert torch.equal(covered, tables >= 0), "a table does not cover its row's length"


def _check_fork(seed, rows_sel, ancestors, writes, bm, block_size, **blocks):
    before = _state(bm)
    s_ref, s_tri = _state(bm), _state(bm)
    res_ref = fork_ref(*s_ref, rows_sel, ancestors, writes, block_size)
    res_tri = fork_triton(*s_tri, rows_sel, ancestors, writes, block_size, **blocks)
    # Kernel == reference, exactly (live part of the free stack included).
    for name, a, b in zip(("tables", "lens", "refs"), s_tri[:3], s_ref[:3]):
        assert torch.equal(a, b), f"seed {seed}: {name} differ"
    assert torch.equal(s_tri[4], s_ref[4])
    nf = int(s_ref[4][0])
    assert torch.equal(s_tri[3][:nf], s_ref[3][:nf]), f"seed {seed}: free stacks differ"
    for a, b in zip(res_tri, res_ref):
        assert torch.equal(a, b), f"seed {seed}: results differ"
    _check_invariants(*s_tri, block_size)

    n_cow = int(res_tri.num_cow[0])
    pairs = res_tri.cow_pairs
    assert bool((pairs[:, n_cow:] == -1).all())
    dst = pairs[1, :n_cow]
    assert dst.unique().numel() == n_cow, "COW destinations not distinct"
    # Destinations were free once the fork's gather was done (nobody referenced them) ...
    gathered = before[0].clone()
    gathered[rows_sel] = before[0][rows_sel[ancestors]]
    unreferenced = torch.bincount(gathered[gathered >= 0].long(), minlength=before[2].numel()) == 0
    assert bool(unreferenced[dst].all()), "COW destination was not free"
    # ... were popped from the top of the stack, and are now private to their child.
    top = int(s_tri[4][0])
    assert sorted(s_tri[3][top:top + n_cow].tolist()) == sorted(dst.tolist())
    assert bool((s_tri[2][dst] == 1).all())
    if int(res_tri.missing[0]) == 0:
        # No writing child holds a shared, partially filled last block any more.
        for i in torch.nonzero(writes).flatten().tolist():
            r = int(rows_sel[i])
            n = int(s_tri[1][r])
            if n % block_size:
                assert int(s_tri[2][int(s_tri[0][r, n // block_size])]) == 1, f"seed {seed}: child {i} shares"
    return before, s_tri, res_tri


def _lazy_equivalent(bm, rows_sel, ancestors, writes, before, after, res):
    """The same fork done by the block manager: assign, then reserve(writers, 1) copies lazily.
    Reserving after the kernel's fork must copy nothing and end in the identical state."""
    block_size = bm.block_size
    lazy = BlockManager(bm.num_blocks, block_size, *bm.tables.shape)
    lazy.tables, lazy.lens, lazy.ref_counts, lazy.free_stack = [x.clone() for x in before[:4]]
    _set_num_free(lazy, int(before[4][0]))
    lazy.assign(rows_sel, rows_sel[ancestors])
    wr = rows_sel[writes]
    ones = torch.ones(wr.numel(), dtype=torch.int64)
    if lazy.blocks_needed(wr, ones) > _num_free(lazy):
        return False
    slots_lazy, cow_lazy = lazy.reserve(wr, ones)

    eager = BlockManager(bm.num_blocks, block_size, *bm.tables.shape)
    eager.tables, eager.lens, eager.ref_counts, eager.free_stack = [x.clone() for x in after[:4]]
    _set_num_free(eager, int(after[4][0]))
    slots_eager, cow_eager = eager.reserve(wr, ones)
    assert cow_eager.shape[1] == 0, "reserve still had to copy after the eager fork"
    n = int(res.num_cow[0])
    assert torch.equal(res.cow_pairs[:, :n], cow_lazy), "COW pairs differ from the block manager's"
    assert torch.equal(slots_eager, slots_lazy)
    assert torch.equal(eager.tables, lazy.tables) and torch.equal(eager.lens, lazy.lens)
    assert torch.equal(eager.ref_counts, lazy.ref_counts)
    assert _num_free(eager) == _num_free(lazy)
    assert torch.equal(eager.free_stack[:_num_free(eager)], lazy.free_stack[:_num_free(lazy)])
    eager.check_invariants()
    return True


@pytest.mark.parametrize("seed", range(8))
def test_random_forks_match_reference_and_block_manager(seed):
    rng = random.Random(1000 + seed)
    bm = _scenario(seed)
    rows = bm.tables.shape[0]
    # Fork a subset of the rows (the others may still share blocks: readers outside the fork).
    rows_sel = torch.tensor(sorted(rng.sample(range(rows), rng.randint(1, rows))), dtype=torch.int64)
    m = rows_sel.numel()
    ancestors = torch.tensor([rng.randrange(m) for _ in range(m)], dtype=torch.int64)
    writes = torch.tensor([rng.random() < 0.75 for _ in range(m)])
    before, after, res = _check_fork(seed, rows_sel, ancestors, writes, bm, bm.block_size)
    _lazy_equivalent(bm, rows_sel, ancestors, writes, before, after, res)


def test_all_writers_one_keeps_in_place():
    """Three children of one particle with a partial last block, all writing: the lowest index keeps
    the block, two copy; with a non-writing sibling, every writer copies."""
    B = 4
    bm = BlockManager(16, B, 4, 4)
    bm.reserve(torch.tensor([0]), torch.tensor([6]))  # blocks: one full, one with 2 tokens
    rows = torch.arange(3)
    anc = torch.zeros(3, dtype=torch.int64)
    before, after, res = _check_fork(0, rows, anc, torch.ones(3, dtype=torch.bool), bm, B)
    assert int(res.num_cow[0]) == 2
    last = int(before[0][0, 1])
    assert int(after[0][0, 1]) == last, "the lowest-index writer keeps the block in place"
    assert torch.equal(res.cow_pairs[0, :2], torch.tensor([last, last]))
    assert int(after[0][0, 0]) == int(after[0][1, 0]) == int(after[0][2, 0]), "full blocks stay shared"
    _lazy_equivalent(bm, rows, anc, torch.ones(3, dtype=torch.bool), before, after, res)

    writes = torch.tensor([True, True, False])
    before, after, res = _check_fork(1, rows, anc, writes, bm, B)
    assert int(res.num_cow[0]) == 2 and int(after[0][2, 1]) == last, "the reader keeps the original"
    _lazy_equivalent(bm, rows, anc, writes, before, after, res)


def test_block_boundary_is_never_copied_and_dead_blocks_are_reused():
    """A context ending exactly on a block boundary shares only full blocks: nothing to copy. The
    blocks of particles that leave no offspring return to the free stack, ascending."""
    B = 4
    bm = BlockManager(16, B, 3, 4)
    bm.reserve(torch.tensor([0, 1, 2]), torch.tensor([8, 5, 3]))
    rows = torch.arange(3)
    anc = torch.zeros(3, dtype=torch.int64)
    before, after, res = _check_fork(0, rows, anc, torch.ones(3, dtype=torch.bool), bm, B)
    assert int(res.num_cow[0]) == 0 and bool((res.cow_pairs == -1).all())
    freed = sorted(before[0][1:][before[0][1:] >= 0].tolist())
    nf0 = int(before[4][0])
    assert after[3][nf0:nf0 + len(freed)].tolist() == freed
    _lazy_equivalent(bm, rows, anc, torch.ones(3, dtype=torch.bool), before, after, res)


def test_out_of_blocks_reports_and_leaves_a_consistent_state():
    B = 4
    bm = BlockManager(4, B, 4, 2)
    bm.reserve(torch.tensor([0]), torch.tensor([6]))  # 2 blocks used, 2 free
    bm.reserve(torch.tensor([3]), torch.tensor([1]))  # 1 more used by an outside row: 1 free
    rows = torch.arange(3)
    anc = torch.zeros(3, dtype=torch.int64)
    writes = torch.ones(3, dtype=torch.bool)
    before, after, res = _check_fork(0, rows, anc, writes, bm, B)
    assert int(res.missing[0]) == 1 and int(res.num_cow[0]) == 0 and bool((res.cow_pairs == -1).all())
    assert int(after[4][0]) == 1, "no block was popped"
    # The state is exactly the block manager's after assign alone.
    plain = BlockManager(4, B, 4, 2)
    plain.tables, plain.lens, plain.ref_counts, plain.free_stack = [x.clone() for x in before[:4]]
    _set_num_free(plain, int(before[4][0]))
    plain.assign(rows, rows[anc])
    assert torch.equal(plain.tables, after[0]) and torch.equal(plain.ref_counts, after[2])


def test_empty_single_child_and_chunked_launch():
    bm = _scenario(3)
    empty = fork(*_state(bm), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                 torch.zeros(0, dtype=torch.bool), bm.block_size)
    assert empty.cow_pairs.shape == (2, 0) and int(empty.num_cow[0]) == 0
    _check_fork(1, torch.tensor([5]), torch.tensor([0]), torch.tensor([True]), bm, bm.block_size)
    # Many children, rows and blocks over several chunks of small BLOCKs.
    big = _scenario(9, num_blocks=80, block_size=2, rows=20, width=18, rounds=3)
    rng = random.Random(9)
    rows = torch.arange(20)
    anc = torch.tensor([rng.randrange(20) for _ in range(20)])
    writes = torch.tensor([rng.random() < 0.8 for _ in range(20)])
    before, after, res = _check_fork(9, rows, anc, writes, big, 2, block_w=16, block_m=16, block_nb=16)
    _lazy_equivalent(big, rows, anc, writes, before, after, res)


def test_profiler_range():
    bm = _scenario(4)
    rows = torch.arange(8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fork(*_state(bm), rows, torch.zeros(8, dtype=torch.int64), torch.ones(8, dtype=torch.bool), bm.block_size)
    assert "pfengine::fork" in {e.name for e in prof.events()}
