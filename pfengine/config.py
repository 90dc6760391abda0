"""Every user-facing option in one place: engine, sampling and particle-filter parameters.

Each dataclass checks its fields on construction (and again when the engine receives a request, in
case a field was reassigned): integers must be integers (not floats or bools), floats finite and in
range, strings valid Unicode. A bad value raises :class:`InvalidArgument` naming the field."""
from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

KV_DTYPES = ("float32", "bfloat16", "float16")
"""Storage types of the KV cache, as torch dtype names (this module stays torch-free, so the command
line's help and argument errors do not wait for torch to import)."""
AGGREGATIONS = ("model", "last", "prod", "min")
RESAMPLING = ("systematic", "stratified", "multinomial", "residual")
METHODS = ("particle_filter", "particle_gibbs", "parallel_tempering", "greedy", "best_of_n",
           "weighted_best_of_n", "self_consistency", "beam_search", "dvts")
SELECTIONS = ("argmax", "sample", "vote")
LIKELIHOOD_REDUCTIONS = ("min", "mean")
SEED_RANGE = (0, 2**64 - 1)
WEIGHT_TEMPERATURE_RANGE = (1e-4, 1e4)
"""Tempered log-weights logit(r) / T stay finite and comparable in float32 inside this range."""
MAX_DELIMITER_CHARS = 64
"""Longest step delimiter (step ends are matched on token ids by a table with a row per character)."""
GREEDY_BELOW = 1e-5
"""A sampling temperature below this is greedy (dividing logits by it would overflow)."""


