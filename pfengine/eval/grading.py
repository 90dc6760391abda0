"""Grading a response against a reference answer with math-verify (Hugging Face's verifier, the
standard for MATH-style grading): ``\\left( 3, \\frac{\\pi}{2} \\right)`` equals ``(3, \\pi/2)``,
``\\frac{14}{3}`` equals ``14/3``, ``27.0`` equals ``27``, ``10\\%`` equals ``10``.

A response's answer is what it states: its ``\\boxed{...}`` first, else an anchored phrase
("the final answer is ..."); a response that states none is wrong. (pfengine's own extraction,
:mod:`pfengine.search.answers`, stays where math-verify offers nothing: the engine's
``PFResult.answer`` and the canonical strings its votes count, computed without sympy on the hot
path.)

``python -m pfengine.eval.grading DATA.jsonl ...`` grades each file's reference answers against
their solutions and against themselves written as ``\\boxed{answer}``: a check of the grader on the data."""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from pfengine.eval.dataset import Problem, read_problems

RESPONSE_TARGETS = (LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False),
                    ExprExtractionConfig(try_extract_without_anchor=False))
"""What counts as a response's answer: ``\\boxed{}`` first, then anchored phrases; never a bare
number from the middle of the text (a solution cut off mid-step states no answer)."""
REFERENCE_TARGETS = (LatexExtractionConfig(), ExprExtractionConfig())
TIMEOUT_S = 5


@dataclass(frozen=True)
class Grade:
    correct: bool
    extracted: str | None
    """The response's answer as it was graded (None: the response states no answer)."""


def grade(reference: str, response: str) -> Grade:
    """Whether ``response`` states an answer equal to ``reference`` (a bare answer: ``\\frac{1}{2}``)."""
    gold = parse_reference(reference)
    found = parse(response, RESPONSE_TARGETS, parsing_timeout=_timeout())
    if not found:
        return Grade(False, None)
    return Grade(verify(list(gold), found, timeout_seconds=_timeout()), _as_text(found))


@lru_cache(maxsize=4096)
def parse_reference(reference: str) -> tuple:
    """math-verify's reading of a reference answer; an error if it reads nothing in it."""
    gold = tuple(parse(f"\\boxed{{{reference}}}", REFERENCE_TARGETS, parsing_timeout=_timeout()))
    if not gold:
        raise ValueError(f"reference answer {reference!r}: math-verify reads no answer in it")
    return gold


def _as_text(found: list) -> str:
    """math-verify's reading of an answer: ``[sympy_expr, matched_text]``, or ``[text]`` when only text matched."""
    return found[-1] if isinstance(found[-1], str) else str(found[-1])


def _timeout() -> int | None:
    """math-verify times out through ``signal.alarm``, which only the main thread may set."""
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


CHECKS = {"solution": "their solution", "boxed": "themselves written as \\boxed{answer}"}


def check_references(problems: list[Problem], against: str = "solution") -> list[tuple[Problem, Grade]]:
    """The problems whose reference answer does not grade equal to their ``solution`` (problems
    without one are skipped) or to the answer itself written as ``\\boxed{answer}`` (``boxed``)."""
    assert against in CHECKS, against
    if against == "solution":
        pairs = [(p, p.solution) for p in problems if p.solution is not None]
    else:
        pairs = [(p, f"\\boxed{{{p.answer}}}") for p in problems]
    return [(p, g) for p, g in ((p, grade(p.answer, r)) for p, r in pairs) if not g.correct]


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m pfengine.eval.grading DATA.jsonl [...]", file=sys.stderr)
        return 2
    for path in argv:
        problems = read_problems(path)
        with_solution = sum(p.solution is not None for p in problems)
        for against, total in (("solution", with_solution), ("boxed", len(problems))):
            if not total:
                continue
            wrong = check_references(problems, against)
            print(f"{path}: {total - len(wrong)}/{total} reference answers grade equal to {CHECKS[against]} "
                  f"({100 * (1 - len(wrong) / total):.1f} %)")
            for p, g in wrong:
                print(f"  {p.unique_id}: answer {p.answer!r}, graded {g.extracted!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
