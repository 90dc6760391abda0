"""End of a round, for every method: score the particles whose step ended -> each request's method
decides which particles continue (ancestors) -> fork both caches -> next step (or next sweep, or done)."""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Callable

import torch

from pfengine.kernels.prm_score import LOGIT_CLIP, initial_running, running_to_prob, weigh
from pfengine.particles import Phase
from pfengine.prm import PRM, EndedSteps
from pfengine.search.method import RoundContext
from pfengine.state import RequestState, StepTrace

log = logging.getLogger("pfengine")


def start(r: RequestState, ctx: RoundContext, logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """After the prompt's prefill: every particle slot starts from the prompt's last logits."""
    ctx.table.start(r.rows)
    ctx.logits[r.rows], ctx.hidden[r.rows] = logits.to(ctx.logits.dtype), hidden.to(ctx.hidden.dtype)
    r.aggregate = initial_running(r.n, r.search.aggregation)
    r.log_w = torch.full((r.n,), -math.log(r.n))
    r.growing = r.n
    r.method.start(r, logits, hidden)


def finish_round(reqs: list[RequestState], prm: PRM | None, ctx: RoundContext,
                 detokenize: Callable[[list[int]], str]) -> None:
    """Every request in ``reqs`` has no particle mid-step."""
    for r in reqs:
        r.method.before_round(r, ctx)
    groups: dict[str, list[RequestState]] = defaultdict(list)
    for r in reqs:
        groups[r.search.aggregation if r.method.uses_prm else ""].append(r)
    for aggregation, group in groups.items():
        _score(group, prm if aggregation else None, aggregation or "model", ctx, detokenize)
    _resample(reqs, ctx)
    rows = torch.cat([r.rows for r in reqs])
    ctx.table.next_step(rows)
    for r in reqs:
        if not r.done and bool((ctx.table.phase[r.rows] == Phase.FROZEN).all()) and r.method.end_of_sweep(r, ctx):
            r.done = True
        r.growing = int(ctx.table.growing(r.rows).sum())


def _resample(reqs: list[RequestState], ctx: RoundContext) -> None:
    """Each method's plan, then one fork per cache for every request's resampling."""
    rows, global_ancestors, writes, moves = [], [], [], []
    for r in reqs:
        r.round += 1
        r.stats.steps += 1
        ancestors = r.method.plan(r, ctx)
        if ancestors is not None and ancestors != list(range(r.n)):
            global_ancestors += [len(rows) + a for a in ancestors]
            writes += (ctx.table.finish[r.rows[ancestors]] == 0).tolist()
            rows += r.rows.tolist()
            moves.append((r, ancestors))
    if not rows:
        return
    ctx.caches.fork(torch.tensor(rows), torch.tensor(global_ancestors), torch.tensor(writes))
    for r, ancestors in moves:
        src = r.rows[ancestors]
        held_copy = (ctx.table.phase[src] == Phase.HELD) & (src != r.rows)
        ctx.table.copy(r.rows, src)
        ctx.table.phase[r.rows[held_copy]] = Phase.ENDED  # a copy of the reference prefix grows on
        ctx.hidden[r.rows], ctx.logits[r.rows] = ctx.hidden[src], ctx.logits[src]
        idx = torch.tensor(ancestors)
        r.aggregate, r.log_w = r.aggregate[idx], r.log_w[idx]
        r.method.reorder(ancestors)
        r.trace[-1].ancestors = ancestors
        r.stats.resamples += 1


def _score(group: list[RequestState], prm: PRM | None, aggregation: str, ctx: RoundContext,
           detokenize: Callable[[list[int]], str]) -> None:
    """Score the group's particles whose step just ended; weights and ESS per request."""
    table = ctx.table
    rows = torch.cat([r.rows for r in group])
    fresh = table.phase[rows] == Phase.ENDED
    scored = fresh if prm is not None else torch.zeros_like(fresh)
    step_logit = torch.zeros(rows.numel())
    if prm is not None and bool(fresh.any()):
        step_logit[fresh] = _step_logits(prm, rows[fresh], group, aggregation, ctx, detokenize)
    table.prm_lag[rows[fresh]], table.prm_partial[rows[fresh]] = 0, 0
    sizes = torch.tensor([r.n for r in group])
    seg_starts = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    running = torch.cat([r.aggregate for r in group])
    temperature = torch.cat([torch.full((r.n,), r.search.weight_temperature) for r in group])
    running, log_w, ess = weigh(step_logit, running, scored, seg_starts, aggregation, temperature)
    probs = running_to_prob(running, aggregation)
    fresh_list, ess_list = fresh.tolist(), ess.tolist()
    for j, r in enumerate(group):
        lo, hi = int(seg_starts[j]), int(seg_starts[j + 1])
        r.aggregate, r.log_w = running[lo:hi], log_w[lo:hi]
        slots = [i for i in range(r.n) if fresh_list[lo + i]]
        r.method.scored(r, slots, ctx)
        table.freeze(r.rows)
        r.trace.append(StepTrace(tokens=table.token_lists(r.rows), scored=scored[lo:hi].tolist(),
                                 scores=probs[lo:hi].tolist(), log_weights=r.log_w.tolist(), ess=ess_list[j],
                                 sweep=r.method.sweep))


def _step_logits(prm: PRM, rows: torch.Tensor, group: list[RequestState], aggregation: str, ctx: RoundContext,
                 detokenize: Callable[[list[int]], str]) -> torch.Tensor:
    """The PRM's logits for ``rows``; a PRM that produced a non-finite value gives that particle
    weight ~0 (the run goes on)."""
    def texts() -> list[tuple[str, list[str]]]:
        prompts = {row: r.prompt_text for r in group for row in r.rows.tolist()}
        return [(prompts[row], [detokenize(s) for s in ctx.table.snapshot(row).steps()]) for row in rows.tolist()]

    ended = EndedSteps(rows=rows, hidden=ctx.hidden[rows], nodes=ctx.table.node[rows].tolist(),
                       keep_tags=aggregation != "model", pending=lambda: ctx.table.pending(rows),
                       before=lambda: ctx.table.before_pending(rows), partial=ctx.table.prm_partial[rows], texts=texts)
    logits = prm.score(ended).float().cpu()
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        log.warning("PRM produced non-finite scores for %d particle(s); they get weight 0", int(bad.sum()))
        logits = logits.masked_fill(bad, -LOGIT_CLIP)
    return logits
