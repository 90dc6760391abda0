"""COW block copy kernel vs its torch reference and a numpy oracle (Triton interpreter on CPU)."""

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from pfengine.kernels.copy_blocks import copy_blocks, copy_blocks_ref, copy_blocks_triton  # noqa: E402

pytestmark = pytest.mark.triton



def _cache(layers, nb, b, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, layers, nb, b, hkv, d, generator=g).to(dtype)


def _numpy_copy(kv, pairs):
    out = kv.float().numpy().copy()
    for s, t in pairs.T.tolist():
        if s >= 0 and t >= 0:
            out[:, :, t] = kv.float().numpy()[:, :, s]
    return out


@pytest.mark.parametrize("layers,nb,b,hkv,d,dtype,block", [
    (2, 10, 4, 2, 8, torch.float32, None),
    (3, 8, 16, 1, 16, torch.bfloat16, 64),   # several chunks per block
    (1, 6, 32, 2, 16, torch.float16, None),
])
def test_copy_matches_reference_and_numpy(layers, nb, b, hkv, d, dtype, block):
    kv = _cache(layers, nb, b, hkv, d, dtype, seed=nb + d)
    pairs = torch.tensor([[1, 4, 0], [5, 2, 3]])
    expect = kv.clone()
    copy_blocks_ref(expect, pairs)
    oracle = _numpy_copy(kv, pairs)
    copy_blocks_triton(kv, pairs, block=block)
    assert torch.equal(kv, expect)
    np.testing.assert_array_equal(kv.float().numpy(), oracle)


def test_padding_columns_are_skipped_and_empty_is_a_no_op():
    kv = _cache(2, 6, 4, 1, 8, torch.float32, seed=7)
    pairs = torch.tensor([[2, -1, -1], [4, -1, -1]])  # fork's cow_pairs: -1 padded
    expect = kv.clone()
    copy_blocks_ref(expect, pairs)
    oracle = _numpy_copy(kv, pairs)
    copy_blocks(kv, pairs)
    assert torch.equal(kv, expect)
    np.testing.assert_array_equal(kv.numpy(), oracle)
    before = kv.clone()
    copy_blocks(kv, torch.empty(2, 0, dtype=torch.int64))
    copy_blocks(kv, torch.full((2, 3), -1, dtype=torch.int64))
    assert torch.equal(kv, before)


def test_single_pair_strided_pairs_and_profiler_range():
    kv = _cache(2, 5, 4, 2, 8, torch.float32, seed=9)
    pairs = torch.tensor([[3, 1]]).T  # a single pair (3 -> 1)
    expect = kv.clone()
    copy_blocks_ref(expect, pairs)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        copy_blocks(kv, pairs)
    assert torch.equal(kv, expect) and torch.equal(kv[:, :, 1], kv[:, :, 3])
    assert "pfengine::copy_blocks" in {e.name for e in prof.events()}
    strided = torch.tensor([[0, 2], [4, 1]]).T  # non-contiguous: pairs (0 -> 2), (4 -> 1)
    assert not strided.is_contiguous()
    expect = kv.clone()
    copy_blocks_ref(expect, strided)
    copy_blocks(kv, strided)
    assert torch.equal(kv, expect)
