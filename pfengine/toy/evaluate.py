"""The paper's scaling curves in miniature: every search method on held-out toy problems, one engine.

    python -m pfengine.toy.evaluate [--problems 500] [--budgets 1 2 4 8 16 32 64] [--out DIR] [--pareto]

``trace_one`` prints one problem's PF run round by round; ``evaluate`` runs greedy, best-of-N,
weighted best-of-N, self-consistency, beam search, DVTS and particle filtering at several budgets
and reports accuracy with Wilson 95% intervals, PF's expected-accuracy estimate, tokens/s and wall
time (Markdown, JSON, and accuracy against budget on a log-2 axis). ``pareto`` runs PF with each
PRM the bundle has -- the separate PRM, the value head distilled from it, the value head trained on
the checker's labels -- and plots accuracy against wall-clock seconds per problem."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from pfengine.config import Request
from pfengine.engine import Engine
from pfengine.state import PFResult
from pfengine.toy.pf import AGGREGATION, DEMO_TEMPERATURE, pf_request
from pfengine.toy.task import Problem, extract_answer

METHODS = ("best_of_n", "weighted_best_of_n", "self_consistency", "beam_search", "dvts", "particle_filter")
LABELS = {"greedy": "Greedy", "best_of_n": "BoN", "weighted_best_of_n": "Weighted BoN",
          "self_consistency": "Self-consistency", "beam_search": "Beam search", "dvts": "DVTS",
          "particle_filter": "Particle filtering"}
PRM_LABELS = {"prm": "separate PRM", "distilled": "value head distilled from the PRM",
              "labels": "value head trained on step labels"}


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
    expected: float | None = None
    """Mean over problems of the paper's expected-accuracy estimate sum_i w_i [answer_i right]."""
    prm: str = "prm"
    """Which PRM scored the run (``pareto``'s PRM kinds); "prm" is the separate PRM."""

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def seconds_per_problem(self) -> float:
        return self.seconds / self.total


def request(problem: Problem, method: str, budget: int, seed: int, temperature: float = DEMO_TEMPERATURE) -> Request:
    """Beam search and DVTS keep ``budget`` beams in groups of (at most) 4, as search-and-learn does.
    Every PRM of the bundle judges single steps, so a particle's score is its worst step's (``min``)."""
    return pf_request(problem, n_particles=budget, seed=seed, temperature=temperature, method=method,
                      beam_width=min(4, budget), aggregation=AGGREGATION)


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    if total == 0:
        return 0.0, 0.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def is_correct(problem: Problem, result: PFResult) -> bool:
    return extract_answer(result.answer) == problem.answer


def run_method(engine: Engine, problems: list[Problem], method: str, budget: int, seed: int,
               progress: tqdm | None = None, temperature: float = DEMO_TEMPERATURE) -> Row:
    reqs = [request(p, method, budget, seed + i, temperature) for i, p in enumerate(problems)]
    start = time.perf_counter()
    ids = [engine.add_request(r) for r in reqs]
    results: dict[int, PFResult] = {}
    while len(results) < len(ids):
        for event in engine.step():
            if event.error is not None:
                raise RuntimeError(f"{LABELS[method]} @ {budget}: request failed: {event.error}")
            if event.result is not None:
                results[event.request_id] = event.result
                if progress is not None:
                    progress.update(1)
    seconds = time.perf_counter() - start
    ordered = [results[i] for i in ids]
    correct = sum(is_correct(p, r) for p, r in zip(problems, ordered))
    tokens = sum(r.stats.generated_tokens for r in ordered)
    expected = (sum(r.expected_accuracy for r in ordered) / len(ordered)
                if method == "particle_filter" else None)
    return Row(method, budget, correct, len(problems), *wilson(correct, len(problems)), tokens, seconds, expected)


