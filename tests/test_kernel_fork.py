"""Fork kernel (gather tables by ancestor, refcounts, free stack, copy-on-write of shared partial
last blocks) vs its torch reference, vs the block manager's own assign + lazy COW, and invariants."""
import pytest
import torch

from kernel_cases import (block_state, check_block_boundary_and_dead_blocks, check_empty_single_and_many_children,
                          check_out_of_blocks, check_random_fork, check_writers_of_shared_partial_block,
                          fork_scenario)
from kernel_device import on_device
from pfengine.kernels.fork import fork, fork_triton

pytest.importorskip("triton")

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("seed", range(8))
def test_random_forks_match_reference_and_block_manager(seed):
    check_random_fork(on_device(fork_triton), seed)


def test_all_writers_one_keeps_in_place():
    check_writers_of_shared_partial_block(on_device(fork_triton))


def test_block_boundary_is_never_copied_and_dead_blocks_are_reused():
    check_block_boundary_and_dead_blocks(on_device(fork_triton))


def test_out_of_blocks_reports_and_leaves_a_consistent_state():
    check_out_of_blocks(on_device(fork_triton))


def test_empty_single_child_and_chunked_launch():
    """Many children, rows and blocks over several chunks of small BLOCKs."""
    check_empty_single_and_many_children(on_device(fork_triton), rows=20, num_blocks=80, block_w=16, block_m=16, block_nb=16)


def test_profiler_range():
    bm = fork_scenario(4)
    rows = torch.arange(8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        on_device(fork)(block_state(bm), rows, torch.zeros(8, dtype=torch.int64), torch.ones(8, dtype=torch.bool),
                        bm.block_size)
    assert "pfengine::fork" in {e.name for e in prof.events()}
