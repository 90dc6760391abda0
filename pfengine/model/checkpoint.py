"""Read a local Hugging Face checkpoint: config.json -> ModelConfig, safetensors -> checked tensors.

The contract: a checkpoint either computes here what transformers computes for it, or it is refused
with a :class:`CheckpointError` naming the config field (and its value) or the tensor at fault.
Each family lists the config.json fields its transformers class reads; every one of them is read
below, and fields of *other* families that would change the computation are refused rather than
silently ignored. Every tensor in the safetensors files must be one the decoder reads.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open

from pfengine.kernels.prm_score import PRMHead


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and the problem."""


COMMON_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "rope_parameters", "eos_token_id"})
"""config.json fields every family reads (``rope_scaling`` / ``rope_theta`` are legacy spellings of
``rope_parameters``)."""
INERT_FIELDS = frozenset({
    "initializer_range", "use_cache", "pad_token_id", "bos_token_id", "attention_dropout", "resid_pdrop",
    "embd_pdrop", "pretraining_tp"})
"""Fields of the supported configs that do not change inference: dropouts, init, the embedding's
padding row (only matters for training), ``pretraining_tp`` (splits matmuls into equal slices)."""
FOREIGN_FIELDS = ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
                  "embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling",
                  "use_qk_norm", "qk_layernorm", "use_sliding_window", "sliding_window", "layer_types")
"""Fields that change the computation in some family. Set (to anything but a neutral value) on a
family whose transformers class does not read them, they are refused: transformers would ignore
them, but a checkpoint that sets them was most likely trained with them."""
ACTIVATIONS = ("silu", "swish")
PRM_SUFFIX = "ForProcessRewardModel"
ROPE_KEYS = {  # keys a rope_parameters dict of each type may hold (besides rope_type / type / rope_theta)
    "default": frozenset(),
    "linear": frozenset({"factor"}),
    "llama3": frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}),
    "longrope": frozenset({"short_factor", "long_factor", "factor", "attention_factor",
                           "original_max_position_embeddings"}),
}
ROPE_REQUIRED = {"default": (), "linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
                 "longrope": ("short_factor", "long_factor")}
