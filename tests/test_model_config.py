"""config.json and the safetensors contents read as transformers reads them: every field of every
supported architecture accounted for, transformers' defaults for absent fields, the context bounded
exactly where pfengine would otherwise compute something else, and the tensors it may skip."""
import copy
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from pfengine.model.checkpoint import COMMON_FIELDS, FAMILIES, INERT_FIELDS, parse_config, read_config
from pfengine.model.rope import inv_frequencies
from pfengine.random_model import save_random_model
from test_model_parity import hf_logits, make_runner

MINIMAL = dict(vocab_size=32064, hidden_size=256, intermediate_size=128, num_hidden_layers=2, num_attention_heads=32,
               max_position_embeddings=8192)  # Qwen's default 32 KV heads must divide the heads; Phi-3 pads with id 32000


@pytest.mark.parametrize("prefix", sorted(FAMILIES))
def test_every_field_of_the_transformers_config_is_read_or_inert(prefix):
    """The audit: each field of transformers' config class for the family is one pfengine reads
    (and so implements or refuses) or one that does not change inference."""
    family = FAMILIES[prefix]
    base = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    hf_fields = {f.name for f in dataclasses.fields(CONFIG_MAPPING[family.model_type])} - base
    assert hf_fields - COMMON_FIELDS - family.fields - INERT_FIELDS == set()
    assert COMMON_FIELDS | family.fields <= hf_fields


@pytest.mark.parametrize("prefix", sorted(FAMILIES))
def test_absent_fields_take_transformers_defaults(prefix):
    """A config.json with only the required fields: heads, head size, norm epsilon, attention scale
    and rotary frequencies as transformers' model for it has them."""
    family = FAMILIES[prefix]
    ours = parse_config(MINIMAL | {"architectures": [f"{prefix}ForCausalLM"]})
    hf = AutoModelForCausalLM.from_config(CONFIG_MAPPING[family.model_type](**MINIMAL)).eval()
    attention = hf.model.layers[0].self_attn
    assert ours.num_kv_heads * ours.head_dim == hf.config.num_key_value_heads * attention.head_dim
    assert (ours.head_dim, ours.attention_scale) == (attention.head_dim, attention.scaling)
    assert ours.rms_norm_eps == hf.model.layers[0].input_layernorm.variance_epsilon
    assert ours.tie_word_embeddings == hf.config.tie_word_embeddings
    torch.testing.assert_close(inv_frequencies(ours.rope), hf.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    window = getattr(hf.config, "sliding_window", None)
    slides = window is not None and "sliding_attention" in (getattr(hf.config, "layer_types", None) or
                                                          ["sliding_attention"])
    assert ours.max_position_embeddings == (min(window, 8192) if slides else 8192)


@pytest.mark.parametrize("prefix,fields,limit", [
    ("Mistral", {}, 4096),  # transformers' default window when the field is absent
    ("Mistral", {"sliding_window": None}, 8192),
    ("Qwen2", {"use_sliding_window": True, "sliding_window": 1024, "max_window_layers": 1}, 1024),
    ("Qwen2", {"use_sliding_window": True, "sliding_window": 1024, "max_window_layers": 2}, 8192),  # none slides
    ("Qwen3", {"use_sliding_window": False, "sliding_window": 1024}, 8192),
    ("Qwen3", {"use_sliding_window": True, "sliding_window": 512,
               "layer_types": ["sliding_attention", "full_attention"]}, 512),
    ("Phi3", {"sliding_window": 2047}, 2047),
    ("Phi3", {"rope_scaling": {"type": "su", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}}, 4096),
])
def test_context_is_bounded_where_the_computation_would_change(prefix, fields, limit):
    cfg = parse_config(MINIMAL | {"architectures": [f"{prefix}ForCausalLM"]} | fields)
    assert cfg.max_position_embeddings == limit
    assert (cfg.context_limit is None) == (limit == 8192)


def test_sliding_window_bound_is_exact(tmp_path):
    """Within the window, windowed attention is full attention: pfengine computes every position it
    allows exactly; transformers' next position would already slide."""
    window = 12
    path = str(save_random_model(tmp_path / "m", "qwen2", use_sliding_window=True, sliding_window=window,
                                 max_window_layers=1))
    assert read_config(path).max_position_embeddings == window
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, 370, (window + 1,), generator=torch.Generator().manual_seed(0)).tolist()
    runner = make_runner(path)
    ours = runner.decoder.logits(runner.extend([0], [ids[:window]]))[0]
    torch.testing.assert_close(ours, hf_logits(hf, ids[:window])[-1], atol=1e-4, rtol=0)
    no_window = copy.deepcopy(hf.config)
    no_window.layer_types = ["full_attention"] * 2
    full = AutoModelForCausalLM.from_pretrained(path, config=no_window, dtype=torch.float32,
                                                attn_implementation="eager").eval()
    assert not torch.allclose(hf_logits(hf, ids)[-1], hf_logits(full, ids)[-1], atol=1e-3)


