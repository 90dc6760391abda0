"""C++ COW block copy (pfengine._cpp) vs its torch reference and a numpy oracle."""
import importlib.util

import numpy as np
import pytest
import torch

if importlib.util.find_spec("pfengine._cpp") is None:
    pytest.skip("pfengine._cpp is not built (pip install --no-build-isolation -e .)", allow_module_level=True)

from pfengine import _cpp  # noqa: E402,F401  (built: it must load)
from pfengine.kernels import copy_blocks as cb  # noqa: E402
from pfengine.kernels.copy_blocks import copy_blocks, copy_blocks_cpp, copy_blocks_ref  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu_dispatch(monkeypatch):
    monkeypatch.delenv("PFENGINE_TRITON", raising=False)
    monkeypatch.delenv("PFENGINE_CPP", raising=False)


def _cache(layers, nb, b, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, layers, nb, b, hkv, d, generator=g).to(dtype)


def _numpy_copy(kv, pairs):
    out = kv.float().numpy().copy()
    for s, t in pairs.T.tolist():
        if s >= 0 and t >= 0:
            out[:, :, t] = kv.float().numpy()[:, :, s]
    return out


@pytest.mark.parametrize("layers,nb,b,hkv,d,dtype", [
    (2, 10, 4, 2, 8, torch.float32),
    (3, 8, 16, 1, 16, torch.bfloat16),
    (1, 6, 32, 2, 16, torch.float16),
    (8, 40, 16, 2, 64, torch.float32),
])
def test_copy_matches_reference_and_numpy(layers, nb, b, hkv, d, dtype):
    kv = _cache(layers, nb, b, hkv, d, dtype, seed=nb + d)
    pairs = torch.tensor([[1, 4, 0], [5, 2, 3]])
    expect = kv.clone()
    copy_blocks_ref(expect, pairs)
    oracle = _numpy_copy(kv, pairs)
    copy_blocks_cpp(kv, pairs)
    assert torch.equal(kv, expect)
    np.testing.assert_array_equal(kv.float().numpy(), oracle)


def test_copy_padding_empty_single_strided_and_out_of_range():
    kv = _cache(2, 6, 4, 1, 8, torch.float32, seed=7)
    pairs = torch.tensor([[2, -1, -1, 3], [4, -1, 5, -1]])  # fork's cow_pairs: -1 padded
    expect = kv.clone()
    copy_blocks_ref(expect, pairs)
    copy_blocks(kv, pairs)
    assert torch.equal(kv, expect)
    before = kv.clone()
    copy_blocks(kv, torch.empty(2, 0, dtype=torch.int64))
    copy_blocks(kv, torch.full((2, 3), -1, dtype=torch.int64))
    assert torch.equal(kv, before)
    copy_blocks(kv, torch.tensor([[3, 1]]).T)  # a single pair
    assert torch.equal(kv[:, :, 1], kv[:, :, 3])
    strided = torch.tensor([[0, 2], [4, 1]], dtype=torch.int32).T
    assert not strided.is_contiguous()
    expect = kv.clone()
    copy_blocks_ref(expect, strided.long())
    copy_blocks_cpp(kv, strided)
    assert torch.equal(kv, expect)
    with pytest.raises(RuntimeError, match="outside"):
        copy_blocks_cpp(kv, torch.tensor([[0], [6]]))


def test_copy_dispatch_falls_back_for_non_contiguous_cache(monkeypatch):
    calls = []
    monkeypatch.setattr(cb, "copy_blocks_cpp", lambda *a: calls.append(1) or copy_blocks_cpp(*a))
    kv = _cache(2, 6, 4, 1, 8, torch.float32, seed=8)
    pairs = torch.tensor([[1], [2]])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        copy_blocks(kv, pairs)
    assert calls == [1] and "pfengine::copy_blocks" in {e.name for e in prof.events()}
    view = _cache(2, 12, 4, 1, 8, torch.float32, seed=9)[:, :, ::2]
    expect = view.clone()
    copy_blocks_ref(expect, pairs)
    copy_blocks(view, pairs)
    assert calls == [1], "a non-contiguous cache takes the reference"
    assert torch.equal(view, expect)
