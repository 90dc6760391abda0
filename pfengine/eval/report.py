"""An evaluation's summary: accuracy per (method, budget) with Wilson 95 % intervals, generated
tokens per second and wall time, and for particle filtering the paper's expected-accuracy estimate
next to its argmax accuracy, as Markdown, JSON and an accuracy-vs-budget plot."""
from __future__ import annotations

import importlib.util
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

LABELS = {"greedy": "Greedy", "best_of_n": "BoN", "weighted_best_of_n": "Weighted BoN",
          "self_consistency": "Self-consistency", "beam_search": "Beam search", "dvts": "DVTS",
          "particle_filter": "Particle filtering", "particle_gibbs": "Particle Gibbs",
          "parallel_tempering": "Parallel tempering"}


@dataclass
class Row:
    method: str
    budget: int
    correct: int
    total: int
    low: float
    high: float
    tokens: int
    seconds: float
    errors: int = 0
    """Requests that failed (counted as wrong); their messages are in the JSON lines."""
    cpu_seconds: float | None = None
    """CPU time of the eval process over the run's batches (None for results written without it):
    the cost to compare when the machine is shared and wall time is inflated."""
    expected: float | None = None
    """PF only: the mean over problems of sum_i w_i [answer_i right] (answers compared as pfengine
    canonicalises them, not by math-verify), the accuracy a draw by weight would have."""

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % for z = 1.96)."""
    if total == 0:
        return 0.0, 0.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarise(records: list[dict], runs: list[tuple[str, int]]) -> list[Row]:
    """One row per run, in the order given. Wall (CPU) time of a run: for each engine batch it ran
    in (a resumed run has several), the time until its last result, summed; CPU time only when
    every record has it."""
    rows = []
    for method, budget in runs:
        mine = [r for r in records if r["method"] == method and r["budget"] == budget]
        correct = sum(r["correct"] for r in mine)
        batches: dict[str, float] = defaultdict(float)
        cpu: dict[str, float] = defaultdict(float)
        for r in mine:
            batches[r["batch"]] = max(batches[r["batch"]], r["elapsed_s"])
            cpu[r["batch"]] = max(cpu[r["batch"]], r.get("cpu_s", 0.0))
        timed = bool(mine) and all("cpu_s" in r for r in mine)
        estimates = [r["expected_accuracy"] for r in mine if "expected_accuracy" in r]
        rows.append(Row(method, budget, correct, len(mine), *wilson(correct, len(mine)),
                        sum(r["generated_tokens"] for r in mine), sum(batches.values()),
                        sum("error" in r for r in mine), sum(cpu.values()) if timed else None,
                        sum(estimates) / len(mine) if estimates else None))
    return rows


def label(method: str) -> str:
    return LABELS.get(method, method)


def markdown(rows: list[Row]) -> str:
    errors = any(r.errors for r in rows)
    expected = any(r.expected is not None for r in rows)
    cpu = any(r.cpu_seconds is not None for r in rows)
    lines = ["| method | budget | accuracy | 95% CI |" + (" PF expected accuracy |" if expected else "")
             + " tokens/s | wall (s) |" + (" CPU (s) |" if cpu else "") + (" errors |" if errors else ""),
             "|---|---:|---:|---|" + ("---:|" if expected else "") + "---:|---:|" + ("---:|" if cpu else "")
             + ("---:|" if errors else "")]
    for r in rows:
        estimate = f" {100 * r.expected:.1f}% |" if r.expected is not None else " |"
        seconds = f" {r.cpu_seconds:.1f} |" if r.cpu_seconds is not None else " |"
        lines.append(f"| {label(r.method)} | {r.budget} | {100 * r.accuracy:.1f}% ({r.correct}/{r.total}) | "
                     f"{100 * r.low:.1f}–{100 * r.high:.1f}% |" + (estimate if expected else "")
                     + f" {r.tokens_per_second:.0f} | {r.seconds:.1f} |" + (seconds if cpu else "")
                     + (f" {r.errors} |" if errors else ""))
    return "\n".join(lines)


def plot(rows: list[Row], path: Path, title: str) -> None:
    """Accuracy against budget on a log-2 axis, one line per method with its intervals; greedy
    (budget 1 by definition) as a dashed line; PF's expected accuracy dotted."""
    fig, ax = accuracy_axes()
    by_method: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_method[r.method].append(r)
    for method, mine in by_method.items():
        mine.sort(key=lambda r: r.budget)
        if method == "greedy":
            ax.axhline(100 * mine[0].accuracy, color="grey", linestyle="--", label=label(method))
            continue
        errorbars(ax, [r.budget for r in mine], mine, label(method))
        estimated = [r for r in mine if r.expected is not None]
        if estimated:
            ax.plot([r.budget for r in estimated], [100 * r.expected for r in estimated], linestyle=":", marker="x",
                    color="black", label=f"{label(method)}: expected accuracy")
    save_log2_plot(fig, ax, path, "budget (particles / samples / beams)", title)


def accuracy_axes():
    """A new figure for an accuracy plot, drawn off-screen (``Agg``): ``(fig, ax)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.5))


def errorbars(ax, xs: list[float], rows: list[Row], name: str) -> None:
    """Accuracy (%) at ``xs`` with each row's Wilson interval."""
    err = [[100 * max(r.accuracy - r.low, 0.0) for r in rows], [100 * max(r.high - r.accuracy, 0.0) for r in rows]]
    ax.errorbar(xs, [100 * r.accuracy for r in rows], yerr=err, marker="o", capsize=3, label=name)


def save_log2_plot(fig, ax, path: Path, xlabel: str, title: str) -> None:
    """Label an accuracy plot with a log-2 x axis, save it and close it."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(rows: list[Row], out: Path, title: str) -> list[Path]:
    """``summary.md``, ``summary.json`` and (with matplotlib, ``pip install 'pfengine[viz]'``)
    ``accuracy_vs_budget.png`` in ``out``; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "summary.md", out / "summary.json"]
    paths[0].write_text(markdown(rows) + "\n")
    paths[1].write_text(json.dumps([asdict(r) | {"accuracy": r.accuracy, "tokens_per_s": r.tokens_per_second}
                                    for r in rows], indent=1))
    if importlib.util.find_spec("matplotlib") is not None:
        paths.append(out / "accuracy_vs_budget.png")
        plot(rows, paths[2], title)
    return paths
