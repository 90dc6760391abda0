"""Train the bundled toy policy, its value head and a separate PRM on the arithmetic task.

    python -m pfengine.toy.train --out DIR [--budget default|long|tiny] [--seed 0] [--threads 2]

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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2Model
from transformers.utils import logging as hf_logging

from pfengine.distill import FitConfig, Head, cosine_lr, fit_head
from pfengine.toy.modeling import (
    Sampled,
    StepCutter,
    encode_example,
    engine_solutions,
    gather,
    label,
    pad_batch,
    prm_batch,
    prm_hidden,
    sample_solutions,
    step_end_hidden,
    tag_id_of,
)
from pfengine.toy.task import (
    MAX_OPS,
    MIN_OPS,
    Problem,
    corrupted_steps,
    heldout_set,
    problems,
)
from pfengine.toy.tokenizer import build_tokenizer, prompt_ids, save_tokenizer, step_ids


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
    max_steps: int
    """Constant-LR phase ends here at the latest."""
    decay_when: float
    """... or as soon as greedy decoding solves this fraction of the validation problems."""
    decay_steps: int
    policy_batch: int
    policy_lr: float
    label_problems: int
    """Training problems whose sampled solutions label the PRMs."""
    label_k: int
    """Samples per labelling problem."""
    head_epochs: int
    teacher_steps: int
    """The PRM starts from the policy trained this many more steps (a stronger "teacher")."""
    prm_extra_layers: int
    """... deepened by this many layers on top (see :func:`deepened`)."""
    prm_frozen_layers: int
    """The embeddings and this many bottom layers keep the teacher's weights: backward stops above them."""
    prm_steps: int
    prm_batch: int
    prm_lr: float
    """For the teacher's layers; the new layers and the head learn at ``prm_new_lr`` (head 3x)."""
    prm_new_lr: float
    eval_problems: int
    eval_k: int
    """Held-out samples per problem at T=0.8 (their steps also evaluate the PRMs)."""
    warmup: int = 100
    check_from: int = 1000
    check_every: int = 100
    valid_problems: int = 100


BUDGETS = {
    # What the bundled checkpoints come from: ~19 minutes here.
    "default": Budget(policy=LMSize(128, 4, 4, 2, 512), max_steps=3600, decay_when=0.6, decay_steps=0,
                      check_every=50, policy_batch=16, policy_lr=2e-3,
                      label_problems=1500, label_k=8, head_epochs=30, teacher_steps=800, prm_extra_layers=2,
                      prm_frozen_layers=3, prm_steps=2100, prm_batch=32, prm_lr=2e-4, prm_new_lr=1e-3,
                      eval_problems=400, eval_k=4),
    "tiny": Budget(policy=LMSize(32, 2, 4, 2, 64), max_steps=6, decay_when=1.0, decay_steps=4,
                   check_from=3, check_every=3, valid_problems=4, policy_batch=8, policy_lr=3e-3,
                   label_problems=8, label_k=2, head_epochs=2, teacher_steps=2, prm_extra_layers=1,
                   prm_frozen_layers=1, prm_steps=4, prm_batch=8, prm_lr=3e-3, prm_new_lr=3e-3,
                   eval_problems=8, eval_k=2, warmup=2),
}
# A stronger PRM (every layer trained, 2,400 steps) for ~33 minutes; see the README.
BUDGETS["long"] = replace(BUDGETS["default"], prm_frozen_layers=0, prm_steps=2400)
SAMPLE_TEMPERATURE = 0.8
MAX_NEW_TOKENS = 128
MAX_STEP_TOKENS = 32
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

