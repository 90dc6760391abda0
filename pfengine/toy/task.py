"""A synthetic multi-step arithmetic task whose every step can be checked by a program.

A problem is a start number and 6-12 additions / subtractions of two-digit operands::

    Start with 47. Add 38. Subtract 29. Add 16. Subtract 45. Add 21. Subtract 30. What is the result?

Its solution applies one operation per step; steps are separated by ``"\\n\\n"``::

    47 + 38 = 85

    85 - 29 = 56

    ...

    48 - 30 = 18

    The answer is \\boxed{18}.

Every running value has exactly two digits (an operation that would leave ``[10, 99]`` is never
drawn), so each step is a two-digit addition or subtraction, many with a carry or borrow. Why not
three digits: written most-significant digit first, three-digit sums were not learned by a ~1M
parameter model within a ~20 CPU-minute budget; two-digit ones are. Why 6-12 operations: a slip
anywhere spoils the answer, so errors compound along the chain and a policy that gets most single
steps right solves well under half of the problems greedily -- the regime where search over steps
pays. The checker itself does not depend on the range. Train and held-out problems are disjoint by
construction: a problem belongs to the held-out split iff a hash of its text says so, and each
generator only yields problems of its own split.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field

STEP_SEP = "\n\n"
MIN_OPS, MAX_OPS = 6, 12
MIN_VALUE, MAX_VALUE = 10, 99
"""Every running value (start, intermediate results, answer) has exactly two digits."""
MIN_OPERAND, MAX_OPERAND = 10, 99
HELDOUT_EVERY = 8
"""One problem in this many (by text hash) is held out."""
OP_WORD = {"+": "Add", "-": "Subtract"}


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[tuple[str, int], ...]
    """``("+" | "-", operand)`` in order."""

    @property
    def text(self) -> str:
        parts = [f"Start with {self.start}."] + [f"{OP_WORD[op]} {x}." for op, x in self.ops]
        return " ".join(parts) + " What is the result?"

    def values(self) -> list[int]:
        """The running value after 0, 1, ..., len(ops) operations."""
        vals = [self.start]
        for op, x in self.ops:
            vals.append(vals[-1] + x if op == "+" else vals[-1] - x)
        return vals

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def steps(self) -> list[str]:
        """The reference solution's steps (without separators)."""
        vals = self.values()
        steps = [f"{vals[i]} {op} {x} = {vals[i + 1]}" for i, (op, x) in enumerate(self.ops)]
        return steps + [f"The answer is \\boxed{{{self.answer}}}."]

    @property
    def solution(self) -> str:
        return STEP_SEP.join(self.steps())

    @property
    def split(self) -> str:
        return split_of(self.text)


def split_of(text: str) -> str:
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    return "heldout" if h % HELDOUT_EVERY == 0 else "train"


def random_problem(rng: random.Random, n_ops: int | None = None) -> Problem:
    """Start uniform in [MIN_VALUE, MAX_VALUE]; each operation is drawn among those that can keep
    the running value in that range, its operand uniform among the operands that do."""
    n = n_ops if n_ops is not None else rng.randint(MIN_OPS, MAX_OPS)
    value = rng.randint(MIN_VALUE, MAX_VALUE)
    start, ops = value, []
    for _ in range(n):
        feasible = [op for op in "+-" if (value + MIN_OPERAND <= MAX_VALUE if op == "+" else value - MIN_OPERAND >= MIN_VALUE)]
        op = rng.choice(feasible)
        top = min(MAX_OPERAND, MAX_VALUE - value) if op == "+" else min(MAX_OPERAND, value - MIN_VALUE)
        x = rng.randint(MIN_OPERAND, top)
        value = value + x if op == "+" else value - x
        ops.append((op, x))
    return Problem(start, tuple(ops))


