"""The toy task's tokenizer: a byte-level BPE with the Qwen2 pre-tokenizer (digits split one by one),
trained on task text, wrapped as a ``PreTrainedTokenizerFast`` with a Qwen-style chat template.

It is built with exactly the normalizer / pre-tokenizer / decoder that transformers' own
``Qwen2Tokenizer`` installs, so a directory whose ``config.json`` says Qwen2 gives the same ids
whether ``AutoTokenizer`` re-wraps it as ``Qwen2Tokenizer`` or not."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pfengine.toy.task import problems

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]
EOS, PAD, STEP_TAG = "<|im_end|>", "<|endoftext|>", "<extra_0>"
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB_SIZE = 400


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Chat-formatted training problems with their solutions (the text the models will read)."""
    out = []
    for p in problems("train", seed=10_000 + seed, n=n):
        out.append(f"<|im_start|>user\n{p.text}<|im_end|>\n<|im_start|>assistant\n{p.solution}<|im_end|>\n")
    return out


def build_tokenizer(vocab_size: int = VOCAB_SIZE, seed: int = 0) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(seed=seed), trainer)
    if tok.get_vocab_size() <= 259:
        raise RuntimeError("tokenizer has no merges")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=[STEP_TAG])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: str | Path) -> None:
    tokenizer.save_pretrained(str(path))


def prompt_ids(tokenizer, problem_text: str) -> list[int]:
    """The chat-formatted prompt the engine builds for ``[{"role": "user", "content": text}]``."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": problem_text}],
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def step_ids(tokenizer, steps: list[str]) -> list[list[int]]:
    """Token ids of each solution step, the separator ``"\\n\\n"`` kept at the end of every step but
    the last (as the engine cuts a generated solution). The concatenation equals the encoding of the
    whole solution text: the Qwen2 split never merges across a ``"\\n\\n"`` boundary."""
    out = []
    for i, s in enumerate(steps):
        text = s + ("\n\n" if i < len(steps) - 1 else "")
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out
