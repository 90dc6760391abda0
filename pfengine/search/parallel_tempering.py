"""Parallel tempering: chains of N/M particles, each resampled at its own weight temperature, with
Metropolis swap moves between neighbouring chains after every round."""
from __future__ import annotations

import math

import torch

from pfengine.search.particle_filter import draw, normalised
from pfengine.state import RequestState


def chains(r: RequestState) -> list[range]:
    size = r.n // len(r.search.temperatures)
    return [range(c * size, (c + 1) * size) for c in range(len(r.search.temperatures))]


def plan(r: RequestState) -> list[int] | None:
    if all(p.finished for p in r.particles):
        return None
    s = r.search
    logit = r.log_w * s.weight_temperature  # undo the global temperature: each chain has its own
    ancestors = list(range(r.n))
    for chain, temp in zip(chains(r), s.temperatures):
        idx = list(chain)
        w = normalised(logit[idx] / temp).exp()
        for slot, k in zip(idx, draw(w, len(idx), s.resampling, r.generator)):
            ancestors[slot] = idx[k]
    for (a, ta), (b, tb) in zip(zip(chains(r), s.temperatures), zip(chains(r)[1:], s.temperatures[1:])):
        i = a[int(torch.randint(len(a), (1,), generator=r.generator))]
        j = b[int(torch.randint(len(b), (1,), generator=r.generator))]
        si, sj = float(logit[ancestors[i]]), float(logit[ancestors[j]])
        accept = math.exp(min(0.0, (1 / ta - 1 / tb) * (sj - si)))
        if float(torch.rand(1, generator=r.generator)) < accept:
            ancestors[i], ancestors[j] = ancestors[j], ancestors[i]
    return ancestors


def cold_chain(r: RequestState) -> list[int]:
    """Slots of the chain with the lowest temperature: the one the answer comes from."""
    c = min(range(len(r.search.temperatures)), key=lambda k: r.search.temperatures[k])
    return list(chains(r)[c])
