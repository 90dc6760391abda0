"""Amortise a separate PRM into the policy's value head: ``pfengine distill``.

Particle filtering with a separate PRM pays for a second model's forward on every step; the PF
authors name the next step: let the policy act as its own PRM. ``distill`` runs PF with the
separate PRM on training prompts, records every particle state the filter scored together with the
PRM's probability for it, and fits a value head (``Linear(H,H) -> ReLU -> Linear(H,2)`` on the
policy's final hidden state at the step's last token: the file ``EngineConfig(prm=FILE)`` reads)
to those probabilities by cross-entropy. PF with the head needs no PRM model: the head reads a
hidden state the policy computes anyway.

The states come from PF's own traces, so the head learns where PF will query it: every candidate
step of every round, the ones resampling dropped included. A trace's score of a particle is the
PRM's probability of its newest state under ``model`` and ``last`` aggregation only, so the traces
are taken under one of those (:data:`TRACE_AGGREGATIONS`); the head is then used under the
aggregation the PRM is used with.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from pfengine.prompting import encode_prompt

if TYPE_CHECKING:
    from pfengine.config import Request
    from pfengine.engine import Engine
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
    a PRM's soft scores) by cross-entropy against ``(1 - target, target)``. On 0/1 labels this is the
    value head's training as it always was, to the bit (the bundled head reproduces)."""
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
            loss = F.cross_entropy(head(hidden[idx]), torch.stack([1 - target[idx], target[idx]], -1).float())
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
    for r in requests:
        if r.search.method != "particle_filter" or r.search.aggregation not in TRACE_AGGREGATIONS:
            raise ValueError(f"method / aggregation: distill traces particle_filter under "
                             f"{' or '.join(TRACE_AGGREGATIONS)}, got {r.search.method} / {r.search.aggregation}")
    out: list[Trajectory] = []
    for a in range(0, len(requests), chunk):
        part = requests[a:a + chunk]
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
    seconds_hidden, mean = time.perf_counter() - t, float(y.mean())
    log(f"distill: {len(y)} states on {len(trajs)} lineages, hidden states in {seconds_hidden:.0f}s; "
        f"mean PRM score {mean:.3f}")
    head = fit_head(hidden, y, cfg, log)
    with torch.no_grad():
        fitted = torch.sigmoid(head.logit(hidden))
    report = {"states": len(y), "lineages": len(trajs), "mean_score": mean,
              "fit_mean_abs_error": float((fitted - y).abs().mean()), "seconds_hidden": seconds_hidden,
              "fit": asdict(cfg)}
    return head, report


def save_head(head: Head, path: str | Path) -> None:
    """The value-head file ``EngineConfig(prm=...)`` reads (no run metadata: equal weights, equal bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(head.state(), str(path))


def toy_problems(n: int, seed: int) -> list[str]:
    """``n`` toy training problems (never a held-out one): the default prompts of the bundled policy."""
    from pfengine.toy.task import problems

    return [p.text for p in problems("train", 50_000 + seed, n)]
