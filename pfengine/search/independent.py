"""Independent samples, never forked: greedy, best-of-N, weighted best-of-N, self-consistency."""
from __future__ import annotations

from dataclasses import replace

from pfengine.config import SamplingParams
from pfengine.search.method import SearchMethod


class Greedy(SearchMethod):
    uses_prm = False
    selection = "argmax"

    def sampling(self, params: SamplingParams) -> SamplingParams:
        return params if params.greedy else replace(params, temperature=0.0)


class BestOfN(SearchMethod):
    """The sample with the highest score (the last step's, by aggregation)."""

    selection = "argmax"


class WeightedBestOfN(SearchMethod):
    """The answer with the largest summed score."""

    selection = "vote"


class SelfConsistency(SearchMethod):
    """The most frequent answer (no PRM)."""

    uses_prm = False
    selection = "vote"
