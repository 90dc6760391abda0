"""C++ paged decode attention (pfengine._cpp) vs its torch reference and a numpy oracle, on both of
its code paths (AVX2 and portable), plus the CPU dispatch."""
import importlib.util

import numpy as np
import pytest
import torch

if importlib.util.find_spec("pfengine._cpp") is None:
    pytest.skip("pfengine._cpp is not built (pip install --no-build-isolation -e .)", allow_module_level=True)

from pfengine import _cpp  # noqa: E402  (built: it must load)
from pfengine.kernels import paged_attention as pa  # noqa: E402
from pfengine.kernels.paged_attention import (  # noqa: E402
    paged_decode_attention, paged_decode_attention_cpp, paged_decode_attention_ref)

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(params=["avx2", "generic"])
def isa(request):
    """Run each test on the vectorised path (where the CPU has it) and on the portable one."""
    if request.param == "avx2" and _cpp.isa() != "avx2":
        pytest.skip("CPU without AVX2/FMA/F16C")
    _cpp._force_generic(request.param == "generic")
    yield request.param
    _cpp._force_generic(False)


@pytest.fixture(autouse=True)
def _cpu_dispatch(monkeypatch):
    monkeypatch.delenv("PFENGINE_TRITON", raising=False)
    monkeypatch.delenv("PFENGINE_CPP", raising=False)


