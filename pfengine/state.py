"""Live state of requests and their particles, and the results handed back."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from pfengine.config import Request


@dataclass
class Particle:
    tokens: list[int] = field(default_factory=list)
    """Generated tokens (the prompt is not included)."""
    step_starts: list[int] = field(default_factory=lambda: [0])
    """Index into ``tokens`` where each step begins; the last entry is the current step."""
    step_text: str = ""
    """Per-token decoded text of the current step, for delimiter detection."""
    step_done: bool = False
    finished: bool = False
    frozen: bool = False
    """Finished and scored: keeps its weight, never extended again."""
    node: int = 0
    """Identity of the token sequence: particles with equal ``node`` hold identical tokens (forks of
    each other that sampled the same tokens), so only one of them is forwarded."""

    def copy(self) -> Particle:
        return replace(self, tokens=list(self.tokens), step_starts=list(self.step_starts))

    def steps(self) -> list[list[int]]:
        ends = self.step_starts[1:] + [len(self.tokens)]
        return [self.tokens[s:e] for s, e in zip(self.step_starts, ends) if e > s]


@dataclass
class StepTrace:
    """One resampling round of one request, as it happened."""

    tokens: list[list[int]]
    """Each particle's generated tokens at the end of the round (before resampling)."""
    scored: list[bool]
    scores: list[float]
    """Aggregated PRM probability r of each particle after this round's scoring."""
    log_weights: list[float]
    ess: float
    ancestors: list[int] | None
    """``ancestors[i]``: which particle the new particle ``i`` was forked from; None = no resampling."""


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
    score: float
    """Aggregated PRM probability r (weight before normalisation is logit(r) / T)."""
    finished: bool


@dataclass
class PFResult:
    answer: str
    best: int
    particles: list[ParticleResult]
    trace: list[StepTrace]
    stats: RequestStats


@dataclass
class RequestState:
    id: int
    request: Request
    prompt_ids: list[int]
    prompt_text: str
    seed: int
    rows: list[int] = field(default_factory=list)
    generator: torch.Generator = field(init=False)
    particles: list[Particle] = field(default_factory=list)
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    running: torch.Tensor | None = None
    log_w: torch.Tensor | None = None
    trace: list[StepTrace] = field(default_factory=list)
    stats: RequestStats = field(default_factory=RequestStats)
    started: float = 0.0

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def restart(self) -> None:
        """Back to the state before admission (after a preemption): same seed, same future."""
        self.rows, self.particles, self.trace = [], [], []
        self.logits = self.hidden = self.running = self.log_w = None
        self.stats = RequestStats()
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def n(self) -> int:
        return len(self.rows)

    def reorder(self, ancestors: list[int]) -> None:
        """Particle ``i`` becomes a copy of particle ``ancestors[i]`` (the caches fork separately)."""
        idx = torch.tensor(ancestors)
        self.particles = [self.particles[a].copy() for a in ancestors]
        self.logits, self.hidden = self.logits[idx], self.hidden[idx]
        self.running, self.log_w = self.running[idx], self.log_w[idx]
