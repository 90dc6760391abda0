"""Every particle's state as tensors indexed by its cache row, and the transitions between phases.

A particle is a row: its generated tokens, where its steps begin, its phase and why it finished all
live in host tensors ``[rows, ...]``, so the decode loop touches whole batches, never one particle
at a time. A row's life::

    GROWING --(its step ends: delimiter, EOS or a limit)--> ENDED --(scored at the round)--+
       ^                                                                                     |
       +------------------------ not finished: its next step starts ------------------------+
                                                   finished: FROZEN (keeps its weight)

and HELD for a particle Gibbs reference prefix (neither decoded nor scored). Each transition is one
method here. Step ends are found on token ids: EOS ids, the token limits, and the step delimiter
matched by :class:`~pfengine.delimiter.DelimiterMatcher` over each token's text.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

from pfengine.delimiter import DelimiterMatcher

FINISH_REASONS = ("eos", "max_steps", "max_tokens", "max_model_len")
"""Why a particle ended: it sampled end-of-text (``eos``: the model finished its solution), or a
limit cut it off: ``SamplingParams.max_steps``, ``SamplingParams.max_tokens``, or the context
(``max_model_len``, less room for the PRM's step tags). Stored as 1 + index; 0 while it grows."""
EOS, MAX_STEPS, MAX_TOKENS, MAX_MODEL_LEN = 1, 2, 3, 4


class Phase(IntEnum):
    GROWING = 0
    """Mid-step: one token per engine iteration."""
    ENDED = 1
    """Its step ended (and maybe the particle finished): waits for its request's round."""
    FROZEN = 2
    """Finished and scored: keeps its weight in resampling, never grows again."""
    HELD = 3
    """A particle Gibbs reference prefix: not decoded, not scored; its next step is fixed."""


@dataclass(frozen=True)
class RowLimits:
    """What ends a step or a particle, the same for every row of a request."""

    max_tokens: int
    """Generated tokens at which the particle is cut off (``max_tokens`` or the context's room)."""
    limit_reason: int
    max_step_tokens: int
    max_steps: int
    stop_on_eos: bool
    matcher: int
    """Index of the request's step delimiter in :attr:`ParticleTable.matchers`."""
    prm_reads: bool
    """A PRM model reads this request's tokens (they wait in ``prm_lag`` until the step ends)."""
    prompt_last: int = 0
    """The prompt's last token: a likelihood PRM reads it with the first step
    (:meth:`ParticleTable.before_pending`)."""


@dataclass
class Snapshot:
    """A particle copied out of the table (a result candidate, a beam that left the pool, a
    particle Gibbs reference)."""

    tokens: list[int]
    step_starts: list[int]
    finish: int

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS[self.finish - 1] if self.finish else None

    def steps(self) -> list[list[int]]:
        ends = self.step_starts[1:] + [len(self.tokens)]
        return [self.tokens[s:e] for s, e in zip(self.step_starts, ends) if e > s]

    def prefix(self, n_steps: int) -> Snapshot:
        """This particle cut after its first ``n_steps`` steps (finished only if nothing was cut)."""
        n_steps = min(n_steps, len(self.step_starts))
        end = self.step_starts[n_steps] if n_steps < len(self.step_starts) else len(self.tokens)
        finish = self.finish if n_steps == len(self.step_starts) else 0
        return Snapshot(self.tokens[:end], self.step_starts[:max(n_steps, 1)], finish)


class ParticleTable:
    """Per-row particle state (host tensors). Rows belong to the scheduler's row pool; a request's
    rows are set up by :meth:`start` and copied between by :meth:`copy`."""

    def __init__(self, rows: int, max_len: int) -> None:
        self.tokens = torch.zeros(rows, max_len, dtype=torch.int32)
        self.starts = torch.zeros(rows, max_len, dtype=torch.int32)
        """``starts[row, k]``: index of the first token of step ``k``, for ``k < n_steps``."""
        long = torch.int64

        def column(dtype: torch.dtype = long) -> torch.Tensor:
            return torch.zeros(rows, dtype=dtype)

        self.length, self.step_start, self.n_steps = column(), column(), column()
        self.phase, self.finish = column(torch.int8), column(torch.int8)
        self.node = column()
        """Identity of the token sequence: rows with equal nodes hold equal tokens (forks that sampled
        the same tokens), so only one of them is forwarded."""
        self.prm_lag = column()
        """Trailing tokens the PRM model's cache has not read yet: it reads a step's tokens in one
        extend when the step ends (or earlier, when a sibling forks from this row mid-step)."""
        self.match_state = column()
        self.prm_partial = torch.zeros(rows, 3)
        """A likelihood PRM's reduction over the tokens of the current step it has already read
        (when a sibling forked mid-step): min and sum of their log-probabilities, and their count."""
        # what ends a step or a particle, set per request (RowLimits)
        self.limit, self.limit_reason = column(), column(torch.int8)
        self.max_step_tokens, self.max_steps = column(), column()
        self.stop_on_eos, self.matcher, self.prm_reads = column(torch.bool), column(), column()
        self.prompt_last = column()
        self.eos_ids = torch.zeros(0, dtype=torch.int64)
        """Token ids that end a particle (where its request stops on EOS)."""
        self.matchers: list[DelimiterMatcher] = []
        self.next_node = 1

    _STATE = ("length", "step_start", "n_steps", "phase", "finish", "node", "prm_lag", "prm_partial", "match_state")
    """Per-particle fields a fork copies (besides the tokens); the others belong to the request."""

    def configure(self, rows: torch.Tensor, limits: RowLimits) -> None:
        """Give ``rows`` their request's limits (once, when the request is admitted)."""
        self.limit[rows] = limits.max_tokens
        self.limit_reason[rows] = limits.limit_reason
        self.max_step_tokens[rows] = limits.max_step_tokens
        self.max_steps[rows] = limits.max_steps
        self.stop_on_eos[rows] = limits.stop_on_eos
        self.matcher[rows] = limits.matcher
        self.prm_reads[rows] = int(limits.prm_reads)
        self.prompt_last[rows] = limits.prompt_last

    def start(self, rows: torch.Tensor) -> None:
        """Fresh particles at the beginning of their first step, all with the same (empty) sequence."""
        for name in self._STATE:
            getattr(self, name)[rows] = 0
        self.starts[rows, 0] = 0
        self.n_steps[rows] = 1
        self.node[rows] = self.new_nodes(1)

    def hold(self, row: int, snapshot: Snapshot, node: int) -> None:
        """A particle Gibbs reference prefix in ``row``: ENDED-like but never decoded nor scored
        (FROZEN if the whole finished reference)."""
        n = len(snapshot.tokens)
        self.tokens[row, :n] = torch.tensor(snapshot.tokens, dtype=torch.int32)
        self.starts[row, :len(snapshot.step_starts)] = torch.tensor(snapshot.step_starts, dtype=torch.int32)
        self.length[row], self.step_start[row] = n, snapshot.step_starts[-1]
        self.n_steps[row], self.finish[row] = len(snapshot.step_starts), snapshot.finish
        self.phase[row] = Phase.FROZEN if snapshot.finish else Phase.HELD
        self.node[row], self.prm_lag[row], self.match_state[row] = node, 0, 0
        self.prm_partial[row] = 0

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Row ``dst[i]`` becomes a copy of row ``src[i]`` (rows may overlap, as in resampling)."""
        if not src.numel():
            return
        width, steps = int(self.length[src].max()), int(self.n_steps[src].max())
        self.tokens[dst, :width] = self.tokens[src, :width]
        self.starts[dst, :steps] = self.starts[src, :steps]
        for name in self._STATE:
            t = getattr(self, name)
            t[dst] = t[src]

    def growing(self, rows: torch.Tensor) -> torch.Tensor:
        return self.phase[rows] == Phase.GROWING

    def append(self, rows: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Append ``new[i]`` to GROWING row ``rows[i]``; rows whose step ended move to ENDED (and
        get their finish reason). Returns the mask of rows that ended."""
        length = self.length[rows] + 1
        self.length[rows] = length
        self.tokens[rows, length - 1] = new.to(torch.int32)
        self.prm_lag[rows] += self.prm_reads[rows]
        hit = self._match(rows, new)
        finish = torch.zeros_like(length, dtype=torch.int8)
        at_limit = length >= self.limit[rows]
        finish[at_limit] = self.limit_reason[rows[at_limit]]
        finish[self.stop_on_eos[rows] & torch.isin(new, self.eos_ids)] = EOS
        ended = (finish > 0) | hit | (length - self.step_start[rows] >= self.max_step_tokens[rows])
        finish[ended & (finish == 0) & (self.n_steps[rows] >= self.max_steps[rows])] = MAX_STEPS
        self.finish[rows] = finish
        self.phase[rows[ended]] = Phase.ENDED
        return ended

    def _match(self, rows: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Advance each row's delimiter matcher by its new token; True where the delimiter completed."""
        kinds = self.matcher[rows]
        hit = torch.zeros(rows.numel(), dtype=torch.bool)
        for k in kinds.unique().tolist():
            sel = (kinds == k).nonzero().squeeze(1)
            state, done = self.matchers[k].advance(self.match_state[rows[sel]], new[sel])
            self.match_state[rows[sel]] = state
            hit[sel] = done
        return hit

    def next_step(self, rows: torch.Tensor) -> None:
        """ENDED rows that did not finish begin their next step (at the round's end)."""
        rows = rows[(self.phase[rows] == Phase.ENDED) & (self.finish[rows] == 0)]
        self.phase[rows] = Phase.GROWING
        self.step_start[rows] = self.length[rows]
        self.starts[rows, self.n_steps[rows]] = self.length[rows].to(torch.int32)
        self.n_steps[rows] += 1
        self.match_state[rows] = 0

    def freeze(self, rows: torch.Tensor) -> None:
        """Scored rows that finished keep their weight from now on."""
        self.phase[rows[self.finish[rows] > 0]] = Phase.FROZEN

    def merge_identical(self, rows: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Rows holding the same sequence that sampled the same token hold the same sequence again:
        the first of each group (in ``rows`` order) gets a new node and is forwarded, the others
        share its node. Returns, for each row, the position in ``rows`` of its group's first row."""
        key = self.node[rows] * (int(new.max()) + 1) + new if rows.numel() else new.clone()
        _, group = torch.unique(key, return_inverse=True)
        order = torch.arange(rows.numel())
        first = torch.full((int(group.max()) + 1 if rows.numel() else 0,), rows.numel(), dtype=torch.int64)
        first = first.scatter_reduce(0, group, order, reduce="amin")[group]
        leaders = first == order
        nodes = torch.zeros(rows.numel(), dtype=torch.int64)
        nodes[leaders] = self.new_nodes(int(leaders.sum()))
        self.node[rows] = nodes[first]
        return first

    def new_nodes(self, n: int) -> torch.Tensor:
        """Node ids never used before (fresh particles of different requests never merge)."""
        self.next_node += n
        return torch.arange(self.next_node - n, self.next_node)

    def snapshot(self, row: int) -> Snapshot:
        n, steps = int(self.length[row]), int(self.n_steps[row])
        return Snapshot(self.tokens[row, :n].tolist(), self.starts[row, :steps].tolist(), int(self.finish[row]))

    def token_lists(self, rows: torch.Tensor) -> list[list[int]]:
        width = int(self.length[rows].max()) if rows.numel() else 0
        block = self.tokens[rows, :width].tolist()
        return [t[:n] for t, n in zip(block, self.length[rows].tolist())]

    def pending(self, rows: torch.Tensor) -> list[list[int]]:
        """The trailing tokens each row's PRM cache has not read yet."""
        lag, length = self.prm_lag[rows].tolist(), self.length[rows].tolist()
        return [self.tokens[r, n - k:n].tolist() for r, n, k in zip(rows.tolist(), length, lag)]

    def before_pending(self, rows: torch.Tensor) -> list[int]:
        """The token just before each row's pending ones (the prompt's last where none was generated)."""
        at = self.length[rows] - self.prm_lag[rows] - 1
        held = self.tokens[rows, at.clamp(min=0)].to(torch.int64)
        return torch.where(at >= 0, held, self.prompt_last[rows]).tolist()
