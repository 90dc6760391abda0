"""Process reward models. Every kind answers one question, :meth:`score`: the step logits
``logit(p)`` of the particles whose step just ended. Kinds: a value head on the policy's hidden
state, a separate PRM model with its own forked cache (Qwen2.5-Math-PRM layout, or Math-Shepherd
style), or a Python callable."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch.profiler import record_function

from pfengine.kernels.prm_score import LOGIT_CLIP, P_CLIP, PRMHead, head_logit
from pfengine.model.checkpoint import CheckpointError, load_tensors
from pfengine.runner import ModelRunner

log = logging.getLogger("pfengine")

PRMFn = Callable[[str, list[str]], float]
"""``(prompt_text, steps_so_far) -> probability that the last step is correct``."""


@dataclass
class EndedSteps:
    """The particles whose step just ended, as every PRM kind may need them. Token lists and texts
    are built on demand: only the PRM model reads the former, only a callable the latter."""

    rows: torch.Tensor
    """Their cache rows."""
    hidden: torch.Tensor
    """The policy's final hidden state at each step's last token ``[m, H]``."""
    nodes: list[int]
    """Equal nodes hold equal tokens: a PRM model forwards one of them and forks the rest."""
    keep_tags: bool
    """The PRM model keeps each step tag in its cache (aggregations ``last``/``prod``/``min``); with
    ``model`` it reads the whole prefix as one step, so the tag is scored and dropped."""
    pending: Callable[[], list[list[int]]]
    """Each particle's tokens the PRM model's cache has not read yet."""
    texts: Callable[[], list[tuple[str, list[str]]]]
    """Each particle's prompt and step texts."""


class PRM(Protocol):
    reads_hidden: bool
    """It scores the policy's hidden states (``EndedSteps.hidden``), which must then be current."""

    def score(self, ended: EndedSteps) -> torch.Tensor:
        """Step logits ``[m]`` (finite where the PRM behaved; the caller zeroes the others' weights)."""


class ValueHeadPRM:
    """``Linear(H,H) -> ReLU -> Linear(H,2)`` on the policy's own hidden state: no extra forward."""

    reads_hidden = True

    def __init__(self, head: PRMHead) -> None:
        self.head = head

    def score(self, ended: EndedSteps) -> torch.Tensor:
        return head_logit(ended.hidden, self.head)


class ModelPRM:
    """A PRM model with its own paged cache. The cache has the policy's rows and forks with them.
    The PRM reads each policy token once, but not as it is sampled: a step's tokens wait until the
    step ends and are read then, followed by a step tag, in one extend for all particles (wide
    GEMMs instead of one skinny decode forward per token). The tag is read by the 2-layer head
    (Qwen2.5-Math-PRM layout) or, Math-Shepherd style, as P(good) vs P(bad) from the LM head."""

    reads_hidden = False

    def __init__(self, runner: ModelRunner, step_tag_id: int, good_bad: tuple[int, int] | None = None) -> None:
        assert (runner.decoder.prm_head is None) == (good_bad is not None)
        self.runner, self.step_tag_id, self.good_bad = runner, step_tag_id, good_bad
        self.head = runner.decoder.prm_head

    def catch_up(self, rows: list[int], pending: list[list[int]]) -> None:
        """Read the given rows' pending tokens now (before a sibling forks from them mid-step)."""
        with record_function("pfengine::prm_forward"):
            self.runner.extend(rows, pending)

    def score(self, ended: EndedSteps) -> torch.Tensor:
        rep_of: dict[int, int] = {}
        for k, node in enumerate(ended.nodes):
            rep_of.setdefault(node, k)
        reps = sorted(set(rep_of.values()))
        pending = ended.pending()
        rows = ended.rows[reps]
        with record_function("pfengine::prm_forward"):
            hidden = self.runner.extend(rows.tolist(), [pending[k] + [self.step_tag_id] for k in reps], tagged=True)
        if not ended.keep_tags:
            self.runner.blocks.truncate(rows, 1)
        dups = [k for k, node in enumerate(ended.nodes) if rep_of[node] != k]
        if dups:
            assert all(pending[k] == pending[rep_of[ended.nodes[k]]] for k in dups)
            self.runner.blocks.assign(ended.rows[dups], ended.rows[[rep_of[ended.nodes[k]] for k in dups]])
        position = {k: n for n, k in enumerate(reps)}
        hidden = hidden[[position[rep_of[node]] for node in ended.nodes]]
        if self.good_bad is None:
            return head_logit(hidden, self.head)
        logits = self.runner.decoder.logits(hidden)[:, list(self.good_bad)].float()
        return (logits[:, 0] - logits[:, 1]).clamp(-LOGIT_CLIP, LOGIT_CLIP)


class CallablePRM:
    reads_hidden = False

    def __init__(self, fn: PRMFn) -> None:
        self.fn = fn

    def score(self, ended: EndedSteps) -> torch.Tensor:
        """``logit(p)``, p clipped to ``[1e-7, 1 - 1e-7]``. A call that raises, or a value that is not
        a probability (NaN, inf, outside [0, 1], not a number), is logged and read as 0: that
        particle's weight vanishes and the request goes on (one failed particle does not end a run)."""
        probs = [self._call(prompt, steps) for prompt, steps in ended.texts()]
        return torch.tensor([math.log(max(p, P_CLIP) / max(1 - p, P_CLIP)) for p in probs]).clamp(-LOGIT_CLIP, LOGIT_CLIP)

    def _call(self, prompt: str, steps: list[str]) -> float:
        try:
            p = float(self.fn(prompt, steps))
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
    if not str(path).endswith(".safetensors"):
        raise CheckpointError(f"value head {str(path)!r}: expected a .safetensors file")
    tensors = load_tensors(path, PRMHead.shapes(hidden_size))
    return PRMHead.from_tensors({name: t.to(device) for name, t in tensors.items()})
