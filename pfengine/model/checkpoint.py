"""Read a local Hugging Face checkpoint: config.json -> ModelConfig, safetensors -> checked tensors."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "Qwen2ForProcessRewardModel": "qwen2",
}
PRM_ARCHITECTURE = "Qwen2ForProcessRewardModel"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and the problem."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    eos_token_ids: tuple[int, ...]

    @property
    def is_prm(self) -> bool:
        return self.architecture == PRM_ARCHITECTURE


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
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise CheckpointError(f"{cfg_file}: architectures {archs} unsupported; pfengine runs {sorted(ARCHITECTURES)}")

    def need(key: str):
        if key not in raw:
            raise CheckpointError(f"{cfg_file}: missing required key {key!r}")
        return raw[key]

    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{cfg_file}: hidden_act {raw['hidden_act']!r} unsupported (only 'silu')")
    if raw.get("use_sliding_window"):
        raise CheckpointError(f"{cfg_file}: use_sliding_window=true is unsupported")
    heads = need("num_attention_heads")
    kv_heads = raw.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise CheckpointError(f"{cfg_file}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise CheckpointError(f"{cfg_file}: rope type {rope_type!r} unsupported (default, linear, llama3)")
    max_pos = need("max_position_embeddings")
    if ARCHITECTURES[arch] == "mistral" and raw.get("sliding_window"):
        max_pos = min(max_pos, raw["sliding_window"])  # within the window, attention is full attention
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    hidden = need("hidden_size")
    return ModelConfig(
        architecture=arch, vocab_size=need("vocab_size"), hidden_size=hidden,
        intermediate_size=need("intermediate_size"), num_layers=need("num_hidden_layers"), num_heads=heads,
        num_kv_heads=kv_heads, head_dim=raw.get("head_dim") or hidden // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        rope_scaling=rope if rope_type != "default" else None, max_position_embeddings=max_pos,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=ARCHITECTURES[arch] == "qwen2" or bool(raw.get("attention_bias", False)),
        eos_token_ids=eos_ids)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the decoder (and the PRM head) needs, by its Hugging Face name."""
    H, D = cfg.hidden_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, H), "model.norm.weight": (H,)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (cfg.num_heads * D, H),
            p + "self_attn.k_proj.weight": (cfg.num_kv_heads * D, H),
            p + "self_attn.v_proj.weight": (cfg.num_kv_heads * D, H),
            p + "self_attn.o_proj.weight": (H, cfg.num_heads * D),
            p + "mlp.gate_proj.weight": (cfg.intermediate_size, H),
            p + "mlp.up_proj.weight": (cfg.intermediate_size, H),
            p + "mlp.down_proj.weight": (H, cfg.intermediate_size),
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
        }
        if cfg.qkv_bias:
            shapes |= {p + "self_attn.q_proj.bias": (cfg.num_heads * D,),
                       p + "self_attn.k_proj.bias": (cfg.num_kv_heads * D,),
                       p + "self_attn.v_proj.bias": (cfg.num_kv_heads * D,)}
    if cfg.is_prm:
        shapes |= {"score.0.weight": (H, H), "score.0.bias": (H,), "score.2.weight": (2, H), "score.2.bias": (2,)}
    elif not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, H)
    return shapes


def load_tensors(path: str | Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float32,
                 optional: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Load exactly the named tensors from ``*.safetensors`` (single file, shards + index, or one
    named file), checking each shape; missing or misshapen tensors raise :class:`CheckpointError`."""
    path = Path(path)
    files = _safetensors_files(path)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                if name in shapes:
                    t = sf.get_tensor(name)
                    if tuple(t.shape) != shapes[name]:
                        raise CheckpointError(f"{f}: tensor {name} has shape {tuple(t.shape)}, config implies {shapes[name]}")
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
