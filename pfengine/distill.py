"""Amortise a separate PRM into the policy's value head.

    pfengine distill --prm PRM_DIR --out HEAD.safetensors [--model POLICY] [--problems N | --data FILE.jsonl]

Particle filtering with a separate PRM pays for a second model's forward on every step; the PF
authors name the next step: let the policy act as its own PRM. ``distill`` runs PF with the
separate PRM on training prompts, records every particle state the filter scored together with the
PRM's probability for that state's newest step, and fits a value head (``Linear(H,H) -> ReLU ->
Linear(H,2)`` on the policy's final hidden state at the step's last token: the file
``EngineConfig(prm=FILE)`` reads) to those probabilities by cross-entropy. PF with the head needs
no PRM model: the head reads a hidden state the policy computes anyway.

The states come from PF's own traces, so the head learns where PF will query it: every candidate
step of every round, the ones resampling dropped included. The trace's score of a particle is its
newest step's probability under ``model`` and ``last`` aggregation, so the traces are taken under
one of those; the head is then used under the aggregation the PRM is used with (``min`` for a
judge of single steps: ``last`` feeds it the same input, a tag after every step).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from pfengine.config import Request
from pfengine.engine import Engine
from pfengine.prompting import encode_prompt
from pfengine.state import PFResult

TRACE_AGGREGATIONS = ("model", "last")
"""Aggregations under which a trace's score of a particle is the PRM's probability of its newest step."""


class Head(nn.Module):
    """``Linear(H,H) -> ReLU -> Linear(H,2)``, saved as ``score.0.*`` / ``score.2.*`` (the value-head
    file layout, and the head of a Qwen2.5-Math-PRM-layout checkpoint)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.score(h)

    def logit(self, h: torch.Tensor) -> torch.Tensor:
        """logit(p_good) = l1 - l0, as the engine reads the head."""
        out = self.score(h)
        return out[:, 1] - out[:, 0]

    def state(self) -> dict[str, torch.Tensor]:
        return {f"score.{k}": v.detach().clone().contiguous() for k, v in self.score.state_dict().items()}


