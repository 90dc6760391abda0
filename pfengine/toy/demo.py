"""``pfengine demo``: one problem's particle-filtering run traced round by round, then the paper's
Table 1 in miniature as a preset of ``pfengine eval``: held-out toy problems exported as JSON lines
(the format of MATH-500) and every search method run on them at several budgets."""
from __future__ import annotations

import math
from pathlib import Path

from pfengine.config import Request
from pfengine.engine import Engine
from pfengine.eval.dataset import Problem as EvalProblem
from pfengine.eval.dataset import write_problems
from pfengine.state import PFResult
from pfengine.toy.pf import MAX_STEP_TOKENS, MAX_STEPS, pf_request
from pfengine.toy.task import Problem

METHODS = ("greedy", "best_of_n", "weighted_best_of_n", "self_consistency", "beam_search", "dvts", "particle_filter")
BEAM_WIDTH = 4
"""Beam search and DVTS keep ``budget`` beams in groups of (at most) 4, as search-and-learn does."""


def export(problems: list[Problem], path: Path) -> Path:
    """Toy problems as an eval problem set: the text, the answer, the reference solution; problem
    ``k`` has unique_id ``k`` (a prefix of a longer held-out set keeps its ids)."""
    rows = [EvalProblem(problem=p.text, answer=str(p.answer), unique_id=str(k), solution=p.solution)
            for k, p in enumerate(problems)]
    return write_problems(rows, path)


def eval_argv(data: Path, budgets: list[int], temperature: float, seed: int, prm: Path, likelihood: str | None,
              out: Path) -> list[str]:
    """The ``pfengine eval`` command line of the demo: every method, the toy task's step limits, a
    cache for ~70 budget-16 problems at a time (1 GiB per model), fresh results."""
    return ["eval", str(data), "--method", ",".join(METHODS), "--budgets", ",".join(map(str, budgets)),
            "--prm", str(prm), *(["--prm-likelihood", likelihood] if likelihood else []),
            "--temperature", str(temperature), "--seed", str(seed),
            "--max-steps", str(MAX_STEPS), "--max-step-tokens", str(MAX_STEP_TOKENS),
            "--max-tokens", str(MAX_STEPS * MAX_STEP_TOKENS), "--beam-width", str(BEAM_WIDTH),
            "--num-blocks", "16384", "--max-particles", "4096", "--out", str(out), "--fresh"]


def is_correct(problem: Problem, result: PFResult) -> bool:
    return result.answer == str(problem.answer)


def hard_problem(engine: Engine, problems: list[Problem], budget: int, seed: int, temperature: float) -> Problem:
    """A problem worth tracing: the first one greedy decoding gets wrong that PF gets right after
    resampling at least once (else the first greedy-wrong one PF resamples on, else the first one
    greedy gets wrong, else the first one)."""
    greedy = engine.generate([pf_request(p, 1, seed, method="greedy") for p in problems])
    wrong = [p for p, r in zip(problems, greedy) if not is_correct(p, r)]
    runs = engine.generate([pf_request(p, budget, seed, temperature) for p in wrong])
    resampled = [(p, r) for p, r in zip(wrong, runs) if any(tr.ancestors is not None for tr in r.trace)]
    rescued = (p for p, r in resampled if is_correct(p, r))
    return next(rescued, resampled[0][0] if resampled else wrong[0] if wrong else problems[0])


def trace_one(engine: Engine, request: Request, problem: Problem) -> PFResult:
    """One PF run of ``problem``, round by round: each particle's newest step, its score and weight,
    and which particles the next round's particles were forked from."""
    result = engine.generate([request])[0]
    print(f"Problem: {problem.text}   (answer {problem.answer})\n")
    for k, tr in enumerate(result.trace):
        print(f"Round {k + 1}  (ESS {tr.ess:.2f} of {len(tr.tokens)})")
        for i, toks in enumerate(tr.tokens):
            text = engine.detokenize(toks).rstrip("\n").split("\n\n")[-1]
            mark = "scored" if tr.scored[i] else "frozen"
            print(f"  p{i:<2} score {tr.scores[i]:.3f}  weight {math.exp(tr.log_weights[i]):.3f}  [{mark}]  {text!r}")
        if tr.ancestors is not None:
            print("  resampled: " + ", ".join(f"p{i}<-p{a}" for i, a in enumerate(tr.ancestors)))
        print()
    verdict = "correct" if is_correct(problem, result) else "wrong"
    print(f"Chosen particle p{result.best}: answer {result.answer} -> {verdict}\n  {result.text!r}\n")
    return result
