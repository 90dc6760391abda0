"""Where the bundled toy checkpoints live, and engine requests for toy problems."""
from __future__ import annotations

from pathlib import Path

from pfengine.toy.task import Problem

CHECKPOINTS = Path(__file__).parent / "checkpoints"
POLICY = CHECKPOINTS / "policy"
VALUE_HEAD = POLICY / "value_head.safetensors"
PRM = CHECKPOINTS / "prm"

MAX_STEPS = 10
"""A solution has at most 7 steps (6 operations + the answer)."""
MAX_STEP_TOKENS = 32
"""A step is at most ~16 tokens."""


def pf_request(problem: Problem | str, n_particles: int = 8, seed: int | None = 0, temperature: float = 0.8,
               max_steps: int = MAX_STEPS, max_step_tokens: int = MAX_STEP_TOKENS, **search):
    """A :class:`pfengine.Request` for one toy problem, as chat messages. ``search`` holds further
    search options (``aggregation``, ``resampling``, ...)."""
    import pfengine.config as C  # imported late: the package's own import stays light

    text = problem.text if isinstance(problem, Problem) else problem
    sampling = C.SamplingParams(temperature=temperature, seed=seed, max_steps=max_steps,
                                max_step_tokens=max_step_tokens, max_tokens=max_steps * max_step_tokens)
    messages = [{"role": "user", "content": text}]
    if hasattr(C, "SearchParams"):
        return C.Request(prompt=messages, sampling=sampling, search=C.SearchParams(n_particles=n_particles, **search))
    return C.Request(prompt=messages, sampling=sampling, pf=C.PFParams(n_particles=n_particles, **search))
