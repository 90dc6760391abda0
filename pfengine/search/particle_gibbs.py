"""Particle Gibbs: ``iterations`` sweeps of particle filtering; from the second sweep on, the last
slot holds a reference trajectory drawn from the previous sweep (conditional SMC).

At round t the reference slot is the reference cut after t steps, forked from the row holding the
whole reference (its blocks shared, not recomputed) with its own step-t weight. The free slots are
resampled from all particles, reference included; a free copy of the reference continues from its
prefix. (its_hub weighs the reference by its final weight at every round; we use its step-t weight.)
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from pfengine.kernels.prm_score import initial_running
from pfengine.particles import Snapshot
from pfengine.search.method import RoundContext, finished
from pfengine.search.particle_filter import ParticleFilter, plan

if TYPE_CHECKING:
    from pfengine.state import RequestState


class ParticleGibbs(ParticleFilter):
    extra_rows_needed = 1

    def __init__(self, search) -> None:
        super().__init__(search)
        self.ref: Snapshot | None = None
        self.ref_history: tuple[list[float], list[torch.Tensor]] = ([], [])
        self.history: list[tuple[list[float], list[torch.Tensor]]] = []
        """Per slot: the aggregate and the policy's hidden state after each scored step (a copy of
        the reference continues from any of its steps without a forward pass)."""

    @property
    def slots(self) -> int:
        return self.search.particles_per_sweep

    @property
    def ref_row(self) -> int:
        return self.extra_rows[0]

    def start(self, r: RequestState, logits: torch.Tensor, hidden: torch.Tensor) -> None:
        self.prompt_logits, self.prompt_hidden = logits, hidden
        self.history = [([], []) for _ in range(r.n)]

    def before_round(self, r: RequestState, ctx: RoundContext) -> None:
        if self.ref is not None:
            self.install_reference(r, ctx, r.round + 1)

    def scored(self, r: RequestState, slots: list[int], ctx: RoundContext) -> None:
        for i in slots:
            self.history[i][0].append(float(r.aggregate[i]))
            self.history[i][1].append(ctx.hidden[int(r.rows[i])].clone())

    def plan(self, r: RequestState, ctx: RoundContext) -> list[int] | None:
        free = list(range(r.n - 1)) if self.ref is not None else None
        return plan(r, finished(r, ctx), destinations=free)

    def reorder(self, ancestors: list[int]) -> None:
        self.history = [(list(self.history[a][0]), list(self.history[a][1])) for a in ancestors]

    def install_reference(self, r: RequestState, ctx: RoundContext, n_steps: int) -> None:
        """Put the reference's first ``n_steps`` steps in the last slot, in every cache."""
        slot, row = r.n - 1, int(r.rows[-1])
        prefix = self.ref.prefix(n_steps)
        kept = min(n_steps, len(self.ref.step_starts))
        ctx.caches.assign([row], [self.ref_row])
        tags = len(prefix.step_starts) if self.search.aggregation != "model" and prefix.tokens else 0
        length = len(r.prompt_ids) + len(prefix.tokens)
        ctx.caches.truncate_to(row, length, tags)
        ctx.table.hold(row, prefix, int(ctx.table.new_nodes(1)))  # a node no sampled sibling shares
        running, hidden = self.ref_history[0][:kept], self.ref_history[1][:kept]
        self.history[slot] = (list(running), list(hidden))
        if hidden:
            ctx.hidden[row] = hidden[-1]
            ctx.logits[row] = ctx.lm_head(hidden[-1][None])[0]
            r.aggregate[slot] = running[-1]

    def end_of_sweep(self, r: RequestState, ctx: RoundContext) -> bool:
        """Draw the reference from the finished sweep by weight; restart the other slots from the
        prompt. Done after the last sweep."""
        if self.sweep + 1 >= self.search.iterations:
            return True
        k = int(torch.multinomial(r.log_w.exp().double(), 1, generator=r.generator))
        ctx.caches.assign([self.ref_row], [int(r.rows[k])])
        self.ref, self.ref_history = ctx.table.snapshot(int(r.rows[k])), self.history[k]
        ctx.caches.assign(r.rows, [r.root_row] * r.n)
        ctx.table.start(r.rows[:-1])
        ctx.table.hold(int(r.rows[-1]), Snapshot([], [0], 0), int(ctx.table.new_nodes(1)))
        self.history = [([], []) for _ in range(r.n)]
        r.aggregate = initial_running(r.n, self.search.aggregation, r.aggregate.device)
        r.log_w = torch.full((r.n,), -math.log(r.n), device=r.log_w.device)
        ctx.hidden[r.rows] = self.prompt_hidden.to(ctx.hidden.dtype)
        ctx.logits[r.rows] = self.prompt_logits.to(ctx.logits.dtype)
        self.sweep += 1
        r.round = 0
        return False
