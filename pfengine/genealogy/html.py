"""The genealogy as one self-contained HTML page: the picture as inline SVG (readable without
script), the nodes' details as embedded JSON, and a little vanilla JS (``page.js``) for hover, click,
lineage highlighting and ``#node=K`` links. Nothing is fetched: it works opened from disk.

Particle text is untrusted model output: it reaches the page only HTML-escaped (SVG labels) or
inside the JSON block with ``<``, ``>`` and ``&`` written as ``\\u`` escapes, and the script puts it
into the page with ``textContent`` only."""
from __future__ import annotations

import json
import re
from html import escape
from pathlib import Path

from pfengine.genealogy.layout import LEFT, SCORE_RAMP, Label, Layout, legend_items
from pfengine.genealogy.tree import FORKING, Tree

HERE = Path(__file__).parent
FLAG_SCORED, FLAG_FORKED, FLAG_REFERENCE, FLAG_CHOSEN, FLAG_CARRIED = 1, 2, 4, 8, 16
"""Bits of a node's flags in the page's data (page.js reads the same bits)."""
LABEL_CLASS = {"count": "k", "answer": "ans", "column": "col", "ess": "ev", "band": "band", "axis": "axis"}
ANCHOR = {"count": "middle", "column": "middle", "ess": "middle", "axis": "end"}


def render(layout: Layout) -> str:
    tree = layout.tree
    parts = {"title": escape(tree.title), "style": (HERE / "page.css").read_text(), "header": _header(tree),
             "svg": _svg(layout), "data": _json(_data(tree)), "script": (HERE / "page.js").read_text()}
    return re.sub(r"\{\{(\w+)\}\}", lambda m: parts[m.group(1)], (HERE / "page.html").read_text())


def _header(tree: Tree) -> str:
    run = tree.run
    lines = [f"<h1>{escape(tree.title)}</h1>"]
    if run.prompt:
        lines.append(f'<p class="prompt">{escape(run.prompt)}</p>')
    mark = "" if run.correct is None else (' class="ok"' if run.correct[run.best] else ' class="bad"')
    lines.append(f'<p{mark} id="pf-verdict">{escape(run.verdict)}</p>')
    if run.method not in FORKING:
        lines.append('<p class="note">Independent samples: nothing is forked; identical prefixes share a node.</p>')
    if not tree.scored_any:
        lines.append('<p class="note">No PRM scored these particles (grey).</p>')
    lines.append(_legend(tree))
    return "\n".join(lines)


def _legend(tree: Tree) -> str:
    last = len(SCORE_RAMP) - 1
    stops = "".join(f'<stop offset="{k / last:g}" stop-color="{c}"/>' for k, c in enumerate(SCORE_RAMP))
    ramp = (f'<svg width="120" height="12" aria-hidden="true"><defs><linearGradient id="pf-ramp">{stops}'
            '</linearGradient></defs><rect width="120" height="12" fill="url(#pf-ramp)"/></svg>')
    items = [f"PRM score 0 {ramp} 1"] if tree.scored_any else []
    items += [f'<span class="{cls}">{text}</span>' if cls else text for cls, text in legend_items(tree)]
    return '<div class="legend">' + "".join(f"<span>{item}</span>" for item in items) + "</div>"


