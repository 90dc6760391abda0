"""Particle filtering (Puri et al. 2025): resample the particle pool by softmax(logit(r) / T)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pfengine.kernels.resample import resample
from pfengine.search.method import RoundContext, SearchMethod, finished

if TYPE_CHECKING:
    from pfengine.state import RequestState

ANNEAL_ESS_RATIO = 0.5
ANNEAL_EARLY_PHASE = 0.5


class ParticleFilter(SearchMethod):
    weighs_by_log_w = True

    def plan(self, r: RequestState, ctx: RoundContext) -> list[int] | None:
        return plan(r, finished(r, ctx))


def plan(r: RequestState, done: list[bool], destinations: list[int] | None = None) -> list[int] | None:
    """Ancestors for every slot, or None when nothing is resampled. ``done``: which particles
    finished; ``destinations`` are the slots that receive resampled particles (default: the
    resampling pool itself)."""
    s = r.search
    if all(done):
        return None
    pool = [i for i, d in enumerate(done) if s.finished == "freeze" or not d]
    dest = pool if destinations is None else destinations
    log_w = normalised(r.log_w[pool])
    if s.annealing:
        log_w = normalised(log_w / anneal_temperature(log_w.exp(), r.round / r.request.sampling.max_steps))
    w = log_w.exp()
    if s.ess_threshold < 1.0 and float(1.0 / (w * w).sum()) >= s.ess_threshold * len(pool):
        return None
    picks = draw(w, len(dest), s.resampling, r.generator)
    ancestors = list(range(r.n))
    for slot, k in zip(dest, picks):
        ancestors[slot] = pool[k]
    return ancestors


def normalised(log_w: torch.Tensor) -> torch.Tensor:
    return log_w - torch.logsumexp(log_w, 0)


def anneal_temperature(w: torch.Tensor, progress: float) -> float:
    """ESS-based entropic annealing: while ESS/N < 0.5 in the first half of the run, flatten the
    weights by T = (N / ESS) * (1 - progress) (never below 1), so one lucky step cannot collapse the pool."""
    ratio = float(1.0 / (w * w).sum()) / w.numel()
    if ratio >= ANNEAL_ESS_RATIO or progress >= ANNEAL_EARLY_PHASE or w.numel() <= 1:
        return 1.0
    return max(1.0, (1.0 / ratio) * (1.0 - progress))


def draw(w: torch.Tensor, n: int, method: str, generator: torch.Generator) -> list[int]:
    """``n <= len(w)`` indices into ``w`` by systematic, stratified, multinomial or residual
    resampling, with the request's own generator. For ``n < len(w)`` (particle Gibbs free slots)
    ``len(w)`` are drawn and a random ``n`` kept, which leaves each index's expected count ``n * w_i``."""
    m = w.numel()
    assert n <= m, "draw: more draws than particles"
    w = w.double() / w.double().sum()
    if method == "residual":
        counts = torch.floor(m * w).long()
        picks = torch.arange(m, device=w.device).repeat_interleave(counts)
        rest = m - picks.numel()
        if rest:
            residual = m * w - counts
            extra = torch.tensor(draw(residual, rest, "multinomial", generator), device=w.device)
            picks = torch.cat([picks, extra])
    else:
        uniforms = torch.rand(m, generator=generator, dtype=torch.float64).to(w.device)
        picks = resample(w, torch.tensor([0, m], device=w.device), uniforms, method)
    if n < m:
        picks = picks[torch.randperm(m, generator=generator)[:n].to(w.device)]
    return picks.tolist()
