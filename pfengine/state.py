"""What a request is while it runs, and what it hands back: rounds, results, events."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pfengine.config import Request, SearchParams
from pfengine.particles import FINISH_REASONS

if TYPE_CHECKING:
    from pfengine.search.method import SearchMethod

__all__ = ["FINISH_REASONS", "RequestState", "StepTrace", "RequestStats", "ParticleResult", "PFResult", "Event"]


@dataclass
class StepTrace:
    """One round of one request, as it happened."""

    tokens: list[list[int]]
    """Each particle's generated tokens at the end of the round (before resampling)."""
    scored: list[bool]
    scores: list[float]
    """Aggregated PRM probability r of each particle after this round's scoring (0.5 without a PRM)."""
    log_weights: list[float]
    ess: float
    ancestors: list[int] | None = None
    """``ancestors[i]``: the particle that new particle ``i`` was forked from; None = no fork."""
    sweep: int = 0


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    resamples: int = 0
    seconds: float = 0.0


@dataclass
class ParticleResult:
    text: str
    token_ids: list[int]
    steps: list[str]
    step_starts: list[int]
    """Index into ``token_ids`` where each step begins."""
    weight: float
    """Normalised selection weight (PF: softmax of tempered log-weights)."""
    score: float
    """Aggregated PRM probability r."""
    finish_reason: str
    """``eos`` (the model ended its solution) or the limit that cut it off (see ``FINISH_REASONS``)."""
    answer: str | None
    """Canonical extracted answer (the last ``\\boxed{}``, else the last number); None if it has none."""

    @property
    def cut_off(self) -> bool:
        """Stopped by a limit rather than by the model."""
        return self.finish_reason != "eos"


@dataclass
class PFResult:
    answer: str | None
    """The chosen particle's extracted, canonical answer (``particles[best].answer``)."""
    text: str
    """The chosen particle's whole text."""
    best: int
    particles: list[ParticleResult]
    trace: list[StepTrace]
    stats: RequestStats
    method: str = "particle_filter"
    expected_accuracy: float | None = None
    """sum_i w_i * [answer_i == reference] when the request gave a reference answer."""


@dataclass
class Event:
    """What a request did in one engine step: a finished round (``trace``), its final ``result``,
    or the ``error`` that ended it."""

    request_id: int
    trace: StepTrace | None
    result: PFResult | None = None
    error: Exception | None = None


@dataclass
class RequestState:
    """One admitted (or waiting) request. Its particles live in the engine's
    :class:`~pfengine.particles.ParticleTable` at ``rows``; what only one search method needs lives
    in ``method``."""

    id: int
    request: Request
    prompt_ids: list[int]
    prompt_text: str
    seed: int
    method: SearchMethod
    rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    """One cache row per particle slot."""
    root_row: int = -1
    """Holds the prompt for the request's lifetime (particle Gibbs sweeps restart from it)."""
    generator: torch.Generator = field(init=False)
    aggregate: torch.Tensor | None = None
    """Each particle's running PRM aggregate (logit r, or sum log p for ``prod``)."""
    log_w: torch.Tensor | None = None
    """Normalised log-weights."""
    growing: int = 0
    """Particles still mid-step in the current round."""
    trace: list[StepTrace] = field(default_factory=list)
    round: int = 0
    """Rounds finished in the current sweep."""
    done: bool = False
    overtaken: int = 0
    """Times a later request was admitted while this one waited (see the scheduler's policy)."""
    stats: RequestStats = field(default_factory=RequestStats)
    started: float = 0.0

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def search(self) -> SearchParams:
        return self.request.search

    @property
    def n(self) -> int:
        return self.rows.numel()

    @property
    def all_rows(self) -> list[int]:
        return self.rows.tolist() + [self.root_row] + self.method.extra_rows

    def restart(self) -> None:
        """Back to the state before admission (after a preemption): same seed, same future."""
        fresh = RequestState(self.id, self.request, self.prompt_ids, self.prompt_text, self.seed,
                             type(self.method)(self.search))
        self.__dict__.update(fresh.__dict__)
