"""A run's trace as a genealogy tree: per round, one node for each distinct particle state.

Particle ``i`` of round ``k`` descends from particle ``ancestors[i]`` of round ``k - 1`` (the
resampling recorded after round ``k - 1``; no resampling: from itself), or from the prompt in the
first round of a sweep. Particles of one round with the same parent node and the same new tokens
(identical copies, or siblings that sampled the same step) are one node with a count, so a node's
identity is its whole token sequence within its band."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from pfengine.genealogy.record import Run
from pfengine.state import StepTrace

ROOT = -1
"""``Node.parent`` of a sweep's prompt node."""
METHOD_NAMES = {"particle_filter": "Particle filtering", "particle_gibbs": "Particle Gibbs",
                "parallel_tempering": "Parallel tempering", "greedy": "Greedy", "best_of_n": "Best-of-N",
                "weighted_best_of_n": "Weighted best-of-N", "self_consistency": "Self-consistency",
                "beam_search": "Beam search", "dvts": "DVTS"}
FORKING = ("particle_filter", "particle_gibbs", "parallel_tempering", "beam_search", "dvts")


@dataclass
class Node:
    column: int
    parent: int
    band: int
    step: str
    """The text this round added to the particle ("" for the prompt, or a finished particle carried on)."""
    score: float
    scored: bool
    """Scored by the PRM this round (a finished particle carried on, or the prompt, is not)."""
    slots: list[int] = field(default_factory=list)
    weight: float = 0.0
    forked: bool = False
    """Reached through a fork: resampling copied its parent particle into more than one slot."""
    reference: bool = False
    """Holds particle Gibbs' reference trajectory."""
    candidate: int = -1
    """Index of the final candidate this node is (-1: none)."""

    @property
    def count(self) -> int:
        return len(self.slots)

    @property
    def is_root(self) -> bool:
        return self.parent == ROOT

    @property
    def carried(self) -> bool:
        """A finished particle carried into a later round unchanged."""
        return not self.is_root and not self.scored and not self.step


@dataclass
class Column:
    sweep: int
    round: int
    """Round within the sweep; 0 is the sweep's prompt column."""
    ess: float | None
    resampled: bool
    """The particles were resampled after this round."""


@dataclass
class Tree:
    run: Run
    nodes: list[Node]
    columns: list[Column]
    bands: list[str]
    """Label of each band (horizontal group of slots); one unlabelled band when the method has none."""
    band_size: int
    chosen: list[int]
    """Node ids from the prompt to the chosen candidate."""

    @property
    def edges(self) -> list[tuple[int, int]]:
        """(parent, child) for every node that has a parent."""
        return [(node.parent, i) for i, node in enumerate(self.nodes) if not node.is_root]

    @property
    def scored_any(self) -> bool:
        return any(node.scored for node in self.nodes)

    @property
    def title(self) -> str:
        n = self.run.n_particles
        rounds = sum(1 for c in self.columns if c.round > 0)
        sweeps = len({c.sweep for c in self.columns})
        particles = f"{n} particle{'s' * (n != 1)}" + (f" × {sweeps} sweeps" if sweeps > 1 else "")
        return f"{METHOD_NAMES[self.run.method]} · {particles} · {rounds} rounds"


def build(run: Run, detokenize: Callable[[list[int]], str]) -> Tree:
    n = run.n_particles
    bands, band_size = _bands(run, n)
    nodes: list[Node] = []
    columns: list[Column] = []
    slot_nodes: list[int] = []
    wanted = {tuple(c) for c in run.candidates}
    last_seen: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    """Each candidate's tokens -> (slot, node) of the particles holding them in the last round they appear in."""
    for k, st in enumerate(run.trace):
        _expect_particles(st, n, k)
        starts_sweep = k == 0 or st.sweep != run.trace[k - 1].sweep
        ancestors = None if starts_sweep else run.trace[k - 1].ancestors or list(range(n))
        if ancestors is None:
            columns.append(Column(st.sweep, 0, None, False))
            nodes.append(Node(len(columns) - 1, ROOT, 0, "", 0.5, False))
            slot_nodes = [len(nodes) - 1] * n
        columns.append(Column(st.sweep, columns[-1].round + 1, st.ess, st.ancestors is not None))
        previous = None if ancestors is None else run.trace[k - 1].tokens
        slot_nodes = _add_round(run, k, len(columns) - 1, nodes, slot_nodes, ancestors, previous, band_size, detokenize)
        last_seen.update(_holding(wanted, st, slot_nodes))
    chosen = _mark_candidates(run, nodes, last_seen)
    return Tree(run, nodes, columns, bands, band_size, chosen)