ROTARY_BUFFER = re.compile(r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")
"""Old checkpoints saved the rotary inverse frequencies; they derive from config.json and, as in
transformers, are skipped."""


@dataclass(frozen=True)
class Family:
    """One architecture family as its transformers class computes it."""

    prefix: str
    """Class-name prefix: ``Llama`` -> ``LlamaForCausalLM`` and ``LlamaForProcessRewardModel``."""
    model_type: str
    fields: frozenset[str]
    """config.json fields read beyond :data:`COMMON_FIELDS` (``head_dim`` is honoured by every family)."""
    kv_heads_default: int | None = None
    """``num_key_value_heads`` when config.json lacks it (None: ``num_attention_heads``)."""
    head_dim_default: int | None = None
    """``head_dim`` when config.json lacks it (None: ``hidden_size // num_attention_heads``)."""
    eps_default: float = 1e-6
    sliding_window_default: int | None = None
    original_max_default: int | None = None
    qkv_bias: bool = False
    """q/k/v projections always have biases (Qwen2), whatever ``attention_bias`` says."""
    fused_projections: bool = False
    """``qkv_proj`` and ``gate_up_proj`` tensors instead of q/k/v and gate/up (Phi-3)."""
    qk_norm: bool = False
    """A per-head RMS norm on queries and keys before the rotary embedding (Qwen3)."""
    partial_rotary: bool = False
    rope_types: frozenset[str] = frozenset({"default", "linear", "llama3"})


_QWEN_SLIDING = frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"})
_GRANITE = frozenset({"embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"})
FAMILIES = {f.prefix: f for f in (
    Family("Llama", "llama", frozenset({"head_dim", "attention_bias", "mlp_bias"})),
    Family("Mistral", "mistral", frozenset({"head_dim", "sliding_window"}), kv_heads_default=8,
           sliding_window_default=4096),
    Family("Qwen2", "qwen2", _QWEN_SLIDING, kv_heads_default=32, sliding_window_default=4096, qkv_bias=True),
    Family("Qwen3", "qwen3", _QWEN_SLIDING | {"head_dim", "attention_bias"}, kv_heads_default=32,
           head_dim_default=128, sliding_window_default=4096, qk_norm=True),
    Family("Granite", "granite", _GRANITE | {"attention_bias", "mlp_bias"}),
    Family("Phi3", "phi3", frozenset({"sliding_window", "original_max_position_embeddings"}), eps_default=1e-5,
           original_max_default=4096, fused_projections=True, partial_rotary=True,
           rope_types=frozenset({"default", "longrope"})),
)}
ARCHITECTURES = {f"{p}{kind}": p for p in FAMILIES for kind in ("ForCausalLM", PRM_SUFFIX)}
PRM_ARCHITECTURES = sorted(a for a in ARCHITECTURES if a.endswith(PRM_SUFFIX))


@dataclass(frozen=True)
class RopeConfig:
    kind: str
    """default, linear, llama3 or longrope (its short factors: positions stay within the original context)."""
    theta: float
    rotary_dim: int
    """Leading dimensions of each head that rotate (Phi-3's partial rotary factor); the rest pass through."""
    scaling: dict
    """The kind's resolved parameters."""
    attention_factor: float = 1.0
    """Scales cos and sin (LongRoPE's attention scaling)."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    """Positions this model computes exactly as transformers does (see ``context_limit``)."""
    context_limit: str | None
    """Why ``max_position_embeddings`` is below config.json's value, if it is."""
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    fused_projections: bool
    qk_norm: bool
    attention_scale: float
    embedding_multiplier: float
    residual_multiplier: float
    logits_scaling: float
    eos_token_ids: tuple[int, ...]

    @property
    def is_prm(self) -> bool:
        return self.architecture.endswith(PRM_SUFFIX)


class _Fields:
    """config.json's dict with typed, named reads: every error names the file, the field and its value."""

    def __init__(self, raw: dict, where: str) -> None:
        self.raw, self.where = raw, where

    def fail(self, key: str, why: str) -> CheckpointError:
        shown = f"{key}={self.raw[key]!r}" if key in self.raw else key
        return CheckpointError(f"{self.where}: {shown} {why}")

    def need(self, key: str):
        if key not in self.raw:
            raise CheckpointError(f"{self.where}: missing required key {key!r}")
        return self.raw[key]

    def positive_int(self, key: str, default: int | None = None) -> int:
        value = self.need(key) if default is None else self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.fail(key, "must be a positive integer")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise self.fail(key, "must be a positive number")
        return float(value)

    def flag(self, key: str) -> bool:
        value = self.get(key, False)
        if not isinstance(value, bool):
            raise self.fail(key, "must be true or false")
        return value

    def get(self, key: str, default=None):
        """The value, or ``default`` when the key is absent or null."""
        value = self.raw.get(key)
        return default if value is None else value


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (a Hugging Face checkpoint needs config.json)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object")
    return parse_config(raw, str(cfg_file))


def parse_config(raw: dict, where: str = "config.json") -> ModelConfig:
    """config.json's contents -> ModelConfig, with transformers' defaults for absent fields."""
    c = _Fields(raw, where)
    arch = _architecture(c)
    family = FAMILIES[ARCHITECTURES[arch]]
    _refuse_foreign(c, family)
    if c.get("hidden_act", "silu") not in ACTIVATIONS:
        raise c.fail("hidden_act", f"unsupported (pfengine computes {' / '.join(ACTIVATIONS)})")
    hidden, heads = c.positive_int("hidden_size"), c.positive_int("num_attention_heads")
    kv_default = heads if "num_key_value_heads" in raw else family.kv_heads_default or heads  # null: heads
    kv_heads = c.positive_int("num_key_value_heads", kv_default)
    if heads % kv_heads:
        raise c.fail("num_attention_heads", f"is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = c.positive_int("head_dim", family.head_dim_default or hidden // heads)
    max_pos = c.positive_int("max_position_embeddings")
    rope = _rope(c, family, head_dim, max_pos)
    max_pos, limit = _context(c, family, rope, max_pos)
    attention_bias = "attention_bias" in family.fields and c.flag("attention_bias")
    granite = "attention_multiplier" in family.fields
    return ModelConfig(
        architecture=arch, family=family.prefix, vocab_size=c.positive_int("vocab_size"), hidden_size=hidden,
        intermediate_size=c.positive_int("intermediate_size"), num_layers=c.positive_int("num_hidden_layers"),
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        rms_norm_eps=c.number("rms_norm_eps", family.eps_default), rope=rope, max_position_embeddings=max_pos,
        context_limit=limit, tie_word_embeddings=c.flag("tie_word_embeddings"),
        qkv_bias=family.qkv_bias or attention_bias, o_bias=attention_bias,
        mlp_bias="mlp_bias" in family.fields and c.flag("mlp_bias"),
        fused_projections=family.fused_projections, qk_norm=family.qk_norm,
        attention_scale=c.number("attention_multiplier", 1.0) if granite else head_dim ** -0.5,
        embedding_multiplier=c.number("embedding_multiplier", 1.0) if granite else 1.0,
        residual_multiplier=c.number("residual_multiplier", 1.0) if granite else 1.0,
        logits_scaling=c.number("logits_scaling", 1.0) if granite else 1.0,
        eos_token_ids=_eos_ids(c))


def _architecture(c: _Fields) -> str:
    archs = c.get("architectures", [])
    arch = next((a for a in archs if a in ARCHITECTURES), None) if isinstance(archs, list) else None
    if arch is None:
        raise CheckpointError(f"{c.where}: architectures {archs} unsupported; pfengine runs {sorted(ARCHITECTURES)}")
    family = FAMILIES[ARCHITECTURES[arch]]
    if c.get("model_type", family.model_type) != family.model_type:
        raise c.fail("model_type", f"does not match architectures {archs} (transformers would build a "
                                   f"{c.raw['model_type']!r} model, expected {family.model_type!r})")
    if c.get("quantization_config") is not None:
        raise c.fail("quantization_config", "is set: quantized checkpoints are unsupported")
    return arch


def _refuse_foreign(c: _Fields, family: Family) -> None:
    for key in FOREIGN_FIELDS:
        if key not in family.fields and not _neutral(key, c.get(key)):
            raise c.fail(key, f"is not part of {family.prefix}ForCausalLM: refused rather than ignored")


def _neutral(key: str, value) -> bool:
    """Absent, null, false, 1, or only full-attention layers: the same computation as without the field."""
    if value is None or value is False:
        return True
    if key == "layer_types":
        return isinstance(value, list) and all(t == "full_attention" for t in value)
    return not isinstance(value, bool) and value == 1


def _rope(c: _Fields, family: Family, head_dim: int, max_pos: int) -> RopeConfig:
    """``rope_parameters`` (or the legacy ``rope_scaling`` / ``rope_theta``), resolved as transformers does."""
    if c.get("rope_scaling") and c.get("rope_parameters"):
        raise c.fail("rope_scaling", "and rope_parameters are both set: ambiguous")
    key = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"
    params = c.get(key, {})
    if not isinstance(params, dict):
        raise c.fail(key, "must be a JSON object")
    params = dict(params)
    if any(isinstance(v, dict) for v in params.values()):
        raise c.fail(key, "holds per-layer-type parameters: unsupported")
    theta = params.pop("rope_theta", c.get("rope_theta", 10000.0))
    partial = params.pop("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    kind, legacy = params.pop("rope_type", None), params.pop("type", None)
    if kind is not None and legacy is not None and kind != legacy:
        raise c.fail(key, f"has rope_type {kind!r} and type {legacy!r}: ambiguous")
    kind = kind or legacy or "default"
    if family.prefix == "Phi3" and kind in ("su", "yarn"):
        kind = "longrope"  # Phi3Config reads both legacy names as LongRoPE
    if kind not in family.rope_types:
        raise c.fail(key, f"rope type {kind!r} unsupported for {family.prefix} ({', '.join(sorted(family.rope_types))})")
    unknown = sorted(set(params) - ROPE_KEYS[kind])
    if unknown:
        raise c.fail(key, f"holds {unknown} that pfengine does not implement for rope type {kind!r}")
    missing = [k for k in ROPE_REQUIRED[kind] if k not in params]
    if missing:
        raise c.fail(key, f"lacks {missing} required by rope type {kind!r}")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise c.fail(key, f"rope_theta {theta!r} must be a positive number")
    rotary_dim = _rotary_dim(c, family, partial, head_dim)
    if kind == "default":
        return RopeConfig(kind, float(theta), rotary_dim, {})
    if kind == "linear":
        return RopeConfig(kind, float(theta), rotary_dim, {"factor": _param(c, key, params, "factor")})
    original = _original_max(c, family, params, key, max_pos)
    if kind == "llama3":
        scaling = {k: _param(c, key, params, k) for k in ROPE_REQUIRED["llama3"]}
        return RopeConfig(kind, float(theta), rotary_dim, scaling | {"original_max_position_embeddings": original})
    return _longrope(c, key, params, float(theta), rotary_dim, original, max_pos)


def _rotary_dim(c: _Fields, family: Family, partial, head_dim: int) -> int:
    if partial != 1 and not family.partial_rotary:
        raise CheckpointError(f"{c.where}: partial_rotary_factor={partial!r} is unsupported for {family.prefix}")
    if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial <= 1:
        raise CheckpointError(f"{c.where}: partial_rotary_factor={partial!r} must be in (0, 1]")
    rotary_dim = int(head_dim * partial)
    if rotary_dim < 2 or rotary_dim % 2:
        raise CheckpointError(f"{c.where}: head_dim={head_dim} x partial_rotary_factor={partial!r} gives an odd or "
                              f"empty rotary dimension ({rotary_dim})")
    return rotary_dim


def _param(c: _Fields, key: str, params: dict, name: str) -> float:
    value = params[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise c.fail(key, f"{name} {value!r} must be a positive number")
    return float(value)


def _original_max(c: _Fields, family: Family, params: dict, key: str, max_pos: int) -> int:
    """The pretraining context of llama3 / longrope scaling. transformers lets a top-level
    ``original_max_position_embeddings`` (Phi-3: default 4096) override the rope dict's; disagreement
    is refused."""
    top = c.get("original_max_position_embeddings", family.original_max_default)
    inner = params.get("original_max_position_embeddings")
    if top is not None and inner is not None and top != inner:
        raise c.fail(key, f"original_max_position_embeddings {inner!r} differs from the top-level "
                          f"original_max_position_embeddings={top!r} (transformers would use the latter)")
    original = top if top is not None else inner if inner is not None else max_pos
    if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
        raise c.fail(key, f"original_max_position_embeddings {original!r} must be a positive integer")
    return original


def _longrope(c: _Fields, key: str, params: dict, theta: float, rotary_dim: int, original: int,
              max_pos: int) -> RopeConfig:
    """LongRoPE as transformers computes it: the short factors while the sequence fits the original
    context (the long factors would re-rotate every cached key when a sequence grows past it, so
    pfengine stops there; see :func:`_context`), cos and sin scaled by the attention factor."""
    for name in ("short_factor", "long_factor"):
        f = params[name]
        if not (isinstance(f, list) and len(f) == rotary_dim // 2
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in f)):
            raise c.fail(key, f"{name} must be a list of {rotary_dim // 2} positive numbers")
    factor = _param(c, key, params, "factor") if params.get("factor") is not None else max_pos / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    elif isinstance(attention, bool) or not isinstance(attention, (int, float)) or attention <= 0:
        raise c.fail(key, f"attention_factor {attention!r} must be a positive number")
    return RopeConfig("longrope", theta, rotary_dim, {"short_factor": [float(x) for x in params["short_factor"]],
                                                      "original_max_position_embeddings": original},
                      float(attention))


def _context(c: _Fields, family: Family, rope: RopeConfig, max_pos: int) -> tuple[int, str | None]:
    """Positions computed exactly: a sliding window in use and LongRoPE's original context bound them
    (within a window, windowed attention is full attention)."""
    limits = []
    window = _sliding_window(c, family)
    if window is not None:
        limits.append((window, f"sliding_window={window}"))
    if rope.kind == "longrope":
        original = rope.scaling["original_max_position_embeddings"]
        limits.append((original, f"LongRoPE's original_max_position_embeddings={original}"))
    n, why = min(limits, default=(max_pos, None))
    return (n, why) if n < max_pos else (max_pos, None)


def _sliding_window(c: _Fields, family: Family) -> int | None:
    """The window of the layers that slide, if any does (Mistral / Phi-3: every layer; Qwen: with
    ``use_sliding_window``, the layers ``layer_types`` or ``max_window_layers`` name)."""
    if "sliding_window" not in family.fields:
        return None
    qwen = "use_sliding_window" in family.fields
    window = c.raw.get("sliding_window", family.sliding_window_default)  # null: no window
    if qwen and not c.flag("use_sliding_window"):
        window = None
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise c.fail("sliding_window", "must be a positive integer or null")
    if not qwen:
        return window
    layers = c.positive_int("num_hidden_layers")
    first = c.positive_int("max_window_layers", 28)
    types = c.get("layer_types") or ["sliding_attention" if window is not None and i >= first else "full_attention"
                                     for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or \
            not set(types) <= {"full_attention", "sliding_attention"}:
        raise c.fail("layer_types", f"must list 'full_attention' / 'sliding_attention' for each of {layers} layers")
    if "sliding_attention" not in types:
        return None
    if window is None:
        raise c.fail("layer_types", "has sliding_attention layers but use_sliding_window is false or "
                                    "sliding_window is null (transformers fails on it)")
    return window


def _eos_ids(c: _Fields) -> tuple[int, ...]:
    eos = c.get("eos_token_id")
    ids = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise c.fail("eos_token_id", "must be a token id or a list of token ids")
    return tuple(ids)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the decoder (and the PRM head) needs, by its Hugging Face name."""
    H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * D, cfg.num_kv_heads * D
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, H), "model.norm.weight": (H,)}
    for i in range(cfg.num_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        shapes |= {f"model.layers.{i}.input_layernorm.weight": (H,),
                   f"model.layers.{i}.post_attention_layernorm.weight": (H,),
                   a + "o_proj.weight": (H, q), m + "down_proj.weight": (H, I)}
        if cfg.fused_projections:
            shapes |= {a + "qkv_proj.weight": (q + 2 * kv, H), m + "gate_up_proj.weight": (2 * I, H)}
        else:
            shapes |= {a + "q_proj.weight": (q, H), a + "k_proj.weight": (kv, H), a + "v_proj.weight": (kv, H),
                       m + "gate_proj.weight": (I, H), m + "up_proj.weight": (I, H)}
        if cfg.qkv_bias:
            shapes |= {a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,), a + "v_proj.bias": (kv,)}
        if cfg.o_bias:
            shapes[a + "o_proj.bias"] = (H,)
        if cfg.mlp_bias:
            shapes |= {m + "gate_proj.bias": (I,), m + "up_proj.bias": (I,), m + "down_proj.bias": (H,)}
        if cfg.qk_norm:
            shapes |= {a + "q_norm.weight": (D,), a + "k_norm.weight": (D,)}
    if cfg.is_prm:
        shapes |= PRMHead.shapes(H)
    else:
        shapes["lm_head.weight"] = (cfg.vocab_size, H)
    return shapes


def load_checkpoint(path: str | Path, take: Callable[[ModelConfig, str, Any], torch.Tensor] | None = None
                    ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """config.json and exactly the tensors it implies (with ``take``, only the part of each that
    ``take(cfg, name, view)`` reads from its safetensors slice ``view``). A tied checkpoint may also
    hold ``lm_head.weight``, but only as a copy of the embedding (transformers 5 would silently untie
    a different one, transformers 4 would silently drop it)."""
    cfg = read_config(path)
    tied = frozenset({"lm_head.weight"}) if cfg.tie_word_embeddings else frozenset()
    tensors = load_tensors(path, expected_shapes(cfg), optional=tied, take=None if take is None else partial(take, cfg))
    head = tensors.pop("lm_head.weight", None) if cfg.tie_word_embeddings else None
    if head is not None and not torch.equal(head, tensors["model.embed_tokens.weight"]):
        raise CheckpointError(f"{path}: tie_word_embeddings=true but lm_head.weight differs from "
                              f"model.embed_tokens.weight (set tie_word_embeddings to false if the head is separate)")
    return cfg, tensors


def load_tensors(path: str | Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float32,
                 optional: frozenset[str] = frozenset(), take: Callable[[str, Any], torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
    """Load exactly the named tensors from ``*.safetensors`` (single file, shards + index, or one
    named file), checking each shape; missing, misshapen or unexpected tensors (other than rotary
    frequency buffers) raise :class:`CheckpointError`. ``take(name, view)``: read only that part of
    each tensor from its slice ``view``."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(path):
        with safe_open(str(f), framework="pt") as sf:
            names = list(sf.keys())
            unexpected = sorted(n for n in names if n not in shapes and not ROTARY_BUFFER.fullmatch(n))
            if unexpected:
                raise CheckpointError(f"{f}: {len(unexpected)} tensor(s) that the config does not account for "
                                      f"(pfengine would not read them), e.g. {unexpected[:3]}")
            for name in (n for n in names if n in shapes):
                view = sf.get_slice(name)
                if tuple(view.get_shape()) != shapes[name]:
                    raise CheckpointError(f"{f}: tensor {name} has shape {tuple(view.get_shape())}, config implies "
                                          f"{shapes[name]}")
                t = sf.get_tensor(name) if take is None else take(name, view)
                if not t.is_floating_point():
                    raise CheckpointError(f"{f}: tensor {name} has dtype {t.dtype}, expected a floating-point dtype")
                tensors[name] = t.to(dtype)
    missing = sorted(set(shapes) - set(tensors) - optional)
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    return tensors


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index}: lists shard(s) that do not exist: {absent}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
