"""Paged decode attention kernel (plain and split-KV) vs its torch reference and a numpy oracle."""

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from pfengine.kernels.paged_attention import (  # noqa: E402
    choose_num_splits, paged_decode_attention, paged_decode_attention_ref, paged_decode_attention_triton)

pytestmark = pytest.mark.triton



def _case(lens, hq, hkv, d, b, dtype, seed, width=None):
    """Random caches; each sequence gets distinct random blocks; unused table entries are -1."""
    g = torch.Generator().manual_seed(seed)
    n = len(lens)
    need = [(x + b - 1) // b for x in lens]
    width = width or max(need)
    nb = sum(need) + 2
    q = torch.randn(n, hq, d, generator=g).to(dtype)
    kc = torch.randn(nb, b, hkv, d, generator=g).to(dtype)
    vc = torch.randn(nb, b, hkv, d, generator=g).to(dtype)
    perm = torch.randperm(nb, generator=g)
    tables = torch.full((n, width), -1, dtype=torch.int32)
    k = 0
    for i, c in enumerate(need):
        tables[i, :c] = perm[k:k + c].to(torch.int32)
        k += c
    return q, kc, vc, tables, torch.tensor(lens, dtype=torch.int64)


def _numpy_attention(q, kc, vc, tables, lens, scale):
    q, kc, vc = (x.double().numpy() for x in (q, kc, vc))
    n, hq, d = q.shape
    b, hkv = kc.shape[1], kc.shape[2]
    out = np.zeros((n, hq, d))
    for i in range(n):
        ctx = int(lens[i])
        blocks = tables[i, :(ctx + b - 1) // b].long().numpy()
        k = kc[blocks].reshape(-1, hkv, d)[:ctx]
        v = vc[blocks].reshape(-1, hkv, d)[:ctx]
        for h in range(hq):
            kvh = h // (hq // hkv)
            s = k[:, kvh] @ q[i, h] * scale
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v[:, kvh]
    return out


TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# (context lengths, Hq, Hkv, D, B, dtype, split counts). Lengths include 1, exact block boundaries
# (16, 32, 64) and ragged ends; GQA groups of 1, 2, 4 and 8.
CASES = [
    ([5, 32, 40], 4, 2, 16, 16, torch.float32, [1, 2, 3]),
    ([64, 17], 2, 2, 64, 32, torch.float16, [1, 2]),
    ([33, 1], 8, 1, 128, 16, torch.bfloat16, [1, 3]),
    ([48], 4, 1, 64, 16, torch.float32, [1, 2, 4]),
    ([16, 9, 31, 2], 1, 1, 16, 16, torch.float32, [1, 2]),
]


@pytest.mark.parametrize("lens,hq,hkv,d,b,dtype,splits", CASES)
def test_matches_reference_and_numpy(lens, hq, hkv, d, b, dtype, splits):
    q, kc, vc, tables, ctx = _case(lens, hq, hkv, d, b, dtype, seed=sum(lens) + d)
    scale = d ** -0.5
    ref = paged_decode_attention_ref(q, kc, vc, tables, ctx, scale)
    oracle = torch.from_numpy(_numpy_attention(q, kc, vc, tables, ctx, scale))
    tol = TOL[dtype]
    torch.testing.assert_close(ref.double(), oracle, rtol=tol, atol=tol)
    for s in splits:
        out = paged_decode_attention_triton(q, kc, vc, tables, ctx, scale, num_splits=s)
        assert out.dtype == q.dtype and out.shape == q.shape
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol, msg=f"num_splits={s}")
        torch.testing.assert_close(out.double(), oracle, rtol=tol, atol=tol, msg=f"num_splits={s}")


def test_split_heuristic_and_wrong_length_hint():
    """A small batch over a wide table splits the KV axis; a too-small max_context_len hint only
    changes the partitioning (the last partition takes the remainder), never the result."""
    lens = [150, 70]
    q, kc, vc, tables, ctx = _case(lens, 2, 1, 16, 16, torch.float32, seed=5, width=24)
    assert choose_num_splits(2, 1, 24, torch.device("cpu")) > 1
    assert choose_num_splits(64, 8, 24, torch.device("cpu")) == 1
    ref = paged_decode_attention_ref(q, kc, vc, tables, ctx, 0.3)
    for kw in ({}, {"max_context_len": 16}, {"num_splits": 5, "max_context_len": 40}):
        out = paged_decode_attention(q, kc, vc, tables, ctx, 0.3, **kw)
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5, msg=str(kw))


def test_empty_batch_and_single_token_context():
    q, kc, vc, tables, ctx = _case([1], 2, 2, 16, 16, torch.float32, seed=6)
    out = paged_decode_attention(q, kc, vc, tables, ctx, 0.25)
    # One token attended to: the output is its value row.
    blk = int(tables[0, 0])
    torch.testing.assert_close(out[0], vc[blk, 0], rtol=0, atol=1e-6)
    empty = paged_decode_attention(q[:0], kc, vc, tables[:0], ctx[:0], 0.25)
    assert empty.shape == (0, 2, 16)


def test_strided_query_and_profiler_ranges():
    """q as a view of a fused QKV projection; the split path shows its two launches by name."""
    lens = [20, 40]
    _, kc, vc, tables, ctx = _case(lens, 4, 2, 16, 16, torch.float32, seed=8)
    qkv = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    q = qkv[:, :4]
    assert not q.is_contiguous()
    ref = paged_decode_attention_ref(q, kc, vc, tables, ctx, 0.25)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out1 = paged_decode_attention(q, kc, vc, tables, ctx, 0.25, num_splits=1)
        out2 = paged_decode_attention(q, kc, vc, tables, ctx, 0.25, num_splits=2)
    torch.testing.assert_close(out1, ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out2, ref, rtol=2e-5, atol=2e-5)
    names = {e.name for e in prof.events()}
    assert {"pfengine::paged_attention", "pfengine::paged_attention_split",
            "pfengine::paged_attention_merge"} <= names
