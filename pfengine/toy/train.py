"""Train the bundled toy policy, its value head and the separate PRM on the arithmetic task.

    python -m pfengine.toy.train --out DIR [--budget default|tiny] [--seed 0] [--threads 1]

Writes ``DIR/policy`` (Qwen2ForCausalLM + tokenizer + ``value_head.safetensors``), ``DIR/prm``
(the teacher: a Qwen2ForCausalLM with the same tokenizer, read as a likelihood PRM, see
:data:`pfengine.toy.pf.PRM_CONFIG`) and ``DIR/report.json`` (timings, held-out accuracy of policy
and teacher, step-level accuracy / AUROC of the value head and the PRM). Plain torch on CPU,
seeded: the same command with the same thread count writes the same weights.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

from pfengine.distill import FitConfig, Head, fit_head
from pfengine.toy.modeling import (
    Sampled,
    encode_example,
    engine_solutions,
    pad_batch,
    sample_solutions,
    step_end_hidden,
)
from pfengine.toy.pf import MAX_STEP_TOKENS, MAX_STEPS
from pfengine.toy.task import MAX_OPS, MIN_OPS, Problem, heldout_set, problems
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
    batch: int
    lr: float
    policy_when: float
    """The policy is the model at the first check where greedy decoding solves this fraction of the
    validation problems ..."""
    teacher_when: float
    """... the teacher decays from the first check where it solves this fraction ..."""
    max_steps: int
    """... or from the first check at or after this step (the policy too, if it is not yet taken)."""
    teacher_decay: int
    label_problems: int
    """Training problems whose sampled solutions label the value head."""
    label_k: int
    """Samples per labelling problem."""
    head_epochs: int
    eval_problems: int
    eval_k: int
    """Held-out samples per problem at T=0.8 (their steps also evaluate the PRMs)."""
    warmup: int = 100
    check_from: int = 1000
    check_every: int = 50
    valid_problems: int = 100


BUDGETS = {
    # What the bundled checkpoints come from (README, "The bundled toy model").
    "default": Budget(policy=LMSize(128, 4, 4, 2, 512), batch=16, lr=2e-3, policy_when=0.2, teacher_when=0.8,
                      max_steps=4000, teacher_decay=200, label_problems=1000, label_k=8, head_epochs=30,
                      eval_problems=400, eval_k=4),
    "tiny": Budget(policy=LMSize(32, 2, 4, 2, 64), batch=8, lr=3e-3, policy_when=1.0, teacher_when=1.0,
                   max_steps=6, teacher_decay=2, label_problems=8, label_k=2, head_epochs=2, eval_problems=8,
                   eval_k=2, warmup=2, check_from=3, check_every=3, valid_problems=4),
}
SAMPLE_TEMPERATURE = 0.8
MAX_NEW_TOKENS = MAX_STEPS * MAX_STEP_TOKENS
MAX_POSITIONS = 512


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def qwen2_config(size: LMSize, tokenizer) -> Qwen2Config:
    return Qwen2Config(vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.intermediate,
                       num_hidden_layers=size.layers, num_attention_heads=size.heads,
                       num_key_value_heads=size.kv_heads, max_position_embeddings=MAX_POSITIONS,
                       tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6,
                       bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


# ---------------------------------------------------------------------------------------------
# Policy
# ---------------------------------------------------------------------------------------------

def train_policy_and_teacher(tokenizer, b: Budget, seed: int) -> tuple[Qwen2ForCausalLM, Qwen2ForCausalLM, dict]:
    """One run of teacher forcing on chat-formatted (problem -> solution + EOS) pairs, loss on the
    assistant's tokens only, gives both models. Every problem is fresh (an endless seeded stream);
    each batch has one number of operations, so rows are about equally long (little padding).

    Schedule: warmup, then a constant learning rate; every ``check_every`` steps greedy decoding runs
    on a fixed validation set (train-split problems the stream never reaches). The **policy** is the
    model at the first check where it solves ``policy_when`` of them: good at single steps, wrong
    somewhere in most long chains. The run goes on until greedy decoding solves ``teacher_when``
    (or ``max_steps`` pass), then ``teacher_decay`` steps of cosine decay give the **teacher**, which
    solves nearly every problem: the probability it gives a written token says whether the token is
    right, so it judges the policy's steps as a likelihood PRM (:data:`pfengine.toy.pf.PRM_CONFIG`).
    Why one run and not a policy trained further: when the model learns carrying varies by seed
    (and thread count) by ~1000 steps, a fixed step count lands anywhere from "cannot add" to
    "almost perfect", and a decayed policy trained further re-learns slowly."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config(b.policy, tokenizer))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=b.lr, betas=(0.9, 0.98), weight_decay=0.01)
    streams = {k: problems("train", seed, n_ops=k) for k in range(MIN_OPS, MAX_OPS + 1)}
    valid = list(problems("train", seed + 1_000_000, b.valid_problems))
    rng = random.Random(seed)
    t0, ema = time.perf_counter(), None
    policy: Qwen2ForCausalLM | None = None
    report: dict = {"checks": []}
    decay_from: int | None = None
    step = 0
    while decay_from is None or step < decay_from + b.teacher_decay:
        stream = streams[rng.randint(MIN_OPS, MAX_OPS)]
        loss = lm_loss(model, tokenizer, [next(stream) for _ in range(b.batch)])
        if step < b.warmup:
            lr = b.lr * (step + 1) / b.warmup
        elif decay_from is None:
            lr = b.lr
        else:
            lr = b.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - decay_from) / b.teacher_decay)))
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = float(loss.detach()) if ema is None else 0.95 * ema + 0.05 * float(loss.detach())
        step += 1
        if decay_from is None and step >= b.check_from and step % b.check_every == 0:
            model.eval()
            acc = accuracy(sample_solutions(model, tokenizer, valid, 1, 0.0, 0, max_new_tokens=MAX_NEW_TOKENS,
                                            max_step_tokens=MAX_STEP_TOKENS))["fully_correct"]
            model.train()
            report["checks"].append({"step": step, "loss": round(ema, 4), "valid_greedy": acc})
            log(f"step {step} loss {ema:.4f} valid greedy {acc:.3f} ({time.perf_counter() - t0:.0f}s)")
            if policy is None and (acc >= b.policy_when or step >= b.max_steps):
                policy, report["policy_step"] = copy.deepcopy(model).eval(), step
                log(f"policy: the model at step {step}")
            if acc >= b.teacher_when or step >= b.max_steps:
                decay_from = report["teacher_decay_from"] = step
                log(f"teacher: decaying the learning rate over {b.teacher_decay} steps from step {step}")
        elif step % 200 == 0:
            log(f"step {step} loss {ema:.4f} ({time.perf_counter() - t0:.0f}s)")
    report["teacher_step"] = step
    assert policy is not None
    return policy, model.eval(), report