def _svg(layout: Layout) -> str:
    tree = layout.tree
    w, h = layout.width, layout.height
    out = [f'<svg id="pf-svg" xmlns="http://www.w3.org/2000/svg" width="{w:.0f}" height="{h:.0f}" '
           f'viewBox="0 0 {w:.0f} {h:.0f}" role="img" aria-label="{escape(tree.title)}">']
    out += [f'<rect x="{LEFT - 88:.0f}" y="{top:.1f}" width="{w - LEFT + 84:.0f}" height="{bottom - top:.1f}" '
            f'class="band b{b % 2}"/>' for b, (_, top, bottom) in enumerate(layout.band_spans())]
    out += [f'<rect x="{b.x:.1f}" y="{b.y:.1f}" width="{b.width:.1f}" height="{b.height:.1f}" '
            f'class="ess{" low" if b.low else ""}"><title>{b.title}</title></rect>' for b in layout.ess_bars()]
    out += [f'<line x1="{x:.1f}" y1="{layout.plot_top:.1f}" x2="{x:.1f}" y2="{layout.plot_bottom:.1f}" class="sweep"/>'
            for x in layout.sweep_lines()]
    out.append('<g id="pf-edges">')
    out += [_edge(layout, i) for i, node in enumerate(tree.nodes) if not node.is_root]
    path = tree.chosen
    out.append(f'</g><path class="chosen" d="{"".join(_path(layout, a, b) for a, b in zip(path, path[1:]))}"/>')
    out.append('<g id="pf-nodes">')
    out += [_node(layout, i) for i in range(len(tree.nodes))]
    out.append('</g><g class="chosen">')
    out += [f'<circle cx="{layout.node_x[i]:.1f}" cy="{layout.node_y[i]:.1f}" r="{layout.radius[i] + 1.5:.1f}"/>'
            for i in path]
    out.append('</g><g class="labels">')
    out += [_label(label) for label in layout.labels()]
    out.append("</g></svg>")
    return "\n".join(out)


def _edge(layout: Layout, i: int) -> str:
    node = layout.tree.nodes[i]
    cls = ' class="f"' if node.forked else ""
    width = layout.edge_width[i]
    stroke = f' stroke-width="{width:.1f}"' if width > 0.85 else ""
    return f'<path{cls}{stroke} d="{_path(layout, node.parent, i)}"/>'


def _path(layout: Layout, a: int, b: int) -> str:
    (x0, y0), (xm, _), _, (x1, y1) = layout.curve(a, b)
    if abs(y0 - y1) < 0.05:
        return f"M{x0:.1f} {y0:.1f}H{x1:.1f}"
    return f"M{x0:.1f} {y0:.1f}C{xm:.1f} {y0:.1f} {xm:.1f} {y1:.1f} {x1:.1f} {y1:.1f}"


def _node(layout: Layout, i: int) -> str:
    node = layout.tree.nodes[i]
    classes = [name for name, on in (("root", node.is_root), ("x", node.carried), ("ref", node.reference)) if on]
    cls = f' class="{" ".join(classes)}"' if classes else ""
    return (f'<circle{cls} cx="{layout.node_x[i]:.1f}" cy="{layout.node_y[i]:.1f}" r="{layout.radius[i]:.1f}" '
            f'fill="{layout.fill[i]}"/>')


def _label(label: Label) -> str:
    verdict = "" if label.correct is None else (" ok" if label.correct else " bad")
    anchor = ANCHOR.get(label.kind)
    anchor_attr = f' text-anchor="{anchor}"' if anchor else ""
    return (f'<text x="{label.x:.1f}" y="{label.y:.1f}" class="{LABEL_CLASS[label.kind]}{verdict}"{anchor_attr}>'
            f"{escape(label.text)}</text>")


def _data(tree: Tree) -> dict:
    """Everything the script shows on hover and click; node ``i`` is the ``i``-th circle of #pf-nodes."""
    run = tree.run
    steps: dict[str, int] = {}
    chosen = set(tree.chosen)
    nodes = []
    for i, node in enumerate(tree.nodes):
        flags = (FLAG_SCORED * node.scored | FLAG_FORKED * node.forked | FLAG_REFERENCE * node.reference
                 | FLAG_CHOSEN * (i in chosen) | FLAG_CARRIED * node.carried)
        nodes.append([node.parent, node.column, node.count, round(node.score, 4), float(f"{node.weight:.4g}"),
                      steps.setdefault(node.step, len(steps)), flags, node.candidate, node.slots])
    columns = [[c.sweep, c.round, None if c.ess is None else round(c.ess, 3), c.resampled] for c in tree.columns]
    candidates = [[a, None if run.correct is None else run.correct[k]] for k, a in enumerate(run.answers)]
    return {"method": run.method, "n": run.n_particles, "prompt": run.prompt or "", "columns": columns,
            "nodes": nodes, "steps": list(steps), "candidates": candidates, "best": run.best}


def _json(data: dict) -> str:
    """JSON safe inside <script>: no raw ``<``, ``>`` or ``&`` can end the block or open a tag."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
