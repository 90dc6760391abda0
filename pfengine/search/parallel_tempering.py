"""Parallel tempering: chains of N/M particles, each resampled at its own weight temperature, with
Metropolis swap moves between neighbouring chains after every round."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from pfengine.search.method import RoundContext, SearchMethod, finished
from pfengine.search.particle_filter import draw, normalised

if TYPE_CHECKING:
    from pfengine.state import RequestState


class ParallelTempering(SearchMethod):
    weighs_by_log_w = True

    @property
    def n_candidates(self) -> int:
        return self.slots // len(self.search.temperatures)

    def chains(self) -> list[range]:
        size = self.slots // len(self.search.temperatures)
        return [range(c * size, (c + 1) * size) for c in range(len(self.search.temperatures))]

    def plan(self, r: RequestState, ctx: RoundContext) -> list[int] | None:
        if all(finished(r, ctx)):
            return None
        s = self.search
        logit = r.log_w * s.weight_temperature  # undo the global temperature: each chain has its own
        ancestors = list(range(r.n))
        chains = self.chains()
        for chain, temp in zip(chains, s.temperatures):
            idx = list(chain)
            w = normalised(logit[idx] / temp).exp()
            for slot, k in zip(idx, draw(w, len(idx), s.resampling, r.generator)):
                ancestors[slot] = idx[k]
        for (a, ta), (b, tb) in zip(zip(chains, s.temperatures), zip(chains[1:], s.temperatures[1:])):
            i = a[int(torch.randint(len(a), (1,), generator=r.generator))]
            j = b[int(torch.randint(len(b), (1,), generator=r.generator))]
            si, sj = float(logit[ancestors[i]]), float(logit[ancestors[j]])
            accept = math.exp(min(0.0, (1 / ta - 1 / tb) * (sj - si)))
            if float(torch.rand(1, generator=r.generator)) < accept:
                ancestors[i], ancestors[j] = ancestors[j], ancestors[i]
        return ancestors

    def final_slots(self, r: RequestState) -> list[int]:
        """The chain with the lowest temperature: the one the answer comes from."""
        temps = self.search.temperatures
        return list(self.chains()[min(range(len(temps)), key=lambda k: temps[k])])