def lm_loss(model: Qwen2ForCausalLM, tokenizer, batch: list[Problem]) -> torch.Tensor:
    """Teacher forcing on (problem -> reference solution + EOS), loss on the solution's tokens only."""
    examples = [encode_example(tokenizer, p) for p in batch]
    ids = pad_batch([x for x, _ in examples], tokenizer.pad_token_id)
    target = ids.clone()
    for i, (x, n_prompt) in enumerate(examples):
        target[i, :n_prompt] = -100
        target[i, len(x):] = -100
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1), ignore_index=-100)


def accuracy(samples: list[Sampled]) -> dict[str, float]:
    n = len(samples)
    return {"n": n, "fully_correct": sum(s.correct for s in samples) / n,
            "answer_correct": sum(s.answer == s.problem.answer for s in samples) / n,
            "step_accuracy": sum(sum(s.labels) for s in samples) / max(1, sum(len(s.labels) for s in samples))}


# ---------------------------------------------------------------------------------------------
# Saving in Hugging Face layout
# ---------------------------------------------------------------------------------------------

def save_policy(model: Qwen2ForCausalLM, tokenizer, head: Head | None, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                     do_sample=True, temperature=SAMPLE_TEMPERATURE, top_p=1.0, top_k=0).save_pretrained(str(path))
    save_tokenizer(tokenizer, path)
    if head is not None:
        save_file(head.state(), str(path / "value_head.safetensors"))


