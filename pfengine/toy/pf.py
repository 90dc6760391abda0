"""Where the bundled toy checkpoints live, how the engine reads their PRM, and engine requests for
toy problems."""
from __future__ import annotations

from pathlib import Path

from pfengine.config import PRMConfig, Request, SamplingParams, SearchParams
from pfengine.toy.task import MAX_OPS, Problem

CHECKPOINTS = Path(__file__).parent / "checkpoints"
POLICY = CHECKPOINTS / "policy"
VALUE_HEAD = POLICY / "value_head.safetensors"
PRM = CHECKPOINTS / "prm"
PRM_CONFIG = PRMConfig(likelihood="min")
"""The bundled PRM is a teacher that solves the task (``pfengine.toy.train.train_teacher``): a step
is as good as the least likely token the teacher sees written in it."""

SCALING_RESULTS = "bench/results/toy-scaling/"
"""Where the full sweep (budgets 1-64, 500 problems) and the distillation's Pareto plot are kept."""

DEMO_TEMPERATURE = 1.0
"""Policy sampling temperature of the demo's sampled methods: the policy's own distribution. This
PRM passes no wrong step, so the more varied the samples the more every PRM-guided method finds;
best-of-N gains least (README, "Budgets 1-64 on 500 problems")."""

MAX_STEPS = MAX_OPS + 2
"""A solution has at most 13 steps (12 operations + the answer); one more shows a run-on."""
MAX_STEP_TOKENS = 24
"""A step is at most 11 tokens."""


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
