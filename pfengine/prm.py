"""Process reward models. Every kind answers one question, :meth:`score`: the step logits
``logit(p)`` of the particles whose step just ended. Kinds: a value head on the policy's hidden
state, a separate PRM model with its own forked cache (Qwen2.5-Math-PRM layout, or Math-Shepherd
style, or a causal LM judging each step by its own likelihood), or a Python callable."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch.profiler import record_function

from pfengine.config import LIKELIHOOD_REDUCTIONS
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
    before: Callable[[], list[int]]
    """The token just before each particle's pending ones (a likelihood PRM predicts from it)."""
    partial: torch.Tensor
    """A likelihood PRM's reduction over the step's tokens it read earlier (``ParticleTable.prm_partial``)."""
    texts: Callable[[], list[tuple[str, list[str]]]]
    """Each particle's prompt and step texts."""


class PRM(Protocol):
    reads_hidden: bool
    model_aggregation: str
    """What the ``model`` aggregation (the PRM judges the whole prefix) is for this kind: ``model``
    where its score of a step reads the prefix, else the aggregation that makes a prefix's score
    of its step scores."""
    """It scores the policy's hidden states (``EndedSteps.hidden``), which must then be current."""

    def score(self, ended: EndedSteps) -> torch.Tensor:
        """Step logits ``[m]`` (finite where the PRM behaved; the caller zeroes the others' weights)."""


def prob_logit(p: torch.Tensor) -> torch.Tensor:
    """``logit(p)`` as float32, p clipped to ``[P_CLIP, 1 - P_CLIP]`` (so within ``±LOGIT_CLIP``)."""
    p = p.double().clamp(P_CLIP, 1 - P_CLIP)
    return (p.log() - torch.log1p(-p)).float()