class InvalidArgument(ValueError, TypeError):
    """A bad value of a named option (a ``ValueError`` and a ``TypeError``, so either catches it).

    ``field`` is the option as the Python API names it and the message starts with it. Other options
    the message mentions are written ``EngineConfig.name`` etc.; :meth:`render` names all of them the
    way a front end spells them (a CLI flag, an HTTP field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def render(self, name_of: Callable[[str], str]) -> str:
        message = re.sub(r"\b(?:EngineConfig|SamplingParams|SearchParams|Request)\.(\w+)",
                         lambda m: name_of(m[1]), self.message)
        return f"{name_of(self.field)}: {message}"


@dataclass
class EngineConfig:
    """How the engine is built (checkpoints, cache size) and what one request may ask of it."""

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
    max_request_particles: int = 1024
    """Per-request limit on the budget ``n_particles`` (all particle Gibbs sweeps together)."""
    max_iterations: int = 64
    """Per-request limit on particle Gibbs sweeps."""
    max_request_tokens: int = 1 << 22
    """Per-request limit on the tokens it may generate: ``n_particles`` x the per-particle cap
    (``max_tokens``, ``max_steps * max_step_tokens`` and the context, whichever is smallest)."""
    max_prompt_chars: int = 1 << 20
    """Longest prompt (characters, all chat messages together), checked before tokenising."""
    max_overtakes: int = 16
    """Admission: a waiting request that does not fit yet lets at most this many later requests
    that do fit start before it; then admission waits until it fits (so nothing starves)."""
    cuda_graphs: bool = True
    """On CUDA, decode through CUDA graphs captured per batch-size bucket (:mod:`pfengine.cuda_graphs`);
    no effect on CPU, nor with tensor parallelism (eager decode)."""
    tensor_parallel_size: int = 1
    """Processes each model is split across (heads, MLP, vocabulary; :mod:`pfengine.distributed`):
    spawned by the engine, or the ranks of ``torchrun --nproc-per-node``. The PRM model, if any,
    is split across the same ranks."""

    def __post_init__(self) -> None:
        self.model = _path("model", self.model)
        self.prm = None if self.prm is None else _path("prm", self.prm)
        self.block_size = _int("block_size", self.block_size, 1)
        require(self.block_size & (self.block_size - 1) == 0, "block_size",
               f"must be a positive power of two, got {self.block_size}")
        self.num_blocks = _int("num_blocks", self.num_blocks, 1)
        _choice("kv_dtype", self.kv_dtype, tuple(KV_DTYPES))
        self.max_particles = _int("max_particles", self.max_particles, 1)
        if self.max_model_len is not None:
            self.max_model_len = _int("max_model_len", self.max_model_len, 2)
        _string("device", self.device)
        _instance("prm_config", self.prm_config, PRMConfig)
        for name in ("max_request_particles", "max_iterations", "max_request_tokens", "max_prompt_chars"):
            setattr(self, name, _int(name, getattr(self, name), 1))
        self.max_overtakes = _int("max_overtakes", self.max_overtakes, 0)
        _bool("cuda_graphs", self.cuda_graphs)
        self.tensor_parallel_size = _int("tensor_parallel_size", self.tensor_parallel_size, 1)


@dataclass
class SamplingParams:
    """Token sampling within a step. ``temperature=0`` (or below 1e-5) is greedy."""

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
        self.validate()

    def validate(self) -> None:
        self.temperature = _float("temperature", self.temperature, 0.0)
        self.top_p = _float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        self.top_k = _int("top_k", self.top_k, 0)
        if self.seed is not None:
            self.seed = _int("seed", self.seed, *SEED_RANGE)
        for name in ("max_step_tokens", "max_steps", "max_tokens"):
            setattr(self, name, _int(name, getattr(self, name), 1))
        _string("step_delimiter", self.step_delimiter)
        require(0 < len(self.step_delimiter) <= MAX_DELIMITER_CHARS, "step_delimiter",
                f"must be a non-empty string of at most {MAX_DELIMITER_CHARS} characters, got {len(self.step_delimiter)}")
        _bool("stop_on_eos", self.stop_on_eos)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class SearchParams:
    """Which search runs on the engine, and its options. ``n_particles`` is the budget of every
    method: particles (PF, PG per sweep x ``iterations``, PT over all chains), samples (BoN,
    self-consistency) or beams (beam search, DVTS)."""

    method: str = "particle_filter"
    n_particles: int = 8
    aggregation: str = "model"
    """How a particle's step scores combine into its weight: ``model`` (the PRM scores the whole
    prefix; best in the paper; a likelihood PRM judges single steps, so there it means ``min``),
    ``last``, ``prod`` or ``min``."""
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
        self.validate()

    def validate(self) -> None:
        _choice("method", self.method, METHODS)
        self.n_particles = _int("n_particles", self.n_particles, 1)
        _choice("aggregation", self.aggregation, AGGREGATIONS)
        _choice("resampling", self.resampling, RESAMPLING)
        self.weight_temperature = _float("weight_temperature", self.weight_temperature, *WEIGHT_TEMPERATURE_RANGE)
        self.ess_threshold = _float("ess_threshold", self.ess_threshold, 0.0, 1.0)
        _choice("finished", self.finished, ("freeze", "remove"))
        _choice("selection", self.selection, SELECTIONS)
        _bool("annealing", self.annealing)
        self.iterations = _int("iterations", self.iterations, 1)
        require(isinstance(self.temperatures, (tuple, list)) and len(self.temperatures) > 0, "temperatures",
               f"expected a non-empty sequence of numbers, got {self.temperatures!r}")
        self.temperatures = tuple(_float("temperatures", t, *WEIGHT_TEMPERATURE_RANGE) for t in self.temperatures)
        self.beam_width = _int("beam_width", self.beam_width, 1)
        self._check_method()

    def _check_method(self) -> None:
        n = self.n_particles
        if self.method == "particle_gibbs":
            require(n % self.iterations == 0 and n // self.iterations >= 2, "n_particles",
                   f"particle_gibbs needs a multiple of SearchParams.iterations ({self.iterations}) with at least "
                   f"2 particles per sweep, got {n}")
        if self.method == "parallel_tempering":
            require(n % len(self.temperatures) == 0, "n_particles",
                   f"parallel_tempering needs a multiple of the number of SearchParams.temperatures "
                   f"({len(self.temperatures)}), got {n}")
        if self.method in ("beam_search", "dvts"):
            require(n % self.beam_width == 0, "n_particles",
                   f"{self.method} needs a multiple of SearchParams.beam_width ({self.beam_width}), got {n}")
        if self.method == "greedy":
            require(n == 1, "n_particles", f"greedy takes exactly 1, got {n}")

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
    score is P(good) / (P(good) + P(bad)) at the tag. Likelihood (a causal LM, e.g. a teacher that
    solves the task): set ``likelihood`` to ``min`` or ``mean`` and the score is the probability
    the LM gives the step's least likely token (``min``) or the geometric mean of its tokens'
    probabilities (``mean``); no step tag is read. Under ``model`` aggregation a prefix is as good
    as its worst step."""

    step_tag: str = "<extra_0>"
    good_token: str | None = None
    bad_token: str | None = None
    likelihood: str | None = None

    @property
    def kind(self) -> str:
        """``head`` (Qwen2.5-Math-PRM layout), ``shepherd`` or ``likelihood``."""
        return "likelihood" if self.likelihood is not None else "shepherd" if self.good_token is not None else "head"

    def __post_init__(self) -> None:
        _string("step_tag", self.step_tag)
        for name in ("good_token", "bad_token"):
            if getattr(self, name) is not None:
                _string(name, getattr(self, name))
        require((self.good_token is None) == (self.bad_token is None), "good_token",
               "set both PRMConfig.good_token and PRMConfig.bad_token (Math-Shepherd style) or neither")
        if self.likelihood is not None:
            _choice("likelihood", self.likelihood, LIKELIHOOD_REDUCTIONS)
            require(self.good_token is None, "likelihood", "a likelihood PRM reads no good/bad tokens: set "
                                                            "PRMConfig.likelihood or good_token/bad_token, not both")


