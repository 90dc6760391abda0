"""Malformed or unsupported checkpoints fail with a message that names the problem."""
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from pfengine import Engine, EngineConfig, Request
import torch

from pfengine.model.checkpoint import CheckpointError, read_config
from pfengine.random_model import save_random_prm, save_tokenizer


def broken_copy(src: str, tmp_path, edit_config=None, edit_tensors=None) -> str:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        t = load_file(str(dst / "model.safetensors"))
        edit_tensors(t)
        save_file(t, str(dst / "model.safetensors"))
    return str(dst)


def set_(**fields):
    return lambda cfg: cfg.update(fields)


def pop(*keys):
    return lambda cfg: [cfg.pop(k) for k in keys]


def add_tensor(name: str, like: str):
    return lambda t: t.update({name: torch.randn_like(t[like])})


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
CASES = [  # (id, base checkpoint, config edit, tensor edit, message)
    ("unsupported architecture", "qwen2-gqa", set_(architectures=["GPT2LMHeadModel"]), None, "unsupported"),
    ("missing key", "qwen2-gqa", pop("hidden_size"), None, "missing required key 'hidden_size'"),
    ("non-positive size", "qwen2-gqa", set_(hidden_size=-64), None, "hidden_size=-64 must be a positive integer"),
    ("heads not a multiple", "qwen2-gqa", set_(num_key_value_heads=3), None,
     "num_attention_heads=4 is not a multiple of num_key_value_heads 3"),
    ("bad activation", "qwen2-gqa", set_(hidden_act="gelu"), None, "hidden_act='gelu' unsupported"),
    ("bad eps", "qwen2-gqa", set_(rms_norm_eps=0), None, "rms_norm_eps=0 must be a positive number"),
    ("model_type mismatch", "llama-bias", set_(model_type="granite"), None, "model_type='granite' does not match"),
    ("quantized", "llama-bias", set_(quantization_config={"quant_method": "fp8"}), None, "quantization_config="),
    ("bias flag not boolean", "llama-bias", set_(attention_bias="yes"), None, "attention_bias='yes' must be true"),
    ("yarn rope", "qwen2-gqa", set_(rope_parameters={"rope_type": "yarn", "factor": 2.0}), None,
     "rope type 'yarn' unsupported for Qwen2"),
    ("dynamic rope", "llama-bias", set_(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), None,
     "rope type 'dynamic' unsupported"),
    ("unknown rope type", "llama-bias", lambda c: c.update(rope_parameters=None, rope_scaling={"type": "stretchy"}), None,
     "rope type 'stretchy' unsupported"),
    ("longrope on llama", "llama-bias", set_(rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * 8,
                                                             "long_factor": [1.0] * 8}), None,
     "rope type 'longrope' unsupported for Llama"),
    ("llama3 rope on phi3", "phi3-fused", set_(rope_parameters=LLAMA3), None, "rope type 'llama3' unsupported for Phi3"),
    ("unimplemented rope key", "llama-bias", set_(rope_parameters=LLAMA3 | {"mscale": 0.7}), None,
     r"holds \['mscale'\] that pfengine does not implement"),
    ("rope key missing", "llama-bias", set_(rope_parameters={k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}),
     None, r"lacks \['low_freq_factor'\]"),
    ("rope type and type disagree", "llama-bias", set_(rope_parameters={"rope_type": "default", "type": "yarn"}), None,
     "has rope_type 'default' and type 'yarn'"),
    ("rope_scaling and rope_parameters", "llama-bias",
     set_(rope_scaling=LLAMA3, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), None,
     "rope_scaling=.* and rope_parameters are both set"),
    ("per-layer rope", "qwen2-gqa", set_(rope_parameters={"full_attention": {"rope_type": "default"}}), None,
     "per-layer-type parameters"),
    ("bad rope theta", "llama-bias", set_(rope_parameters={"rope_type": "default", "rope_theta": -1.0}), None,
     "rope_theta -1.0 must be a positive number"),
    ("partial rotary on llama", "llama-bias", set_(partial_rotary_factor=0.5), None,
     "partial_rotary_factor=0.5 is unsupported for Llama"),
    ("odd partial rotary", "phi3-fused", lambda c: c["rope_parameters"].update(partial_rotary_factor=0.1875), None,
     "head_dim=16 x partial_rotary_factor=0.1875 gives an odd or empty rotary"),
    ("odd head_dim", "llama-bias", set_(head_dim=15, hidden_size=64), None, "head_dim=15 .* gives an odd"),
    ("rope parameters not an object", "llama-bias", set_(rope_parameters=[10000.0]), None,
     r"rope_parameters=\[10000.0\] must be a JSON object"),
    ("longrope factors length", "phi3-longrope",
     lambda c: c["rope_parameters"].update(short_factor=[1.0, 2.0]), None, "short_factor must be a list of 4"),
    ("longrope original context disagrees", "phi3-longrope", set_(original_max_position_embeddings=32), None,
     "original_max_position_embeddings 64 differs from the top-level original_max_position_embeddings=32"),
    ("sliding layers without a window", "qwen2-gqa", set_(layer_types=["full_attention", "sliding_attention"]), None,
     "layer_types=.* has sliding_attention layers but use_sliding_window is false"),
    ("unknown layer type", "qwen3-qknorm", set_(layer_types=["full_attention", "chunked_attention"]), None,
     "layer_types=.* must list 'full_attention' / 'sliding_attention'"),
    ("soft-capping", "llama-bias", set_(final_logit_softcapping=30.0), None,
     "final_logit_softcapping=30.0 is not part of LlamaForCausalLM"),
    ("multiplier on llama", "llama-bias", set_(embedding_multiplier=12.0), None,
     "embedding_multiplier=12.0 is not part of LlamaForCausalLM"),
    ("qk norm flag on mistral", "mistral-gqa", set_(use_qk_norm=True), None,
     "use_qk_norm=True is not part of MistralForCausalLM"),
    ("sliding window on granite", "granite-mult", set_(sliding_window=4096), None,
     "sliding_window=4096 is not part of GraniteForCausalLM"),
    ("bad granite multiplier", "granite-mult", set_(attention_multiplier=0), None,
     "attention_multiplier=0 must be a positive number"),
    ("bad eos", "qwen2-gqa", set_(eos_token_id="<eos>"), None, "eos_token_id='<eos>' must be a token id"),
    ("missing tensor", "qwen2-gqa", None, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing 1 tensor"),
    ("shape mismatch", "qwen2-gqa", set_(intermediate_size=96), None, "config implies"),
    ("bias the config does not declare", "qwen2-gqa", None,
     add_tensor("model.layers.0.self_attn.o_proj.bias", "model.norm.weight"),
     r"1 tensor\(s\) that the config does not account for .*o_proj.bias"),
    ("mlp biases without mlp_bias", "llama-bias", set_(mlp_bias=False), None,
     r"6 tensor\(s\) that the config does not account for .*mlp.down_proj.bias"),
    ("more layers than configured", "llama-bias", set_(num_hidden_layers=1), None,
     "that the config does not account for .*model.layers.1."),
    ("tied head that differs", "qwen2-tied", None, add_tensor("lm_head.weight", "model.embed_tokens.weight"),
     "tie_word_embeddings=true but lm_head.weight differs from model.embed_tokens.weight"),
]