def evaluate(engine: Engine, problems: list[Problem], budgets: tuple[int, ...] = (1, 2, 4, 8, 16),
             methods: tuple[str, ...] = METHODS, seed: int = 0, temperature: float = DEMO_TEMPERATURE) -> list[Row]:
    runs = [("greedy", 1)] + [(m, b) for b in budgets for m in methods]
    rows = []
    with tqdm(total=len(runs) * len(problems), desc="evaluating", unit="problem") as bar:
        for method, budget in runs:
            bar.set_postfix_str(f"{LABELS[method]} @ {budget}")
            rows.append(run_method(engine, problems, method, budget, seed, bar, temperature))
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| method | budget | accuracy | 95% CI | PF expected accuracy | tokens/s | s / problem |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        expected = f"{100 * r.expected:.1f}%" if r.expected is not None else ""
        lines.append(f"| {LABELS[r.method]} | {r.budget} | {100 * r.accuracy:.1f}% ({r.correct}/{r.total}) | "
                     f"{100 * r.low:.1f}–{100 * r.high:.1f}% | {expected} | {r.tokens_per_second:.0f} | "
                     f"{r.seconds_per_problem:.3f} |")
    return "\n".join(lines)


def _axes(title: str, xlabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy on held-out problems (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return plt, fig, ax


def _errorbar(ax, pts: list[tuple[float, Row]], label: str, **style) -> None:
    xs = [x for x, _ in pts]
    ys = [100 * r.accuracy for _, r in pts]
    err = [[100 * (r.accuracy - r.low) for _, r in pts], [100 * (r.high - r.accuracy) for _, r in pts]]
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label, **style)


def plot(rows: list[Row], path: Path) -> None:
    """Accuracy against budget on a log-2 axis (the paper's figures), PF's expected accuracy dashed."""
    plt, fig, ax = _axes(f"pfengine on the toy arithmetic task ({rows[0].total} held-out problems)",
                         "budget (particles / samples / beams)")
    greedy = next((r for r in rows if r.method == "greedy"), None)
    if greedy is not None:
        ax.axhline(100 * greedy.accuracy, color="grey", linestyle="--", label="Greedy")
    for method in METHODS:
        pts = sorted((r.budget, r) for r in rows if r.method == method)
        if pts:
            _errorbar(ax, pts, LABELS[method], linewidth=2.5 if method == "particle_filter" else 1.2)
    pf = sorted((r.budget, r.expected) for r in rows if r.method == "particle_filter" and r.expected is not None)
    if pf:
        ax.plot([b for b, _ in pf], [100 * e for _, e in pf], linestyle=":", marker="x", color="black",
                label="PF expected accuracy")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[Row], out: Path, name: str = "results") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(markdown(rows) + "\n")
    (out / f"{name}.json").write_text(json.dumps([asdict(r) | {"accuracy": r.accuracy} for r in rows], indent=1))
    plot(rows, out / "accuracy_vs_budget.png")


def pareto(engines: dict[str, Engine], problems: list[Problem], budgets: tuple[int, ...], seed: int = 0,
           temperature: float = DEMO_TEMPERATURE) -> list[Row]:
    """PF at each budget with each PRM kind (``engines``: PRM kind -> engine), one after the other."""
    rows = []
    with tqdm(total=len(engines) * len(budgets) * len(problems), desc="pareto", unit="problem") as bar:
        for kind, engine in engines.items():
            for budget in budgets:
                bar.set_postfix_str(f"{PRM_LABELS[kind]} @ {budget}")
                row = run_method(engine, problems, "particle_filter", budget, seed, bar, temperature)
                row.prm = kind
                rows.append(row)
    return rows


def pareto_markdown(rows: list[Row]) -> str:
    lines = ["| PRM | budget | accuracy | 95% CI | s / problem |", "|---|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {PRM_LABELS[r.prm]} | {r.budget} | {100 * r.accuracy:.1f}% ({r.correct}/{r.total}) | "
                     f"{100 * r.low:.1f}–{100 * r.high:.1f}% | {r.seconds_per_problem:.3f} |")
    return "\n".join(lines)


