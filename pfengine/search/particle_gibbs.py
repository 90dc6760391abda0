"""Particle Gibbs: ``iterations`` sweeps of particle filtering; from the second sweep on, the last
slot holds a reference trajectory drawn from the previous sweep (conditional SMC).

At round t the reference slot is the reference cut after t steps, forked from the row holding the
whole reference (its blocks shared, not recomputed) with its own step-t weight. The free slots are
resampled from all particles, reference included; a free copy of the reference continues from its
prefix. (its_hub weighs the reference by its final weight at every round; we use its step-t weight.)
"""
from __future__ import annotations

import torch

from pfengine.runner import ModelRunner
from pfengine.search import particle_filter
from pfengine.state import Particle, RequestState


def plan(r: RequestState) -> list[int] | None:
    free = list(range(r.n - 1)) if r.ref is not None else None
    return particle_filter.plan(r, destinations=free)


def install_reference(r: RequestState, runners: list[ModelRunner], n_steps: int) -> None:
    """Put the reference's first ``n_steps`` steps in the last slot, in every cache."""
    from pfengine.search.round import fork

    slot, row = r.n - 1, r.rows[-1]
    prefix = r.ref.prefix(n_steps)
    fork(runners, [row], [r.ref_row])
    tags = len(prefix.step_starts) if r.search.aggregation != "model" and len(prefix.tokens) else 0
    for k, runner in enumerate(runners):
        target = len(r.prompt_ids) + len(prefix.tokens) + (tags if k > 0 else 0)
        runner.blocks.truncate(torch.tensor([row]), int(runner.blocks.lens[row]) - target)
    prefix.held, prefix.frozen = True, prefix.finished
    prefix.node = -(r.id * 1000 + n_steps) - 1  # unique: never merged with a sampled sibling
    r.particles[slot] = prefix
    if prefix.step_hidden:
        r.hidden[slot] = prefix.step_hidden[-1]
        r.logits[slot] = runners[0].decoder.logits(prefix.step_hidden[-1][None])[0]
        r.running[slot] = prefix.step_running[-1]


def next_sweep(r: RequestState, runners: list[ModelRunner]) -> None:
    """Draw the reference from the finished sweep by weight; restart the other slots from the prompt."""
    from pfengine.search.round import fork, reset_weights

    k = int(torch.multinomial(r.log_w.exp().double(), 1, generator=r.generator))
    fork(runners, [r.ref_row], [r.rows[k]])
    r.ref = r.particles[k].copy()
    fork(runners, r.rows, [r.root_row] * r.n)
    n = r.n
    r.particles = [Particle() for _ in range(n)]
    r.particles[-1] = Particle(held=True, step_done=True, node=-1)
    reset_weights(r, r.prompt_logits, r.prompt_hidden)
    r.sweep += 1
    r.round = 0
