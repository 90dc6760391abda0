"""KV store kernel vs its torch reference and a numpy oracle (Triton interpreter on CPU)."""
from functools import partial

import pytest
import torch

from kernel_cases import STORE_CASES, check_store, check_store_skips, check_store_views, store_case
from kernel_device import cpu_only, on_device
from kernel_paths import run_without
from pfengine.kernels import use_triton
from pfengine.kernels.kv_store import store_kv, store_kv_triton

pytest.importorskip("triton")

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("t,hkv,d,b,nb,kdtype,cdtype", STORE_CASES)
def test_store_matches_reference_and_numpy(t, hkv, d, b, nb, kdtype, cdtype):
    # The interpreter rounds fp32 -> bf16 by truncation (a GPU rounds to nearest even, as torch): 1 ulp.
    rtol = 2 ** -7 if cdtype == torch.bfloat16 and kdtype != cdtype else 0.0
    case = store_case(t, hkv, d, b, nb, kdtype, cdtype, seed=t * 31 + d)
    check_store(on_device(partial(store_kv_triton, block=32)), *case, rtol=rtol)  # several chunks per token row


def test_non_contiguous_inputs():
    check_store_views(on_device(store_kv))


def test_edge_cases_empty_and_all_skipped():
    check_store_skips(on_device(store_kv))


def test_single_token_and_profiler_range():
    case = store_case(1, 2, 16, 16, 2, torch.float32, torch.float32, seed=4, n_skip=0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        check_store(on_device(store_kv), *case)
    assert "pfengine::store_kv" in {e.name for e in prof.events()}


@cpu_only("the dispatch of CPU tensors")
def test_dispatch_switch(monkeypatch):
    t = torch.zeros(1)
    assert use_triton(t)  # forced by the fixture
    monkeypatch.setenv("PFENGINE_TRITON", "0")
    assert not use_triton(t)
    monkeypatch.delenv("PFENGINE_TRITON")
    assert not use_triton(t), "CPU tensors take the reference unless forced"
    monkeypatch.setenv("PFENGINE_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        use_triton(t)


@cpu_only("every kernel on the CPU, in a subprocess without triton")
def test_package_works_without_triton():
    """triton is an optional extra: with it unimportable, the kernels import and run another path."""
    run_without("triton", "from pfengine.kernels import triton_available\nassert not triton_available()")
