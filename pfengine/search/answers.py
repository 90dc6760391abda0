"""Final answers: extraction from text, canonical forms for voting, and the final selection."""
from __future__ import annotations

import re
from collections import defaultdict
from fractions import Fraction

import torch

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_FRAC = re.compile(r"^\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")


def extract_answer(text: str) -> str | None:
    """The last ``\\boxed{...}`` (nested braces kept), else the last number in the text."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return canonical(boxed)
    numbers = _NUMBER.findall(text)
    return canonical(numbers[-1]) if numbers else None


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def canonical(answer: str) -> str:
    """A form under which equal answers compare equal: ``0.5``, ``1/2``, ``\\frac{1}{2}`` -> ``1/2``;
    ``1,000`` -> ``1000``; ``$5$`` -> ``5``. Non-numeric answers are whitespace/markup-normalised."""
    a = answer.strip().strip("$").strip()
    a = re.sub(r"\\(left|right|,|!|;|:)", "", a)
    a = re.sub(r"\\text\{([^{}]*)\}", r"\1", a).strip()
    a = a.rstrip(".").replace(" ", "")
    if a.startswith("\\$"):
        a = a[2:]
    frac = _FRAC.match(a) or re.match(r"^\\[dt]?frac(\d)(\d)$", a)
    if frac:
        a = f"{frac.group(1)}/{frac.group(2)}"
    number = a.replace(",", "") if re.fullmatch(r"-?[\d,]+(\.\d+)?", a) else a
    try:
        value = Fraction(number)
    except (ValueError, ZeroDivisionError):
        return a
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def select(weights: list[float], answers: list[str | None], how: str, generator: torch.Generator) -> int:
    """Index of the chosen particle: ``argmax`` weight, a ``sample`` by weight, or the highest-
    weight particle holding the answer with the largest total weight (``vote``)."""
    assert weights, "select: no candidates"
    if how == "sample":
        return int(torch.multinomial(torch.tensor(weights, dtype=torch.float64), 1, generator=generator))
    best = max(range(len(weights)), key=lambda i: weights[i])
    if how == "argmax":
        return best
    totals: dict[str, float] = defaultdict(float)
    for w, a in zip(weights, answers):
        if a is not None:
            totals[a] += w
    if not totals:
        return best
    winner = max(totals, key=lambda a: totals[a])
    return max((i for i, a in enumerate(answers) if a == winner), key=lambda i: weights[i])


def expected_accuracy(weights: list[float], answers: list[str | None], reference: str) -> float:
    """The paper's estimate sum_i w_i * [answer_i == reference] (weights normalised here)."""
    ref = canonical(_last_boxed(reference) or reference)
    total = sum(weights)
    return sum(w for w, a in zip(weights, answers) if a == ref) / total if total > 0 else 0.0
