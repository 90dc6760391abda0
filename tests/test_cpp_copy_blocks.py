"""C++ COW block copy (pfengine._cpp) vs its torch reference and a numpy oracle."""
import pytest
import torch

from kernel_cases import COPY_CASES, COPY_PAIRS, check_copy, check_copy_edge_cases, kv_cache
from pfengine.kernels import copy_blocks as cb
from pfengine.kernels.copy_blocks import copy_blocks, copy_blocks_cpp, copy_blocks_ref

pytestmark = pytest.mark.cpp


@pytest.mark.parametrize("layers,nb,b,hkv,d,dtype", COPY_CASES + [(8, 40, 16, 2, 64, torch.float32)])
def test_copy_matches_reference_and_numpy(layers, nb, b, hkv, d, dtype):
    check_copy(copy_blocks_cpp, kv_cache(layers, nb, b, hkv, d, dtype, seed=nb + d), COPY_PAIRS)


def test_copy_padding_empty_single_strided_and_out_of_range():
    check_copy_edge_cases(copy_blocks_cpp)
    with pytest.raises(RuntimeError, match="outside"):
        copy_blocks_cpp(kv_cache(2, 6, 4, 1, 8, torch.float32, seed=7), torch.tensor([[0], [6]]))


def test_copy_dispatch_falls_back_for_non_contiguous_cache(monkeypatch):
    calls = []
    monkeypatch.setattr(cb, "copy_blocks_cpp", lambda *a: calls.append(1) or copy_blocks_cpp(*a))
    kv = kv_cache(2, 6, 4, 1, 8, torch.float32, seed=8)
    pairs = torch.tensor([[1], [2]])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        copy_blocks(kv, pairs)
    assert calls == [1] and "pfengine::copy_blocks" in {e.name for e in prof.events()}
    view = kv_cache(2, 12, 4, 1, 8, torch.float32, seed=9)[:, :, ::2]
    expect = view.clone()
    copy_blocks_ref(expect, pairs)
    copy_blocks(view, pairs)
    assert calls == [1], "a non-contiguous cache takes the reference"
    assert torch.equal(view, expect)
