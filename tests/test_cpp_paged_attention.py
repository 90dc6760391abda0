"""C++ paged decode attention (pfengine._cpp) vs its torch reference and a numpy oracle, on both of
its code paths (AVX2, which the avx2 and avx512 instruction sets run, and portable), plus the CPU
dispatch."""
import pytest
import torch

from kernel_cases import (ATTENTION_CASES, EXTEND_CASES, attention_case, check_attention,
                          check_attention_single_token_and_empty, check_extend_attention, dispatched_extend)
from pfengine.kernels import paged_attention as pa
from pfengine.kernels.paged_attention import (
    paged_decode_attention, paged_decode_attention_cpp, paged_decode_attention_ref)

pytestmark = pytest.mark.cpp


@pytest.fixture(params=["avx2", "portable"])
def isa(request, monkeypatch):
    """Run each test on the vectorised path (where the CPU has it) and on the portable one."""
    from pfengine import _cpp

    if request.param not in _cpp.cpu_isas():
        pytest.skip("CPU without AVX2/FMA/F16C")
    monkeypatch.setenv("PFENGINE_CPU_ISA", request.param)
    return request.param


# The shared cases plus GQA groups of 3 and 6, head dims that are not a multiple of 8 (portable path)
# or of 16, and blocks of 4 and 64 tokens.
CASES = ATTENTION_CASES + [
    ([7, 12, 4], 6, 2, 24, 4, torch.float32),
    ([130, 64, 65], 9, 3, 40, 64, torch.bfloat16),
    ([11, 3], 2, 1, 12, 8, torch.float16),
    ([100, 37, 16, 1, 90], 8, 2, 64, 16, torch.bfloat16),
]


@pytest.mark.parametrize("lens,hq,hkv,d,b,dtype", CASES)
def test_matches_reference_and_numpy(isa, lens, hq, hkv, d, b, dtype):
    check_attention(paged_decode_attention_cpp, lens, hq, hkv, d, b, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp32_query_over_low_precision_cache_accumulates_in_fp32(isa, dtype):
    """The engine's case: fp32 queries over bf16 / fp16 storage. The reference upcasts the cache,
    so the two agree to fp32 rounding, far tighter than the storage precision."""
    q, kc, vc, tables, ctx = attention_case([70, 33, 16], 8, 2, 64, 16, dtype, seed=11, qdtype=torch.float32)
    ref = paged_decode_attention_ref(q, kc, vc, tables, ctx, 0.125)
    out = paged_decode_attention_cpp(q, kc, vc, tables, ctx, 0.125)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


def test_long_context_many_particles(isa):
    """A context of many blocks (online-softmax rescaling across blocks) with large logits."""
    q, kc, vc, tables, ctx = attention_case([1000, 513, 777, 256], 8, 2, 64, 16, torch.float32, seed=3)
    q = q * 8  # peaked softmax: the running max changes often
    ref = paged_decode_attention_ref(q, kc, vc, tables, ctx, 0.125)
    out = paged_decode_attention_cpp(q, kc, vc, tables, ctx, 0.125)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


def test_empty_batch_single_particle_and_single_token(isa):
    check_attention_single_token_and_empty(paged_decode_attention_cpp)
    # A single particle over several blocks, ending exactly on a block boundary.
    q, kc, vc, tables, ctx = attention_case([48], 4, 2, 64, 16, torch.float32, seed=7)
    torch.testing.assert_close(paged_decode_attention_cpp(q, kc, vc, tables, ctx, 0.125),
                               paged_decode_attention_ref(q, kc, vc, tables, ctx, 0.125), rtol=2e-5, atol=2e-5)


def test_strided_inputs_int64_tables_and_wide_tables(isa):
    """q as a view of a fused QKV projection, caches whose heads are strided views, int64 block
    tables, tables wider than the contexts (-1 padding never read) and strided tables."""
    lens = [20, 40, 3]
    _, kc, vc, tables, ctx = attention_case(lens, 4, 2, 16, 16, torch.float32, seed=8, width=7)
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
    q, kc, vc, tables, ctx = attention_case([300, 20, 150], 8, 4, 32, 16, torch.float32, seed=9)
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
    q, kc, vc, tables, ctx = attention_case([20], 2, 1, 16, 16, torch.float32, seed=10)
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
    q, kc, vc, tables, ctx = attention_case([20, 5], 4, 2, 16, 16, torch.float32, seed=12)
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


@pytest.mark.parametrize("case", EXTEND_CASES)
def test_extend_runs_every_new_token_as_a_decode_row(isa, case):
    """Prefill / PRM extends: each new token attends causally over its sequence's blocks."""
    check_extend_attention(dispatched_extend, *case)