def train_policy(tokenizer, b: Budget, seed: int) -> tuple[Qwen2ForCausalLM, dict]:
    """Teacher forcing on chat-formatted (problem -> solution + EOS) pairs, loss on the assistant's
    tokens only. Every problem is fresh (an endless seeded stream); each batch has one number of
    operations, so rows are about equally long (little padding).

    Schedule: warmup, then a constant learning rate until greedy decoding solves ``decay_when`` of
    a fixed validation set (train-split problems the stream never reaches; checked every
    ``check_every`` steps) or ``max_steps`` pass, then ``decay_steps`` of cosine decay. When the
    model learns carrying varies by seed by ~1000 steps (a sudden drop of the loss); a fixed step
    count would land anywhere from "cannot add" to "almost perfect"."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config(b.policy, tokenizer))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=b.policy_lr, betas=(0.9, 0.98), weight_decay=0.01)
    streams = {k: problems("train", seed, n_ops=k) for k in range(MIN_OPS, MAX_OPS + 1)}
    valid = list(problems("train", seed + 1_000_000, b.valid_problems))
    rng = random.Random(seed)
    t0, ema = time.perf_counter(), None
    decay_from: int | None = None
    history: list[dict] = []
    step = 0
    while decay_from is None or step < decay_from + b.decay_steps:
        stream = streams[rng.randint(MIN_OPS, MAX_OPS)]
        loss = lm_loss(model, tokenizer, [next(stream) for _ in range(b.policy_batch)])
        if step < b.warmup:
            lr = b.policy_lr * (step + 1) / b.warmup
        elif decay_from is None:
            lr = b.policy_lr
        else:
            frac = (step - decay_from) / b.decay_steps
            lr = b.policy_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
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
                                            max_step_tokens=MAX_STEP_TOKENS))
            model.train()
            history.append({"step": step, "loss": round(ema, 4), "valid_greedy": acc["fully_correct"]})
            log(f"policy step {step} loss {ema:.4f} valid greedy {acc['fully_correct']:.3f} "
                f"({time.perf_counter() - t0:.0f}s)")
            if acc["fully_correct"] >= b.decay_when or step >= b.max_steps:
                decay_from = step
                log(f"policy: decaying the learning rate over {b.decay_steps} steps from step {step}")
        elif step % 200 == 0:
            log(f"policy step {step} loss {ema:.4f} ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    return model, {"steps": step, "decay_from": decay_from, "checks": history}


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


def train_teacher(policy: Qwen2ForCausalLM, tokenizer, b: Budget, seed: int) -> Qwen2ForCausalLM:
    """A copy of the policy trained ``teacher_steps`` more steps on fresh problems (learning rate
    decaying to a tenth). It solves nearly every problem, so its backbone already computes the digits
    the sampling policy gets wrong; the PRM starts from it."""
    torch.manual_seed(seed)
    teacher = Qwen2ForCausalLM(policy.config)
    teacher.load_state_dict(policy.state_dict())
    teacher.train()
    opt = torch.optim.AdamW(teacher.parameters(), lr=b.policy_lr, betas=(0.9, 0.98), weight_decay=0.01)
    streams = {k: problems("train", seed, n_ops=k) for k in range(MIN_OPS, MAX_OPS + 1)}
    rng = random.Random(seed)
    t0 = time.perf_counter()
    for step in range(b.teacher_steps):
        loss = lm_loss(teacher, tokenizer, [next(streams[rng.randint(MIN_OPS, MAX_OPS)]) for _ in range(b.policy_batch)])
        for g in opt.param_groups:
            g["lr"] = b.policy_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / b.teacher_steps)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(teacher.parameters(), 1.0)
        opt.step()
        if (step + 1) % 200 == 0:
            log(f"teacher step {step + 1}/{b.teacher_steps} loss {float(loss.detach()):.4f} "
                f"({time.perf_counter() - t0:.0f}s)")
    return teacher.eval()


def accuracy(samples: list[Sampled]) -> dict[str, float]:
    n = len(samples)
    return {"n": n, "fully_correct": sum(s.correct for s in samples) / n,
            "answer_correct": sum(s.answer == s.problem.answer for s in samples) / n,
            "step_accuracy": sum(sum(s.labels) for s in samples) / max(1, sum(len(s.labels) for s in samples))}


# ---------------------------------------------------------------------------------------------
# Separate PRM (Qwen2.5-Math-PRM layout), initialised from the policy's backbone
# ---------------------------------------------------------------------------------------------

class SlipStream:
    """Fresh labelled solutions of training problems, never repeated: the reference solution, or
    (with probability ``p_slip``) one with an arithmetic slip. Clean negatives at every step position,
    next to the policy's own mostly-right samples."""

    def __init__(self, tokenizer, seed: int, p_slip: float = 0.6) -> None:
        self.tokenizer, self.p_slip = tokenizer, p_slip
        self.cutter = StepCutter(tokenizer, MAX_STEP_TOKENS)
        self.rng = random.Random(seed)
        self.problems = problems("train", seed)

    def __next__(self) -> Sampled:
        p = next(self.problems)
        steps = corrupted_steps(p, self.rng) if self.rng.random() < self.p_slip else p.steps()
        ids = [t for s in step_ids(self.tokenizer, steps) for t in s] + [self.tokenizer.eos_token_id]
        return label(self.cutter, p, prompt_ids(self.tokenizer, p.text), ids)


