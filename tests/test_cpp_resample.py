"""C++ resampling (pfengine._cpp) vs its torch reference and numpy: identical ancestors."""
import importlib.util

import numpy as np
import pytest
import torch

if importlib.util.find_spec("pfengine._cpp") is None:
    pytest.skip("pfengine._cpp is not built (pip install --no-build-isolation -e .)", allow_module_level=True)

from pfengine import _cpp  # noqa: E402,F401  (built: it must load)
from pfengine.kernels import resample as rs  # noqa: E402
from pfengine.kernels.resample import METHODS, resample, resample_cpp, resample_ref  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu_dispatch(monkeypatch):
    monkeypatch.delenv("PFENGINE_TRITON", raising=False)
    monkeypatch.delenv("PFENGINE_CPP", raising=False)


def _segments(sizes, seed, power=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    seg = torch.tensor([0, *np.cumsum(sizes).tolist()], dtype=torch.int64)
    w = torch.rand(int(seg[-1]), generator=g, dtype=torch.float64) ** power
    for lo, hi in zip(seg[:-1].tolist(), seg[1:].tolist()):
        if hi > lo:
            w[lo:hi] /= w[lo:hi].sum()
    return w.to(dtype), seg, torch.rand(int(seg[-1]), generator=g)


def _numpy_resample(w, seg, u, method):
    out = np.arange(len(w))
    for lo, hi in zip(seg[:-1].tolist(), seg[1:].tolist()):
        n = hi - lo
        if n == 0:
            continue
        cdf = np.cumsum(w[lo:hi].double().numpy())
        cdf /= cdf[-1]
        uu = u[lo:hi].double().numpy()
        points = {"systematic": (np.arange(n) + uu[0]) / n, "stratified": (np.arange(n) + uu) / n,
                  "multinomial": uu}[method]
        out[lo:hi] = lo + np.minimum(np.searchsorted(cdf, points, side="right"), n - 1)
    return torch.from_numpy(out)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("sizes,dtype", [([5, 0, 1, 24], torch.float32), ([3, 40], torch.float64),
                                         ([64], torch.float64), ([1024], torch.float32),
                                         ([7] * 30 + [0, 300], torch.float64)])
def test_matches_reference_and_numpy(method, sizes, dtype):
    w, seg, u = _segments(sizes, seed=len(sizes) * 7 + sum(sizes), dtype=dtype)
    got = resample_cpp(w, seg, u, method)
    assert got.dtype == torch.int64
    assert torch.equal(got, resample_ref(w, seg, u, method))
    assert torch.equal(got, _numpy_resample(w, seg, u, method))
    lo = seg[:-1].repeat_interleave(seg[1:] - seg[:-1])
    hi = seg[1:].repeat_interleave(seg[1:] - seg[:-1])
    assert bool(((got >= lo) & (got < hi)).all()), "an ancestor left its segment"


@pytest.mark.parametrize("method", list(METHODS))
def test_all_weight_on_one_particle_zero_weights_and_extreme_uniforms(method):
    w = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.3, 0.0, 0.7, 0.0])
    seg = torch.tensor([0, 4, 8])
    rand = torch.rand(8, generator=torch.Generator().manual_seed(3))
    for u in (torch.zeros(8), torch.full((8,), 1 - 2 ** -24), rand, torch.rand(8, dtype=torch.float64)):
        got = resample(w, seg, u, method)
        assert torch.equal(got, resample_ref(w, seg, u, method))
        assert torch.equal(got[:4], torch.full((4,), 2)), "all weight on particle 2"
        assert set(got[4:].tolist()) <= {4, 6}, "a zero-weight particle was drawn"


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
    w, seg, u = _segments([4, 1, 6], seed=5)
    active = torch.tensor([True, True, False])
    got = resample(w, seg, u, "systematic", active=active)
    assert torch.equal(got, resample_ref(w, seg, u, "systematic", active=active))
    assert torch.equal(got[5:], torch.arange(5, 11)), "an inactive segment keeps its particles"
    assert int(got[4]) == 4, "a single particle is its own ancestor"
    empty = resample(torch.zeros(0), torch.tensor([0]), torch.zeros(0), "stratified")
    assert empty.shape == (0,) and empty.dtype == torch.int64
    with pytest.raises(ValueError):
        resample(w, seg, u, "residual")
    with pytest.raises(RuntimeError, match="bad segment"):
        resample_cpp(w, torch.tensor([0, 4, 3, 11]), u, "systematic")


@pytest.mark.parametrize("method", list(METHODS))
def test_many_replicates_equal_reference(method):
    """3000 segments of 8 (the statistical tests' set-up): the same draws as the reference, so the
    reference's unbiasedness / variance properties carry over."""
    weights = torch.tensor([0.26, 0.19, 0.155, 0.13, 0.11, 0.085, 0.05, 0.02])
    reps = 3000
    g = torch.Generator().manual_seed(100 + METHODS[method])
    seg = torch.arange(reps + 1, dtype=torch.int64) * 8
    u = torch.rand(reps * 8, generator=g)
    assert torch.equal(resample_cpp(weights.repeat(reps), seg, u, method),
                       resample_ref(weights.repeat(reps), seg, u, method))


def test_dispatch_and_profiler_range(monkeypatch):
    w, seg, u = _segments([4, 3], seed=6)
    calls = []
    monkeypatch.setattr(rs, "resample_cpp", lambda *a, **k: calls.append(1) or resample_cpp(*a, **k))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = resample(w, seg, u, "multinomial")
    assert calls == [1] and "pfengine::resample" in {e.name for e in prof.events()}
    monkeypatch.setenv("PFENGINE_CPP", "0")
    assert torch.equal(resample(w, seg, u, "multinomial"), got)
    assert calls == [1], "PFENGINE_CPP=0 must take the reference"
