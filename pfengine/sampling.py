"""Logits -> tokens for every growing particle of an iteration in one call. Each request keeps its
own generator (drawing as many uniforms as it has rows, in row order), so a request samples the
same tokens alone or batched; the rows are then sampled together: greedy rows by argmax, plain
temperature rows by the fused kernel (once per distinct temperature), top-k / top-p rows through one
batched filter with per-row k and p."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pfengine.config import SamplingParams
from pfengine.kernels.sampling import inverse_cdf, temperature_sample

GREEDY, PLAIN, FILTERED = 0, 1, 2


@dataclass
class RowGroup:
    """``rows`` consecutive logits rows of one request."""

    params: SamplingParams
    generator: torch.Generator
    rows: int


def kind_of(params: SamplingParams, vocab: int) -> int:
    if params.greedy:
        return GREEDY
    return FILTERED if 0 < params.top_k < vocab or params.top_p < 1.0 else PLAIN


def sample(logits: torch.Tensor, groups: list[RowGroup]) -> torch.Tensor:
    """``logits [m, V]`` (rows grouped as ``groups`` say, in order) -> token ids ``[m]``."""
    vocab = logits.shape[-1]
    kinds = [kind_of(g.params, vocab) for g in groups]
    u = torch.cat([torch.rand(g.rows, 1, generator=g.generator, dtype=torch.float64) if k != GREEDY
                   else torch.zeros(g.rows, 1, dtype=torch.float64) for g, k in zip(groups, kinds)]).to(logits.device)
    counts = torch.tensor([g.rows for g in groups])
    kind = torch.tensor(kinds).repeat_interleave(counts)
    temperature = torch.tensor([g.params.temperature for g in groups]).repeat_interleave(counts)
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    for k in set(kinds):
        sel = (kind == k).nonzero().squeeze(1) if len(set(kinds)) > 1 else None
        part = (lambda t: t) if sel is None else (lambda t: t[sel.to(t.device)])
        if k == GREEDY:
            tokens = part(logits).argmax(-1)
        elif k == PLAIN:
            tokens = _plain(part(logits), part(temperature), part(u))
        else:
            top_k = torch.tensor([g.params.top_k for g in groups]).repeat_interleave(counts)
            top_p = torch.tensor([g.params.top_p for g in groups]).repeat_interleave(counts)
            tokens = _filtered(part(logits), part(temperature), part(top_k), part(top_p), part(u))
        if sel is None:
            return tokens
        out[sel.to(out.device)] = tokens
    return out


def _plain(logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Temperature sampling, one fused kernel call per distinct temperature."""
    values = temperature.unique()
    if values.numel() == 1:
        return temperature_sample(logits, float(values[0]), u)
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    for t in values.tolist():
        sel = (temperature == t).nonzero().squeeze(1).to(logits.device)
        out[sel] = temperature_sample(logits[sel], t, u[sel])
    return out


def _filtered(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
              u: torch.Tensor) -> torch.Tensor:
    """Top-k (0 or >= V: off), then top-p (1: off) on ``softmax(logits / T)``, per row."""
    dev, vocab = logits.device, logits.shape[-1]
    x = logits.float() / temperature.to(dev, torch.float32)[:, None]
    use_k = ((top_k > 0) & (top_k < vocab)).to(dev)
    if bool(use_k.any()):
        kth = x.sort(-1, descending=True).values.gather(1, (top_k.clamp(1, vocab) - 1).to(dev)[:, None])
        x = x.masked_fill((x < kth) & use_k[:, None], float("-inf"))
    probs = x.softmax(-1)
    use_p = (top_p < 1.0).to(dev)
    if bool(use_p.any()):
        sorted_p, order = probs.sort(-1, descending=True)
        drop = (sorted_p.cumsum(-1) - sorted_p >= top_p.to(dev, torch.float32)[:, None]) & use_p[:, None]
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return inverse_cdf(probs, u)