def deepened(model: Qwen2ForCausalLM, extra: int) -> Qwen2Model:
    """The model's backbone with ``extra`` more layers on top, each a copy of the last layer with its
    output projections zeroed: the new layers start as the identity, so the PRM starts from exactly
    the teacher's features, and they add the depth to compare a written digit with the predicted one
    and carry the verdict to the step tag."""
    d = model.config.to_dict()
    d["num_hidden_layers"] += extra
    d.pop("layer_types", None)
    backbone = Qwen2Model(Qwen2Config.from_dict(d))
    state = dict(model.model.state_dict())
    last = model.config.num_hidden_layers - 1
    for k, v in list(state.items()):
        if k.startswith(f"layers.{last}."):
            for j in range(last + 1, last + 1 + extra):
                zero = k.endswith(("o_proj.weight", "down_proj.weight"))
                state[k.replace(f"layers.{last}.", f"layers.{j}.")] = torch.zeros_like(v) if zero else v.clone()
    backbone.load_state_dict(state)
    return backbone


def _depth(name: str, top: int) -> int:
    """Where a backbone parameter sits, for freezing from the bottom: 0 for the embeddings, a layer's
    index, ``top`` (above every layer) for the final norm."""
    if name.startswith("layers."):
        return int(name.split(".")[1])
    return 0 if name.startswith("embed_tokens") else top


def train_prm(teacher: Qwen2ForCausalLM, tokenizer, samples: list[Sampled], b: Budget, seed: int
              ) -> tuple[Qwen2Model, Head]:
    """Fine-tune the deepened teacher backbone plus a fresh head on the engine's ``model`` layout
    (the prefix plus one step tag). Half of each batch is the policy's own samples, half fresh
    reference / slipped solutions. Losses: the step label at each tag and the dense per-token label
    (:func:`token_labels`) at each generated token."""
    torch.manual_seed(seed)
    backbone = deepened(teacher, b.prm_extra_layers)
    backbone.train()
    head = Head(teacher.config.hidden_size)
    first_new = teacher.config.num_hidden_layers
    new, old = [], []
    for n, p in backbone.named_parameters():
        depth = _depth(n, first_new)
        p.requires_grad_(depth >= b.prm_frozen_layers)
        if p.requires_grad:
            (new if n.startswith("layers.") and depth >= first_new else old).append(p)
    opt = torch.optim.AdamW([{"params": old, "lr": b.prm_lr}, {"params": new, "lr": b.prm_new_lr},
                             {"params": head.parameters(), "lr": 3 * b.prm_new_lr}], weight_decay=0.01)
    base = [g["lr"] for g in opt.param_groups]
    tag, pad = tag_id_of(tokenizer), tokenizer.pad_token_id
    rng = random.Random(seed)
    fresh = SlipStream(tokenizer, seed + 1)
    order: list[int] = []
    half = b.prm_batch // 2
    t0, ema = time.perf_counter(), None
    for step in range(b.prm_steps):
        if len(order) < half:
            more = list(range(len(samples)))
            rng.shuffle(more)
            order += more
        chunk = [samples[i] for i in order[:half]] + [next(fresh) for _ in range(b.prm_batch - half)]
        del order[:half]
        batch = prm_batch(chunk, tag, pad, "model")
        hidden = prm_hidden(backbone, batch)
        steps = torch.tensor([y for lab in batch.labels for y in lab])
        dense = torch.tensor([int(y) for s in chunk for y in s.token_labels])
        loss = (F.cross_entropy(head(gather(hidden, batch.tags)), steps)
                + F.cross_entropy(head(gather(hidden, batch.generated)), dense)) / 2
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = cosine_lr(step, b.prm_steps, lr, b.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 1.0)
        opt.step()
        ema = float(loss.detach()) if ema is None else 0.97 * ema + 0.03 * float(loss.detach())
        if (step + 1) % 100 == 0 or step + 1 == b.prm_steps:
            log(f"prm step {step + 1}/{b.prm_steps} loss {ema:.4f} ({time.perf_counter() - t0:.0f}s)")
    backbone.eval()
    return backbone, head.eval()


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


