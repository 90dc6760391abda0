"""KV store kernel vs its torch reference and a numpy oracle (Triton interpreter on CPU)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from pfengine.kernels import use_triton  # noqa: E402
from pfengine.kernels.kv_store import store_kv, store_kv_ref, store_kv_triton  # noqa: E402

pytestmark = pytest.mark.triton


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
    (7, 1, 64, 32, 3, torch.float32, torch.bfloat16),
    (4, 4, 8, 16, 2, torch.float16, torch.float16),
    (3, 2, 128, 16, 2, torch.bfloat16, torch.float32),
])
def test_store_matches_reference_and_numpy(t, hkv, d, b, nb, kdtype, cdtype):
    k, v, kc, vc, slots = _case(t, hkv, d, b, nb, kdtype, cdtype, seed=t * 31 + d)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    store_kv_ref(k, v, kc_ref, vc_ref, slots)
    store_kv_triton(k, v, kc, vc, slots, block=32)  # several chunks per token row
    kn, vn = _numpy_store(k.to(cdtype), v.to(cdtype), *_case(t, hkv, d, b, nb, kdtype, cdtype, seed=t * 31 + d)[2:4],
                          slots)
    if kdtype == cdtype or cdtype != torch.bfloat16:
        assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
        np.testing.assert_array_equal(kc.float().numpy(), kn)
        np.testing.assert_array_equal(vc.float().numpy(), vn)
    else:
        # The interpreter rounds fp32 -> bf16 by truncation (a GPU rounds to nearest even): 1 ulp.
        torch.testing.assert_close(kc.float(), kc_ref.float(), rtol=2 ** -7, atol=0)
        torch.testing.assert_close(vc.float(), vc_ref.float(), rtol=2 ** -7, atol=0)
        np.testing.assert_allclose(kc.float().numpy(), kn, rtol=2 ** -7, atol=0)


def test_non_contiguous_inputs():
    """K/V as strided views of a fused projection, as a decoder would hand them over."""
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(6, 3, 2, 16, generator=g)
    k, v = qkv[:, 1], qkv[:, 2]
    kc, vc = torch.zeros(3, 4, 2, 16), torch.zeros(3, 4, 2, 16)
    slots = torch.tensor([0, 5, -1, 11, 3, 7])
    kc_ref, vc_ref = kc.clone(), vc.clone()
    store_kv_ref(k, v, kc_ref, vc_ref, slots)
    store_kv(k, v, kc, vc, slots)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


def test_edge_cases_empty_and_all_skipped():
    k, v, kc, vc, slots = _case(3, 1, 16, 16, 2, torch.float32, torch.float32, seed=3, n_skip=3)
    before_k, before_v = kc.clone(), vc.clone()
    store_kv(k, v, kc, vc, slots)  # every slot -1
    assert torch.equal(kc, before_k) and torch.equal(vc, before_v)
    store_kv(k[:0], v[:0], kc, vc, slots[:0])  # empty batch
    assert torch.equal(kc, before_k)


def test_single_token_and_profiler_range():
    k, v, kc, vc, slots = _case(1, 2, 16, 16, 2, torch.float32, torch.float32, seed=4, n_skip=0)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    store_kv_ref(k, v, kc_ref, vc_ref, slots)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        store_kv(k, v, kc, vc, slots)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert "pfengine::store_kv" in {e.name for e in prof.events()}


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


NO_TRITON = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton is not installed (blocked)")
sys.meta_path.insert(0, Block())
import torch
from pfengine.kernels import copy_blocks, fork, kv_store, paged_attention, prm_score, resample, triton_available
assert not triton_available()
k = torch.randn(2, 1, 4)
kc = torch.zeros(2, 4, 1, 4)
kv_store.store_kv(k, k, kc, kc.clone(), torch.tensor([0, 5]))
out = paged_attention.paged_decode_attention(torch.randn(1, 1, 4), kc, kc, torch.tensor([[1, 0]], dtype=torch.int32),
                                             torch.tensor([6]), 0.5)
assert out.shape == (1, 1, 4)
anc = resample.resample(torch.tensor([0.5, 0.5]), torch.tensor([0, 2]), torch.tensor([0.1, 0.2]), "systematic")
assert anc.tolist() == [0, 1]
assert "triton" not in sys.modules
print("ok")
"""


def test_package_works_without_triton():
    """triton is an optional extra: with it unimportable, the kernels import and the references run."""
    env = {k: v for k, v in os.environ.items() if k != "PFENGINE_TRITON"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", NO_TRITON], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
