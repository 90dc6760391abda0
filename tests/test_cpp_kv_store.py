"""C++ KV store (pfengine._cpp) vs its torch reference and a numpy oracle."""
import importlib.util

import numpy as np
import pytest
import torch

if importlib.util.find_spec("pfengine._cpp") is None:
    pytest.skip("pfengine._cpp is not built (pip install --no-build-isolation -e .)", allow_module_level=True)

from pfengine import _cpp  # noqa: E402,F401  (built: it must load)
from pfengine.kernels import kv_store as ks  # noqa: E402
from pfengine.kernels.kv_store import store_kv, store_kv_cpp, store_kv_ref  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu_dispatch(monkeypatch):
    monkeypatch.delenv("PFENGINE_TRITON", raising=False)
    monkeypatch.delenv("PFENGINE_CPP", raising=False)


def _case(t, hkv, d, b, nb, kdtype, cdtype, seed, n_skip=1):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(t, hkv, d, generator=g).to(kdtype)
    v = torch.randn(t, hkv, d, generator=g).to(kdtype)
    kc = torch.randn(nb, b, hkv, d, generator=g).to(cdtype)
    vc = torch.randn(nb, b, hkv, d, generator=g).to(cdtype)
    slots = torch.randperm(nb * b, generator=g)[:t].long()
    slots[torch.randperm(t, generator=g)[:n_skip]] = -1
    return k, v, kc, vc, slots


def _numpy_store(k, v, kc, vc, slots):
    kc, vc = kc.float().numpy().copy(), vc.float().numpy().copy()
    b = kc.shape[1]
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            kc[s // b, s % b] = k[i].float().numpy()
            vc[s // b, s % b] = v[i].float().numpy()
    return kc, vc


@pytest.mark.parametrize("t,hkv,d,b,nb,kdtype,cdtype", [
    (5, 2, 16, 16, 4, torch.float32, torch.float32),
    (7, 1, 64, 32, 3, torch.float32, torch.bfloat16),   # fp32 -> bf16: round to nearest even, as torch
    (4, 4, 8, 16, 2, torch.float16, torch.float16),
    (3, 2, 128, 16, 2, torch.bfloat16, torch.float32),
    (9, 2, 64, 4, 5, torch.float32, torch.float16),
    (600, 2, 64, 16, 40, torch.float32, torch.float32),  # a prefill: enough rows for both threads
])
def test_store_matches_reference_and_numpy(t, hkv, d, b, nb, kdtype, cdtype):
    k, v, kc, vc, slots = _case(t, hkv, d, b, nb, kdtype, cdtype, seed=t * 31 + d)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    kn, vn = _numpy_store(k.to(cdtype), v.to(cdtype), kc, vc, slots)
    store_kv_ref(k, v, kc_ref, vc_ref, slots)
    store_kv_cpp(k, v, kc, vc, slots)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    np.testing.assert_array_equal(kc.float().numpy(), kn)
    np.testing.assert_array_equal(vc.float().numpy(), vn)


def test_non_contiguous_inputs_and_cache_views():
    """K/V as strided views of a fused projection, the caches as layer views of the KV tensor."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(6, 3, 2, 16, generator=g)
    k, v = qkv[:, 1], qkv[:, 2]
    kv = torch.zeros(2, 3, 3, 4, 2, 16)  # [2, layers, blocks, B, Hkv, D]
    kc, vc = kv[0, 1], kv[1, 1]
    slots = torch.tensor([0, 5, -1, 11, 3, 7])
    expect = kv.clone()
    store_kv_ref(k, v, expect[0, 1], expect[1, 1], slots)
    store_kv(k, v, kc, vc, slots)
    assert torch.equal(kv, expect)
    # Head-strided cache views (cache rows not contiguous across heads) and int32 slots.
    big_k, big_v = torch.zeros(3, 4, 4, 16), torch.zeros(3, 4, 4, 16)
    ref_k, ref_v = big_k.clone(), big_v.clone()
    store_kv_ref(k, v, ref_k[:, :, ::2], ref_v[:, :, 1::2], slots)
    store_kv_cpp(k, v, big_k[:, :, ::2], big_v[:, :, 1::2], slots.int())
    assert torch.equal(big_k, ref_k) and torch.equal(big_v, ref_v)


def test_edge_cases_empty_all_skipped_and_out_of_range():
    k, v, kc, vc, slots = _case(3, 1, 16, 16, 2, torch.float32, torch.float32, seed=3, n_skip=3)
    before_k, before_v = kc.clone(), vc.clone()
    store_kv(k, v, kc, vc, slots)  # every slot -1
    assert torch.equal(kc, before_k) and torch.equal(vc, before_v)
    store_kv(k[:0], v[:0], kc, vc, slots[:0])  # empty batch
    assert torch.equal(kc, before_k)
    with pytest.raises(RuntimeError, match="outside the cache"):
        store_kv_cpp(k, v, kc, vc, torch.tensor([0, 32, 1]))
    assert torch.equal(kc, before_k), "a rejected store writes nothing"


def test_single_token_dispatch_and_profiler_range(monkeypatch):
    k, v, kc, vc, slots = _case(1, 2, 16, 16, 2, torch.float32, torch.float32, seed=4, n_skip=0)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    store_kv_ref(k, v, kc_ref, vc_ref, slots)
    calls = []
    monkeypatch.setattr(ks, "store_kv_cpp", lambda *a: calls.append(1) or store_kv_cpp(*a))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        store_kv(k, v, kc, vc, slots)
    assert calls == [1]
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert "pfengine::store_kv" in {e.name for e in prof.events()}
    monkeypatch.setenv("PFENGINE_CPP", "0")
    store_kv(k, v, kc, vc, slots)
    assert calls == [1], "PFENGINE_CPP=0 must take the reference"
