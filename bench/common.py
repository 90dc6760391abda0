"""Helpers shared by every system of the benchmark, standard library + numpy only (bench/vllm_pf.py
imports this module from the vLLM venv, which has neither pfengine nor its dependencies).

The PF loop in :func:`run_pf` is the one the hand-written peers (transformers, vLLM offline) share:
every step extends every particle of every prompt by exactly ``L`` tokens, the PRM scores the whole
prefix (``model`` aggregation: one step tag after the last step), weights = softmax(logit(r)),
systematic resampling with a seeded generator."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

P_CLIP = 1e-7
NEVER_DELIMITER = "\x00\x00pfbench:no-step-delimiter\x00\x00"
"""A step delimiter no model emits: every step ends at exactly ``max_step_tokens`` tokens."""


def distinct_prefixes(prompt_len: int, sequences: list[list[int]]) -> int:
    """Tokens in the union of all particles' distinct prefixes of one request (a trie's node count):
    the least any system must forward to produce these sequences."""
    return prompt_len + len({tuple(s[:k]) for s in sequences for k in range(1, len(s) + 1)})


def logit(p: float) -> float:
    p = min(max(p, P_CLIP), 1 - P_CLIP)
    return math.log(p / (1 - p))


def systematic(weights: np.ndarray, rng: np.random.Generator) -> list[int]:
    """Ancestor of each new particle: slot i takes j with cum[j-1] <= (i+u)/N < cum[j]."""
    n = len(weights)
    cum = np.cumsum(weights / weights.sum())
    cum[-1] = 1.0
    positions = (np.arange(n) + rng.uniform()) / n
    return np.searchsorted(cum, positions, side="right").tolist()


@dataclass
class PFTrace:
    """What a PF run did, per prompt: every particle's generated ids at the end of each step."""

    prompt_ids: list[list[int]]
    steps: list[list[list[list[int]]]] = field(default_factory=list)
    """``steps[p][k]``: the generated ids of prompt p's particles after step k (before resampling)."""

    def union(self) -> int:
        return sum(distinct_prefixes(len(ids), [s for step in per_prompt for s in step])
                   for ids, per_prompt in zip(self.prompt_ids, self.steps))

    def generated(self) -> int:
        """Tokens sampled: each step's new tokens of every particle."""
        total = 0
        for per_prompt in self.steps:
            prev = None
            for step in per_prompt:
                total += sum(len(s) for s in step) - (0 if prev is None else sum(len(s) for s in prev))
                prev = step
        return total


def run_pf(prompt_ids: list[list[int]], n: int, steps: int, step_tokens: int, seed: int,
           extend: Callable[[list[list[int]]], list[list[int]]],
           score: Callable[[list[list[int]]], list[float]],
           timings: dict[str, float] | None = None) -> PFTrace:
    """Particle filtering over token ids for all prompts at once.

    ``extend(seqs)`` gets the full id sequences (prompt + generated) of every live particle and
    returns exactly ``step_tokens`` new ids for each; ``score(seqs)`` returns the PRM probability of
    each full sequence. Every step is one ``extend`` call and one ``score`` call for all particles of
    all prompts."""
    rngs = [np.random.default_rng([seed, p]) for p in range(len(prompt_ids))]
    particles = [[[] for _ in range(n)] for _ in prompt_ids]
    trace = PFTrace(prompt_ids=[list(p) for p in prompt_ids], steps=[[] for _ in prompt_ids])
    t = timings if timings is not None else {}
    for _ in range(steps):
        seqs = [prompt_ids[p] + particles[p][i] for p in range(len(prompt_ids)) for i in range(n)]
        t0 = time.perf_counter()
        new = extend(seqs)
        t1 = time.perf_counter()
        assert len(new) == len(seqs) and all(len(x) == step_tokens for x in new), \
            f"a step must add exactly {step_tokens} tokens to every particle, got {sorted({len(x) for x in new})}"
        for k, x in enumerate(new):
            particles[k // n][k % n] = particles[k // n][k % n] + list(x)
        probs = score([prompt_ids[p] + particles[p][i] for p in range(len(prompt_ids)) for i in range(n)])
        t2 = time.perf_counter()
        for p in range(len(prompt_ids)):
            trace.steps[p].append([list(x) for x in particles[p]])
            log_w = np.array([logit(probs[p * n + i]) for i in range(n)])
            w = np.exp(log_w - log_w.max())
            ancestors = systematic(w, rngs[p])
            particles[p] = [particles[p][a] for a in ancestors]
        t3 = time.perf_counter()
        t["generate_s"] = t.get("generate_s", 0.0) + t1 - t0
        t["prm_s"] = t.get("prm_s", 0.0) + t2 - t1
        t["resample_s"] = t.get("resample_s", 0.0) + t3 - t2
    return trace


def peak_rss_mb() -> float:
    """Peak resident set of this process (MB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
