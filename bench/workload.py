"""The benchmark workload: a deterministic random-weight Qwen2-style checkpoint of a realistic small
shape (+ a value head and a separate PRM in the Qwen2.5-Math-PRM layout), the prompts, and the PF
shape every system runs: P prompts x N particles x S steps x L tokens.

Random weights never emit a step delimiter, so steps end by token count (``max_step_tokens=L`` with a
delimiter that never occurs, ``stop_on_eos=False``): every system generates exactly P*N*S*L tokens.

Every peer carries token ids end to end (vLLM takes token-id prompts; the its_hub adapters map each
step string they produced back to its ids), so no system re-tokenises text: a random id sequence
does not survive decode -> encode with a BPE tokenizer, and a text-based peer would silently process
other (and more) tokens."""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

MODEL_SHAPE = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1024,
                   vocab_size=16384)
"""The default benchmark model: ~34.6M parameters (untied embeddings), GQA 8 query / 2 KV heads."""
TINY_SHAPE = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=1024)
"""For the smoke test only."""
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]
STEP_TAG = "<extra_0>"
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPTS = [
    "Problem: A farmer has 17 sheep and buys 25 more, then sells 9. How many sheep are left? Solve step by step.",
    "Problem: Compute the sum of the first 20 odd numbers, and explain each step of the computation clearly.",
    "Problem: A train travels 120 km in 1.5 hours. What is its average speed in km per hour? Show your work.",
    "Problem: Find all integers x such that x squared minus 5 x plus 6 equals zero. Reason step by step.",
    "Problem: A rectangle has a perimeter of 36 and a width of 7. What is its area? Explain every step.",
    "Problem: What is the remainder when 2 to the power 10 is divided by 7? Work it out step by step.",
    "Problem: Three friends share 45 apples so that each gets 3 more than the previous one. How many each?",
    "Problem: Simplify the fraction 84 over 126 to lowest terms, explaining how you find the common factor.",
]


@dataclass(frozen=True)
class Workload:
    prompts: int = 2
    particles: int = 16
    steps: int = 8
    step_tokens: int = 32
    temperature: float = 0.8
    seed: int = 0

    @property
    def generated_tokens(self) -> int:
        return self.prompts * self.particles * self.steps * self.step_tokens

    def prompt_texts(self) -> list[str]:
        return [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" (variant {i // len(PROMPTS)})")
                for i in range(self.prompts)]


