"""Resampling kernel vs its torch reference and numpy, plus the statistics of the resamplers:
unbiased offspring counts (chi-square at a fixed level, deterministic seeds) and lower offspring
variance for systematic / stratified than for multinomial."""
import math
from functools import partial

import numpy as np
import pytest
import torch

from kernel_cases import (W8, check_resample, check_resample_active_single_and_empty, check_resample_degenerate,
                          replicate_ancestors, segments)
from kernel_device import on_device
from pfengine.kernels.resample import METHODS, resample, resample_ref, resample_triton

pytest.importorskip("triton")

pytestmark = pytest.mark.triton

ALPHA_Z = 3.090  # standard normal quantile at 1 - 0.001: every chi-square test runs at level 0.001


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("sizes,block", [([5, 0, 1, 24], None), ([5, 0, 1, 24], 16), ([3, 40], 16)])
def test_matches_reference_and_numpy(method, sizes, block):
    w, seg, u = segments(sizes, seed=len(sizes) * 7 + (block or 0))
    check_resample(on_device(partial(resample_triton, block=block)), method, w, seg, u)


@pytest.mark.parametrize("method", list(METHODS))
def test_all_weight_on_one_particle_zero_weights_and_extreme_uniforms(method):
    check_resample_degenerate(on_device(resample), method)


def test_active_mask_single_particle_and_empty():
    check_resample_active_single_and_empty(on_device(resample))


def test_profiler_range():
    w, seg, u = segments([4], seed=6)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        on_device(resample)(w, seg, u, "multinomial")
    assert "pfengine::resample" in {e.name for e in prof.events()}


# ---------------------------------------------------------------------------------------------- #
# Statistics. Each replicate is one segment (an independent request with the same weights).

def _replicates(fn, method, reps, seed, weights=W8):
    """``[reps, N]`` offspring counts."""
    anc = replicate_ancestors(fn, method, reps, seed, weights)
    return torch.nn.functional.one_hot(anc, weights.numel()).sum(1).double().numpy()


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
    counts = _replicates(on_device(resample_triton), method, reps=100, seed=300 + METHODS[method])
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
