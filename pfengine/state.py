"""Live state of requests and their particles, and the results handed back."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from pfengine.config import Request, SearchParams


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
    held: bool = False
    """A particle Gibbs reference prefix: not decoded, not scored; its next step is fixed."""
    prm_lag: int = 0
    """Trailing ``tokens`` the PRM model's cache has not read yet: it reads a step's tokens in one
    extend when the step ends (or earlier, when a sibling forks from this particle mid-step)."""
    node: int = 0
    """Identity of the token sequence: particles with equal ``node`` hold identical tokens (forks of
    each other that sampled the same tokens), so only one of them is forwarded."""
    step_running: list[float] = field(default_factory=list)
    """The running PRM aggregate after each scored step."""
    step_hidden: list[torch.Tensor] = field(default_factory=list)
    """Hidden state at each step end (kept for particle Gibbs references: their copies continue
    from any step without a forward pass)."""

    def copy(self) -> Particle:
        return replace(self, tokens=list(self.tokens), step_starts=list(self.step_starts),
                       step_running=list(self.step_running), step_hidden=list(self.step_hidden))

    def steps(self) -> list[list[int]]:
        ends = self.step_starts[1:] + [len(self.tokens)]
        return [self.tokens[s:e] for s, e in zip(self.step_starts, ends) if e > s]

    def prefix(self, n_steps: int) -> Particle:
        """This particle cut after its first ``n_steps`` steps (as a reference prefix)."""
        n_steps = min(n_steps, len(self.step_starts))
        end = self.step_starts[n_steps] if n_steps < len(self.step_starts) else len(self.tokens)
        return Particle(tokens=self.tokens[:end], step_starts=self.step_starts[:max(n_steps, 1)],
                        step_done=True, finished=self.finished and n_steps == len(self.step_starts),
                        step_running=self.step_running[:n_steps], step_hidden=self.step_hidden[:n_steps])


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
    finished: bool
    answer: str | None
    """Canonical extracted answer (``\\boxed{}`` or last number)."""


@dataclass
class PFResult:
    answer: str
    """The chosen particle's text."""
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
class Completed:
    """A beam that finished and left the pool, with its aggregated score (logit or sum-log for prod)."""

    particle: Particle
    running: float


@dataclass
class RequestState:
    id: int
    request: Request
    prompt_ids: list[int]
    prompt_text: str
    seed: int
    rows: list[int] = field(default_factory=list)
    """One cache row per particle slot."""
    root_row: int = -1
    """Holds the prompt for the request's lifetime (particle Gibbs sweeps restart from it)."""
    ref_row: int = -1
    """Particle Gibbs: holds the whole reference trajectory."""
    generator: torch.Generator = field(init=False)
    particles: list[Particle] = field(default_factory=list)
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    prompt_logits: torch.Tensor | None = None
    prompt_hidden: torch.Tensor | None = None
    running: torch.Tensor | None = None
    log_w: torch.Tensor | None = None
    trace: list[StepTrace] = field(default_factory=list)
    completed: list[Completed] = field(default_factory=list)
    ref: Particle | None = None
    sweep: int = 0
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
        return len(self.rows)

    @property
    def all_rows(self) -> list[int]:
        return self.rows + [self.root_row] + ([self.ref_row] if self.ref_row >= 0 else [])

    def restart(self) -> None:
        """Back to the state before admission (after a preemption): same seed, same future."""
        fresh = RequestState(self.id, self.request, self.prompt_ids, self.prompt_text, self.seed)
        self.__dict__.update(fresh.__dict__)

    def reorder(self, ancestors: list[int]) -> None:
        """Particle ``i`` becomes a copy of particle ``ancestors[i]`` (the caches fork separately)."""
        idx = torch.tensor(ancestors, device=self.logits.device)
        self.particles = [self.particles[a].copy() for a in ancestors]
        self.logits, self.hidden = self.logits[idx], self.hidden[idx]
        self.running, self.log_w = self.running[idx], self.log_w[idx]
