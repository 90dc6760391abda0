"""Where the bundled toy checkpoints live, and engine requests for toy problems."""
from __future__ import annotations

from pathlib import Path

from pfengine.config import Request, SamplingParams, SearchParams
from pfengine.toy.task import Problem

CHECKPOINTS = Path(__file__).parent / "checkpoints"
POLICY = CHECKPOINTS / "policy"
VALUE_HEAD = POLICY / "value_head.safetensors"
PRM = CHECKPOINTS / "prm"

DEMO_TEMPERATURE = 0.5
"""Policy sampling temperature of the demo's sampled methods. At 0.8 the policy's samples are right
62 % of the time against 70.5 % for greedy decoding, and this toy PRM's top score picks a wrong
sample too often for best-of-16 to beat greedy; from 0.3 to 0.5 it does (README, toy demo)."""

MAX_STEPS = 10
"""A solution has at most 7 steps (6 operations + the answer)."""
MAX_STEP_TOKENS = 32
"""A step is at most ~16 tokens."""


def is_bundled() -> bool:
    """True when the trained checkpoints are present (they are committed; a partial copy is not)."""
    return all((d / "config.json").is_file() for d in (POLICY, PRM)) and VALUE_HEAD.is_file()


def pf_request(problem: Problem | str, n_particles: int = 8, seed: int | None = 0, temperature: float = 0.8,
               max_steps: int = MAX_STEPS, max_step_tokens: int = MAX_STEP_TOKENS, **search) -> Request:
    """A request for one toy problem, as chat messages. ``search`` holds further :class:`SearchParams`
    fields (``method``, ``aggregation``, ``resampling``, ...)."""
    text = problem.text if isinstance(problem, Problem) else problem
    reference = str(problem.answer) if isinstance(problem, Problem) else None
    sampling = SamplingParams(temperature=temperature, seed=seed, max_steps=max_steps,
                              max_step_tokens=max_step_tokens, max_tokens=max_steps * max_step_tokens)
    return Request(prompt=[{"role": "user", "content": text}], sampling=sampling,
                   search=SearchParams(n_particles=n_particles, **search), reference_answer=reference)
