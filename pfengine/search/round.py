"""End of a round, for every method: score the particles whose step ended -> the method decides
which particles continue (ancestors) -> fork both caches -> next step (or next sweep, or done)."""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Callable

import torch

from pfengine.kernels.prm_score import LOGIT_CLIP, head_logit, initial_running, running_to_prob, score_particles, weigh
from pfengine.prm import CallablePRM, EndedStep, ModelPRM, ValueHeadPRM
from pfengine.runner import ModelRunner
from pfengine.search import beam, parallel_tempering, particle_filter, particle_gibbs
from pfengine.state import Particle, RequestState, StepTrace

PRM = ValueHeadPRM | ModelPRM | CallablePRM
log = logging.getLogger("pfengine")

def _independent(r: RequestState) -> None:
    """Greedy, best-of-N, weighted best-of-N, self-consistency: independent samples, never forked."""
    return None


PLANS: dict[str, Callable[[RequestState], list[int] | None]] = {
    "particle_filter": particle_filter.plan,
    "particle_gibbs": particle_gibbs.plan,
    "parallel_tempering": parallel_tempering.plan,
    "greedy": _independent,
    "best_of_n": _independent,
    "weighted_best_of_n": _independent,
    "self_consistency": _independent,
    "beam_search": beam.plan_beam,
    "dvts": beam.plan_dvts,
}


