"""Every user-facing option in one place: engine, sampling and particle-filter parameters."""
from __future__ import annotations

from dataclasses import dataclass, field

KV_DTYPES = ("float32", "bfloat16", "float16")
"""Storage types of the KV cache, as torch dtype names (this module stays torch-free, so the command
line's help and argument errors do not wait for torch to import)."""
AGGREGATIONS = ("model", "last", "prod", "min")
RESAMPLING = ("systematic", "stratified", "multinomial", "residual")


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
    prm_config: PRMConfig = field(default_factory=lambda: PRMConfig())

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


METHODS = ("particle_filter", "particle_gibbs", "parallel_tempering", "greedy", "best_of_n",
           "weighted_best_of_n", "self_consistency", "beam_search", "dvts")
SELECTIONS = ("argmax", "sample", "vote")


@dataclass
class SearchParams:
    """Which search runs on the engine, and its options. ``n_particles`` is the budget of every
    method: particles (PF, PG per sweep x ``iterations``, PT over all chains), samples (BoN,
    self-consistency) or beams (beam search, DVTS)."""

    method: str = "particle_filter"
    n_particles: int = 8
    aggregation: str = "model"
    """How a particle's step scores combine into its weight: ``model`` (the PRM scores the whole
    prefix; best in the paper), ``last``, ``prod`` or ``min``."""
    resampling: str = "systematic"
    weight_temperature: float = 1.0
    """Softmax temperature applied to the log-weights logit(r)."""
    ess_threshold: float = 1.0
    """Resample only when ESS < threshold * N (1.0: every round, the paper's default)."""
    finished: str = "freeze"
    """``freeze``: finished particles keep their final weight in resampling (the paper);
    ``remove``: they leave the resampling pool (never revived either way)."""
    selection: str = "argmax"
    """Final answer: highest weight (``argmax``), a draw by weight (``sample``), or the weighted
    majority ``vote`` over extracted answers."""
    annealing: bool = False
    """Entropic annealing: when ESS/N < 0.5 early in the run, temper the weights (ESS rule)."""
    iterations: int = 1
    """Particle Gibbs sweeps; each sweep after the first keeps a reference particle."""
    temperatures: tuple[float, ...] = (1.0, 2.0)
    """Parallel tempering: one chain per weight temperature, ``n_particles / len`` particles each."""
    beam_width: int = 4
    """Beam search: keep the top N/M, expand each M ways. DVTS: N/M subtrees of width M."""

    def __post_init__(self) -> None:
        _check(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        _check(self.n_particles > 0, f"n_particles must be positive, got {self.n_particles}")
        _check(self.aggregation in AGGREGATIONS,
               f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        _check(self.resampling in RESAMPLING, f"resampling must be one of {RESAMPLING}, got {self.resampling!r}")
        _check(self.weight_temperature > 0, f"weight_temperature must be > 0, got {self.weight_temperature}")
        _check(0 <= self.ess_threshold <= 1, f"ess_threshold must be in [0, 1], got {self.ess_threshold}")
        _check(self.finished in ("freeze", "remove"), f"finished must be 'freeze' or 'remove', got {self.finished!r}")
        _check(self.selection in SELECTIONS, f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        _check(self.iterations > 0, f"iterations must be positive, got {self.iterations}")
        _check(len(self.temperatures) > 0 and all(t > 0 for t in self.temperatures),
               f"temperatures must be positive, got {self.temperatures}")
        _check(self.beam_width > 0, f"beam_width must be positive, got {self.beam_width}")
        if self.method == "particle_gibbs":
            _check(self.n_particles % self.iterations == 0 and self.n_particles // self.iterations >= 2,
                   f"particle_gibbs: n_particles ({self.n_particles}) must be a multiple of iterations "
                   f"({self.iterations}) with at least 2 particles per sweep")
        if self.method == "parallel_tempering":
            _check(self.n_particles % len(self.temperatures) == 0,
                   f"parallel_tempering: n_particles ({self.n_particles}) must be a multiple of the number of "
                   f"temperatures ({len(self.temperatures)})")
        if self.method in ("beam_search", "dvts"):
            _check(self.n_particles % self.beam_width == 0,
                   f"{self.method}: n_particles ({self.n_particles}) must be a multiple of beam_width ({self.beam_width})")
        if self.method == "greedy":
            _check(self.n_particles == 1, f"greedy: n_particles must be 1, got {self.n_particles}")

    @property
    def uses_prm(self) -> bool:
        return self.method not in ("greedy", "self_consistency")

    @property
    def particles_per_sweep(self) -> int:
        return self.n_particles // self.iterations if self.method == "particle_gibbs" else self.n_particles


@dataclass
class PRMConfig:
    """Tokens a model PRM reads. Qwen2.5-Math-PRM layout: the head scores the hidden state at
    ``step_tag``. Math-Shepherd style (a causal LM): set ``good_token`` / ``bad_token`` and the
    score is P(good) / (P(good) + P(bad)) at the tag."""

    step_tag: str = "<extra_0>"
    good_token: str | None = None
    bad_token: str | None = None

    def __post_init__(self) -> None:
        _check((self.good_token is None) == (self.bad_token is None),
               "PRMConfig: set both good_token and bad_token (Math-Shepherd style) or neither")


@dataclass
class Request:
    """One prompt (text or chat messages) to solve with a search method (particle filtering by default)."""

    prompt: str | list[dict] = ""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    search: SearchParams = field(default_factory=SearchParams)
    reference_answer: str | None = None
    """When given, the result reports the expected accuracy sum_i w_i * [answer_i == reference]."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
