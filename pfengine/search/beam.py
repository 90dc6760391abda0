"""Step-level beam search and DVTS with search-and-learn semantics.

Beam search: N beams; each round every unfinished beam grows one step, finished beams leave the
pool for the completed list, the top N/M unfinished by score survive and are forked M ways to refill
N beams. It stops once N beams completed (or none is left) and returns at most N.
DVTS: N/M independent subtrees of width M; each round a subtree keeps its best candidate and forks
it M ways; a subtree whose best candidate finished is done.
"""
from __future__ import annotations

from pfengine.state import Completed, RequestState


def plan_beam(r: RequestState) -> list[int] | None:
    n, keep = r.n, max(1, r.n // r.search.beam_width)
    unfinished = [i for i, p in enumerate(r.particles) if not p.finished]
    for i, p in enumerate(r.particles):  # every finished slot is overwritten below (or the search ends)
        if p.finished:
            r.completed.append(Completed(p.copy(), float(r.running[i])))
    if len(r.completed) >= n or not unfinished:
        r.done = True
        return None
    best = sorted(unfinished, key=lambda i: float(r.running[i]), reverse=True)[:keep]
    return (best * (n // len(best) + 1))[:n]


def plan_dvts(r: RequestState) -> list[int] | None:
    m = r.search.beam_width
    ancestors = list(range(r.n))
    for lo in range(0, r.n, m):
        group = range(lo, lo + m)
        if all(r.particles[i].frozen for i in group):
            continue
        best = max(group, key=lambda i: float(r.running[i]))
        for i in group:
            ancestors[i] = best
    return ancestors


def subtree_bests(r: RequestState) -> list[int]:
    m = r.search.beam_width
    return [max(range(lo, lo + m), key=lambda i: float(r.running[i])) for lo in range(0, r.n, m)]
