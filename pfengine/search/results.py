"""What a finished request returns: its method's candidates, their weights, the choice."""
from __future__ import annotations

from typing import Callable

from pfengine.search.answers import expected_accuracy, extract_answer, select
from pfengine.search.method import RoundContext
from pfengine.state import ParticleResult, PFResult, RequestState


def build(r: RequestState, ctx: RoundContext, detokenize: Callable[[list[int]], str]) -> PFResult:
    particles, probs, weights = r.method.candidates(r, ctx)
    assert all(p.finish for p in particles), "results.build: a candidate is still growing"
    texts = [detokenize(p.tokens) for p in particles]
    answers = [extract_answer(t) for t in texts]
    best = select(weights.tolist(), answers, r.method.selection or r.search.selection, r.generator)
    results = [ParticleResult(text=t, token_ids=p.tokens, steps=[detokenize(s) for s in p.steps()],
                              step_starts=p.step_starts, weight=float(w), score=float(pr),
                              finish_reason=p.finish_reason, answer=a)
               for p, t, w, pr, a in zip(particles, texts, weights, probs, answers)]
    accuracy = (expected_accuracy(weights.tolist(), answers, r.request.reference_answer)
                if r.request.reference_answer is not None else None)
    return PFResult(answer=answers[best], text=texts[best], best=best, particles=results, trace=r.trace,
                    stats=r.stats, method=r.search.method, expected_accuracy=accuracy)
