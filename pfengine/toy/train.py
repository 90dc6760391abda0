"""Train the bundled toy policy, its value head and a separate PRM on the arithmetic task.

    python -m pfengine.toy.train --out DIR [--budget full|tiny] [--seed 0] [--threads 2]

Writes ``DIR/policy`` (Qwen2ForCausalLM + tokenizer + ``value_head.safetensors``), ``DIR/prm``
(Qwen2ForProcessRewardModel layout, same tokenizer) and ``DIR/report.json`` (timings, held-out
accuracy of the policy, step-level accuracy / AUROC of both PRMs). Plain torch on CPU, seeded:
the same command with the same thread count writes the same weights.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

from pfengine.toy.modeling import (Head, Sampled, encode_example, pad_batch, sample_solutions, step_end_hidden,
                                   tag_id_of, tagged_sequence)
from pfengine.toy.task import heldout_set, problems
from pfengine.toy.tokenizer import build_tokenizer, save_tokenizer


@dataclass
class LMSize:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


@dataclass
class Budget:
    policy: LMSize
    policy_steps: int
    policy_batch: int
    policy_lr: float
    label_problems: int
    """Training problems whose sampled solutions label the PRMs."""
    label_k: int
    """Samples per labelling problem."""
    head_epochs: int
    prm: LMSize
    prm_steps: int
    prm_batch: int
    prm_lr: float
    eval_problems: int
    eval_k: int
    prm_eval_problems: int
    prm_eval_k: int
    warmup: int = 100


BUDGETS = {
    "full": Budget(policy=LMSize(192, 4, 4, 2, 512), policy_steps=3000, policy_batch=32, policy_lr=2e-3,
                   label_problems=2000, label_k=8, head_epochs=30,
                   prm=LMSize(128, 4, 4, 2, 384), prm_steps=2000, prm_batch=32, prm_lr=2e-3,
                   eval_problems=400, eval_k=4, prm_eval_problems=200, prm_eval_k=8),
    "tiny": Budget(policy=LMSize(32, 2, 4, 2, 64), policy_steps=10, policy_batch=8, policy_lr=3e-3,
                   label_problems=8, label_k=2, head_epochs=2,
                   prm=LMSize(32, 1, 4, 2, 64), prm_steps=4, prm_batch=8, prm_lr=3e-3,
                   eval_problems=8, eval_k=2, prm_eval_problems=4, prm_eval_k=2, warmup=2),
}
SAMPLE_TEMPERATURE = 0.8
MAX_NEW_TOKENS = 128
MAX_POSITIONS = 512


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def qwen2_config(size: LMSize, tokenizer) -> Qwen2Config:
    return Qwen2Config(vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.intermediate,
                       num_hidden_layers=size.layers, num_attention_heads=size.heads,
                       num_key_value_heads=size.kv_heads, max_position_embeddings=MAX_POSITIONS,
                       tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6,
                       bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


# ---------------------------------------------------------------------------------------------
# Policy
# ---------------------------------------------------------------------------------------------

def train_policy(tokenizer, b: Budget, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config(b.policy, tokenizer))
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=b.policy_lr, betas=(0.9, 0.98))
    data = problems("train", seed)
    pad = tokenizer.pad_token_id
    t0, ema = time.perf_counter(), None
    for step in range(b.policy_steps):
        batch = [encode_example(tokenizer, next(data)) for _ in range(b.policy_batch)]
        ids = pad_batch([x for x, _ in batch], pad)
        target = ids.clone()
        for i, (x, n_prompt) in enumerate(batch):
            target[i, :n_prompt] = -100
            target[i, len(x):] = -100
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1),
                               ignore_index=-100)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, b.policy_steps, b.policy_lr, b.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = float(loss) if ema is None else 0.98 * ema + 0.02 * float(loss)
        if (step + 1) % 200 == 0 or step + 1 == b.policy_steps:
            log(f"policy step {step + 1}/{b.policy_steps} loss {ema:.4f} ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    return model


def accuracy(samples: list[Sampled]) -> dict[str, float]:
    n = len(samples)
    return {"n": n, "fully_correct": sum(s.correct for s in samples) / n,
            "answer_correct": sum(s.answer == s.problem.answer for s in samples) / n,
            "step_accuracy": sum(sum(s.labels) for s in samples) / max(1, sum(len(s.labels) for s in samples))}


if __name__ == "__main__":
    import sys
    torch.set_num_threads(int(sys.argv[1]))
    steps = int(sys.argv[2])
    b = BUDGETS["full"]
    b.policy_steps = steps
    hf_logging.disable_progress_bar()
    tok = build_tokenizer()
    t = time.time()
    m = train_policy(tok, b, 0)
    log(f"train {time.time()-t:.0f}s")
    held = heldout_set(200)
    t = time.time()
    g = sample_solutions(m, tok, held, 1, 0.0, 0)
    log(f"greedy {accuracy(g)} {time.time()-t:.0f}s")
    t = time.time()
    s = sample_solutions(m, tok, held, 4, 0.8, 0)
    log(f"T=0.8 {accuracy(s)} {time.time()-t:.0f}s")
    m.save_pretrained("/tmp/pol_exp")
    tok.save_pretrained("/tmp/pol_exp")
