"""The search method interface. At the end of every round (each particle's step ended and was
scored) the engine asks the request's method which particles continue, and when all particles are
frozen whether the request is done; at the end it asks for the candidates and how to choose among
them. Everything only one method needs (a reference trajectory, completed beams, histories) lives
on that method's object, one per request."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from pfengine.caches import Caches
from pfengine.config import SamplingParams, SearchParams
from pfengine.kernels.prm_score import running_to_prob
from pfengine.particles import ParticleTable, Phase, Snapshot

if TYPE_CHECKING:
    from pfengine.state import RequestState


@dataclass
class RoundContext:
    """What a method may touch: the particle table, both caches, the policy's per-row hidden state
    and logits (rows continue from them), and the LM head."""

    table: ParticleTable
    caches: Caches
    hidden: torch.Tensor
    logits: torch.Tensor
    lm_head: Callable[[torch.Tensor], torch.Tensor]


class SearchMethod:
    uses_prm = True
    selection: str | None = None
    """The method's own final selection (best-of-N: argmax, ...); None: ``SearchParams.selection``."""
    weighs_by_log_w = False
    """Candidates weigh by their normalised log-weights (particle methods) rather than by score."""
    extra_rows_needed = 0
    """Cache rows the method holds besides the particles and the prompt's root row."""
    sweep = 0

    def __init__(self, search: SearchParams) -> None:
        self.search = search
        self.extra_rows: list[int] = []

    @property
    def slots(self) -> int:
        """Particles alive at once."""
        return self.search.n_particles

    @property
    def rows_needed(self) -> int:
        return self.slots + 1 + self.extra_rows_needed

    @property
    def n_candidates(self) -> int:
        """How many final candidates the method returns."""
        return self.slots

    settled_text = True
    """A round's shared prefix of the surviving particles is final (beam search drops beams)."""

    def sampling(self, params: SamplingParams) -> SamplingParams:
        """The sampling the method runs with (greedy forces temperature 0)."""
        return params

    def start(self, r: RequestState, logits: torch.Tensor, hidden: torch.Tensor) -> None:
        """After the prompt's prefill; ``logits [1, V]`` / ``hidden [1, H]`` at its last token."""

    def before_round(self, r: RequestState, ctx: RoundContext) -> None:
        """Before the round's particles are scored."""

    def scored(self, r: RequestState, slots: list[int], ctx: RoundContext) -> None:
        """``slots`` were just scored (``r.aggregate`` holds their new aggregates)."""

    def plan(self, r: RequestState, ctx: RoundContext) -> list[int] | None:
        """Which particle each slot continues from (None: nobody moves)."""
        return None

    def reorder(self, ancestors: list[int]) -> None:
        """Slot ``i`` became a copy of slot ``ancestors[i]``: move the method's per-slot state."""

    def end_of_sweep(self, r: RequestState, ctx: RoundContext) -> bool:
        """Every particle is frozen: True when the request is done."""
        return True

    def final_slots(self, r: RequestState) -> list[int]:
        return list(range(r.n))

    def candidates(self, r: RequestState, ctx: RoundContext) -> tuple[list[Snapshot], torch.Tensor, torch.Tensor]:
        """The final particles, their aggregated PRM probabilities and normalised weights."""
        slots = self.final_slots(r)
        snapshots = [ctx.table.snapshot(int(r.rows[i])) for i in slots]
        probs = running_to_prob(r.aggregate[slots], self.search.aggregation)
        if self.weighs_by_log_w:
            weights = (r.log_w[slots] - torch.logsumexp(r.log_w[slots], 0)).exp()
        elif self.uses_prm:
            weights = probs / probs.sum()
        else:
            weights = torch.full((len(slots),), 1.0 / len(slots))
        return snapshots, probs, weights


def frozen(r: RequestState, ctx: RoundContext) -> torch.Tensor:
    return ctx.table.phase[r.rows] == Phase.FROZEN


def finished(r: RequestState, ctx: RoundContext) -> list[bool]:
    return (ctx.table.finish[r.rows] > 0).tolist()
