"""The paper's Table 1 in miniature: every search method on held-out toy problems, one engine.

``trace_one`` prints one problem's PF run round by round; ``evaluate`` runs greedy, best-of-N,
weighted best-of-N, self-consistency, beam search, DVTS and particle filtering at several budgets
and reports accuracy with Wilson 95% intervals, tokens/s and wall time (Markdown, JSON, PNG)."""
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
from pfengine.toy.pf import DEMO_TEMPERATURE, pf_request
from pfengine.toy.task import Problem, extract_answer

METHODS = ("best_of_n", "weighted_best_of_n", "self_consistency", "beam_search", "dvts", "particle_filter")
LABELS = {"greedy": "Greedy", "best_of_n": "BoN", "weighted_best_of_n": "Weighted BoN",
          "self_consistency": "Self-consistency", "beam_search": "Beam search", "dvts": "DVTS",
          "particle_filter": "Particle filtering"}


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

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def request(problem: Problem, method: str, budget: int, seed: int, temperature: float = DEMO_TEMPERATURE) -> Request:
    """Beam search and DVTS keep ``budget`` beams in groups of (at most) 4, as search-and-learn does."""
    return pf_request(problem, n_particles=budget, seed=seed, temperature=temperature, method=method,
                      beam_width=min(4, budget))


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
            if event.result is not None:
                results[event.request_id] = event.result
                if progress is not None:
                    progress.update(1)
    seconds = time.perf_counter() - start
    ordered = [results[i] for i in ids]
    correct = sum(is_correct(p, r) for p, r in zip(problems, ordered))
    tokens = sum(r.stats.generated_tokens for r in ordered)
    return Row(method, budget, correct, len(problems), *wilson(correct, len(problems)), tokens, seconds)


def evaluate(engine: Engine, problems: list[Problem], budgets: tuple[int, ...] = (4, 8, 16),
             methods: tuple[str, ...] = METHODS, seed: int = 0, temperature: float = DEMO_TEMPERATURE) -> list[Row]:
    runs = [("greedy", 1)] + [(m, b) for b in budgets for m in methods]
    rows = []
    with tqdm(total=len(runs) * len(problems), desc="evaluating", unit="problem") as bar:
        for method, budget in runs:
            bar.set_postfix_str(f"{LABELS[method]} @ {budget}")
            rows.append(run_method(engine, problems, method, budget, seed, bar, temperature))
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| method | budget | accuracy | 95% CI | tokens/s | wall (s) |", "|---|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {LABELS[r.method]} | {r.budget} | {100 * r.accuracy:.1f}% ({r.correct}/{r.total}) | "
                     f"{100 * r.low:.1f}–{100 * r.high:.1f}% | {r.tokens_per_second:.0f} | {r.seconds:.1f} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    greedy = next((r for r in rows if r.method == "greedy"), None)
    if greedy is not None:
        ax.axhline(100 * greedy.accuracy, color="grey", linestyle="--", label="Greedy")
    for method in METHODS:
        pts = sorted((r.budget, r) for r in rows if r.method == method)
        if pts:
            xs = [b for b, _ in pts]
            ys = [100 * r.accuracy for _, r in pts]
            err = [[100 * (r.accuracy - r.low) for _, r in pts], [100 * (r.high - r.accuracy) for _, r in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=LABELS[method])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget (particles / samples / beams)")
    ax.set_ylabel("accuracy on held-out problems (%)")
    ax.set_title("pfengine on the toy arithmetic task")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[Row], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown(rows) + "\n")
    (out / "results.json").write_text(json.dumps([asdict(r) | {"accuracy": r.accuracy} for r in rows], indent=1))
    plot(rows, out / "accuracy_vs_budget.png")


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