@dataclass
class Checkpoints:
    policy: str
    prm_dir: str | None
    value_head: str | None
    step_tag_id: int | None
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _pretokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _corpus(seed: int, words: int = 120_000) -> list[str]:
    """Deterministic pseudo-text with enough distinct words for a 16k BPE vocabulary."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "st",
              "tr", "pl", "ch", "sh", "th", "br", "gr", "qu"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou", "ea", "y"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "st", "x"]
    lines, line = [], []
    for _ in range(words):
        r = rng.random()
        if r < 0.08:
            word = str(rng.randint(0, 999))
        elif r < 0.12:
            word = rng.choice(["+", "-", "=", "*", "/", "(", ")", ",", ".", ":", "?", "\\boxed{", "}"])
        else:
            word = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                           for _ in range(rng.choice([1, 1, 2, 2, 3])))
            if rng.random() < 0.1:
                word = word.capitalize()
        line.append(word)
        if rng.random() < 0.05:
            lines.append(" ".join(line) + rng.choice(["\n", "\n\n", ". "]))
            line = []
    return lines + PROMPTS * 50


def save_tokenizer(path: Path, vocab_size: int, seed: int = 0):
    """A byte-level BPE with the Qwen2 split regex and exactly ``vocab_size`` tokens (specials included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pretokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(seed, words=min(120_000, 8 * vocab_size)), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=[STEP_TAG])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def _random_qwen2(path: Path, shape: dict, seed: int, eos_id: int, max_len: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    cfg = Qwen2Config(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                      intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                      num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                      max_position_embeddings=max_len, tie_word_embeddings=False, eos_token_id=eos_id,
                      bos_token_id=None, pad_token_id=0, rope_theta=10000.0, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # O(1) activations and logits: far from uniform, still diverse
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5)
            elif "bias" in name:
                p.normal_(0, 0.1)
    hf_logging.disable_progress_bar()
    model.save_pretrained(str(path))
    return model


def _head(hidden: int, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    H = hidden
    return {"score.0.weight": torch.randn(H, H, generator=g) / H ** 0.5, "score.0.bias": torch.randn(H, generator=g) * 0.1,
            "score.2.weight": torch.randn(2, H, generator=g) / H ** 0.5, "score.2.bias": torch.randn(2, generator=g) * 0.1}


def build_checkpoints(root: str | Path, seed: int = 0, shape: dict | None = None, max_len: int = 2048,
                      force: bool = False) -> Checkpoints:
    """Build (once; reused when its manifest matches) the benchmark policy, value head and PRM dir."""
    from safetensors.torch import load_file, save_file

    shape = dict(MODEL_SHAPE if shape is None else shape)
    root = Path(root)
    manifest = root / "manifest.json"
    want = {"shape": shape, "seed": seed, "max_len": max_len, "version": 1}
    if manifest.is_file() and not force:
        got = json.loads(manifest.read_text())
        if got.get("want") == want:
            return Checkpoints(**got["checkpoints"])
    policy, prm = root / "policy", root / "prm"
    for d in (policy, prm):
        d.mkdir(parents=True, exist_ok=True)
    tok = save_tokenizer(policy, shape["vocab_size"], seed)
    assert len(tok) == shape["vocab_size"], f"tokenizer has {len(tok)} tokens, want {shape['vocab_size']}"
    model = _random_qwen2(policy, shape, seed, tok.eos_token_id, max_len)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    head_file = root / "value_head.safetensors"
    save_file(_head(shape["hidden_size"], seed + 2), str(head_file))
    # The separate PRM: another random backbone of the same shape, Qwen2.5-Math-PRM layout.
    save_tokenizer(prm, shape["vocab_size"], seed)
    _random_qwen2(prm, shape, seed + 1, tok.eos_token_id, max_len)
    tensors = {k: v for k, v in load_file(str(prm / "model.safetensors")).items() if not k.startswith("lm_head")}
    tensors |= _head(shape["hidden_size"], seed + 3)
    save_file(tensors, str(prm / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((prm / "config.json").read_text())
    cfg["architectures"] = ["Qwen2ForProcessRewardModel"]
    cfg["num_labels"] = 2
    cfg.pop("id2label", None), cfg.pop("label2id", None)
    (prm / "config.json").write_text(json.dumps(cfg, indent=2))
    step_tag_id = tok.convert_tokens_to_ids(STEP_TAG)
    ck = Checkpoints(policy=str(policy), prm_dir=str(prm), value_head=str(head_file), step_tag_id=step_tag_id,
                     meta={"params": n_params, **shape})
    manifest.write_text(json.dumps({"want": want, "checkpoints": ck.to_json()}, indent=1))
    return ck


def external_checkpoints(model: str, prm: str | None) -> Checkpoints:
    """A real checkpoint dir (and PRM dir or value-head file) given on the command line."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    tag = tok.convert_tokens_to_ids(STEP_TAG) if STEP_TAG in tok.get_vocab() else None
    is_file = prm is not None and Path(prm).is_file()
    return Checkpoints(policy=model, prm_dir=None if is_file else prm, value_head=prm if is_file else None,
                       step_tag_id=tag, meta={})


def prompt_ids(policy_dir: str, texts: list[str]) -> list[list[int]]:
    """The prompts' ids exactly as pfengine tokenises a string prompt (the tokenizer's special tokens
    included), so every system starts from the same ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_dir, local_files_only=True)
    return [tok.encode(t) for t in texts]
