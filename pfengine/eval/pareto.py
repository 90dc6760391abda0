"""Accuracy against cost: one method's rows from several ``pfengine eval`` summaries (e.g. PF with a
separate PRM, with a distilled value head, with a label-trained value head), as a table and a plot
of accuracy against seconds per problem, each point labelled with its budget::

    python -m pfengine.eval.pareto "separate PRM=out/prm" "distilled head=out/distilled" --out pareto [--cost cpu]

The cost is a run's wall time (``--cost wall``, batched) or the eval process's CPU time (``--cost
cpu``) over its problem count, from ``summary.json``: wall times compare only between runs on one
machine under the same load; CPU time is the fairer measure on a shared machine."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from pfengine.eval.report import Row, accuracy_axes, errorbars, save_log2_plot


COSTS = ("wall", "cpu")


@dataclass
class Point:
    label: str
    row: Row
    cost: str = "wall"

    @property
    def seconds_per_problem(self) -> float:
        seconds = self.row.seconds if self.cost == "wall" else self.row.cpu_seconds
        assert seconds is not None, "read_points checks that every row has its cost"
        return seconds / self.row.total


def read_points(label: str, summary_dir: Path, method: str, cost: str = "wall") -> list[Point]:
    """The rows of ``method`` in ``summary_dir/summary.json``, by budget."""
    path = summary_dir / "summary.json"
    if not path.is_file():
        raise ValueError(f"{label}={summary_dir}: no summary.json there (the --out of a pfengine eval run)")
    fields = set(Row.__dataclass_fields__)
    rows = [Row(**{k: v for k, v in r.items() if k in fields}) for r in json.loads(path.read_text())]
    points = sorted((Point(label, r, cost) for r in rows if r.method == method and r.total),
                    key=lambda p: p.row.budget)
    if not points:
        raise ValueError(f"{label}={summary_dir}: summary.json has no {method} rows")
    if cost == "cpu" and any(p.row.cpu_seconds is None for p in points):
        raise ValueError(f"{label}={summary_dir}: its results have no CPU times (written before eval recorded "
                         f"them); use --cost wall or rerun with --fresh")
    return points


def markdown(points: list[Point]) -> str:
    cost = "CPU s / problem" if points and points[0].cost == "cpu" else "wall s / problem"
    lines = [f"| run | budget | accuracy | 95% CI | {cost} |", "|---|---:|---:|---|---:|"]
    for p in points:
        r = p.row
        lines.append(f"| {p.label} | {r.budget} | {100 * r.accuracy:.1f}% ({r.correct}/{r.total}) | "
                     f"{100 * r.low:.1f}–{100 * r.high:.1f}% | {p.seconds_per_problem:.4f} |")
    return "\n".join(lines)


def plot(points: list[Point], path: Path, title: str) -> None:
    fig, ax = accuracy_axes()
    for label in dict.fromkeys(p.label for p in points):
        mine = [p for p in points if p.label == label]
        errorbars(ax, [p.seconds_per_problem for p in mine], [p.row for p in mine], label)
        for p in mine:
            ax.annotate(str(p.row.budget), (p.seconds_per_problem, 100 * p.row.accuracy), textcoords="offset points",
                        xytext=(4, -10), fontsize=7)
    cost = "CPU seconds" if points[0].cost == "cpu" else "wall-clock seconds (batched)"
    save_log2_plot(fig, ax, path, f"{cost} per problem", title)


def _labelled_dir(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label:
        raise argparse.ArgumentTypeError(f"expected LABEL=DIR, got {text!r}")
    return label, Path(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=_labelled_dir, metavar="LABEL=DIR", help="an eval --out directory")
    ap.add_argument("--method", default="particle_filter", help="the method compared (default particle_filter)")
    ap.add_argument("--out", type=Path, required=True, help="where pareto.md and pareto.png go")
    ap.add_argument("--cost", choices=COSTS, default="wall", help="wall time (default) or CPU time per problem")
    ap.add_argument("--title", default="accuracy against cost")
    a = ap.parse_args(argv)
    try:
        points = [p for label, d in a.runs for p in read_points(label, d, a.method, a.cost)]
    except ValueError as e:
        print(f"pareto: error: {e}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "pareto.md").write_text(markdown(points) + "\n")
    plot(points, a.out / "pareto.png", a.title)
    print(markdown(points))
    return 0


if __name__ == "__main__":
    sys.exit(main())
