"""COW block copy kernel vs its torch reference and a numpy oracle (Triton interpreter on CPU)."""
from functools import partial

import pytest
import torch

from kernel_cases import COPY_CASES, COPY_PAIRS, check_copy, check_copy_edge_cases, kv_cache
from kernel_device import on_device
from pfengine.kernels.copy_blocks import copy_blocks, copy_blocks_triton

pytest.importorskip("triton")

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("block", [None, 64])  # 64: several chunks per block
@pytest.mark.parametrize("layers,nb,b,hkv,d,dtype", COPY_CASES)
def test_copy_matches_reference_and_numpy(layers, nb, b, hkv, d, dtype, block):
    check_copy(on_device(partial(copy_blocks_triton, block=block)), kv_cache(layers, nb, b, hkv, d, dtype, seed=nb + d),
               COPY_PAIRS)


def test_padding_empty_single_and_strided_pairs():
    check_copy_edge_cases(on_device(copy_blocks))


def test_profiler_range():
    kv = kv_cache(2, 5, 4, 2, 8, torch.float32, seed=9)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        check_copy(on_device(copy_blocks), kv, torch.tensor([[3], [1]]))
    assert "pfengine::copy_blocks" in {e.name for e in prof.events()}
