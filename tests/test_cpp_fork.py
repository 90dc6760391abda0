"""C++ fork (pfengine._cpp): gather tables by ancestor, refcounts, free stack, copy-on-write of shared
partial last blocks -- equal to fork_ref exactly, to the block manager's assign + lazy COW, and
keeping the block invariants; plus resample + fork as the engine chains them."""
import pytest
import torch

from kernel_cases import (block_state, check_block_boundary_and_dead_blocks, check_empty_single_and_many_children,
                          check_fork, check_out_of_blocks, check_random_fork, check_writers_of_shared_partial_block,
                          fork_scenario)
from pfengine.cache.block_manager import BlockManager
from pfengine.kernels import fork as fk
from pfengine.kernels.fork import BlockState, fork, fork_cpp, fork_ref
from pfengine.kernels.resample import resample_cpp, resample_ref

pytestmark = pytest.mark.cpp


@pytest.mark.parametrize("seed", range(16))
def test_random_forks_match_reference_and_block_manager(seed):
    check_random_fork(fork_cpp, seed)


def test_all_writers_one_keeps_in_place():
    check_writers_of_shared_partial_block(fork_cpp)


def test_block_boundary_is_never_copied_and_dead_blocks_are_reused():
    check_block_boundary_and_dead_blocks(fork_cpp)


def test_out_of_blocks_reports_and_leaves_a_consistent_state():
    check_out_of_blocks(fork_cpp)


def test_empty_single_child_many_children_and_strided_state():
    check_empty_single_and_many_children(fork_cpp, rows=64, num_blocks=300)
    bm = fork_scenario(3)
    # Tables and lens as strided views (int32 rows / ancestors / uint8 writes given as other dtypes).
    s_ref, s_cpp = block_state(bm), block_state(bm)
    wide = torch.full((bm.tables.shape[0], 2 * bm.tables.shape[1]), 7, dtype=torch.int32)
    wide[:, ::2] = s_cpp[0]
    lens2 = torch.stack([s_cpp[1], s_cpp[1]], 1)
    rows, anc = torch.tensor([1, 2, 4, 6]), torch.tensor([3, 3, 0, 2])
    w = torch.tensor([1, 0, 1, 1], dtype=torch.uint8)
    r_ref = fork_ref(s_ref, rows, anc, w.bool(), bm.block_size)
    r_cpp = fork_cpp(BlockState(wide[:, ::2], lens2[:, 0], *s_cpp[2:]), rows.int(), anc.int(), w, bm.block_size)
    assert torch.equal(wide[:, ::2], s_ref[0]) and bool((wide[:, 1::2] == 7).all())
    assert torch.equal(lens2[:, 0], s_ref[1]) and torch.equal(s_cpp[2], s_ref[2])
    assert all(torch.equal(a, b) for a, b in zip(r_cpp, r_ref))


def test_bad_rows_raise_before_changing_anything():
    bm = fork_scenario(4)
    state = block_state(bm)
    snapshot = [x.clone() for x in state]
    with pytest.raises(RuntimeError, match="ancestor"):
        fork_cpp(state, torch.arange(3), torch.tensor([0, 1, 3]), torch.ones(3, dtype=torch.bool), bm.block_size)
    with pytest.raises(RuntimeError, match="row"):
        fork_cpp(state, torch.tensor([0, 99]), torch.tensor([0, 1]), torch.ones(2, dtype=torch.bool), bm.block_size)
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
    _, _, res = check_fork(fork_cpp, n, torch.arange(n), anc, torch.ones(n, dtype=torch.bool), bm, B)
    assert int(res.num_cow[0]) > 0


def test_dispatch_block_manager_and_profiler_range(monkeypatch):
    calls = []
    monkeypatch.setattr(fk, "fork_cpp", lambda *a: calls.append(1) or fork_cpp(*a))
    bm = fork_scenario(5)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        bm.fork(torch.arange(8), torch.zeros(8, dtype=torch.int64), torch.ones(8, dtype=torch.bool))
    bm.check_invariants()
    assert calls == [1] and "pfengine::fork" in {e.name for e in prof.events()}
    monkeypatch.setenv("PFENGINE_CPP", "0")
    fork(block_state(bm), torch.arange(2), torch.zeros(2, dtype=torch.int64), torch.ones(2, dtype=torch.bool), 4)
    assert calls == [1], "PFENGINE_CPP=0 must take the reference"
    monkeypatch.delenv("PFENGINE_CPP")
    s = block_state(bm)
    refs = torch.stack([s[2], s[2]], 1)[:, 0]  # a non-contiguous refcount view
    fork(BlockState(s[0], s[1], refs, *s[3:]), torch.arange(2), torch.zeros(2, dtype=torch.int64),
         torch.ones(2, dtype=torch.bool), 4)
    assert calls == [1], "a layout the C++ kernel does not take runs the reference"
