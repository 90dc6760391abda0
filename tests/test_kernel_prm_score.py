"""PRM scoring on its Triton path (the head's epilogue; weighing: row epilogue + per-segment
normalisation) vs the torch reference and a numpy oracle."""
import math

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from kernel_device import on_device  # noqa: E402
from pfengine.kernels.prm_score import (  # noqa: E402
    LOGIT_CLIP, P_CLIP, PRMHead, head_logit, head_logit_ref, head_logit_triton, initial_running, weigh, weigh_ref,
    weigh_triton)

pytestmark = [pytest.mark.triton, pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")]

AGGS = ["model", "last", "min", "prod"]



def _head(h, seed):
    g = torch.Generator().manual_seed(seed)
    return PRMHead(torch.randn(h, h, generator=g) / math.sqrt(h), torch.randn(h, generator=g),
                   torch.randn(2, h, generator=g), torch.randn(2, generator=g))


def _running(m, agg, g):
    if agg == "prod":  # sum of log p <= 0, some near 0 (expm1 accuracy), some far
        return -torch.rand(m, generator=g) * torch.tensor([1e-6, 1e-3, 0.05, 2.0, 30.0]).repeat(m)[:m]
    if agg == "min":  # at or below the starting top
        return initial_running(m, agg) - torch.rand(m, generator=g) * 3
    return torch.randn(m, generator=g)


def _numpy_score(hidden, head, running, scored, seg_starts, agg, temperature):
    """float64 oracle written from the paper's definitions, independent of the torch code."""
    h = np.maximum(hidden.double().numpy() @ head.w1.double().numpy().T + head.b1.double().numpy(), 0)
    logits = h @ head.w2.double().numpy().T + head.b2.double().numpy()
    step = np.clip(logits[:, 1] - logits[:, 0], -LOGIT_CLIP, LOGIT_CLIP)
    run = running.double().numpy()
    if agg in ("model", "last"):
        new = step
    elif agg == "min":
        new = np.minimum(run, step)
    else:
        new = run - np.log1p(np.exp(-step))  # + log sigmoid(step)
    run = np.where(scored.numpy(), new, run)
    if agg == "prod":
        r = np.minimum(run, math.log1p(-P_CLIP))
        logit = run - np.log(-np.expm1(r))
    else:
        logit = run
    t = temperature.double().numpy() if isinstance(temperature, torch.Tensor) else temperature
    lw = np.clip(logit, -LOGIT_CLIP, LOGIT_CLIP) / t
    out, ess = np.empty_like(lw), []
    bounds = seg_starts.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        x = lw[lo:hi]
        if hi == lo:
            ess.append(math.inf)
            continue
        y = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
        out[lo:hi] = y
        ess.append(1.0 / (np.exp(y) ** 2).sum())
    return run, out, np.array(ess)


def _close(got, want, tol=2e-5):
    torch.testing.assert_close(got.double(), torch.as_tensor(want).double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("per_row_temp", [False, True])
def test_score_matches_reference_and_numpy(agg, per_row_temp):
    m, h = 9, 48
    g = torch.Generator().manual_seed(AGGS.index(agg) * 2 + per_row_temp)
    head = _head(h, seed=3)
    hidden = torch.randn(m, h, generator=g) * 2
    running = _running(m, agg, g)
    scored = torch.rand(m, generator=g) < 0.7
    seg_starts = torch.tensor([0, 4, 4, 5, 9])  # includes an empty and a single-particle segment
    temperature = torch.rand(m, generator=g) + 0.5 if per_row_temp else 0.8
    ref = weigh_ref(head_logit_ref(hidden, head), running, scored, seg_starts, agg, temperature)
    got = on_device(weigh_triton)(on_device(head_logit_triton)(hidden, head), running, scored, seg_starts, agg,
                                  temperature)
    oracle = _numpy_score(hidden, head, running, scored, seg_starts, agg, temperature)
    for a, b, o in zip(got, ref, oracle):
        assert a.dtype == torch.float32 and a.shape == b.shape
        _close(a, b)
        _close(a, o)
    assert got[2][1] == math.inf and got[2][2] == 1.0  # empty segment; a single particle has ESS 1
    assert got[1][4] == 0.0


def test_chunked_paths():
    """Small BLOCK sizes: H and the segments span several chunks (loops with a carry)."""
    m, h = 40, 80
    g = torch.Generator().manual_seed(11)
    head = _head(h, seed=4)
    hidden, scored = torch.randn(m, h, generator=g), torch.ones(m, dtype=torch.bool)
    running = _running(m, "prod", g)
    seg_starts = torch.tensor([0, 37, 40])
    ref = weigh_ref(head_logit_ref(hidden, head), running, scored, seg_starts, "prod", 1.0)
    step = on_device(head_logit_triton)(hidden, head, block_m=16, block_h=32)
    got = on_device(weigh_triton)(step, running, scored, seg_starts, "prod", 1.0, block_m=16, block_seg=16)
    for a, b in zip(got, ref):
        _close(a, b)


@pytest.mark.parametrize("agg", AGGS)
def test_weigh_from_step_logits(agg):
    """The callable-PRM path: step logits in, same epilogue; clipped extremes included."""
    m = 7
    g = torch.Generator().manual_seed(20 + AGGS.index(agg))
    step = torch.randn(m, generator=g) * 5
    step[0], step[1] = LOGIT_CLIP, -LOGIT_CLIP
    running = _running(m, agg, g)
    scored = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    seg_starts = torch.tensor([0, 3, 7])
    ref = weigh_ref(step, running, scored, seg_starts, agg, torch.full((m,), 1.5))
    got = on_device(weigh_triton)(step, running, scored, seg_starts, agg, torch.full((m,), 1.5))
    for a, b in zip(got, ref):
        _close(a, b)


def test_all_weight_on_one_particle_and_empty_batch():
    m = 5
    step = torch.full((m,), -LOGIT_CLIP)
    step[3] = LOGIT_CLIP
    running, scored = initial_running(m, "last"), torch.ones(m, dtype=torch.bool)
    seg_starts = torch.tensor([0, m])
    _, log_w, ess = on_device(weigh)(step, running, scored, seg_starts, "last", 1.0)
    _, ref_w, ref_ess = weigh_ref(step, running, scored, seg_starts, "last", 1.0)
    _close(log_w, ref_w)
    assert log_w[3] == 0.0 and bool((log_w.exp()[[0, 1, 2, 4]] < 1e-12).all())
    assert abs(float(ess[0]) - 1.0) < 1e-6 and abs(float(ref_ess[0]) - 1.0) < 1e-6

    head = _head(8, seed=1)
    assert on_device(head_logit)(torch.zeros(0, 8), head).shape == (0,)
    empty = on_device(weigh)(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.bool), torch.tensor([0, 0]),
                             "model", 1.0)
    ref = weigh_ref(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.bool), torch.tensor([0, 0]), "model",
                    1.0)
    assert empty[0].shape == (0,) and empty[1].shape == (0,)
    assert torch.equal(empty[2], ref[2]) and empty[2][0] == math.inf


def test_unknown_aggregation_and_profiler_ranges():
    head = _head(16, seed=2)
    hidden = torch.randn(3, 16)
    args = (torch.zeros(3), torch.ones(3, dtype=torch.bool), torch.tensor([0, 3]))
    with pytest.raises(ValueError):
        on_device(weigh)(on_device(head_logit)(hidden, head), *args, "mean", 1.0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        on_device(weigh)(on_device(head_logit)(hidden, head), *args, "min", 1.0)
    names = {e.name for e in prof.events()}
    assert {"pfengine::prm_head_gemm", "pfengine::prm_head_epilogue", "pfengine::prm_score_rows",
            "pfengine::prm_normalise"} <= names
