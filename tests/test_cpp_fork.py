"""C++ fork (pfengine._cpp): gather tables by ancestor, refcounts, free stack, copy-on-write of shared
partial last blocks -- equal to fork_ref exactly, to the block manager's assign + lazy COW, and
keeping the block invariants; plus resample + fork as the engine chains them."""
import importlib.util
import random

import pytest
import torch

if importlib.util.find_spec("pfengine._cpp") is None:
    pytest.skip("pfengine._cpp is not built (pip install --no-build-isolation -e .)", allow_module_level=True)

from pfengine import _cpp  # noqa: E402,F401  (built: it must load)
from pfengine.cache.block_manager import BlockManager  # noqa: E402
from pfengine.kernels import fork as fk  # noqa: E402
from pfengine.kernels.fork import fork, fork_cpp, fork_ref  # noqa: E402
from pfengine.kernels.resample import resample_cpp, resample_ref  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu_dispatch(monkeypatch):
    monkeypatch.delenv("PFENGINE_TRITON", raising=False)
    monkeypatch.delenv("PFENGINE_CPP", raising=False)


def _scenario(seed, num_blocks=48, block_size=4, rows=8, width=8, rounds=4):
    """A block manager after a prompt, a fan-out and rounds of appends and random forks, so that
    full, partial, shared and private blocks all occur."""
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, block_size, rows, width)
    all_rows = torch.arange(rows)
    bm.reserve(torch.tensor([0]), torch.tensor([rng.randint(1, 2 * block_size + 1)]))
    bm.assign(all_rows[1:], torch.zeros(rows - 1, dtype=torch.int64))
    for _ in range(rounds):
        sub = torch.tensor(sorted(rng.sample(range(rows), rng.randint(1, rows))))
        room = width * block_size - bm.lens[sub]
        n_new = torch.tensor([rng.randint(0, min(3, int(r))) for r in room])
        if bm.blocks_needed(sub, n_new) <= bm.num_free:
            bm.reserve(sub, n_new)
        bm.assign(all_rows, torch.tensor([rng.randrange(rows) for _ in range(rows)]))
    bm.check_invariants()
    return bm


def _state(bm):
    return [bm.tables.clone(), bm.lens.clone(), bm.ref_counts.clone(), bm.free_stack.clone(),
            torch.tensor([bm.num_free], dtype=torch.int64)]


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


