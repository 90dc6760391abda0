"""C++ resampling (pfengine._cpp) vs its torch reference and numpy: identical ancestors."""
import pytest
import torch

from kernel_cases import (check_resample, check_resample_active_single_and_empty, check_resample_degenerate,
                          replicate_ancestors, segments)
from pfengine.kernels import resample as rs
from pfengine.kernels.resample import METHODS, resample, resample_cpp, resample_ref

pytestmark = pytest.mark.cpp


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("sizes,dtype", [([5, 0, 1, 24], torch.float32), ([3, 40], torch.float64),
                                         ([64], torch.float64), ([1024], torch.float32),
                                         ([7] * 30 + [0, 300], torch.float64)])
def test_matches_reference_and_numpy(method, sizes, dtype):
    w, seg, u = segments(sizes, seed=len(sizes) * 7 + sum(sizes), dtype=dtype)
    check_resample(resample_cpp, method, w, seg, u)


@pytest.mark.parametrize("method", list(METHODS))
def test_all_weight_on_one_particle_zero_weights_and_extreme_uniforms(method):
    check_resample_degenerate(resample, method)


def test_unnormalised_weights_and_cdf_ties():
    """Weights that do not sum to 1 (normalised by the last CDF entry) and points landing exactly
    on a CDF value (searchsorted right=True goes past ties)."""
    w = torch.tensor([1.0, 1.0, 2.0, 0.0, 4.0], dtype=torch.float64)
    seg = torch.tensor([0, 5])
    for u in (torch.zeros(5, dtype=torch.float64), torch.full((5,), 0.125, dtype=torch.float64),
              torch.tensor([0.125, 0.25, 0.5, 0.5, 0.999], dtype=torch.float64)):
        for method in METHODS:
            assert torch.equal(resample_cpp(w, seg, u, method), resample_ref(w, seg, u, method)), (u, method)


def test_active_mask_single_particle_empty_and_errors():
    check_resample_active_single_and_empty(resample)
    w, _, u = segments([4, 1, 6], seed=5)
    with pytest.raises(RuntimeError, match="bad segment"):
        resample_cpp(w, torch.tensor([0, 4, 3, 11]), u, "systematic")


@pytest.mark.parametrize("method", list(METHODS))
def test_many_replicates_equal_reference(method):
    """3000 segments of 8 (the statistical tests' set-up): the same draws as the reference, so the
    reference's unbiasedness / variance properties carry over."""
    seed = 100 + METHODS[method]
    assert torch.equal(replicate_ancestors(resample_cpp, method, 3000, seed),
                       replicate_ancestors(resample_ref, method, 3000, seed))


def test_dispatch_and_profiler_range(monkeypatch):
    w, seg, u = segments([4, 3], seed=6)
    calls = []
    monkeypatch.setattr(rs, "resample_cpp", lambda *a, **k: calls.append(1) or resample_cpp(*a, **k))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = resample(w, seg, u, "multinomial")
    assert calls == [1] and "pfengine::resample" in {e.name for e in prof.events()}
    monkeypatch.setenv("PFENGINE_CPP", "0")
    assert torch.equal(resample(w, seg, u, "multinomial"), got)
    assert calls == [1], "PFENGINE_CPP=0 must take the reference"
