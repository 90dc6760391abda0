"""Search methods on the engine: each :data:`METHODS` entry implements
:class:`~pfengine.search.method.SearchMethod` once."""
from __future__ import annotations

from pfengine.config import SearchParams
from pfengine.search.beam import DVTS, BeamSearch
from pfengine.search.independent import BestOfN, Greedy, SelfConsistency, WeightedBestOfN
from pfengine.search.method import SearchMethod
from pfengine.search.parallel_tempering import ParallelTempering
from pfengine.search.particle_filter import ParticleFilter
from pfengine.search.particle_gibbs import ParticleGibbs

METHODS: dict[str, type[SearchMethod]] = {
    "particle_filter": ParticleFilter, "particle_gibbs": ParticleGibbs, "parallel_tempering": ParallelTempering,
    "greedy": Greedy, "best_of_n": BestOfN, "weighted_best_of_n": WeightedBestOfN,
    "self_consistency": SelfConsistency, "beam_search": BeamSearch, "dvts": DVTS,
}


def make_method(search: SearchParams) -> SearchMethod:
    return METHODS[search.method](search)