def _check_fork(seed, rows_sel, ancestors, writes, bm, block_size):
    before = _state(bm)
    s_ref, s_cpp = _state(bm), _state(bm)
    res_ref = fork_ref(*s_ref, rows_sel, ancestors, writes, block_size)
    res_cpp = fork_cpp(*s_cpp, rows_sel, ancestors, writes, block_size)
    for name, a, b in zip(("tables", "lens", "refs", "num_free"), s_cpp[:3] + s_cpp[4:], s_ref[:3] + s_ref[4:]):
        assert torch.equal(a, b), f"seed {seed}: {name} differ"
    nf = int(s_ref[4][0])
    assert torch.equal(s_cpp[3][:nf], s_ref[3][:nf]), f"seed {seed}: free stacks differ"
    for a, b in zip(res_cpp, res_ref):
        assert a.dtype == b.dtype and torch.equal(a, b), f"seed {seed}: results differ"
    _check_invariants(*s_cpp, block_size)

    n_cow = int(res_cpp.num_cow[0])
    pairs = res_cpp.cow_pairs
    assert bool((pairs[:, n_cow:] == -1).all())
    dst = pairs[1, :n_cow]
    assert dst.unique().numel() == n_cow, "COW destinations not distinct"
    top = int(s_cpp[4][0])
    assert sorted(s_cpp[3][top:top + n_cow].tolist()) == sorted(dst.tolist()), "not popped from the stack top"
    assert bool((s_cpp[2][dst] == 1).all())
    if int(res_cpp.missing[0]) == 0:
        for i in torch.nonzero(writes).flatten().tolist():
            r = int(rows_sel[i])
            n = int(s_cpp[1][r])
            if n % block_size:
                assert int(s_cpp[2][int(s_cpp[0][r, n // block_size])]) == 1, f"seed {seed}: child {i} shares"
    return before, s_cpp, res_cpp


def _lazy_equivalent(bm, rows_sel, ancestors, writes, before, after, res):
    """The block manager's assign + reserve(writers, 1) copies lazily what the fork copied eagerly."""
    B = bm.block_size
    lazy = BlockManager(bm.num_blocks, B, *bm.tables.shape)
    lazy.tables, lazy.lens, lazy.ref_counts, lazy.free_stack = [x.clone() for x in before[:4]]
    lazy.num_free = int(before[4][0])
    lazy.assign(rows_sel, rows_sel[ancestors])
    wr = rows_sel[writes]
    ones = torch.ones(wr.numel(), dtype=torch.int64)
    if lazy.blocks_needed(wr, ones) > lazy.num_free:
        return
    slots_lazy, cow_lazy = lazy.reserve(wr, ones)
    eager = BlockManager(bm.num_blocks, B, *bm.tables.shape)
    eager.tables, eager.lens, eager.ref_counts, eager.free_stack = [x.clone() for x in after[:4]]
    eager.num_free = int(after[4][0])
    slots_eager, cow_eager = eager.reserve(wr, ones)
    assert cow_eager.shape[1] == 0, "reserve still had to copy after the eager fork"
    n = int(res.num_cow[0])
    assert torch.equal(res.cow_pairs[:, :n], cow_lazy), "COW pairs differ from the block manager's"
    assert torch.equal(slots_eager, slots_lazy)
    assert torch.equal(eager.tables, lazy.tables) and torch.equal(eager.ref_counts, lazy.ref_counts)
    assert eager.num_free == lazy.num_free
    eager.check_invariants()


@pytest.mark.parametrize("seed", range(16))
def test_random_forks_match_reference_and_block_manager(seed):
    rng = random.Random(1000 + seed)
    bm = _scenario(seed)
    rows = bm.tables.shape[0]
    rows_sel = torch.tensor(sorted(rng.sample(range(rows), rng.randint(1, rows))), dtype=torch.int64)
    m = rows_sel.numel()
    ancestors = torch.tensor([rng.randrange(m) for _ in range(m)], dtype=torch.int64)
    writes = torch.tensor([rng.random() < 0.75 for _ in range(m)])
    before, after, res = _check_fork(seed, rows_sel, ancestors, writes, bm, bm.block_size)
    _lazy_equivalent(bm, rows_sel, ancestors, writes, before, after, res)


def test_all_writers_one_keeps_in_place():
    B = 4
    bm = BlockManager(16, B, 4, 4)
    bm.reserve(torch.tensor([0]), torch.tensor([6]))  # one full block, one with 2 tokens
    rows = torch.arange(3)
    anc = torch.zeros(3, dtype=torch.int64)
    before, after, res = _check_fork(0, rows, anc, torch.ones(3, dtype=torch.bool), bm, B)
    assert int(res.num_cow[0]) == 2
    last = int(before[0][0, 1])
    assert int(after[0][0, 1]) == last, "the lowest-index writer keeps the block in place"
    assert torch.equal(res.cow_pairs[0, :2], torch.tensor([last, last]))
    _lazy_equivalent(bm, rows, anc, torch.ones(3, dtype=torch.bool), before, after, res)
    writes = torch.tensor([True, True, False])
    before, after, res = _check_fork(1, rows, anc, writes, bm, B)
    assert int(res.num_cow[0]) == 2 and int(after[0][2, 1]) == last, "the reader keeps the original"


def test_block_boundary_is_never_copied_and_dead_blocks_are_reused():
    B = 4
    bm = BlockManager(16, B, 3, 4)
    bm.reserve(torch.tensor([0, 1, 2]), torch.tensor([8, 5, 3]))
    rows = torch.arange(3)
    anc = torch.zeros(3, dtype=torch.int64)
    before, after, res = _check_fork(0, rows, anc, torch.ones(3, dtype=torch.bool), bm, B)
    assert int(res.num_cow[0]) == 0 and bool((res.cow_pairs == -1).all())
    freed = sorted(before[0][1:][before[0][1:] >= 0].tolist())
    nf0 = int(before[4][0])
    assert after[3][nf0:nf0 + len(freed)].tolist() == freed, "dead blocks pushed in ascending order"


def test_out_of_blocks_reports_and_leaves_a_consistent_state():
    B = 4
    bm = BlockManager(4, B, 4, 2)
    bm.reserve(torch.tensor([0]), torch.tensor([6]))
    bm.reserve(torch.tensor([3]), torch.tensor([1]))  # one free block left
    rows = torch.arange(3)
    anc = torch.zeros(3, dtype=torch.int64)
    before, after, res = _check_fork(0, rows, anc, torch.ones(3, dtype=torch.bool), bm, B)
    assert int(res.missing[0]) == 1 and int(res.num_cow[0]) == 0 and bool((res.cow_pairs == -1).all())
    assert int(after[4][0]) == 1, "no block was popped"


def test_empty_single_child_many_children_and_strided_state():
    bm = _scenario(3)
    empty = fork_cpp(*_state(bm), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                     torch.zeros(0, dtype=torch.bool), bm.block_size)
    assert empty.cow_pairs.shape == (2, 0) and int(empty.num_cow[0]) == 0 and int(empty.missing[0]) == 0
    _check_fork(1, torch.tensor([5]), torch.tensor([0]), torch.tensor([True]), bm, bm.block_size)
    big = _scenario(9, num_blocks=300, block_size=2, rows=64, width=18, rounds=3)
    rng = random.Random(9)
    rows = torch.arange(64)
    anc = torch.tensor([rng.randrange(64) for _ in range(64)])
    writes = torch.tensor([rng.random() < 0.8 for _ in range(64)])
    before, after, res = _check_fork(9, rows, anc, writes, big, 2)
    _lazy_equivalent(big, rows, anc, writes, before, after, res)
    # Tables and lens as strided views (int32 rows / ancestors / uint8 writes given as other dtypes).
    s_ref, s_cpp = _state(bm), _state(bm)
    wide = torch.full((bm.tables.shape[0], 2 * bm.tables.shape[1]), 7, dtype=torch.int32)
    wide[:, ::2] = s_cpp[0]
    lens2 = torch.stack([s_cpp[1], s_cpp[1]], 1)
    rows, anc = torch.tensor([1, 2, 4, 6]), torch.tensor([3, 3, 0, 2])
    w = torch.tensor([1, 0, 1, 1], dtype=torch.uint8)
    r_ref = fork_ref(*s_ref, rows, anc, w.bool(), bm.block_size)
    r_cpp = fork_cpp(wide[:, ::2], lens2[:, 0], *s_cpp[2:], rows.int(), anc.int(), w, bm.block_size)
    assert torch.equal(wide[:, ::2], s_ref[0]) and bool((wide[:, 1::2] == 7).all())
    assert torch.equal(lens2[:, 0], s_ref[1]) and torch.equal(s_cpp[2], s_ref[2])
    assert all(torch.equal(a, b) for a, b in zip(r_cpp, r_ref))


def test_bad_rows_raise_before_changing_anything():
    bm = _scenario(4)
    state = _state(bm)
    snapshot = [x.clone() for x in state]
    with pytest.raises(RuntimeError, match="ancestor"):
        fork_cpp(*state, torch.arange(3), torch.tensor([0, 1, 3]), torch.ones(3, dtype=torch.bool), bm.block_size)
    with pytest.raises(RuntimeError, match="row"):
        fork_cpp(*state, torch.tensor([0, 99]), torch.tensor([0, 1]), torch.ones(2, dtype=torch.bool), bm.block_size)
    assert all(torch.equal(a, b) for a, b in zip(state, snapshot))


@pytest.mark.parametrize("n", [64, 1024])
@pytest.mark.parametrize("method", ["systematic", "multinomial"])
def test_resample_then_fork_equals_reference_chain(n, method):
    """The PF step on the block tables: ancestors from the weights, then the fork; C++ == reference."""
    B = 16
    bm = BlockManager(n * 6 + 8, B, n, 8)
    bm.reserve(torch.tensor([0]), torch.tensor([37]))
    bm.assign(torch.arange(1, n), torch.zeros(n - 1, dtype=torch.int64))
    g = torch.Generator().manual_seed(n)
    bm.reserve(torch.arange(n), torch.randint(1, 20, (n,), generator=g))
    w = torch.rand(n, generator=g, dtype=torch.float64) ** 4
    w /= w.sum()
    u = torch.rand(n, generator=g, dtype=torch.float64)
    seg = torch.tensor([0, n])
    anc = resample_cpp(w, seg, u, method)
    assert torch.equal(anc, resample_ref(w, seg, u, method))
    before, after, res = _check_fork(n, torch.arange(n), anc, torch.ones(n, dtype=torch.bool), bm, B)
    assert int(res.num_cow[0]) > 0


def test_dispatch_block_manager_and_profiler_range(monkeypatch):
    calls = []
    monkeypatch.setattr(fk, "fork_cpp", lambda *a: calls.append(1) or fork_cpp(*a))
    bm = _scenario(5)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        bm.fork(torch.arange(8), torch.zeros(8, dtype=torch.int64), torch.ones(8, dtype=torch.bool))
    bm.check_invariants()
    assert calls == [1] and "pfengine::fork" in {e.name for e in prof.events()}
    monkeypatch.setenv("PFENGINE_CPP", "0")
    fork(*_state(bm), torch.arange(2), torch.zeros(2, dtype=torch.int64), torch.ones(2, dtype=torch.bool), 4)
    assert calls == [1], "PFENGINE_CPP=0 must take the reference"
    monkeypatch.delenv("PFENGINE_CPP")
    s = _state(bm)
    refs = torch.stack([s[2], s[2]], 1)[:, 0]  # a non-contiguous refcount view
    fork(s[0], s[1], refs, *s[3:], torch.arange(2), torch.zeros(2, dtype=torch.int64), torch.ones(2, dtype=torch.bool), 4)
    assert calls == [1], "a layout the C++ kernel does not take runs the reference"
