"""pfengine: particle filtering at inference time over one paged, copy-on-write KV cache."""
from pfengine.config import EngineConfig, PFParams, Request, SamplingParams
from pfengine.engine import Engine
from pfengine.state import ParticleResult, PFResult

__all__ = ["Engine", "EngineConfig", "PFParams", "PFResult", "ParticleResult", "Request", "SamplingParams"]
