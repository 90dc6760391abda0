"""pfengine: particle filtering at inference time over one paged, copy-on-write KV cache.

The public names are imported on first use, so ``import pfengine.cli`` (``pfengine --help``) does
not wait for torch."""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pfengine.config import EngineConfig, PRMConfig, Request, SamplingParams, SearchParams
    from pfengine.engine import Engine
    from pfengine.state import ParticleResult, PFResult

_EXPORTS = {"EngineConfig": "pfengine.config", "PRMConfig": "pfengine.config", "Request": "pfengine.config",
            "SamplingParams": "pfengine.config", "SearchParams": "pfengine.config", "Engine": "pfengine.engine",
            "ParticleResult": "pfengine.state", "PFResult": "pfengine.state"}

__all__ = ["Engine", "EngineConfig", "PFResult", "PRMConfig", "ParticleResult", "Request", "SamplingParams",
           "SearchParams"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pfengine' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
