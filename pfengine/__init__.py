"""pfengine: particle filtering at inference time over one paged, copy-on-write KV cache."""
from pfengine.config import EngineConfig, PRMConfig, Request, SamplingParams, SearchParams
from pfengine.engine import Engine
from pfengine.state import ParticleResult, PFResult

__all__ = ["Engine", "EngineConfig", "PFResult", "PRMConfig", "ParticleResult", "Request", "SamplingParams",
           "SearchParams"]