def problems(split: str, seed: int, n: int | None = None, n_ops: int | None = None):
    """Problems of one split (``"train"`` or ``"heldout"``), reproducible from ``seed``; endless when
    ``n`` is None. Duplicates within a finite set are skipped. ``n_ops`` fixes the number of
    operations (default: uniform in MIN_OPS..MAX_OPS)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"{split}:{seed}" + (f":{n_ops}" if n_ops is not None else ""))
    seen: set[str] = set()
    made = 0
    while n is None or made < n:
        p = random_problem(rng, n_ops)
        if p.split != split or (n is not None and p.text in seen):
            continue
        if n is not None:
            seen.add(p.text)
        made += 1
        yield p


def heldout_set(n: int = 200, seed: int = 1234) -> list[Problem]:
    return list(problems("heldout", seed, n))


PROBLEM_RE = re.compile(r"Start with (\d+)\.((?: (?:Add|Subtract) \d+\.)+) What is the result\?")


def parse_problem(text: str) -> Problem:
    m = PROBLEM_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"not a problem of this task: {text!r}")
    ops = tuple(("+" if w == "Add" else "-", int(x)) for w, x in re.findall(r"(Add|Subtract) (\d+)\.", m.group(2)))
    return Problem(int(m.group(1)), ops)


# ---------------------------------------------------------------------------------------------
# Checking generated solutions
# ---------------------------------------------------------------------------------------------

STEP_RE = re.compile(r"(-?\d+) ([+-]) (\d+) = (-?\d+)")
ANSWER_RE = re.compile(r"The answer is \\boxed\{(-?\d+)\}\.")
BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclass
class Check:
    """The verdict on one generated solution."""

    step_ok: list[bool] = field(default_factory=list)
    """Per generated step: the prefix up to and including it is still correct (prefix semantics:
    once a step is wrong, every later step is labelled wrong too)."""
    step_local: list[bool] = field(default_factory=list)
    """Per generated step: the step is right *given the steps written before it* -- it continues
    from the previous step's written result, applies the problem's next operation and adds right.
    The prefix is correct exactly while every step so far is locally right (``step_ok`` is the
    running AND of ``step_local``), so a judge of single steps, aggregated by ``min``, judges
    whole prefixes."""
    answer: int | None = None
    """The integer in the last ``\\boxed{}``, if any."""
    correct: bool = False
    """Every step right, and the answer step is the last one with the right number."""


def split_steps(solution: str) -> list[str]:
    """Steps as the engine cuts them: at each ``"\\n\\n"``; empty trailing pieces are dropped."""
    parts = solution.split(STEP_SEP)
    return [p for p in parts if p.strip()] if parts else []


def extract_answer(text: str) -> int | None:
    """The last ``\\boxed{...}`` in ``text`` as an integer, or None."""
    found = BOXED_RE.findall(text)
    if not found:
        return None
    try:
        return int(found[-1].strip())
    except ValueError:
        return None


def check_step(problem: Problem, index: int, step: str) -> bool:
    """Is ``step`` the correct ``index``-th step (0-based) of the reference solution, assuming all
    earlier steps were correct? The left operand must be the correct running value, the operation
    and operand must be the problem's next ones, and the arithmetic right. The step after the last
    operation must state the answer."""
    return local_step(problem, index, problem.values()[min(index, len(problem.ops))]) == step.strip()


def local_step(problem: Problem, index: int, value: int | None) -> str | None:
    """The right ``index``-th step (0-based) for a solution whose previous step wrote ``value`` (the
    start value for index 0): the problem's next operation applied to ``value``, or the answer
    statement after the last operation. None where no step can be right (``value`` unknown, or
    the solution already past its answer)."""
    if value is None or index > len(problem.ops):
        return None
    if index == len(problem.ops):
        return f"The answer is \\boxed{{{value}}}."
    op, x = problem.ops[index]
    return f"{value} {op} {x} = {value + x if op == '+' else value - x}"


def written_result(step: str) -> int | None:
    """The result an operation step wrote (``c`` in ``a op x = c``), or None."""
    m = STEP_RE.fullmatch(step.strip())
    return int(m.group(4)) if m else None


def check_steps(problem: Problem, steps: list[str]) -> Check:
    """Prefix-correctness and local labels for already-split steps (the engine's ``ParticleResult.steps``)."""
    labels, local, ok, value = [], [], True, problem.start
    for i, s in enumerate(steps):
        right = local_step(problem, i, value) == s.strip()
        ok = ok and right
        labels.append(ok)
        local.append(right)
        value = written_result(s)
    answer = extract_answer(steps[-1]) if steps else None
    correct = bool(labels) and all(labels) and len(steps) == len(problem.ops) + 1
    return Check(step_ok=labels, step_local=local, answer=answer, correct=correct)


def check_solution(problem: Problem, solution: str) -> Check:
    """Check a generated solution text (special tokens already stripped)."""
    return check_steps(problem, split_steps(solution))