def test_longrope_bound_is_exact(checkpoint_dir):
    """LongRoPE uses its short factors while the sequence fits the original context (64 here):
    pfengine's last position equals transformers' there; one more switches every position to the
    long factors."""
    path = checkpoint_dir("phi3-longrope")
    assert read_config(path).max_position_embeddings == 64
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, 370, (65,), generator=torch.Generator().manual_seed(1)).tolist()
    runner = make_runner(path)
    ours = runner.decoder.logits(runner.extend([0], [ids[:64]]))[0]
    torch.testing.assert_close(ours, hf_logits(hf, ids[:64])[-1], atol=1e-4, rtol=0)
    assert not torch.allclose(hf_logits(hf, ids)[:64], hf_logits(hf, ids[:64]), atol=1e-3)


def copy_with(src: str, dst, extra: dict[str, torch.Tensor]) -> str:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    save_file(tensors | extra(tensors), str(dst / "model.safetensors"))
    return str(dst)


def test_rotary_buffers_are_skipped_and_a_tied_head_copy_is_accepted(checkpoint_dir, tmp_path):
    """Old checkpoints hold ``rotary_emb.inv_freq`` buffers (derived from config.json; transformers
    skips them), and some tied ones a copy of the embedding as ``lm_head.weight``."""
    src = checkpoint_dir("qwen2-tied")
    path = copy_with(src, tmp_path / "ckpt", lambda t: {
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.rand(8),
        "lm_head.weight": t["model.embed_tokens.weight"].clone()})
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["tie_word_embeddings"]
    ids = list(range(10, 30))
    clean, extra = make_runner(src), make_runner(path)
    torch.testing.assert_close(extra.decoder.logits(extra.extend([0], [ids])),
                               clean.decoder.logits(clean.extend([0], [ids])), atol=0, rtol=0)


PHI_4 = {  # microsoft/phi-4 config.json (transformers 4.47)
    "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "auto_map": {},
    "bos_token_id": 100257, "embd_pdrop": 0.0, "eos_token_id": 100257, "hidden_act": "silu", "hidden_size": 5120,
    "initializer_range": 0.02, "intermediate_size": 17920, "max_position_embeddings": 16384, "model_type": "phi3",
    "num_attention_heads": 40, "num_hidden_layers": 40, "num_key_value_heads": 10,
    "original_max_position_embeddings": 16384, "pad_token_id": 100257, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 250000, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.47.0", "use_cache": True, "vocab_size": 100352}
GRANITE_8B = {  # an ibm-granite 3.x 8B instruct config.json (transformers 4.49)
    "architectures": ["GraniteForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attention_multiplier": 0.0078125, "bos_token_id": 0, "embedding_multiplier": 12.0, "eos_token_id": 0,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 12800,
    "logits_scaling": 16.0, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "granite",
    "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 8, "pad_token_id": 0,
    "residual_multiplier": 0.22, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000000.0,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.49.0", "use_cache": True,
    "vocab_size": 49159}


def test_published_configs_of_the_new_families_load_as_transformers_reads_them():
    for raw in (PHI_4, GRANITE_8B):
        ours = parse_config(raw)
        hf = CONFIG_MAPPING[raw["model_type"]](**raw)
        assert (ours.num_kv_heads, ours.rms_norm_eps, ours.rope.theta) == \
            (hf.num_key_value_heads, hf.rms_norm_eps, hf.rope_parameters["rope_theta"])
        assert ours.context_limit is None and ours.max_position_embeddings == raw["max_position_embeddings"]
    phi4, granite = parse_config(PHI_4), parse_config(GRANITE_8B)
    assert phi4.fused_projections and (phi4.head_dim, phi4.rope.kind, phi4.rope.rotary_dim) == (128, "default", 128)
    assert granite.tie_word_embeddings and not (granite.qkv_bias or granite.o_bias or granite.mlp_bias)
    assert (granite.attention_scale, granite.embedding_multiplier, granite.residual_multiplier,
            granite.logits_scaling) == (0.0078125, 12.0, 0.22, 16.0)
