"""Step-level beam search and DVTS with search-and-learn semantics.

Beam search: N beams; each round every unfinished beam grows one step, finished beams leave the
pool for the completed list, the top N/M unfinished by score survive and are forked M ways to refill
N beams. It stops once N beams completed (or none is left) and returns at most N.
DVTS: N/M independent subtrees of width M; each round a subtree keeps its best candidate and forks
it M ways; a subtree whose best candidate finished is done.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pfengine.kernels.prm_score import running_to_prob
from pfengine.particles import Snapshot
from pfengine.search.method import RoundContext, SearchMethod, finished, frozen

if TYPE_CHECKING:
    from pfengine.state import RequestState


class BeamSearch(SearchMethod):
    settled_text = False

    def __init__(self, search) -> None:
        super().__init__(search)
        self.completed: list[tuple[Snapshot, float]] = []
        """Beams that finished and left the pool, with their aggregate (logit, or sum-log for prod)."""

    def plan(self, r: RequestState, ctx: RoundContext) -> list[int] | None:
        n, keep = r.n, max(1, r.n // self.search.beam_width)
        done = finished(r, ctx)
        unfinished = [i for i, d in enumerate(done) if not d]
        for i in [i for i, d in enumerate(done) if d]:  # every finished slot is overwritten below (or the search ends)
            self.completed.append((ctx.table.snapshot(int(r.rows[i])), float(r.aggregate[i])))
        if len(self.completed) >= n or not unfinished:
            r.done = True
            return None
        best = sorted(unfinished, key=lambda i: float(r.aggregate[i]), reverse=True)[:keep]
        return (best * (n // len(best) + 1))[:n]

    def end_of_sweep(self, r: RequestState, ctx: RoundContext) -> bool:
        return False  # the plan decides when the search ends

    def candidates(self, r: RequestState, ctx: RoundContext) -> tuple[list[Snapshot], torch.Tensor, torch.Tensor]:
        best = sorted(self.completed, key=lambda c: c[1], reverse=True)[:r.n]
        probs = running_to_prob(torch.tensor([c[1] for c in best]), self.search.aggregation)
        return [c[0] for c in best], probs, probs / probs.sum()


class DVTS(SearchMethod):
    @property
    def n_candidates(self) -> int:
        return self.slots // self.search.beam_width

    def subtrees(self, n: int) -> list[range]:
        m = self.search.beam_width
        return [range(lo, lo + m) for lo in range(0, n, m)]

    def plan(self, r: RequestState, ctx: RoundContext) -> list[int] | None:
        still = frozen(r, ctx).tolist()
        ancestors = list(range(r.n))
        for group in self.subtrees(r.n):
            if all(still[i] for i in group):
                continue
            best = max(group, key=lambda i: float(r.aggregate[i]))
            for i in group:
                ancestors[i] = best
        return ancestors

    def final_slots(self, r: RequestState) -> list[int]:
        return [max(group, key=lambda i: float(r.aggregate[i])) for group in self.subtrees(r.n)]