def check_tokenizer(path: Path, tokenizer, samples: list[Sampled]) -> dict:
    """The saved tokenizer, reloaded as the engine loads it, gives the same ids; decode -> encode
    round-trips generated ids."""
    from transformers import AutoTokenizer
    reloaded = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    texts = [s.problem.text for s in samples[:50]]
    same = all(reloaded(t)["input_ids"] == tokenizer(t)["input_ids"] for t in texts)
    same = same and reloaded.get_vocab() == tokenizer.get_vocab()
    roundtrip = sum(reloaded.encode(reloaded.decode(s.tokens), add_special_tokens=False) == s.tokens for s in samples)
    return {"reloaded_class": type(reloaded).__name__, "same_ids_after_reload": bool(same),
            "roundtrip_generated": roundtrip / max(1, len(samples))}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def _sampler(kind: str, policy, tokenizer, policy_dir: Path):
    """``draw(problems, k, temperature, seed) -> list[Sampled]`` with pfengine (default) or a plain
    transformers sampler (no dependence on the engine; about half as fast here)."""
    if kind == "engine":
        return lambda probs, k, temp, seed: engine_solutions(policy_dir, probs, k, temp, seed)
    return lambda probs, k, temp, seed: sample_solutions(policy, tokenizer, probs, k, temp, seed,
                                                         max_new_tokens=MAX_NEW_TOKENS, max_step_tokens=MAX_STEP_TOKENS)


def run(out: Path, budget: str = "default", seed: int = 0, sampler: str = "engine") -> dict:
    b = BUDGETS[budget]
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    report: dict = {"budget": budget, "seed": seed, "threads": torch.get_num_threads(), "sampler": sampler,
                    "config": asdict(b),
                    "seconds": {}}
    t_all = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    policy_dir, prm_dir = out / "policy", out / "prm"
    for d in (policy_dir, prm_dir):
        if d.exists():
            shutil.rmtree(d)

    t = time.perf_counter()
    tokenizer = build_tokenizer(seed=seed)
    report["vocab_size"] = len(tokenizer)
    report["seconds"]["tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    log(f"policy and teacher: {asdict(b.policy)}, batches of {b.batch}")
    policy, teacher, report["training"] = train_policy_and_teacher(tokenizer, b, seed)
    report["params"] = sum(p.numel() for p in policy.parameters())
    report["seconds"]["policy_and_teacher"] = time.perf_counter() - t

    save_policy(policy, tokenizer, None, policy_dir)
    draw = _sampler(sampler, policy, tokenizer, policy_dir)

    t = time.perf_counter()
    label_problems = list(problems("train", seed + 1, b.label_problems))
    samples = draw(label_problems, b.label_k, SAMPLE_TEMPERATURE, seed + 2)
    report["label_samples"] = {"samples": len(samples), **accuracy(samples)}
    report["seconds"]["sample_for_labels"] = time.perf_counter() - t
    log(f"sampled {len(samples)} solutions for labels in {time.perf_counter() - t:.0f}s: {report['label_samples']}")

    t = time.perf_counter()
    hidden, labels = step_end_hidden(policy, samples, tokenizer.pad_token_id)
    head = fit_head(hidden, labels.float(), FitConfig(epochs=b.head_epochs, seed=seed + 3), log)
    save_file(head.state(), str(policy_dir / "value_head.safetensors"))
    report["seconds"]["value_head"] = time.perf_counter() - t

    save_policy(teacher, tokenizer, None, prm_dir)
    report["tokenizer"] = check_tokenizer(policy_dir, tokenizer, samples)

    # Held-out evaluation of what was saved (the engine loads it from disk).
    t = time.perf_counter()
    from pfengine.toy.prm_eval import evaluate
    held = heldout_set(b.eval_problems)
    greedy = draw(held, 1, 0.0, seed + 5)
    sampled = draw(held, b.eval_k, SAMPLE_TEMPERATURE, seed + 6)
    report["heldout_policy"] = {"greedy": accuracy(greedy), f"T={SAMPLE_TEMPERATURE}": accuracy(sampled)}
    report["heldout_teacher"] = {"greedy": accuracy(_sampler(sampler, teacher, tokenizer, prm_dir)(held, 1, 0.0, seed + 5))}
    log(f"held-out policy: {report['heldout_policy']}; teacher: {report['heldout_teacher']}")
    report["heldout_prm"] = evaluate(policy_dir, prm_dir, samples=sampled)
    report["seconds"]["eval"] = time.perf_counter() - t
    report["seconds"]["total"] = time.perf_counter() - t_all
    report["bytes"] = {d.name: sum(f.stat().st_size for f in d.iterdir()) for d in (policy_dir, prm_dir)}
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    log(json.dumps({k: report[k] for k in ("heldout_policy", "heldout_prm", "seconds", "bytes")}, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train the toy policy, its value head and the teacher (the PRM).")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    ap.add_argument("--sampler", choices=["engine", "hf"], default="engine",
                    help="what samples the policy's solutions for labels and evaluation")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    run(a.out, a.budget, a.seed, a.sampler)


if __name__ == "__main__":
    main()
