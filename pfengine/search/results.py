"""What a finished request returns: each method's final candidates, their weights, the choice."""
from __future__ import annotations

from typing import Callable

import torch

from pfengine.kernels.prm_score import running_to_prob
from pfengine.search import beam, parallel_tempering
from pfengine.search.answers import expected_accuracy, extract_answer, select
from pfengine.search.particle_filter import normalised
from pfengine.state import Particle, ParticleResult, PFResult, RequestState

SELECTION = {"best_of_n": "argmax", "weighted_best_of_n": "vote", "self_consistency": "vote", "greedy": "argmax"}


def candidates(r: RequestState) -> tuple[list[Particle], torch.Tensor, torch.Tensor]:
    """The final particles of a method, their aggregated PRM probabilities and normalised weights."""
    agg = r.search.aggregation
    if r.search.method == "beam_search":
        done = sorted(r.completed, key=lambda c: c.running, reverse=True)[:r.n]
        particles = [c.particle for c in done]
        probs = running_to_prob(torch.tensor([c.running for c in done]), agg)
        return particles, probs, probs / probs.sum()
    if r.search.method == "dvts":
        slots = beam.subtree_bests(r)
    elif r.search.method == "parallel_tempering":
        slots = parallel_tempering.cold_chain(r)
    else:
        slots = list(range(r.n))
    particles = [r.particles[i] for i in slots]
    probs = running_to_prob(r.running[slots], agg)
    if r.search.method in ("particle_filter", "particle_gibbs", "parallel_tempering"):
        weights = normalised(r.log_w[slots]).exp()
    elif r.search.uses_prm:
        weights = probs / probs.sum()
    else:
        weights = torch.full((len(slots),), 1.0 / len(slots))
    return particles, probs, weights


def build(r: RequestState, decode: Callable[[list[int]], str]) -> PFResult:
    particles, probs, weights = candidates(r)
    assert all(p.finished for p in particles), "results.build: a candidate is still growing"
    texts = [decode(p.tokens) for p in particles]
    answers = [extract_answer(t) for t in texts]
    how = SELECTION.get(r.search.method, r.search.selection)
    best = select(weights.tolist(), answers, how, r.generator)
    results = [ParticleResult(text=t, token_ids=list(p.tokens), steps=[decode(s) for s in p.steps()],
                              step_starts=list(p.step_starts), weight=float(w), score=float(pr),
                              finish_reason=p.finish_reason, answer=a)
               for p, t, w, pr, a in zip(particles, texts, weights, probs, answers)]
    accuracy = (expected_accuracy(weights.tolist(), answers, r.request.reference_answer)
                if r.request.reference_answer is not None else None)
    return PFResult(answer=answers[best], text=texts[best], best=best, particles=results, trace=r.trace, stats=r.stats,
                    method=r.search.method, expected_accuracy=accuracy)
