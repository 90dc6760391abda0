"""Where every mark of a genealogy goes, how big and in which colour: one geometry for the HTML page
and the PNG, which only draw it. Rounds are columns, left to right; each round's particles fill the
column's height in slots (a node of ``count`` copies takes ``count`` slots), ordered by band, then by
their parent's height so lineages stay straight, then best score first. A node's area is
proportional to its weight."""
from __future__ import annotations

import math
from dataclasses import dataclass

from pfengine.genealogy.tree import Tree

LEFT, RIGHT = 92.0, 104.0
"""Margins: band labels and the ESS axis on the left, the candidates' answers on the right."""
ESS_STRIP = 44.0
"""Height of the ESS bars' strip above the columns."""
TOP, BOTTOM = 22.0, 30.0
SCORE_RAMP = ("#d73027", "#fc8d59", "#fee090", "#91bfdb", "#4575b4")
"""PRM score 0 -> 1: red (a step the PRM rejects) through pale yellow to blue (one it trusts)."""
UNSCORED = "#a0a0a0"
LABEL_ROW = 9.0
"""Every candidate's answer is written beside it only when a slot is this tall (else the chosen one's)."""


@dataclass
class Label:
    x: float
    y: float
    text: str
    kind: str
    """``count`` (inside a node), ``answer`` (right of a candidate), ``column``, ``ess``, ``band``, ``axis``."""
    correct: bool | None = None


@dataclass
class Bar:
    """The ESS of one round: full height is ESS = N; ``low`` when ESS < N / 2."""

    x: float
    y: float
    width: float
    height: float
    low: bool
    title: str


@dataclass
class Layout:
    tree: Tree
    width: float
    height: float
    row: float
    """Vertical pixels per particle slot."""
    col: float
    """Horizontal pixels per column."""
    plot_top: float
    """Top of the first slot (below the ESS strip, with room for a big node's radius)."""
    xs: list[float]
    """Centre of each column."""
    node_x: list[float]
    node_y: list[float]
    radius: list[float]
    fill: list[str]
    edge_width: list[float]
    """Per node: width of the edge from its parent (it grows with the copies the edge carries)."""

    @property
    def plot_bottom(self) -> float:
        return self.plot_top + self.row * self.tree.run.n_particles

    def band_spans(self) -> list[tuple[str, float, float]]:
        """(label, top, bottom) of each band; none when the method has a single one."""
        if len(self.tree.bands) == 1:
            return []
        size = self.tree.band_size * self.row
        return [(label, self.plot_top + b * size, self.plot_top + (b + 1) * size)
                for b, label in enumerate(self.tree.bands)]

    def curve(self, a: int, b: int) -> tuple[tuple[float, float], ...]:
        """Bezier control points of the edge from node ``a`` to node ``b``: (start, c1, c2, end)."""
        x0, y0, x1, y1 = self.node_x[a], self.node_y[a], self.node_x[b], self.node_y[b]
        xm = (x0 + x1) / 2
        return (x0, y0), (xm, y0), (xm, y1), (x1, y1)

    def ess_bars(self) -> list[Bar]:
        n = self.tree.run.n_particles
        base, full = TOP + ESS_STRIP - 6, ESS_STRIP - 20
        bars = []
        for c, column in enumerate(self.tree.columns):
            if column.ess is not None:
                h = full * min(1.0, max(0.0, column.ess / n))
                bars.append(Bar(self.xs[c] - 0.3 * self.col, base - h, 0.6 * self.col, h, column.ess < n / 2,
                                f"round {column.round}: ESS {column.ess:.2f} of {n}"))
        return bars

    def sweep_lines(self) -> list[float]:
        """x of the boundary before every sweep but the first."""
        return [self.xs[c] - self.col / 2 for c, column in enumerate(self.tree.columns) if column.round == 0 and c > 0]

    def labels(self) -> list[Label]:
        return self._frame_labels() + self._node_labels()

    def _frame_labels(self) -> list[Label]:
        tree = self.tree
        base = TOP + ESS_STRIP - 6
        out = [Label(LEFT - 8, base, "ESS", "axis")]
        out += [Label(LEFT - 84, top + 13, label, "band") for label, top, _ in self.band_spans()]
        y = self.plot_bottom + 18
        every = max(1, math.ceil(40 / self.col))
        for c, column in enumerate(tree.columns):
            if column.round == 0:
                text = f"sweep {column.sweep + 1}" if tree.run.method == "particle_gibbs" else "prompt"
                out.append(Label(self.xs[c], y, text, "column"))
            elif (column.round - 1) % every == 0:
                out.append(Label(self.xs[c], y, str(column.round), "column"))
            if column.ess is not None and self.col >= 30:
                ess = f"{column.ess:.3g}" if column.ess < 100 else f"{column.ess:.0f}"
                out.append(Label(self.xs[c], base - (ESS_STRIP - 20) - 3, ess, "ess"))
        return out

    def _node_labels(self) -> list[Label]:
        """Copy counts inside big nodes; the candidates' answers (and verdicts) to their right."""
        tree, run = self.tree, self.tree.run
        out = []
        for i, node in enumerate(tree.nodes):
            x, y, r = self.node_x[i], self.node_y[i], self.radius[i]
            if node.count > 1 and r >= 9:
                out.append(Label(x, y + 3.5, f"×{node.count}", "count"))
            elif node.count > 1 and self.row >= 16:
                out.append(Label(x, y - r - 3, f"×{node.count}", "count"))
            if node.candidate >= 0 and (self.row >= LABEL_ROW or i == tree.chosen[-1]):
                answer = run.answers[node.candidate]
                correct = None if run.correct is None else run.correct[node.candidate]
                mark = "" if correct is None else (" ✓" if correct else " ✗")
                text = ("–" if answer is None else answer[:14]) + mark
                out.append(Label(x + r + 4, y + 4, text, "answer", correct))
        return out