def save_prm(backbone: Qwen2Model, head: Head, tokenizer, path: Path) -> None:
    """``config.json`` with ``architectures: ["Qwen2ForProcessRewardModel"]``; ``model.safetensors``
    with the backbone as ``model.*`` (no ``lm_head``) and the head as ``score.0.*`` / ``score.2.*``."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = Qwen2Config.from_dict(backbone.config.to_dict())
    cfg.architectures = ["Qwen2ForProcessRewardModel"]
    cfg.tie_word_embeddings = False
    cfg.save_pretrained(str(path))
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in backbone.state_dict().items()}
    tensors |= head.state()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    save_tokenizer(tokenizer, path)


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
        return lambda probs, k, temp, seed: engine_solutions(policy_dir, probs, k, temp, seed,
                                                            max_step_tokens=MAX_STEP_TOKENS)
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
    log(f"policy: {asdict(b.policy)}, batches of {b.policy_batch}")
    policy, report["policy_training"] = train_policy(tokenizer, b, seed)
    report["policy_params"] = sum(p.numel() for p in policy.parameters())
    report["seconds"]["policy"] = time.perf_counter() - t

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

    t = time.perf_counter()
    teacher = train_teacher(policy, tokenizer, b, seed + 7)
    report["seconds"]["teacher"] = time.perf_counter() - t

    t = time.perf_counter()
    backbone, prm_head = train_prm(teacher, tokenizer, samples, b, seed + 4)
    save_prm(backbone, prm_head, tokenizer, prm_dir)
    report["seconds"]["prm"] = time.perf_counter() - t
    report["tokenizer"] = check_tokenizer(policy_dir, tokenizer, samples)

    # Held-out evaluation of what was saved (the engine loads it from disk).
    t = time.perf_counter()
    from pfengine.toy.prm_eval import evaluate
    held = heldout_set(b.eval_problems)
    greedy = draw(held, 1, 0.0, seed + 5)
    sampled = draw(held, b.eval_k, SAMPLE_TEMPERATURE, seed + 6)
    report["heldout_policy"] = {"greedy": accuracy(greedy), f"T={SAMPLE_TEMPERATURE}": accuracy(sampled)}
    log(f"held-out policy: {report['heldout_policy']}")
    report["heldout_prm"] = evaluate(policy_dir, prm_dir, samples=sampled)
    report["seconds"]["eval"] = time.perf_counter() - t
    report["seconds"]["total"] = time.perf_counter() - t_all
    report["bytes"] = {d.name: sum(f.stat().st_size for f in d.iterdir()) for d in (policy_dir, prm_dir)}
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    log(json.dumps({k: report[k] for k in ("heldout_policy", "heldout_prm", "seconds", "bytes")}, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train the toy policy, value head and PRM.")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it)")
    ap.add_argument("--sampler", choices=["engine", "hf"], default="engine",
                    help="what samples the policy's solutions for labels and evaluation")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    run(a.out, a.budget, a.seed, a.sampler)


if __name__ == "__main__":
    main()
