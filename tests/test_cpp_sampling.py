"""C++ fused temperature sampling (pfengine._cpp) draws exactly the reference's tokens: same softmax,
same fp64 running sums, same search -- and pfengine.sampling.sample takes it for plain sampling."""
import pytest
import torch

from pfengine.config import SamplingParams
from pfengine.kernels import sampling as ks
from pfengine.kernels.sampling import temperature_sample_cpp, temperature_sample_ref
from pfengine.sampling import RowGroup, sample

pytestmark = pytest.mark.cpp


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,vocab", [(64, 16384), (5, 384), (1, 7), (3, 50021), (17, 1000)])
def test_same_tokens_as_reference(threads, n, vocab):
    g = torch.Generator().manual_seed(n * vocab)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for temperature in (0.3, 0.8, 1.0, 1.7):
            for scale in (1.0, 6.0, 40.0):  # flat to very peaked distributions
                logits = torch.randn(n, vocab, generator=g) * scale
                u = torch.rand(n, 1, generator=g, dtype=torch.float64)
                got = temperature_sample_cpp(logits, temperature, u)
                assert got.dtype == torch.int64 and got.shape == (n,)
                assert torch.equal(got, temperature_sample_ref(logits, temperature, u)), (temperature, scale)
    finally:
        torch.set_num_threads(before)


def test_edges_exact_cdf_points_masked_logits_strided_and_empty():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 50, generator=g)
    cdf = (logits / 0.8).softmax(-1).double().cumsum(-1)
    for u in (cdf[:, 10:11] / cdf[:, -1:], torch.zeros(4, 1, dtype=torch.float64),
              torch.full((4, 1), 1 - 2 ** -53, dtype=torch.float64)):
        assert torch.equal(temperature_sample_cpp(logits, 0.8, u), temperature_sample_ref(logits, 0.8, u))
    masked = logits.masked_fill(torch.rand(4, 50, generator=g) < 0.7, float("-inf"))
    u = torch.rand(4, 1, generator=g, dtype=torch.float64)
    got = temperature_sample_cpp(masked, 1.0, u)
    assert torch.equal(got, temperature_sample_ref(masked, 1.0, u))
    assert bool(torch.isfinite(masked.gather(1, got[:, None])).all()), "a masked token was drawn"
    wide = torch.randn(3, 100, generator=g)
    view = wide[:, ::2]  # strided rows and columns
    u = torch.rand(3, 1, generator=g, dtype=torch.float64)
    assert torch.equal(temperature_sample_cpp(view, 0.9, u), temperature_sample_ref(view, 0.9, u))
    assert temperature_sample_cpp(logits[:0], 0.8, u[:0]).shape == (0,)


def test_sample_uses_the_fused_kernel_for_plain_sampling_only(monkeypatch):
    calls = []
    monkeypatch.setattr(ks, "temperature_sample_cpp", lambda *a: calls.append(1) or temperature_sample_cpp(*a))
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(2))

    def draw(params):
        return sample(logits, [RowGroup(params, torch.Generator().manual_seed(7), logits.shape[0])])

    plain = draw(SamplingParams(temperature=0.8))
    assert calls == [1]
    monkeypatch.setenv("PFENGINE_CPP", "0")
    assert torch.equal(draw(SamplingParams(temperature=0.8)), plain), "reference path, same tokens"
    assert calls == [1]
    monkeypatch.delenv("PFENGINE_CPP")
    draw(SamplingParams(temperature=0.8, top_k=20))
    draw(SamplingParams(temperature=0.8, top_p=0.9))
    assert calls == [1], "top-k / top-p keep the torch path"
    draw(SamplingParams(temperature=0.8, top_k=300))  # top-k >= V is plain sampling
    assert calls == [1, 1]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        draw(SamplingParams(temperature=1.2))
    assert "pfengine::temperature_sample" in {e.name for e in prof.events()}