@dataclass
class FitConfig:
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_size <= 0:
            raise ValueError(f"epochs and batch_size must be positive, got {self.epochs} and {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 5 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def fit_head(hidden: torch.Tensor, target: torch.Tensor, cfg: FitConfig,
             log: Callable[[str], None] = lambda msg: None) -> Head:
    """A head on fixed hidden states ``[M, H]`` fitted to probabilities ``target [M]`` (0/1 labels or
    a PRM's soft scores) by binary cross-entropy on ``logit = l1 - l0``."""
    assert hidden.dim() == 2 and target.shape == (hidden.shape[0],), (hidden.shape, target.shape)
    torch.manual_seed(cfg.seed)
    head = Head(hidden.shape[1])
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    n = len(target)
    total = cfg.epochs * ((n + cfg.batch_size - 1) // cfg.batch_size)
    step = 0
    for ep in range(cfg.epochs):
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for a in range(0, n, cfg.batch_size):
            idx = perm[a:a + cfg.batch_size]
            loss = F.binary_cross_entropy_with_logits(head.logit(hidden[idx]), target[idx].float())
            for grp in opt.param_groups:
                grp["lr"] = cosine_lr(step, total, cfg.lr, min(50, total // 10 + 1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
            step += 1
        if (ep + 1) % 10 == 0 or ep + 1 == cfg.epochs:
            log(f"head epoch {ep + 1}/{cfg.epochs} loss {tot / n:.4f}")
    return head.eval()


@torch.no_grad()
def hidden_at(model, seqs: list[list[int]], positions: list[list[int]], pad_id: int, batch_size: int = 64
              ) -> torch.Tensor:
    """The causal LM's final (post-norm) hidden states at ``positions[i]`` of ``seqs[i]``, concatenated
    ``[sum len(positions), H]``. Right padding: under a causal mask no real token sees a pad."""
    out = []
    model.eval()
    for b in range(0, len(seqs), batch_size):
        chunk = seqs[b:b + batch_size]
        L = max(len(s) for s in chunk)
        ids = torch.tensor([s + [pad_id] * (L - len(s)) for s in chunk], dtype=torch.long)
        h = model.model(input_ids=ids).last_hidden_state
        out += [h[j, positions[b + j]] for j in range(len(chunk))]
    return torch.cat(out).float()


@dataclass
class Trajectory:
    """One particle lineage as far as the filter took it: prompt and generated token ids, where its
    scored states end (lengths into ``tokens``) and the PRM's probability of each state's newest step."""

    prompt: list[int]
    tokens: list[int]
    ends: list[int]
    scores: list[float]


def trajectories(prompt: list[int], result: PFResult) -> list[Trajectory]:
    """Every distinct scored state of a PF run, once, on as few lineages as the trace allows. A slot
    carries its lineage's states while it survives resampling; a slot that resampling drops (or that
    the run ends with) closes its lineage. Siblings forked from one slot share its earlier states:
    each state goes to the first lineage that closes with it."""
    if not result.trace:
        return []
    slots = [Trajectory(prompt, [], [], []) for _ in result.trace[0].tokens]
    done: set[tuple[int, ...]] = set()
    out: list[Trajectory] = []
    for k, tr in enumerate(result.trace):
        for i, toks in enumerate(tr.tokens):
            slots[i].tokens = toks
            if tr.scored[i] and (not slots[i].ends or slots[i].ends[-1] != len(toks)):
                slots[i].ends.append(len(toks))
                slots[i].scores.append(tr.scores[i])
        last = k + 1 == len(result.trace)
        kept = set() if last else set(range(len(slots)) if tr.ancestors is None else tr.ancestors)
        for i, t in enumerate(slots):
            if i not in kept:
                closed = _unclaimed(t, done)
                if closed.ends:
                    out.append(closed)
        if tr.ancestors is not None and not last:
            slots = [Trajectory(prompt, list(slots[a].tokens), list(slots[a].ends), list(slots[a].scores))
                     for a in tr.ancestors]
    return out


def _unclaimed(t: Trajectory, done: set[tuple[int, ...]]) -> Trajectory:
    keep = [(e, s) for e, s in zip(t.ends, t.scores) if tuple(t.tokens[:e]) not in done]
    done.update(tuple(t.tokens[:e]) for e, _ in keep)
    return Trajectory(t.prompt, t.tokens[:keep[-1][0]] if keep else [], [e for e, _ in keep], [s for _, s in keep])


def collect(engine: Engine, requests: list[Request], chunk: int = 64,
            progress: Callable[[int], None] = lambda n: None) -> list[Trajectory]:
    """Run the PF ``requests`` (their aggregation one of :data:`TRACE_AGGREGATIONS`), ``chunk`` at a
    time, and return their trajectories."""
    out: list[Trajectory] = []
    for a in range(0, len(requests), chunk):
        part = requests[a:a + chunk]
        for r in part:
            if r.search.method != "particle_filter" or r.search.aggregation not in TRACE_AGGREGATIONS:
                raise ValueError(f"distill traces need particle_filter with aggregation in {TRACE_AGGREGATIONS}, "
                                 f"got {r.search.method} / {r.search.aggregation}")
        for r, res in zip(part, engine.generate(part)):
            out += trajectories(encode_prompt(engine.tokenizer, r.prompt)[1], res)
        progress(len(part))
    return out


def targets(trajs: list[Trajectory]) -> tuple[list[list[int]], list[list[int]], torch.Tensor]:
    """``(sequences, step-end positions, scores)`` for :func:`hidden_at` and :func:`fit_head`."""
    seqs = [t.prompt + t.tokens for t in trajs]
    positions = [[len(t.prompt) + e - 1 for e in t.ends] for t in trajs]
    return seqs, positions, torch.tensor([s for t in trajs for s in t.scores])


def distill(policy, pad_id: int, trajs: list[Trajectory], cfg: FitConfig,
            log: Callable[[str], None] = lambda msg: None) -> tuple[Head, dict]:
    """Fit a value head for ``policy`` (a transformers causal LM) to the PRM scores on ``trajs``."""
    t = time.perf_counter()
    seqs, positions, y = targets(trajs)
    hidden = hidden_at(policy, seqs, positions, pad_id)
    seconds_hidden = time.perf_counter() - t
    log(f"distill: {len(y)} states on {len(trajs)} lineages, hidden states in {seconds_hidden:.0f}s; "
        f"mean PRM score {float(y.mean()):.3f}")
    head = fit_head(hidden, y, cfg, log)
    with torch.no_grad():
        fitted = torch.sigmoid(head.logit(hidden))
    report = {"states": len(y), "lineages": len(trajs), "mean_score": float(y.mean()),
              "fit_mean_abs_error": float((fitted - y).abs().mean()), "seconds_hidden": seconds_hidden,
              "fit": asdict(cfg)}
    return head, report


def save_head(head: Head, path: str | Path) -> None:
    """The value-head file ``EngineConfig(prm=...)`` reads (no run metadata: equal weights, equal bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(head.state(), str(path))


def read_prompts(path: str | Path) -> list[str]:
    """The ``problem`` field of every line of a JSON-lines file (the paper's dataset format)."""
    prompts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--data {path}: line {n} is not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("problem"), str) or not row["problem"]:
                raise ValueError(f"--data {path}: line {n} needs a non-empty string field 'problem'")
            prompts.append(row["problem"])
    if not prompts:
        raise ValueError(f"--data {path}: no prompts")
    return prompts


def toy_requests(n: int, particles: int, aggregation: str, temperature: float, seed: int,
                 max_steps: int | None, max_step_tokens: int | None) -> list[Request]:
    """PF requests for ``n`` toy training problems (never a held-out one)."""
    from pfengine.toy.pf import MAX_STEP_TOKENS, MAX_STEPS, pf_request
    from pfengine.toy.task import problems

    return [pf_request(p, n_particles=particles, seed=seed * 1_000_003 + i, temperature=temperature,
                       max_steps=max_steps or MAX_STEPS, max_step_tokens=max_step_tokens or MAX_STEP_TOKENS,
                       aggregation=aggregation)
            for i, p in enumerate(problems("train", 50_000 + seed, n))]


def prompt_requests(prompts: list[str], particles: int, aggregation: str, temperature: float, seed: int,
                    max_steps: int | None, max_step_tokens: int | None) -> list[Request]:
    from pfengine.config import SamplingParams, SearchParams

    steps, step_tokens = max_steps or 40, max_step_tokens or 256
    return [Request(prompt=[{"role": "user", "content": p}],
                    sampling=SamplingParams(temperature=temperature, seed=seed * 1_000_003 + i, max_steps=steps,
                                            max_step_tokens=step_tokens, max_tokens=steps * step_tokens),
                    search=SearchParams(n_particles=particles, aggregation=aggregation))
            for i, p in enumerate(prompts)]


def run_command(args) -> int:
    """``pfengine distill`` (options in :mod:`pfengine.cli`)."""
    from transformers import AutoModelForCausalLM

    from pfengine.config import EngineConfig
    from pfengine.toy.pf import POLICY, PRM

    if args.threads is not None:
        if args.threads <= 0:
            raise ValueError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.particles <= 0:
        raise ValueError(f"--particles must be positive, got {args.particles}")
    if args.problems <= 0:
        raise ValueError(f"--problems must be positive, got {args.problems}")
    if not str(args.out).endswith(".safetensors"):
        raise ValueError(f"--out {args.out!r}: expected a .safetensors file name")
    model, prm = args.model or str(POLICY), args.prm or str(PRM)
    if not Path(prm).is_dir():
        raise ValueError(f"--prm {prm!r}: expected a PRM checkpoint directory (distill learns from a separate PRM)")
    shape = (args.particles, args.aggregation, args.temperature, args.seed, args.max_steps, args.max_step_tokens)
    reqs = (prompt_requests(read_prompts(args.data), *shape) if args.data
            else toy_requests(args.problems, *shape))
    engine = Engine(EngineConfig(model=model, prm=prm, num_blocks=8192, max_particles=max(1024, 64 * args.particles)))
    t = time.perf_counter()
    trajs = collect(engine, reqs, progress=lambda n: print(f"traced {n} prompts", flush=True))
    seconds_trace = time.perf_counter() - t
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    head, report = distill(policy, engine.tokenizer.pad_token_id or 0, trajs, FitConfig(epochs=args.epochs,
                                                                                         seed=args.seed),
                           log=lambda m: print(m, flush=True))
    report |= {"prompts": len(reqs), "particles": args.particles, "aggregation": args.aggregation,
               "seconds_trace": seconds_trace, "seconds_total": time.perf_counter() - t}
    save_head(head, args.out)
    print(json.dumps(report, indent=1))
    print(f"Wrote {args.out}: run PF with EngineConfig(model={model!r}, prm={str(args.out)!r})")
    return 0
