"""Every user-facing option in one place: engine, sampling and particle-filter parameters."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AGGREGATIONS = ("model", "last", "prod", "min")
RESAMPLING = ("systematic", "multinomial")


@dataclass
class EngineConfig:
    """How the engine is built: which checkpoints, how big the paged KV cache is."""

    model: str
    prm: str | None = None
    """A PRM directory (Qwen2.5-Math-PRM layout) or a value-head ``.safetensors`` file for the policy.
    ``None`` means the PRM is a Python callable given to :class:`pfengine.Engine`."""
    block_size: int = 16
    num_blocks: int = 4096
    """KV blocks per cache (policy and PRM each get this many)."""
    kv_dtype: str = "float32"
    max_particles: int = 1024
    """Rows of the block tables: the most particles (of all requests) alive at once."""
    max_model_len: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        _check(self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
               f"block_size must be a positive power of two, got {self.block_size}")
        _check(self.num_blocks > 0, f"num_blocks must be positive, got {self.num_blocks}")
        _check(self.max_particles > 0, f"max_particles must be positive, got {self.max_particles}")
        _check(self.kv_dtype in KV_DTYPES, f"kv_dtype must be one of {sorted(KV_DTYPES)}, got {self.kv_dtype!r}")


@dataclass
class SamplingParams:
    """Token sampling within a step. ``temperature=0`` is greedy."""

    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    seed: int | None = None
    max_step_tokens: int = 256
    """A step is cut after this many tokens even without the delimiter."""
    max_steps: int = 40
    max_tokens: int = 2048
    """Cap on generated tokens per particle."""
    step_delimiter: str = "\n\n"
    stop_on_eos: bool = True

    def __post_init__(self) -> None:
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        for name in ("max_step_tokens", "max_steps", "max_tokens"):
            _check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        _check(len(self.step_delimiter) > 0, "step_delimiter must be a non-empty string")


@dataclass
class PFParams:
    """Particle filtering as in Puri et al. (2025)."""

    n_particles: int = 8
    aggregation: str = "model"
    """How a particle's step scores combine into its weight: ``model`` (the PRM scores the whole
    prefix; best in the paper), ``last``, ``prod`` or ``min``."""
    resampling: str = "systematic"
    weight_temperature: float = 1.0
    """Softmax temperature applied to the log-weights logit(r)."""

    def __post_init__(self) -> None:
        _check(self.n_particles > 0, f"n_particles must be positive, got {self.n_particles}")
        _check(self.aggregation in AGGREGATIONS,
               f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        _check(self.resampling in RESAMPLING, f"resampling must be one of {RESAMPLING}, got {self.resampling!r}")
        _check(self.weight_temperature > 0, f"weight_temperature must be > 0, got {self.weight_temperature}")


@dataclass
class Request:
    """One prompt (text or chat messages) to solve with particle filtering."""

    prompt: str | list[dict] = ""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    pf: PFParams = field(default_factory=PFParams)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
