"""The genealogy as a static PNG (for READMEs and papers): the HTML page's geometry drawn with
matplotlib (``pip install 'pfengine[viz]'``) under a title, the verdict and a legend."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Rectangle
from matplotlib.path import Path as MPath
from matplotlib.textpath import TextToPath
from PIL import Image

from pfengine.genealogy.layout import LEFT, Layout, legend_items, score_colour

LEGEND_LINE = 19.0
"""Pixels per legend line; the title and the verdict take two more, above the legend."""
DPI = 100
MAX_PIXELS = 2.5e6
"""The default scale keeps a picture at most this many pixels (a 256 x 40 run: 1.1x, under 1 MB)."""
PT = 72 / DPI
"""Points per pixel: matplotlib sizes text, lines and markers in points."""
GREY, EDGE, FORK, CHOSEN, REFERENCE = "#555555", "#c6ccd4", "#6b7d99", "#111111", "#7b3294"
RIGHT, WRONG = "#1a7f37", "#c62828"
TEXT = {"count": dict(fontsize=10 * PT, weight="bold", color="#222222", ha="center"),
        "answer": dict(fontsize=11 * PT, weight="bold", color="#333333"),
        "column": dict(fontsize=11 * PT, color=GREY, ha="center"),
        "ess": dict(fontsize=11 * PT, color=GREY, ha="center"),
        "band": dict(fontsize=11 * PT, weight="bold", color="#444455"),
        "axis": dict(fontsize=11 * PT, color=GREY, ha="right")}


def render(layout: Layout, path: str | Path, scale: float | None = None) -> None:
    """Write ``path``. ``scale`` multiplies the pixel size; by default 2 (sharp on high-density
    screens) for small pictures, down to 1 as a picture grows to :data:`MAX_PIXELS`."""
    legend = _legend_rows(layout)
    header = 2 * LEGEND_LINE + len(legend) * LEGEND_LINE + 8
    w, h = layout.width, layout.height + header
    scale = scale or min(2.0, max(1.0, (MAX_PIXELS / (w * h)) ** 0.5))
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI * scale)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, w)
    ax.set_ylim(layout.height, -header)  # the layout's own coordinates, the header above y = 0
    ax.axis("off")
    _header(ax, layout, -header, legend)
    _frame(ax, layout)
    _edges(ax, layout)
    _nodes(ax, layout)
    for label in layout.labels():
        style = dict(TEXT[label.kind])
        if label.correct is not None:
            style["color"] = RIGHT if label.correct else WRONG
        ax.text(label.x, label.y, label.text, va="baseline", zorder=6, **style)
    canvas.draw()
    pixels = Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")
    pixels.quantize(256, method=Image.Quantize.FASTOCTREE).save(path, format="PNG")


def _header(ax: Axes, layout: Layout, top: float, legend: list[list[tuple[float, str, str]]]) -> None:
    tree, run = layout.tree, layout.tree.run
    ax.text(12, top + 20, tree.title, fontsize=15 * PT, weight="bold", va="baseline")
    colour = GREY if run.correct is None else (RIGHT if run.correct[run.best] else WRONG)
    prompt = " ".join((run.prompt or "").split())
    line = run.verdict + (f"   ·   {prompt[:110]}{'…' if len(prompt) > 110 else ''}" if prompt else "")
    ax.text(12, top + 39, line, fontsize=11 * PT, color=colour, va="baseline")
    for k, row in enumerate(legend):
        y = top + 2 * LEGEND_LINE + (k + 1) * LEGEND_LINE
        for x, key, text in row:
            _legend_item(ax, x, y, key, text)


def _legend_item(ax: Axes, x: float, y: float, key: str, text: str) -> None:
    if key == "ramp":
        for k in range(24):
            ax.add_patch(Rectangle((x + 72 + 2.5 * k, y - 9), 2.8, 10, color=score_colour(k / 23), lw=0))
        ax.text(x, y, "PRM score 0", fontsize=10 * PT, color=GREY, va="baseline")
        ax.text(x + 135, y, "1", fontsize=10 * PT, color=GREY, va="baseline")
        return
    if key in ("fork", "chosen"):
        ax.plot([x, x + 16], [y - 4, y - 4], color=FORK if key == "fork" else CHOSEN, lw=2.5 * PT)
    elif key == "reference":
        ax.scatter([x + 6], [y - 4], s=(10 * PT) ** 2, facecolors="none", edgecolors=REFERENCE, linewidths=1.6 * PT,
                   linestyles=(0, (2.5, 1.5)))
    ax.text(x + (20 if key else 0), y, text, fontsize=10 * PT, color=GREY, va="baseline")


def _legend_rows(layout: Layout) -> list[list[tuple[float, str, str]]]:
    """The legend's entries as (x, key, text), wrapped into rows that fit the picture's width."""
    entries = ([("ramp", "PRM score 0 ... 1")] if layout.tree.scored_any else []) + legend_items(layout.tree)
    measure = TextToPath()
    font = FontProperties(size=10 * PT)
    rows: list[list[tuple[float, str, str]]] = [[]]
    x = 12.0
    for key, text in entries:
        width = 145.0 if key == "ramp" else (20 if key else 0) + measure.get_text_width_height_descent(
            text, font, ismath=False)[0] / PT
        if rows[-1] and x + width > layout.width - 12:
            rows.append([])
            x = 12.0
        rows[-1].append((x, key, text))
        x += width + 22
    return rows


def _frame(ax: Axes, layout: Layout) -> None:
    for b, (_, top, bottom) in enumerate(layout.band_spans()):
        ax.add_patch(Rectangle((LEFT - 88, top), layout.width - LEFT + 84, bottom - top, lw=0, zorder=0,
                               color="#f4f6f9" if b % 2 == 0 else "#e9edf3"))
    for bar in layout.ess_bars():
        ax.add_patch(Rectangle((bar.x, bar.y), bar.width, bar.height, lw=0, color="#d98c5f" if bar.low else "#9aa7b8"))
    for x in layout.sweep_lines():
        ax.plot([x, x], [layout.plot_top, layout.plot_bottom], color="#9999aa", lw=PT, ls=(0, (4, 3)))


def _curves(layout: Layout, pairs: list[tuple[int, int]]) -> MPath:
    """One path of the Bezier edges between the (parent, child) ``pairs``."""
    vertices = np.array([layout.curve(a, b) for a, b in pairs], dtype=float).reshape(-1, 2)
    codes = np.tile(np.array([MPath.MOVETO, MPath.CURVE4, MPath.CURVE4, MPath.CURVE4], dtype=MPath.code_type),
                    len(pairs))
    return MPath(vertices, codes)


def _edges(ax: Axes, layout: Layout) -> None:
    """Edges grouped by style into one path each (drawing 10,000 separate paths is slow)."""
    nodes = layout.tree.nodes
    groups: dict[tuple[bool, float], list[tuple[int, int]]] = {}
    for i, node in enumerate(nodes):
        if not node.is_root:
            groups.setdefault((node.forked, round(layout.edge_width[i], 1)), []).append((node.parent, i))
    styles = sorted(groups)  # continuations first, forks drawn over them
    ax.add_collection(PathCollection([_curves(layout, groups[s]) for s in styles], facecolors="none", zorder=1,
                                     edgecolors=[FORK if forked else EDGE for forked, _ in styles],
                                     linewidths=[width * PT for _, width in styles]))
    path = layout.tree.chosen
    if len(path) > 1:
        ax.add_collection(PathCollection([_curves(layout, list(zip(path, path[1:])))], facecolors="none",
                                         edgecolors=CHOSEN, linewidths=2.4 * PT, zorder=3))


def _nodes(ax: Axes, layout: Layout) -> None:
    nodes, chosen = layout.tree.nodes, layout.tree.chosen
    sizes = (2 * np.array(layout.radius) * PT) ** 2
    rgb = np.array([int(fill[1:], 16) for fill in layout.fill])
    colours = np.stack([(rgb >> 16) / 255, (rgb >> 8 & 255) / 255, (rgb & 255) / 255,
                        np.array([0.45 if node.carried else 1.0 for node in nodes])], axis=1)
    outline = np.array([(0.4, 0.4, 0.4, 1.0) if node.is_root else (1.0, 1.0, 1.0, 1.0) for node in nodes])
    ax.scatter(np.array(layout.node_x), np.array(layout.node_y), s=sizes, c=colours, edgecolors=outline, zorder=4,
               linewidths=0.5 * PT)
    ax.scatter([layout.node_x[i] for i in chosen], [layout.node_y[i] for i in chosen], facecolors="none", zorder=5,
               s=[(2 * (layout.radius[i] + 1.5) * PT) ** 2 for i in chosen], edgecolors=CHOSEN, linewidths=1.6 * PT)
    refs = [i for i, node in enumerate(nodes) if node.reference]
    if refs:
        ax.scatter([layout.node_x[i] for i in refs], [layout.node_y[i] for i in refs], s=[sizes[i] for i in refs],
                   facecolors="none", edgecolors=REFERENCE, linewidths=2.0 * PT, linestyles=(0, (2.5, 1.5)), zorder=5)
