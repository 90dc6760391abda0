"""Process reward models: a value head on the policy, a separate PRM model with its own forked cache,
or a Python callable. Each scores the particles whose step just ended."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import record_function

from pfengine.kernels.prm_score import LOGIT_CLIP, P_CLIP, PRMHead
from pfengine.model.checkpoint import CheckpointError, load_tensors
from pfengine.runner import ModelRunner

log = logging.getLogger("pfengine")

PRMFn = Callable[[str, list[str]], float]
"""``(prompt_text, steps_so_far) -> probability that the last step is correct``."""


@dataclass
class EndedStep:
    """One particle whose step just ended: what every PRM kind may need to score it."""

    row: int
    hidden: torch.Tensor
    """The policy's final hidden state at the step's last token."""
    prompt: str
    steps: list[str]
    node: int
    """Equal nodes hold equal tokens: the PRM forwards one of them and forks the rest."""
    pending: list[int] = field(default_factory=list)
    """Tokens of the step the PRM model's cache has not read yet (see ``Particle.prm_lag``)."""


class ValueHeadPRM:
    """``Linear(H,H) -> ReLU -> Linear(H,2)`` on the policy's own hidden state: no extra forward."""

    def __init__(self, head: PRMHead) -> None:
        self.head = head

    def score(self, ended: list[EndedStep]) -> torch.Tensor:
        """The policy's hidden states at the step ends (the head runs in the fused scoring kernel)."""
        return torch.stack([e.hidden for e in ended])


class ModelPRM:
    """A PRM model with its own paged cache. The cache has the policy's rows and forks with them.
    The PRM reads each policy token once, but not as it is sampled: a step's tokens wait until the
    step ends and are read then, followed by a step tag, in one extend for all particles (wide
    GEMMs instead of one skinny decode forward per token). The tag is read by the 2-layer head
    (Qwen2.5-Math-PRM layout) or, Math-Shepherd style, as P(good) vs P(bad) from the LM head. With
    ``keep_tags=False`` (``model`` aggregation) the tag is scored and then dropped from the cache."""

    def __init__(self, runner: ModelRunner, step_tag_id: int, good_bad: tuple[int, int] | None = None) -> None:
        assert (runner.decoder.prm_head is None) == (good_bad is not None)
        self.runner, self.step_tag_id, self.good_bad = runner, step_tag_id, good_bad
        self.head = runner.decoder.prm_head
        self.tags_forwarded = 0

    def catch_up(self, rows: list[int], pending: list[list[int]]) -> None:
        """Read the given rows' pending tokens now (before a sibling forks from them mid-step)."""
        with record_function("pfengine::prm_forward"):
            self.runner.extend(rows, pending)

    def score(self, ended: list[EndedStep], keep_tags: bool) -> torch.Tensor:
        """Hidden states at the tags (Qwen layout) or step logits log P(good) - log P(bad) (Shepherd)."""
        rep_of: dict[int, int] = {}
        for k, e in enumerate(ended):
            rep_of.setdefault(e.node, k)
        reps = sorted(set(rep_of.values()))
        rows = [ended[k].row for k in reps]
        with record_function("pfengine::prm_forward"):
            hidden = self.runner.extend(rows, [ended[k].pending + [self.step_tag_id] for k in reps])
        self.tags_forwarded += len(reps)
        self.runner.tokens_forwarded -= len(reps)  # tags are counted apart from content tokens
        if not keep_tags:
            self.runner.blocks.truncate(torch.tensor(rows), 1)
        dups = [k for k, e in enumerate(ended) if rep_of[e.node] != k]
        if dups:
            assert all(ended[k].pending == ended[rep_of[ended[k].node]].pending for k in dups)
            self.runner.blocks.assign(torch.tensor([ended[k].row for k in dups]),
                                      torch.tensor([ended[rep_of[ended[k].node]].row for k in dups]))
        position = {k: n for n, k in enumerate(reps)}
        hidden = hidden[[position[rep_of[e.node]] for e in ended]]
        if self.good_bad is None:
            return hidden
        good, bad = self.good_bad
        lm_head = self.runner.decoder.lm_head
        return (hidden @ (lm_head[good] - lm_head[bad])).clamp(-LOGIT_CLIP, LOGIT_CLIP)


class CallablePRM:
    def __init__(self, fn: PRMFn) -> None:
        self.fn = fn

    def score(self, ended: list[EndedStep]) -> torch.Tensor:
        """Step logits ``logit(p)``, p clipped to ``[1e-7, 1 - 1e-7]``. A call that raises, or a value
        that is not a probability (NaN, inf, outside [0, 1], not a number), is logged and read as 0:
        that particle's weight vanishes and the request goes on (one failed particle does not end a run)."""
        probs = [self._call(e) for e in ended]
        return torch.tensor([math.log(max(p, P_CLIP) / max(1 - p, P_CLIP)) for p in probs]).clamp(-LOGIT_CLIP, LOGIT_CLIP)

    def _call(self, e: EndedStep) -> float:
        try:
            p = float(self.fn(e.prompt, e.steps))
        except Exception as error:
            log.warning("PRM callable raised %s: %s; that particle gets weight 0", type(error).__name__, error)
            return 0.0
        if not 0.0 <= p <= 1.0:
            log.warning("PRM callable returned %r, outside [0, 1]; that particle gets weight 0", p)
            return 0.0
        return p


def load_value_head(path: str | Path, hidden_size: int, device: str | torch.device = "cpu") -> PRMHead:
    """A safetensors file with ``score.0.{weight,bias}`` (H x H) and ``score.2.{weight,bias}`` (2 x H),
    on the policy's ``device`` (the head reads its hidden states there)."""
    H = hidden_size
    shapes = {"score.0.weight": (H, H), "score.0.bias": (H,), "score.2.weight": (2, H), "score.2.bias": (2,)}
    if not str(path).endswith(".safetensors"):
        raise CheckpointError(f"value head {str(path)!r}: expected a .safetensors file")
    t = load_tensors(path, shapes)
    return PRMHead(*(t[name].to(device) for name in shapes))