def start(r: RequestState, logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """After the prompt's prefill: every particle slot starts from the prompt's last logits."""
    r.prompt_logits, r.prompt_hidden = logits, hidden
    n = r.n
    r.particles = [Particle() for _ in range(n)]
    reset_weights(r, logits, hidden)


def reset_weights(r: RequestState, logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """Every slot continues from ``logits`` / ``hidden`` ([1, V], [1, H]) with equal weights."""
    n = r.n
    r.logits, r.hidden = logits.expand(n, -1).clone(), hidden.expand(n, -1).clone()
    r.running = initial_running(n, r.search.aggregation, logits.device)
    r.log_w = torch.full((n,), -math.log(n), device=logits.device)


def finish_round(reqs: list[RequestState], prm: PRM | None, runners: list[ModelRunner],
                 decode: Callable[[list[int]], str]) -> None:
    """Every request in ``reqs`` has no particle mid-step."""
    for r in reqs:
        if r.search.method == "particle_gibbs" and r.ref is not None:
            particle_gibbs.install_reference(r, runners, r.round + 1)
    groups: dict[str, list[RequestState]] = defaultdict(list)
    for r in reqs:
        groups[r.search.aggregation if r.search.uses_prm else ""].append(r)
    for aggregation, group in groups.items():
        _score(group, prm if aggregation else None, aggregation or "model", decode)
    rows, global_ancestors, writes, moves = [], [], [], []
    for r in reqs:
        r.round += 1
        r.stats.steps += 1
        ancestors = PLANS[r.search.method](r)
        if ancestors is not None and ancestors != list(range(r.n)):
            global_ancestors += [len(rows) + a for a in ancestors]
            writes += [not r.particles[a].finished for a in ancestors]
            rows += r.rows
            moves.append((r, ancestors))
    if rows:  # one fork kernel per cache for every request's resampling
        for runner in runners:
            runner.fork(torch.tensor(rows), torch.tensor(global_ancestors), torch.tensor(writes))
    for r, ancestors in moves:
        r.reorder(ancestors)
        r.trace[-1].ancestors = ancestors
        r.stats.resamples += 1
        for i, a in enumerate(ancestors):
            r.particles[i].held = r.particles[i].held and i == a
    for r in reqs:
        for p in r.particles:
            if p.step_done and not p.finished and not p.held:
                p.step_starts.append(len(p.tokens))
                p.step_text, p.step_done = "", False
        if all(p.frozen for p in r.particles) and not r.done:
            if r.search.method == "particle_gibbs" and r.sweep + 1 < r.search.iterations:
                particle_gibbs.next_sweep(r, runners)
            elif r.search.method != "beam_search":
                r.done = True


def fork(runners: list[ModelRunner], dst: list[int], src: list[int]) -> None:
    """Row ``dst[i]`` becomes a copy of row ``src[i]`` in every cache (blocks shared, not copied)."""
    for runner in runners:
        runner.blocks.assign(torch.tensor(dst, dtype=torch.int64), torch.tensor(src, dtype=torch.int64))


def _score(group: list[RequestState], prm: PRM | None, aggregation: str, decode: Callable[[list[int]], str]) -> None:
    """Score the group's particles whose step just ended; weights and ESS per request."""
    ended: list[EndedStep] = []
    flags = []
    for r in group:
        for i, p in enumerate(r.particles):
            fresh = p.step_done and not p.frozen and not p.held
            flags.append(fresh)
            if fresh:
                pending = p.tokens[len(p.tokens) - p.prm_lag:]
                ended.append(EndedStep(r.rows[i], r.hidden[i], r.prompt_text, [decode(s) for s in p.steps()], p.node,
                                       pending))
                p.prm_lag = 0
    dev = group[0].running.device
    scored = torch.tensor(flags, dtype=torch.bool, device=dev)
    sizes = torch.tensor([r.n for r in group], device=dev)
    seg_starts = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), sizes.cumsum(0)])
    running = torch.cat([r.running for r in group])
    temperature = torch.cat([torch.full((r.n,), r.search.weight_temperature, device=dev) for r in group])
    head = getattr(prm, "head", None)
    hidden = torch.zeros(scored.numel(), group[0].hidden.shape[1], device=dev) if head is not None else None
    if hidden is not None and ended:
        hidden[scored] = _prm_output(prm, ended, aggregation).float()
    broken = hidden is not None and not bool(torch.isfinite(hidden).all())
    if hidden is not None and not broken:  # the fused head -> aggregate -> weights -> ESS path
        running, log_w, ess = score_particles(hidden, head, running, scored, seg_starts, aggregation, temperature)
    elif broken:  # a PRM produced NaN/inf: those particles read as p = 0 (weight ~0); the run goes on
        bad = ~torch.isfinite(hidden).all(1)
        log.warning("PRM produced non-finite hidden states for %d particle(s); they get weight 0", int(bad.sum()))
        step_logit = head_logit(hidden.nan_to_num(0.0, 0.0, 0.0), head).masked_fill(bad, -LOGIT_CLIP)
        running, log_w, ess = weigh(step_logit, running, scored, seg_starts, aggregation, temperature)
    else:
        step_logit = torch.zeros(scored.numel(), device=dev)
        if ended and prm is not None:
            step_logit[scored] = _prm_output(prm, ended, aggregation).to(dev)
        if prm is None:
            scored = scored & False
        running, log_w, ess = weigh(step_logit, running, scored, seg_starts, aggregation, temperature)
    probs = running_to_prob(running, aggregation)
    for j, r in enumerate(group):
        lo, hi = int(seg_starts[j]), int(seg_starts[j + 1])
        r.running, r.log_w = running[lo:hi], log_w[lo:hi]
        for i, p in enumerate(r.particles):
            if flags[lo + i]:
                p.step_running.append(float(r.running[i]))
                if r.search.method == "particle_gibbs":
                    p.step_hidden.append(r.hidden[i].clone())
                p.frozen = p.finished
        r.trace.append(StepTrace(tokens=[list(p.tokens) for p in r.particles], scored=scored[lo:hi].tolist(),
                                 scores=probs[lo:hi].tolist(), log_weights=r.log_w.tolist(), ess=float(ess[j]),
                                 sweep=r.sweep))


def _prm_output(prm: PRM, ended: list[EndedStep], aggregation: str) -> torch.Tensor:
    """Hidden states at the step ends (value head, Qwen-layout PRM) or step logits (others)."""
    if isinstance(prm, ModelPRM):
        return prm.score(ended, keep_tags=aggregation != "model")
    return prm.score(ended)
