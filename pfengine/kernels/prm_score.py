"""PRM scoring: head on step-end hidden states -> logit -> aggregate -> tempered, normalised weights + ESS."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

P_CLIP = 1e-7
LOGIT_CLIP = math.log((1 - P_CLIP) / P_CLIP)


@dataclass
class PRMHead:
    """``Linear(H, H) -> ReLU -> Linear(H, 2)``; class 1 is "step is correct"."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor


def initial_running(n: int, aggregation: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Aggregate before any step: ``min`` starts at the top, everything else at 0."""
    return torch.full((n,), LOGIT_CLIP if aggregation == "min" else 0.0, device=device)


def score_particles(hidden: torch.Tensor, head: PRMHead, running: torch.Tensor, scored: torch.Tensor,
                    seg_starts: torch.Tensor, aggregation: str, temperature: float | torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused path for hidden-state PRMs: ``hidden [M, H]`` holds each particle's step-end state;
    rows where ``scored`` is False (frozen particles) keep their running aggregate."""
    return weigh(head_logit(hidden, head), running, scored, seg_starts, aggregation, temperature)


def head_logit(hidden: torch.Tensor, head: PRMHead) -> torch.Tensor:
    """logit(p_correct) = l1 - l0, clipped as the paper clips p to [1e-7, 1 - 1e-7]."""
    h = torch.relu(hidden.float() @ head.w1.T + head.b1)
    logits = h @ head.w2.T + head.b2
    return (logits[:, 1] - logits[:, 0]).clamp(-LOGIT_CLIP, LOGIT_CLIP)


def weigh(step_logit: torch.Tensor, running: torch.Tensor, scored: torch.Tensor, seg_starts: torch.Tensor,
          aggregation: str, temperature: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns the new running aggregate, per-segment normalised log-weights and ESS per segment.

    ``running`` holds logit(r) for ``model``/``last``/``min`` and sum(log p) for ``prod``.
    """
    step_logit = step_logit.float()
    if aggregation in ("model", "last"):
        new = step_logit
    elif aggregation == "min":
        new = torch.minimum(running, step_logit)
    elif aggregation == "prod":
        new = running + torch.nn.functional.logsigmoid(step_logit)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}")
    running = torch.where(scored, new, running)
    if aggregation == "prod":
        logit = running - torch.log(-torch.expm1(running.clamp(max=math.log1p(-P_CLIP))))
    else:
        logit = running
    log_w = logit.clamp(-LOGIT_CLIP, LOGIT_CLIP) / temperature
    seg = _segment_ids(seg_starts, log_w.shape[0])
    n_seg = seg_starts.numel() - 1
    seg_max = torch.full((n_seg,), -math.inf, device=log_w.device).scatter_reduce(0, seg, log_w, "amax")
    exp = torch.exp(log_w - seg_max[seg])
    seg_sum = torch.zeros(n_seg, device=log_w.device).index_add_(0, seg, exp)
    log_w = log_w - seg_max[seg] - torch.log(seg_sum[seg])
    w = log_w.exp()
    ess = 1.0 / torch.zeros(n_seg, device=log_w.device).index_add_(0, seg, w * w)
    return running, log_w, ess


def running_to_prob(running: torch.Tensor, aggregation: str) -> torch.Tensor:
    """The aggregated probability r behind a running aggregate."""
    return running.exp() if aggregation == "prod" else torch.sigmoid(running)


def _segment_ids(seg_starts: torch.Tensor, m: int) -> torch.Tensor:
    counts = seg_starts[1:] - seg_starts[:-1]
    return torch.arange(counts.numel(), device=seg_starts.device).repeat_interleave(counts)[:m]