def pareto_plot(rows: list[Row], path: Path) -> None:
    plt, fig, ax = _axes("PF: accuracy against cost, by PRM", "wall-clock seconds per problem (batched)")
    for kind in PRM_LABELS:
        pts = sorted((r.seconds_per_problem, r) for r in rows if r.prm == kind)
        if pts:
            _errorbar(ax, pts, PRM_LABELS[kind])
            for x, r in pts:
                ax.annotate(str(r.budget), (x, 100 * r.accuracy), textcoords="offset points", xytext=(4, -10),
                            fontsize=7)
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def hard_problem(engine: Engine, problems: list[Problem], budget: int = 8, seed: int = 0,
                 temperature: float = DEMO_TEMPERATURE) -> Problem:
    """A problem worth tracing: the first one greedy decoding gets wrong on which PF resamples at
    least once (else the first one greedy gets wrong, else the first one)."""
    greedy = engine.generate([request(p, "greedy", 1, seed) for p in problems])
    wrong = [p for p, r in zip(problems, greedy) if not is_correct(p, r)]
    runs = engine.generate([request(p, "particle_filter", budget, seed, temperature) for p in wrong])
    resampled = (p for p, r in zip(wrong, runs) if any(tr.ancestors is not None for tr in r.trace))
    return next(resampled, wrong[0] if wrong else problems[0])


def trace_one(engine: Engine, problem: Problem, budget: int = 8, seed: int = 0,
              temperature: float = DEMO_TEMPERATURE) -> PFResult:
    """One PF run, round by round: each particle's newest step, its score and weight, and which
    particles the next round's particles were forked from."""
    result = engine.generate([request(problem, "particle_filter", budget, seed, temperature)])[0]
    decode = engine.detokenize
    print(f"Problem: {problem.text}   (answer {problem.answer})\n")
    for k, tr in enumerate(result.trace):
        print(f"Round {k + 1}  (ESS {tr.ess:.2f} of {len(tr.tokens)})")
        for i, toks in enumerate(tr.tokens):
            text = decode(toks).rstrip("\n").split("\n\n")[-1]
            mark = "scored" if tr.scored[i] else "frozen"
            print(f"  p{i:<2} score {tr.scores[i]:.3f}  weight {math.exp(tr.log_weights[i]):.3f}  [{mark}]  {text!r}")
        if tr.ancestors is not None:
            print("  resampled: " + ", ".join(f"p{i}<-p{a}" for i, a in enumerate(tr.ancestors)))
        print()
    verdict = "correct" if is_correct(problem, result) else "wrong"
    print(f"Chosen particle p{result.best}: {result.answer!r} -> {verdict}\n")
    return result


def engine_for(kind: str, num_blocks: int = 32768, max_particles: int = 2048) -> Engine:
    """An engine on the bundled policy with one of the bundle's PRMs (``PRM_LABELS``)."""
    from pfengine.config import EngineConfig
    from pfengine.toy.pf import DISTILLED_HEAD, POLICY, PRM, VALUE_HEAD

    prm = {"prm": PRM, "distilled": DISTILLED_HEAD, "labels": VALUE_HEAD}[kind]
    return Engine(EngineConfig(model=str(POLICY), prm=str(prm), num_blocks=num_blocks, max_particles=max_particles))


def main(argv: list[str] | None = None) -> None:
    import argparse

    import torch

    from pfengine.toy.task import heldout_set

    ap = argparse.ArgumentParser(description="Every search method at every budget on held-out toy problems.")
    ap.add_argument("--problems", type=int, default=500)
    ap.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--temperature", type=float, default=DEMO_TEMPERATURE)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/toy-scaling"))
    ap.add_argument("--pareto", action="store_true",
                    help="instead: PF with each PRM kind (separate PRM, distilled head, label-trained head)")
    a = ap.parse_args(argv)
    if a.problems <= 0 or any(b <= 0 for b in a.budgets):
        ap.error("--problems and --budgets must be positive")
    torch.set_num_threads(a.threads)
    problems = heldout_set(a.problems)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.pareto:
        rows = pareto({k: engine_for(k) for k in PRM_LABELS}, problems, tuple(a.budgets), a.seed, a.temperature)
        (a.out / "pareto.md").write_text(pareto_markdown(rows) + "\n")
        (a.out / "pareto.json").write_text(json.dumps([asdict(r) | {"accuracy": r.accuracy} for r in rows], indent=1))
        pareto_plot(rows, a.out / "pareto.png")
        print(pareto_markdown(rows))
        return
    rows = evaluate(engine_for("prm"), problems, tuple(a.budgets), tuple(a.methods), a.seed, a.temperature)
    write_report(rows, a.out)
    print(markdown(rows))


if __name__ == "__main__":
    main()
