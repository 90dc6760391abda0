"""C++ KV store (pfengine._cpp) vs its torch reference and a numpy oracle."""
import pytest
import torch

from kernel_cases import STORE_CASES, check_store, check_store_skips, check_store_views, store_case
from pfengine.kernels import kv_store as ks
from pfengine.kernels.kv_store import store_kv, store_kv_cpp, store_kv_ref

pytestmark = pytest.mark.cpp


# The shared cases (fp32 -> bf16 rounds to nearest even, as torch), fp32 -> fp16, and a prefill with
# enough rows for both threads.
@pytest.mark.parametrize("t,hkv,d,b,nb,kdtype,cdtype", STORE_CASES + [
    (9, 2, 64, 4, 5, torch.float32, torch.float16),
    (600, 2, 64, 16, 40, torch.float32, torch.float32),
])
def test_store_matches_reference_and_numpy(t, hkv, d, b, nb, kdtype, cdtype):
    check_store(store_kv_cpp, *store_case(t, hkv, d, b, nb, kdtype, cdtype, seed=t * 31 + d))


def test_non_contiguous_inputs_and_cache_views():
    check_store_views(store_kv)
    # Head-strided cache views (cache rows not contiguous across heads) and int32 slots.
    qkv = torch.randn(6, 3, 2, 16, generator=torch.Generator().manual_seed(1))
    k, v = qkv[:, 1], qkv[:, 2]
    slots = torch.tensor([0, 5, -1, 11, 3, 7])
    big_k, big_v = torch.zeros(3, 4, 4, 16), torch.zeros(3, 4, 4, 16)
    ref_k, ref_v = big_k.clone(), big_v.clone()
    store_kv_ref(k, v, ref_k[:, :, ::2], ref_v[:, :, 1::2], slots)
    store_kv_cpp(k, v, big_k[:, :, ::2], big_v[:, :, 1::2], slots.int())
    assert torch.equal(big_k, ref_k) and torch.equal(big_v, ref_v)


def test_edge_cases_empty_all_skipped_and_out_of_range():
    check_store_skips(store_kv_cpp)
    k, v, kc, vc, _ = store_case(3, 1, 16, 16, 2, torch.float32, torch.float32, seed=3)
    before_k = kc.clone()
    with pytest.raises(RuntimeError, match="outside the cache"):
        store_kv_cpp(k, v, kc, vc, torch.tensor([0, 32, 1]))
    assert torch.equal(kc, before_k), "a rejected store writes nothing"


def test_single_token_dispatch_and_profiler_range(monkeypatch):
    case = store_case(1, 2, 16, 16, 2, torch.float32, torch.float32, seed=4, n_skip=0)
    calls = []
    monkeypatch.setattr(ks, "store_kv_cpp", lambda *a: calls.append(1) or store_kv_cpp(*a))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        check_store(store_kv, *case)
    assert calls == [1]
    assert "pfengine::store_kv" in {e.name for e in prof.events()}
    monkeypatch.setenv("PFENGINE_CPP", "0")
    store_kv(*case)
    assert calls == [1], "PFENGINE_CPP=0 must take the reference"
