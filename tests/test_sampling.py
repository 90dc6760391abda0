"""Token sampling against numpy: top-k / top-p keep exactly the right support, frequencies match."""
import numpy as np
import pytest
import torch

from pfengine.config import SamplingParams
from pfengine.sampling import RowGroup, sample


def oracle_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    if top_k:  # top-k first, renormalise, then top-p on what is left (as transformers and vLLM do)
        p[order[top_k:]] = 0.0
        p /= p.sum()
    keep = np.zeros_like(p, dtype=bool)
    mass = 0.0
    for i in order:
        if mass >= top_p or p[i] == 0:
            break
        keep[i] = True
        mass += p[i]
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.6), (1.0, 4, 0.8)])
def test_sampling_frequencies_match_oracle(temperature, top_k, top_p):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.3, 0.0, -1.0, -2.0, 0.7])
    n = 40000
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    tokens = sample(logits.expand(n, -1), [RowGroup(params, torch.Generator().manual_seed(0), n)])
    freq = np.bincount(tokens.numpy(), minlength=8) / n
    expected = oracle_probs(logits.numpy().astype(np.float64), temperature, top_k, top_p)
    assert np.all(freq[expected == 0] == 0)
    np.testing.assert_allclose(freq, expected, atol=0.01)


def test_temperature_zero_is_greedy():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(1))
    out = sample(logits, [RowGroup(SamplingParams(temperature=0.0), torch.Generator(), logits.shape[0])])
    assert torch.equal(out, logits.argmax(-1))


@pytest.mark.parametrize("field,value,message", [
    ("temperature", -0.1, "temperature: must be >= 0"),
    ("top_p", 0.0, r"top_p: must be in \(0.0, 1.0\]"),
    ("top_p", 1.5, r"top_p: must be in \(0.0, 1.0\]"),
    ("top_k", -1, "top_k: must be >= 0"),
    ("max_steps", 0, "max_steps: must be >= 1"),
    ("step_delimiter", "", "step_delimiter: must be a non-empty string"),
])
def test_bad_sampling_params(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_a_batch_of_requests_samples_what_each_would_alone():
    """Greedy, plain and filtered rows of several requests (different temperatures, k and p) sampled
    in one call give exactly the tokens each request's rows give on their own."""
    g = torch.Generator().manual_seed(5)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7), SamplingParams(temperature=1.3),
              SamplingParams(temperature=0.9, top_k=5), SamplingParams(temperature=1.1, top_p=0.8),
              SamplingParams(temperature=0.6, top_k=50, top_p=0.9), SamplingParams(temperature=0.7)]
    sizes = [2, 3, 1, 4, 2, 3, 2]
    logits = [torch.randn(n, 97, generator=g) * 3 for n in sizes]
    alone = [sample(x, [RowGroup(p, torch.Generator().manual_seed(k), x.shape[0])])
             for k, (x, p) in enumerate(zip(logits, params))]
    together = sample(torch.cat(logits), [RowGroup(p, torch.Generator().manual_seed(k), x.shape[0])
                                          for k, (x, p) in enumerate(zip(logits, params))])
    assert torch.equal(together, torch.cat(alone))