def _add_round(run: Run, k: int, column: int, nodes: list[Node], parent_of_slot: list[int],
               ancestors: list[int] | None, previous: list[list[int]] | None, band_size: int,
               detokenize: Callable[[list[int]], str]) -> list[int]:
    """Nodes of round ``k`` (in ``column``), appended to ``nodes``; returns each slot's node.
    ``parent_of_slot``: the node of each slot of the previous round (the prompt's at a sweep's start)."""
    st = run.trace[k]
    weights = _normalised(st.log_weights)
    reference_slot = len(st.tokens) - 1 if run.method == "particle_gibbs" and st.sweep > 0 else -1
    offspring = Counter(ancestors or ())
    index: dict[tuple[int, int, tuple[int, ...]], int] = {}
    slot_nodes = []
    for i, toks in enumerate(st.tokens):
        a = i if ancestors is None else ancestors[i]
        head = [] if previous is None else previous[a]
        if toks[:len(head)] != head:
            raise ValueError(f"trace[{k}]: particle {i} does not extend particle {a} of round {k - 1} (its ancestor)")
        new = tuple(toks[len(head):])
        key = (parent_of_slot[a], i // band_size, new)
        j = index.get(key)
        if j is None:
            j = index[key] = len(nodes)
            nodes.append(Node(column, parent_of_slot[a], i // band_size, detokenize(list(new)) if new else "",
                              float(st.scores[i]), bool(st.scored[i])))
        node = nodes[j]
        node.slots.append(i)
        node.weight += weights[i]
        node.forked |= offspring[a] > 1
        node.reference |= i == reference_slot
        slot_nodes.append(j)
    return slot_nodes


def _holding(wanted: set[tuple[int, ...]], st: StepTrace,
             slot_nodes: list[int]) -> dict[tuple[int, ...], list[tuple[int, int]]]:
    """(slot, node) of every particle of a round whose tokens are in ``wanted``, by those tokens."""
    lengths = {len(c) for c in wanted}
    found: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for i, toks in enumerate(st.tokens):
        if len(toks) in lengths and (key := tuple(toks)) in wanted:
            found.setdefault(key, []).append((i, slot_nodes[i]))
    return found


def _mark_candidates(run: Run, nodes: list[Node], last_seen: dict[tuple[int, ...], list[tuple[int, int]]]) -> list[int]:
    """Each final candidate is the node holding its tokens in the last round they appear in (the chosen
    one in its own slot when that slot holds them); returns the chosen candidate's path from the prompt."""
    order = [run.best] + [c for c in range(len(run.candidates)) if c != run.best]
    chosen = -1
    for c in order:
        seen = last_seen.get(tuple(run.candidates[c]))
        if seen is None:
            raise ValueError(f"candidate {c}: its tokens appear in no round of the trace")
        node = next((j for slot, j in seen if slot == c), seen[0][1]) if c == run.best else seen[0][1]
        if nodes[node].candidate < 0:
            nodes[node].candidate = c
        if c == run.best:
            chosen = node
    path = [chosen]
    while not nodes[path[-1]].is_root:
        path.append(nodes[path[-1]].parent)
    return path[::-1]


def _bands(run: Run, n: int) -> tuple[list[str], int]:
    """Parallel tempering's chains and DVTS's subtrees are contiguous slot ranges: one band each."""
    s = run.search
    if s is not None and run.method == "parallel_tempering" and n % len(s.temperatures) == 0:
        return [f"chain T={t:g}" for t in s.temperatures], n // len(s.temperatures)
    if s is not None and run.method == "dvts" and n % s.beam_width == 0:
        return [f"subtree {g + 1}" for g in range(n // s.beam_width)], s.beam_width
    return [""], n


def _expect_particles(st: StepTrace, n: int, k: int) -> None:
    if not (len(st.tokens) == len(st.scored) == len(st.scores) == len(st.log_weights) == n):
        raise ValueError(f"trace[{k}]: expected {n} particles in tokens, scored, scores and log_weights")
    if st.ancestors is not None and (len(st.ancestors) != n or not all(0 <= a < n for a in st.ancestors)):
        raise ValueError(f"trace[{k}].ancestors: expected {n} particle indices in 0..{n - 1}")


def _normalised(log_w: list[float]) -> list[float]:
    finite = [x for x in log_w if math.isfinite(x)]
    if not finite:
        return [0.0] * len(log_w)
    top = max(finite)
    w = [math.exp(x - top) if math.isfinite(x) else 0.0 for x in log_w]
    total = sum(w)
    return [x / total for x in w]