@dataclass
class Request:
    """One prompt (text or chat messages) to solve with a search method (particle filtering by default)."""

    prompt: str | list[dict]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    search: SearchParams = field(default_factory=SearchParams)
    reference_answer: str | None = None
    """When given, the result reports the expected accuracy sum_i w_i * [answer_i == reference]."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field, the nested parameters included (the engine calls this on receipt)."""
        check_prompt(self.prompt)
        _instance("sampling", self.sampling, SamplingParams)
        _instance("search", self.search, SearchParams)
        self.sampling.validate()
        self.search.validate()
        if self.reference_answer is not None:
            _string("reference_answer", self.reference_answer)

    @property
    def prompt_chars(self) -> int:
        if isinstance(self.prompt, str):
            return len(self.prompt)
        return sum(len(m["content"]) for m in self.prompt)


def check_prompt(prompt: Any) -> None:
    """A non-empty string, or a non-empty list of ``{"role": str, "content": str}`` messages."""
    if isinstance(prompt, str):
        _string("prompt", prompt)
        require(len(prompt) > 0, "prompt", "must not be empty")
        return
    require(isinstance(prompt, list), "prompt",
           f"expected a string or a list of chat messages, got {type(prompt).__name__}")
    require(len(prompt) > 0, "prompt", "chat messages must not be empty")
    for k, message in enumerate(prompt):
        require(isinstance(message, dict), f"prompt[{k}]",
               f"expected a message {{'role': ..., 'content': ...}}, got {type(message).__name__}")
        for key in ("role", "content"):
            require(isinstance(message.get(key), str), f"prompt[{k}].{key}",
                   f"expected a string, got {type(message.get(key)).__name__}")
            _string(f"prompt[{k}].{key}", message[key])
        require(len(message["role"]) > 0, f"prompt[{k}].role", "must not be empty")


def require(ok: bool, field: str, message: str) -> None:
    """Raise :class:`InvalidArgument` for ``field`` unless ``ok``."""
    if not ok:
        raise InvalidArgument(field, message)


def _int(name: str, value: Any, low: int, high: int | None = None) -> int:
    require(isinstance(value, numbers.Integral) and not isinstance(value, bool), name,
           f"expected an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if high is None:
        require(value >= low, name, f"must be >= {low}, got {value}")
    else:
        require(low <= value <= high, name, f"must be an integer in [{low}, {high}], got {value}")
    return value


def _float(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> float:
    require(isinstance(value, numbers.Real) and not isinstance(value, bool), name,
           f"expected a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    require(math.isfinite(value), name, f"must be a finite number, got {value}")
    above = value > low if low_open else value >= low
    if high == math.inf:
        require(above, name, f"must be {'>' if low_open else '>='} {low}, got {value}")
    else:
        require(above and value <= high, name, f"must be in {'(' if low_open else '['}{low}, {high}], got {value}")
    return value


def _bool(name: str, value: Any) -> None:
    require(isinstance(value, bool), name, f"expected true or false, got {value!r} ({type(value).__name__})")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    require(isinstance(value, str) and value in choices, name, f"must be one of {choices}, got {value!r}")


def _instance(name: str, value: Any, kind: type) -> None:
    require(isinstance(value, kind), name, f"expected a {kind.__name__}, got {type(value).__name__}")


def _string(name: str, value: Any) -> None:
    """A ``str`` that is valid Unicode (no lone surrogates, which no tokenizer can encode)."""
    require(isinstance(value, str), name, f"expected a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgument(name, f"contains a lone surrogate {value[e.start]!r} at index {e.start}; "
                                    f"text must be valid Unicode") from None


def _path(name: str, value: Any) -> str:
    require(isinstance(value, (str, os.PathLike)), name,
           f"expected a path (string), got {type(value).__name__}")
    value = os.fspath(value)
    _string(name, value)
    require(len(value) > 0, name, "must not be empty")
    return value
