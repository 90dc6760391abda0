"""End of a PF round: score the particles whose step ended -> weigh -> resample -> fork the caches."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch

from pfengine.kernels.prm_score import initial_running, running_to_prob, score_particles, weigh
from pfengine.kernels.resample import resample
from pfengine.prm import CallablePRM, EndedStep, ModelPRM, ValueHeadPRM
from pfengine.runner import ModelRunner
from pfengine.state import Particle, RequestState, StepTrace

PRM = ValueHeadPRM | ModelPRM | CallablePRM


def start_particles(req: RequestState, logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """After the prompt's prefill: N particles that share the prompt's last logits."""
    n = req.n
    req.particles = [Particle() for _ in range(n)]
    req.logits, req.hidden = logits.expand(n, -1).clone(), hidden.expand(n, -1).clone()
    req.running = initial_running(n, req.request.pf.aggregation)
    req.log_w = torch.full((n,), -torch.log(torch.tensor(float(n))).item())


def finish_round(reqs: list[RequestState], prm: PRM, runners: list[ModelRunner],
                 decode: Callable[[list[int]], str]) -> None:
    """Every request in ``reqs`` has no particle mid-step. Requests that share aggregation and
    resampling method are scored, weighed, resampled and forked together."""
    groups: dict[tuple[str, str], list[RequestState]] = defaultdict(list)
    for r in reqs:
        groups[(r.request.pf.aggregation, r.request.pf.resampling)].append(r)
    for (aggregation, method), group in groups.items():
        _score_group(group, prm, aggregation, decode)
        _resample_group([r for r in group if not all(p.finished for p in r.particles)], method, runners)
        for r in group:
            for p in r.particles:
                if p.step_done and not p.finished:
                    p.step_starts.append(len(p.tokens))
                    p.step_text, p.step_done = "", False


def _score_group(group: list[RequestState], prm: PRM, aggregation: str, decode: Callable[[list[int]], str]) -> None:
    ended: list[EndedStep] = []
    scored = torch.cat([torch.tensor([p.step_done and not p.frozen for p in r.particles]) for r in group])
    for r in group:
        for i, p in enumerate(r.particles):
            if p.step_done and not p.frozen:
                ended.append(EndedStep(r.rows[i], r.hidden[i], r.prompt_text, [decode(s) for s in p.steps()], p.node))
                p.frozen = p.finished
    sizes = torch.tensor([r.n for r in group])
    seg_starts = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    running = torch.cat([r.running for r in group])
    temperature = torch.cat([torch.full((r.n,), r.request.pf.weight_temperature) for r in group])
    if isinstance(prm, CallablePRM):
        step_logit = torch.zeros(scored.numel())
        step_logit[scored] = prm.score(ended) if ended else step_logit[:0]
        running, log_w, ess = weigh(step_logit, running, scored, seg_starts, aggregation, temperature)
    else:
        hidden = torch.zeros(scored.numel(), group[0].hidden.shape[1])
        if ended:
            h, head = prm.score(ended, keep_tags=aggregation != "model") if isinstance(prm, ModelPRM) else prm.score(ended)
            hidden[scored] = h.float()
        else:
            head = prm.head if isinstance(prm, ValueHeadPRM) else prm.runner.decoder.prm_head
        running, log_w, ess = score_particles(hidden, head, running, scored, seg_starts, aggregation, temperature)
    probs = running_to_prob(running, aggregation)
    for k, r in enumerate(group):
        lo, hi = int(seg_starts[k]), int(seg_starts[k + 1])
        r.running, r.log_w = running[lo:hi], log_w[lo:hi]
        r.stats.steps += 1
        r.trace.append(StepTrace(tokens=[list(p.tokens) for p in r.particles], scored=scored[lo:hi].tolist(),
                                 scores=probs[lo:hi].tolist(), log_weights=r.log_w.tolist(),
                                 ess=float(ess[k]), ancestors=None))


def _resample_group(group: list[RequestState], method: str, runners: list[ModelRunner]) -> None:
    if not group:
        return
    sizes = torch.tensor([r.n for r in group])
    seg_starts = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    weights = torch.cat([r.log_w for r in group]).exp()
    uniforms = torch.cat([torch.rand(r.n, generator=r.generator) for r in group])
    ancestors = resample(weights, seg_starts, uniforms, method)
    rows = torch.tensor([row for r in group for row in r.rows])
    for runner in runners:
        runner.blocks.assign(rows, rows[ancestors])
    for k, r in enumerate(group):
        local = (ancestors[seg_starts[k]:seg_starts[k + 1]] - seg_starts[k]).tolist()
        r.reorder(local)
        r.trace[-1].ancestors = local
        r.stats.resamples += 1