def _case(lens, hq, hkv, d, b, dtype, seed, width=None, qdtype=None):
    """Random caches; each sequence gets distinct random blocks; unused table entries are -1."""
    g = torch.Generator().manual_seed(seed)
    n = len(lens)
    need = [(x + b - 1) // b for x in lens]
    width = width or max(need + [1])
    nb = sum(need) + 2
    q = torch.randn(n, hq, d, generator=g).to(qdtype or dtype)
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


# (context lengths, Hq, Hkv, D, B, dtype): the Triton test's cases (lengths 1, exact block boundaries
# 16/32/64, ragged ends; GQA groups 1, 2, 4, 8) plus groups of 3 and 6, head dims that are not a
# multiple of 8 (portable path) or of 16, and blocks of 4 and 64 tokens.
CASES = [
    ([5, 32, 40], 4, 2, 16, 16, torch.float32),
    ([64, 17], 2, 2, 64, 32, torch.float16),
    ([33, 1], 8, 1, 128, 16, torch.bfloat16),
    ([48], 4, 1, 64, 16, torch.float32),
    ([16, 9, 31, 2], 1, 1, 16, 16, torch.float32),
    ([7, 12, 4], 6, 2, 24, 4, torch.float32),
    ([130, 64, 65], 9, 3, 40, 64, torch.bfloat16),
    ([11, 3], 2, 1, 12, 8, torch.float16),
    ([100, 37, 16, 1, 90], 8, 2, 64, 16, torch.bfloat16),
]


@pytest.mark.parametrize("lens,hq,hkv,d,b,dtype", CASES)
def test_matches_reference_and_numpy(isa, lens, hq, hkv, d, b, dtype):
    q, kc, vc, tables, ctx = _case(lens, hq, hkv, d, b, dtype, seed=sum(lens) + d)
    scale = d ** -0.5
    ref = paged_decode_attention_ref(q, kc, vc, tables, ctx, scale)
    oracle = torch.from_numpy(_numpy_attention(q, kc, vc, tables, ctx, scale))
    out = paged_decode_attention_cpp(q, kc, vc, tables, ctx, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(out.double(), oracle, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp32_query_over_low_precision_cache_accumulates_in_fp32(isa, dtype):
    """The engine's case: fp32 queries over bf16 / fp16 storage. The reference upcasts the cache,
    so the two agree to fp32 rounding, far tighter than the storage precision."""
    q, kc, vc, tables, ctx = _case([70, 33, 16], 8, 2, 64, 16, dtype, seed=11, qdtype=torch.float32)
    ref = paged_decode_attention_ref(q, kc, vc, tables, ctx, 0.125)
    out = paged_decode_attention_cpp(q, kc, vc, tables, ctx, 0.125)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


def test_long_context_many_particles(isa):
    """A context of many blocks (online-softmax rescaling across blocks) with large logits."""
    q, kc, vc, tables, ctx = _case([1000, 513, 777, 256], 8, 2, 64, 16, torch.float32, seed=3)
    q = q * 8  # peaked softmax: the running max changes often
    ref = paged_decode_attention_ref(q, kc, vc, tables, ctx, 0.125)
    out = paged_decode_attention_cpp(q, kc, vc, tables, ctx, 0.125)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


def test_empty_batch_single_particle_and_single_token(isa):
    q, kc, vc, tables, ctx = _case([1], 2, 2, 16, 16, torch.float32, seed=6)
    out = paged_decode_attention(q, kc, vc, tables, ctx, 0.25)
    blk = int(tables[0, 0])
    torch.testing.assert_close(out[0], vc[blk, 0], rtol=0, atol=1e-6)  # one token: its value row
    empty = paged_decode_attention_cpp(q[:0], kc, vc, tables[:0], ctx[:0], 0.25)
    assert empty.shape == (0, 2, 16) and empty.dtype == q.dtype
    # A single particle over several blocks, ending exactly on a block boundary.
    q, kc, vc, tables, ctx = _case([48], 4, 2, 64, 16, torch.float32, seed=7)
    torch.testing.assert_close(paged_decode_attention_cpp(q, kc, vc, tables, ctx, 0.125),
                               paged_decode_attention_ref(q, kc, vc, tables, ctx, 0.125), rtol=2e-5, atol=2e-5)


def test_strided_inputs_int64_tables_and_wide_tables(isa):
    """q as a view of a fused QKV projection, caches whose heads are strided views, int64 block
    tables, tables wider than the contexts (-1 padding never read) and strided tables."""
    lens = [20, 40, 3]
    _, kc, vc, tables, ctx = _case(lens, 4, 2, 16, 16, torch.float32, seed=8, width=7)
    k_view = torch.stack([kc, -kc], 3).flatten(2, 3)[:, :, ::2]  # [nb, B, Hkv, D] with head stride 2D
    v_view = torch.stack([-vc, vc], 3).flatten(2, 3)[:, :, 1::2]
    assert torch.equal(k_view, kc) and not k_view.is_contiguous()
    qkv = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(1))
    q = qkv[:, :4]
    assert not q.is_contiguous()
    ref = paged_decode_attention_ref(q, kc, vc, tables, ctx, 0.25)
    out = paged_decode_attention_cpp(q, k_view, v_view, tables.long(), ctx, 0.25)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    wide = torch.full((3, 14), -1, dtype=torch.int32)
    wide[:, ::2] = tables
    out = paged_decode_attention_cpp(q, kc, vc, wide[:, ::2], ctx, 0.25)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


def test_threads_do_not_change_the_result(isa):
    q, kc, vc, tables, ctx = _case([300, 20, 150], 8, 4, 32, 16, torch.float32, seed=9)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(paged_decode_attention_cpp(q, kc, vc, tables, ctx, 0.2))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


def test_bad_inputs_raise_instead_of_reading_out_of_bounds():
    q, kc, vc, tables, ctx = _case([20], 2, 1, 16, 16, torch.float32, seed=10)
    bad = tables.clone()
    bad[0, 1] = kc.shape[0]
    with pytest.raises(RuntimeError, match="outside"):
        paged_decode_attention_cpp(q, kc, vc, bad, ctx, 0.25)
    bad[0, 1] = -1  # an unused entry inside the context
    with pytest.raises(RuntimeError, match="outside"):
        paged_decode_attention_cpp(q, kc, vc, bad, ctx, 0.25)
    with pytest.raises(RuntimeError, match="context length"):
        paged_decode_attention_cpp(q, kc, vc, tables, ctx + 100, 0.25)
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        paged_decode_attention_cpp(torch.randn(1, 3, 16), torch.zeros(4, 16, 2, 16), torch.zeros(4, 16, 2, 16),
                                   tables, ctx, 0.25)


def test_dispatch_takes_cpp_on_cpu_and_the_reference_with_pfengine_cpp_0(monkeypatch):
    q, kc, vc, tables, ctx = _case([20, 5], 4, 2, 16, 16, torch.float32, seed=12)
    calls = []
    monkeypatch.setattr(pa, "paged_decode_attention_cpp",
                        lambda *a, **k: calls.append("cpp") or paged_decode_attention_cpp(*a, **k))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = paged_decode_attention(q, kc, vc, tables, ctx, 0.25)
    assert calls == ["cpp"]
    assert "pfengine::paged_attention" in {e.name for e in prof.events()}
    monkeypatch.setenv("PFENGINE_CPP", "0")
    ref = paged_decode_attention(q, kc, vc, tables, ctx, 0.25)
    assert calls == ["cpp"], "PFENGINE_CPP=0 must take the reference"
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