def legend_items(tree: Tree) -> list[tuple[str, str]]:
    """(key, text) of the legend entries this picture needs, after the score colour ramp."""
    items = [("", "area = weight"), ("", "×k = k identical copies")]
    if any(node.forked for node in tree.nodes):
        items.append(("fork", "dark edge = parent copied by resampling"))
    items.append(("chosen", "black = chosen path"))
    if any(node.reference for node in tree.nodes):
        items.append(("reference", "dashed ring = reference trajectory"))
    if any(node.carried for node in tree.nodes):
        items.append(("", "faded = finished, carried on"))
    return items


def place(tree: Tree) -> Layout:
    n = tree.run.n_particles
    row = min(36.0, max(4.0, 560.0 / n))
    col = min(112.0, max(26.0, 1100.0 / len(tree.columns)))
    xs = [LEFT + (c + 0.5) * col for c in range(len(tree.columns))]
    r_max, r_min = min(0.34 * col, 2.2 * row), max(1.3, 0.16 * row)
    radius = [min(r_max, max(4.0, 0.3 * row)) if node.is_root
              else min(r_max, max(r_min, 0.36 * row * math.sqrt(node.weight * n))) for node in tree.nodes]
    pad = max(0.0, max(radius) - row / 2) + 2
    plot_top = TOP + ESS_STRIP + pad
    scored = tree.scored_any
    return Layout(tree=tree, width=LEFT + len(tree.columns) * col + RIGHT, height=plot_top + n * row + pad + BOTTOM,
                  row=row, col=col, plot_top=plot_top, xs=xs, node_x=[xs[node.column] for node in tree.nodes],
                  node_y=[plot_top + y * row for y in _slot_positions(tree)], radius=radius,
                  fill=[score_colour(node.score) if scored and not node.is_root else UNSCORED for node in tree.nodes],
                  edge_width=[min(6.0, 0.8 + 0.9 * math.log2(max(node.count, 1))) for node in tree.nodes])


def _slot_positions(tree: Tree) -> list[float]:
    """Each node's vertical centre in slot units."""
    n = tree.run.n_particles
    y = [0.0] * len(tree.nodes)
    by_column: list[list[int]] = [[] for _ in tree.columns]
    for i, node in enumerate(tree.nodes):
        by_column[node.column].append(i)
    for ids in by_column:
        if tree.nodes[ids[0]].is_root:
            y[ids[0]] = n / 2
            continue
        ids.sort(key=lambda i: (tree.nodes[i].band, y[tree.nodes[i].parent], -tree.nodes[i].score, i))
        filled = [b * tree.band_size for b in range(len(tree.bands))]
        for i in ids:
            node = tree.nodes[i]
            y[i] = filled[node.band] + node.count / 2
            filled[node.band] += node.count
    return y


def _interpolate(score: float) -> str:
    s = score * (len(SCORE_RAMP) - 1)
    k = min(int(s), len(SCORE_RAMP) - 2)
    lo, hi = _rgb(SCORE_RAMP[k]), _rgb(SCORE_RAMP[k + 1])
    return "#" + "".join(f"{round(a + (b - a) * (s - k)):02x}" for a, b in zip(lo, hi))


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return int(hex_colour[1:3], 16), int(hex_colour[3:5], 16), int(hex_colour[5:7], 16)


COLOUR_STEPS = 256
_COLOURS = [_interpolate(k / COLOUR_STEPS) for k in range(COLOUR_STEPS + 1)]


def score_colour(score: float) -> str:
    """Hex colour of a PRM score in [0, 1] on :data:`SCORE_RAMP` (in 256 steps)."""
    return _COLOURS[round(min(1.0, max(0.0, score)) * COLOUR_STEPS)]