@pytest.mark.parametrize("name,base,edit_config,edit_tensors,message", CASES, ids=[c[0] for c in CASES])
def test_bad_checkpoint(checkpoint_dir, tmp_path, name, base, edit_config, edit_tensors, message):
    path = broken_copy(checkpoint_dir(base), tmp_path, edit_config, edit_tensors)
    with pytest.raises(CheckpointError, match=message):
        Engine(EngineConfig(model=path, num_blocks=16), prm_fn=lambda p, s: 0.5)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_config(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json"):
        read_config(tmp_path)


def test_sharded_checkpoint_loads(policy_dir, tmp_path):
    """Shards + index, as large Hugging Face checkpoints are saved."""
    path = tmp_path / "sharded"
    shutil.copytree(policy_dir, path)
    tensors = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(path / file))
    index = {"weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    engine = Engine(EngineConfig(model=str(path), num_blocks=16), prm_fn=lambda p, s: 0.5)
    assert engine.policy.decoder.cfg.num_layers == 2


def test_prm_needs_prm_architecture(policy_dir):
    with pytest.raises(CheckpointError, match="Qwen2ForProcessRewardModel"):
        Engine(EngineConfig(model=policy_dir, prm=policy_dir, num_blocks=16))


def test_pf_needs_a_prm(policy_dir):
    engine = Engine(EngineConfig(model=policy_dir, num_blocks=16))  # fine for PRM-free methods
    with pytest.raises(ValueError, match="'particle_filter' needs a PRM"):
        engine.generate([Request(prompt="hi")])


def test_integer_weights_are_refused(policy_dir, tmp_path):
    path = broken_copy(policy_dir, tmp_path, edit_tensors=lambda t: t.update(
        {"model.norm.weight": t["model.norm.weight"].to(torch.int32)}))
    with pytest.raises(CheckpointError, match="model.norm.weight has dtype torch.int32"):
        Engine(EngineConfig(model=path, num_blocks=16), prm_fn=lambda p, s: 0.5)


@pytest.mark.parametrize("missing,message", [("model.safetensors", "no model.safetensors"),
                                             ("tokenizer.json", "cannot load its tokenizer")])
def test_missing_files(policy_dir, tmp_path, missing, message):
    path = broken_copy(policy_dir, tmp_path)
    (tmp_path / "ckpt" / missing).unlink()
    if missing == "tokenizer.json":
        (tmp_path / "ckpt" / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match=message):
        Engine(EngineConfig(model=path, num_blocks=16), prm_fn=lambda p, s: 0.5)


def test_prm_with_another_tokenizer_is_refused(policy_dir, tmp_path):
    prm = save_random_prm(tmp_path / "prm", vocab_size=384)
    save_tokenizer(prm, vocab_size=300)  # same layout, other merges: ids no longer agree
    with pytest.raises(CheckpointError, match="PRM tokenizer differs from the policy's"):
        Engine(EngineConfig(model=policy_dir, prm=str(prm), num_blocks=16))
