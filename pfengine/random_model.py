"""Small random-weight checkpoints in Hugging Face layout, saved to disk so they load through the
same path as any real checkpoint. Used by the tests and by the demo until a trained model ships."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig
from transformers import MistralForCausalLM, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast, Qwen2Config
from transformers import Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.utils import logging as hf_logging

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = [
    "Step 1: add 17 and 25 to get 42.\n\nStep 2: subtract 9 from 42 to get 33.\n\nThe answer is \\boxed{33}.",
    "We compute 3 * 4 = 12.\n\nThen 12 + 5 = 17.\n\nSo the result is \\boxed{17}.",
    "Let x be the number of apples. Then x + 3 = 10, so x = 7.\n\nTherefore \\boxed{7}.",
    "First, 100 - 37 = 63.\n\nNext, 63 / 7 = 9.\n\nFinally \\boxed{9}.",
]
QWEN2_5_MATH_1_5B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 1536,
    "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
    "vocab_size": 151936, "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 21,
    "bos_token_id": 151643, "eos_token_id": 151643}
"""config.json of Qwen2.5-Math-1.5B: the shape the GPU check (bench/gpu_check.py) runs with random
weights, and the shape at which the tests check that the CUDA decode step is capturable."""
ARCHS = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
         "mistral": (MistralConfig, MistralForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
         "granite": (GraniteConfig, GraniteForCausalLM), "phi3": (Phi3Config, Phi3ForCausalLM)}


def save_tokenizer(path: str | Path, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on a tiny math corpus (with merges) and save it with a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<extra_0>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def save_random_model(path: str | Path, arch: str = "qwen2", seed: int = 0, hidden_size: int = 64,
                      num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, tie: bool = False,
                      rope_scaling: dict | None = None, vocab_size: int = 384, norm_std: float = 0.0,
                      **extra) -> Path:
    """A random causal LM (any of :data:`ARCHS`) plus tokenizer, in HF layout at ``path``; ``extra``
    goes to the transformers config (biases, multipliers, head_dim, ...). ``norm_std > 0`` draws the
    RMS-norm weights from N(1, norm_std) instead of ones, so that a norm applied in the wrong place shows."""
    path = Path(path)
    tokenizer = save_tokenizer(path, vocab_size)
    config_cls, model_cls = ARCHS[arch]
    cfg = config_cls(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                     num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                     max_position_embeddings=1024, tie_word_embeddings=tie, rope_scaling=rope_scaling,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)
    torch.manual_seed(seed)
    model = model_cls(cfg)
    _scale_init(model, norm_std)
    hf_logging.disable_progress_bar()
    model.save_pretrained(str(path))
    return path


def save_random_prm(path: str | Path, arch: str = "qwen2", seed: int = 1, hidden_size: int = 64,
                    num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, vocab_size: int = 384,
                    **extra) -> Path:
    """A random PRM in the Qwen2.5-Math-PRM layout on an ``arch`` backbone: ``model.*`` +
    ``score.{0,2}.*`` head, ``architectures: ["<Arch>ForProcessRewardModel"]``."""
    path = save_random_model(path, arch, seed, hidden_size, num_layers, num_heads, num_kv_heads,
                             vocab_size=vocab_size, **extra)
    tensors = {k: v for k, v in load_file(str(path / "model.safetensors")).items() if not k.startswith("lm_head")}
    tensors |= random_head(hidden_size, seed)
    save_file(tensors, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = [ARCHS[arch][1].__name__.replace("ForCausalLM", "ForProcessRewardModel")]
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def random_head(hidden_size: int, seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    H = hidden_size
    return {"score.0.weight": torch.randn(H, H, generator=g) / H ** 0.5, "score.0.bias": torch.randn(H, generator=g) * 0.1,
            "score.2.weight": torch.randn(2, H, generator=g) / H ** 0.5, "score.2.bias": torch.randn(2, generator=g) * 0.1}


def save_value_head(path: str | Path, hidden_size: int, seed: int = 2) -> Path:
    save_file(random_head(hidden_size, seed), str(path))
    return Path(path)


def _scale_init(model: torch.nn.Module, norm_std: float) -> None:
    """Larger random weights than HF's 0.02 init so logits are far from uniform (a sharper test)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5)
            elif "bias" in name:
                p.normal_(0, 0.1)
            elif norm_std > 0:
                p.normal_(1.0, norm_std)
