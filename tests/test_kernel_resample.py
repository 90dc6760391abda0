"""Resampling kernel vs its torch reference and numpy, plus the statistics of the resamplers:
unbiased offspring counts (chi-square at a fixed level, deterministic seeds) and lower offspring
variance for systematic / stratified than for multinomial."""
import math

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from pfengine.kernels.resample import METHODS, resample, resample_ref, resample_triton  # noqa: E402

pytestmark = pytest.mark.triton

W8 = torch.tensor([0.26, 0.19, 0.155, 0.13, 0.11, 0.085, 0.05, 0.02])  # N * w never an integer
ALPHA_Z = 3.090  # standard normal quantile at 1 - 0.001: every chi-square test runs at level 0.001



def _segments(sizes, seed, power=3.0):
    g = torch.Generator().manual_seed(seed)
    seg = torch.tensor([0, *np.cumsum(sizes).tolist()], dtype=torch.int64)
    w = torch.rand(int(seg[-1]), generator=g) ** power
    for lo, hi in zip(seg[:-1].tolist(), seg[1:].tolist()):
        if hi > lo:
            w[lo:hi] /= w[lo:hi].sum()
    return w, seg, torch.rand(int(seg[-1]), generator=g)


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
@pytest.mark.parametrize("sizes,block", [([5, 0, 1, 24], None), ([5, 0, 1, 24], 16), ([3, 40], 16)])
def test_matches_reference_and_numpy(method, sizes, block):
    w, seg, u = _segments(sizes, seed=len(sizes) * 7 + (block or 0))
    got = resample_triton(w, seg, u, method, block=block)
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
    for u in (torch.zeros(8), torch.full((8,), 1 - 2 ** -24), rand):
        got = resample(w, seg, u, method)
        assert torch.equal(got, resample_ref(w, seg, u, method))
        assert torch.equal(got[:4], torch.full((4,), 2)), "all weight on particle 2"
        assert set(got[4:].tolist()) <= {4, 6}, "a zero-weight particle was drawn"


def test_active_mask_single_particle_and_empty():
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


def test_profiler_range():
    w, seg, u = _segments([4], seed=6)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        resample(w, seg, u, "multinomial")
    assert "pfengine::resample" in {e.name for e in prof.events()}


# ---------------------------------------------------------------------------------------------- #
# Statistics. Each replicate is one segment (an independent request with the same weights).

def _replicates(fn, method, reps, seed, weights=W8):
    n = weights.numel()
    g = torch.Generator().manual_seed(seed)
    seg = torch.arange(reps + 1, dtype=torch.int64) * n
    anc = fn(weights.repeat(reps), seg, torch.rand(reps * n, generator=g), method)
    local = (anc - seg[:-1].repeat_interleave(n)).view(reps, n)
    return torch.nn.functional.one_hot(local, n).sum(1).double().numpy()  # [reps, n] offspring counts


def _chi2_quantile(df, z=ALPHA_Z):
    """Wilson-Hilferty approximation of the chi-square quantile (no scipy here)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _unbiasedness_statistic(counts, weights):
    """Hotelling-type chi-square: S * d' Cov^+ d, d = mean offspring - N w, with the empirical
    covariance of the counts (valid for every method; counts sum to N, so the rank is <= N - 1)."""
    reps, n = counts.shape
    d = counts.mean(0) - n * weights.double().numpy()
    cov = np.cov(counts, rowvar=False)
    rank = np.linalg.matrix_rank(cov, tol=1e-9)
    return reps * d @ np.linalg.pinv(cov, rcond=1e-9) @ d, rank


@pytest.mark.parametrize("method", list(METHODS))
def test_mean_offspring_is_n_times_weight(method):
    counts = _replicates(resample_ref, method, reps=3000, seed=100 + METHODS[method])
    stat, df = _unbiasedness_statistic(counts, W8)
    assert df >= 3
    assert stat < _chi2_quantile(df), f"{method}: chi2={stat:.1f} on {df} df"
    if method == "multinomial":  # the classical Pearson test against the exact multinomial law
        expected = counts.shape[0] * 8 * W8.double().numpy()
        pearson = ((counts.sum(0) - expected) ** 2 / expected).sum()
        assert pearson < _chi2_quantile(7)
    # The test has power: a resampler drawing from slightly wrong weights is rejected.
    wrong = W8 * torch.tensor([1.15, 1, 1, 1, 1, 1, 1, 1])
    biased = _replicates(lambda w, s, u, m: resample_ref(wrong.repeat(3000) / wrong.sum(), s, u, m),
                         method, reps=3000, seed=200 + METHODS[method])
    assert _unbiasedness_statistic(biased, W8)[0] > _chi2_quantile(df)


@pytest.mark.parametrize("method", list(METHODS))
def test_kernel_statistics_small(method):
    """The kernel on fewer replicates: identical draws to the reference, and unbiased on its own."""
    counts = _replicates(resample_triton, method, reps=100, seed=300 + METHODS[method])
    assert np.array_equal(counts, _replicates(resample_ref, method, reps=100, seed=300 + METHODS[method]))
    stat, df = _unbiasedness_statistic(counts, W8)
    assert stat < _chi2_quantile(df), f"{method}: chi2={stat:.1f} on {df} df"


def test_systematic_and_stratified_have_lower_offspring_variance():
    var = {m: _replicates(resample_ref, m, reps=3000, seed=400 + i).var(0, ddof=1).sum()
           for i, m in enumerate(METHODS)}
    n = 8
    theory_multinomial = (n * W8.double() * (1 - W8.double())).sum().item()
    assert abs(var["multinomial"] / theory_multinomial - 1) < 0.1
    assert var["systematic"] < var["stratified"] < var["multinomial"]
    # Systematic: each count is floor or ceil of N w_i, so its variance is frac * (1 - frac).
    frac = (n * W8.double()) % 1
    assert var["systematic"] <= (frac * (1 - frac)).sum().item() * 1.1
