"""Particle filtering semantics against its_hub's ParticleFiltering (the reference implementation
people run today), with a mock LM and PRM that produce fixed steps and scores.

Where the two differ on purpose (and how the test compares like with like):
- its_hub resamples once more after every particle has stopped, then takes the argmax of the
  resampled set (so it can lose its best particle); pfengine keeps the final set as the paper does.
  The test applies that extra multinomial draw on pfengine's side before the argmax.
- its_hub's ParticleFiltering ignores ``resampling_method`` (it is not passed through; multinomial
  always), so only multinomial resampling is compared.
"""
import asyncio
import random
from collections import Counter

import numpy as np
import pytest
import torch

pytest.importorskip("its_hub")
from its_hub.algorithms import ParticleFiltering  # noqa: E402
from its_hub.core.lms.step_generation import StepGeneration  # noqa: E402
from its_hub.api.reward_models.prm import AbstractProcessRewardModel  # noqa: E402

from pfengine.config import Request, SearchParams  # noqa: E402
from pfengine.kernels.prm_score import LOGIT_CLIP, initial_running, weigh  # noqa: E402
from pfengine.search.particle_filter import ParticleFilter, draw, plan  # noqa: E402
from pfengine.state import RequestState  # noqa: E402

STEPS, PROBS = ["A", "B", "C"], [0.5, 0.3, 0.2]
VALUE = {"A": -0.6, "B": 0.7, "C": 1.4}
N, N_STEPS, RUNS = 4, 3, 3000


def prm_score(path: list[str]) -> float:
    """A fixed score per path: later steps count more, so resampling matters at every round."""
    x = sum(VALUE[s] * (k + 1) for k, s in enumerate(path)) / 3
    return float(1 / (1 + np.exp(-x)))


class MockSteps(StepGeneration):
    def __init__(self) -> None:
        super().__init__(max_steps=N_STEPS, step_token="|")

    async def aforward(self, lm, prompts, steps_so_far=None, tools=None, tool_choice=None):
        out = []
        for steps in steps_so_far:
            step = random.choices(STEPS, PROBS)[0]
            out.append((step, len(steps) + 1 >= N_STEPS))
        return out


class MockPRM(AbstractProcessRewardModel):
    def score(self, prompt, response):
        return asyncio.run(self.ascore(prompt, response))

    async def ascore(self, prompt, response):
        return [prm_score(r.split("|")) for r in response]


def its_hub_selected(seed: int) -> str:
    random.seed(seed)
    np.random.seed(seed)
    pf = ParticleFiltering(MockSteps(), MockPRM())
    result = pf.infer(None, "q", budget=N, return_response_only=False)
    return result.responses[result.selected_index]["content"]


def pfengine_selected(seed: int) -> str:
    """pfengine's PF round logic (weigh -> plan -> reorder) driven by the same mock."""
    rng = random.Random(seed)
    search = SearchParams(n_particles=N, resampling="multinomial")
    r = RequestState(0, Request(prompt="q", search=search), [], "", seed=seed, method=ParticleFilter(search),
                     rows=torch.arange(N))
    done = [False] * N
    paths: list[list[str]] = [[] for _ in range(N)]
    r.aggregate = initial_running(N, "model")
    seg = torch.tensor([0, N])
    while not all(done):
        step_logit = torch.zeros(N)
        scored = torch.tensor([not d for d in done])
        for i in range(N):
            if not done[i]:
                paths[i].append(rng.choices(STEPS, PROBS)[0])
                done[i] = len(paths[i]) >= N_STEPS
                s = min(max(prm_score(paths[i]), 1e-7), 1 - 1e-7)
                step_logit[i] = float(np.clip(np.log(s / (1 - s)), -LOGIT_CLIP, LOGIT_CLIP))
        r.aggregate, r.log_w, _ = weigh(step_logit, r.aggregate, scored, seg, "model", 1.0)
        ancestors = plan(r, done)
        if ancestors is not None:
            done = [done[a] for a in ancestors]
            paths = [list(paths[a]) for a in ancestors]
            r.aggregate, r.log_w = r.aggregate[ancestors], r.log_w[ancestors]
    final = draw(r.log_w.exp(), N, "multinomial", r.generator)  # its_hub's extra resampling
    best = max(final, key=lambda i: float(r.log_w[i]))
    return "|".join(paths[best])


def chi2_homogeneity_pvalue(a: Counter, b: Counter, min_count: int = 10) -> float:
    keys = sorted(set(a) | set(b))
    rows = np.array([[a[k] for k in keys], [b[k] for k in keys]], dtype=float)
    small = rows.sum(0) < min_count
    if small.any():
        rows = np.concatenate([rows[:, ~small], rows[:, small].sum(1, keepdims=True)], axis=1)
    expected = rows.sum(1, keepdims=True) * rows.sum(0, keepdims=True) / rows.sum()
    stat = float(((rows - expected) ** 2 / expected).sum())
    dof = rows.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.slow
def test_selected_particle_distribution_matches_its_hub():
    ours = Counter(pfengine_selected(s) for s in range(RUNS))
    theirs = Counter(its_hub_selected(s) for s in range(RUNS))
    p = chi2_homogeneity_pvalue(ours, theirs)
    assert p > 0.001, f"chi2 p={p:.2g}: ours {ours.most_common(5)} vs its_hub {theirs.most_common(5)}"
    # and the test has power: a PF that ignores the weights is told apart
    uniform = Counter("|".join(random.Random(s).choices(STEPS, PROBS, k=N_STEPS)) for s in range(RUNS))
    assert chi2_homogeneity_pvalue(uniform, theirs) < 1e-6