def read_once(runner: ModelRunner, ended: EndedSteps, pending: list[list[int]],
              read: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
    """Rows with equal nodes hold equal tokens: ``read`` reads the first of each (given their
    positions in ``ended``, one result row each), the others become copies of it in ``runner``'s
    cache afterwards. The result row of every particle."""
    rep_of: dict[int, int] = {}
    for k, node in enumerate(ended.nodes):
        rep_of.setdefault(node, k)
    reps = sorted(set(rep_of.values()))
    out = read(reps)
    dups = [k for k, node in enumerate(ended.nodes) if rep_of[node] != k]
    if dups:
        assert all(pending[k] == pending[rep_of[ended.nodes[k]]] for k in dups)
        runner.blocks.assign(ended.rows[dups], ended.rows[[rep_of[ended.nodes[k]] for k in dups]])
    position = {k: n for n, k in enumerate(reps)}
    return out[[position[rep_of[node]] for node in ended.nodes]]


class ValueHeadPRM:
    """``Linear(H,H) -> ReLU -> Linear(H,2)`` on the policy's own hidden state: no extra forward."""

    reads_hidden = True
    model_aggregation = "model"

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
    model_aggregation = "model"

    def __init__(self, runner: ModelRunner, step_tag_id: int, good_bad: tuple[int, int] | None = None) -> None:
        assert (runner.decoder.prm_head is None) == (good_bad is not None)
        self.runner, self.step_tag_id, self.good_bad = runner, step_tag_id, good_bad
        self.head = runner.decoder.prm_head

    def read_prompts(self, rows: list[int], prompts: list[list[int]]) -> None:
        with record_function("pfengine::prm_forward"):
            self.runner.extend(rows, prompts)

    def catch_up(self, rows: list[int], pending: list[list[int]], before: list[int],
                 partial: torch.Tensor) -> torch.Tensor:
        """Read the given rows' pending tokens now (before a sibling forks from them mid-step);
        the rows' new ``prm_partial`` (unused here)."""
        with record_function("pfengine::prm_forward"):
            self.runner.extend(rows, pending)
        return partial

    def score(self, ended: EndedSteps) -> torch.Tensor:
        pending = ended.pending()

        def read(reps: list[int]) -> torch.Tensor:
            rows = ended.rows[reps]
            with record_function("pfengine::prm_forward"):
                tagged = [pending[k] + [self.step_tag_id] for k in reps]
                hidden = self.runner.extend(rows.tolist(), tagged, tagged=True)
            if not ended.keep_tags:
                self.runner.blocks.truncate(rows, 1)
            return hidden

        hidden = read_once(self.runner, ended, pending, read)
        if self.good_bad is None:
            return head_logit(hidden, self.head)
        logits = self.runner.decoder.logits(hidden)[:, list(self.good_bad)].float()
        return (logits[:, 0] - logits[:, 1]).clamp(-LOGIT_CLIP, LOGIT_CLIP)


class LikelihoodPRM:
    """A causal LM (the policy's tokenizer) judging a step by the log-probabilities it gives the
    step's own tokens, reduced by ``min`` (the step's least likely token) or ``mean``; the step
    logit is ``logit(exp(reduced))``, p clipped to ``[1e-7, 1 - 1e-7]``.

    Its paged cache forks with the policy's like :class:`ModelPRM`'s and reads each token once,
    at the step end, with no step tag. It stays one token behind the particle: the token before
    the pending ones is read with them (``[before] + pending[:-1]``), so the logits at the new
    positions are exactly the predictions of the pending tokens, and no logits row has to be kept
    per particle and forked. Tokens read mid-step (:meth:`catch_up`) leave their reduction in
    ``ParticleTable.prm_partial``, which forks with the particle."""

    reads_hidden = False
    model_aggregation = "min"  # it judges each step alone: a prefix is as good as its worst step

    def __init__(self, runner: ModelRunner, reduction: str) -> None:
        assert reduction in LIKELIHOOD_REDUCTIONS and runner.decoder.prm_head is None
        self.runner, self.reduction = runner, reduction

    def read_prompts(self, rows: list[int], prompts: list[list[int]]) -> None:
        """Each prompt but its last token (read with the first step)."""
        reads = [(row, p[:-1]) for row, p in zip(rows, prompts) if len(p) > 1]
        if reads:
            with record_function("pfengine::prm_forward"):
                self.runner.extend([row for row, _ in reads], [p for _, p in reads])

    def catch_up(self, rows: list[int], pending: list[list[int]], before: list[int],
                 partial: torch.Tensor) -> torch.Tensor:
        return self._read(rows, pending, before, partial)

    def score(self, ended: EndedSteps) -> torch.Tensor:
        pending, before = ended.pending(), ended.before()

        def read(reps: list[int]) -> torch.Tensor:
            return self._read(ended.rows[reps].tolist(), [pending[k] for k in reps], [before[k] for k in reps],
                              ended.partial[reps])

        partial = read_once(self.runner, ended, pending, read)
        logp = partial[:, 0] if self.reduction == "min" else partial[:, 1] / partial[:, 2].clamp(min=1)
        return prob_logit(logp.double().exp())

    def _read(self, rows: list[int], pending: list[list[int]], before: list[int],
              partial: torch.Tensor) -> torch.Tensor:
        """Read ``[before] + pending[:-1]`` into each row; ``partial`` with the log-probabilities
        of the pending tokens folded in (min, sum, count)."""
        sel = [k for k, p in enumerate(pending) if p]
        partial = partial.clone()
        if not sel:
            return partial
        with record_function("pfengine::prm_forward"):
            reads = [[before[k]] + pending[k][:-1] for k in sel]
            hidden = self.runner.extend([rows[k] for k in sel], reads, every=True)
        targets = torch.tensor([t for k in sel for t in pending[k]], device=hidden.device)
        logp = self.runner.decoder.logits(hidden).float().log_softmax(-1)
        logp = logp.gather(1, targets[:, None])[:, 0].cpu()
        seg = torch.tensor(sel).repeat_interleave(torch.tensor([len(pending[k]) for k in sel]))
        partial[:, 0] = partial[:, 0].scatter_reduce(0, seg, logp, "amin")
        partial[:, 1] = partial[:, 1].index_add(0, seg, logp)
        partial[:, 2] = partial[:, 2].index_add(0, seg, torch.ones_like(logp))
        return partial


class CallablePRM:
    reads_hidden = False
    model_aggregation = "model"

    def __init__(self, fn: PRMFn) -> None:
        self.fn = fn

    def score(self, ended: EndedSteps) -> torch.Tensor:
        """``logit(p)``, p clipped to ``[1e-7, 1 - 1e-7]``. A call that raises, or a value that is not
        a probability (NaN, inf, outside [0, 1], not a number), is logged and read as 0: that
        particle's weight vanishes and the request goes on (one failed particle does not end a run)."""
        probs = [self._call(prompt, steps) for prompt, steps in ended.texts()]
        return prob_logit(torch.tensor(probs, dtype=torch.float64))

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
