"""Logits -> tokens, with each request's own generator so a request samples the same alone or batched."""
from __future__ import annotations

import torch

from pfengine.config import SamplingParams
from pfengine.kernels.sampling import temperature_sample


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """``logits [n, V]`` -> token ids ``[n]``; temperature 0 (or below 1e-5) is greedy."""
    if params.greedy:
        return logits.argmax(-1)
    if not 0 < params.top_k < logits.shape[-1] and params.top_p >= 1.0:
        # Plain temperature sampling: the fused kernel (C++ on CPU) draws the same tokens as the
        # inverse CDF below without its [n, V] temporaries.
        u = torch.rand(logits.shape[0], 1, generator=generator, dtype=torch.float64).to(logits.device)
        return temperature_sample(logits, params.temperature, u)
    logits = logits.float() / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= params.top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    # Inverse CDF with one uniform per row: exact, and far cheaper on CPU than torch.multinomial
    # or a per-token random race at large vocabularies (the generator draws n numbers, not n * V).
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64).to(probs.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
