"""The toy arithmetic task: generator, step checker (prefix and local labels), slips, answer extraction."""
import random

import pytest

from pfengine.toy.task import (MAX_OPERAND, MAX_OPS, MAX_VALUE, MIN_OPERAND, MIN_OPS, MIN_VALUE, Problem,
                               check_solution, check_step, check_steps, extract_answer, heldout_set, parse_problem,
                               problems, split_steps)

P = Problem(47, (("+", 385), ("-", 129), ("+", 56)))
REF = "47 + 385 = 432\n\n432 - 129 = 303\n\n303 + 56 = 359\n\nThe answer is \\boxed{359}."


def test_reference_text_and_solution():
    assert P.text == "Start with 47. Add 385. Subtract 129. Add 56. What is the result?"
    assert P.solution == REF
    assert P.values() == [47, 432, 303, 359] and P.answer == 359
    assert parse_problem(P.text) == P


@pytest.mark.parametrize("index, step, ok", [
    (0, "47 + 385 = 432", True),
    (0, " 47 + 385 = 432 ", True),            # surrounding whitespace is not an error
    (0, "47 + 385 = 431", False),             # arithmetic
    (0, "47 + 358 = 405", False),             # right arithmetic, wrong operand copied
    (0, "47 - 385 = -338", False),            # wrong operation
    (0, "74 + 385 = 459", False),             # wrong start
    (0, "47+385=432", False),                 # not the step format
    (1, "432 - 129 = 303", True),
    (1, "303 + 56 = 359", False),             # skipped an operation
    (1, "432 - 129 = 303 + 1", False),
    (2, "303 + 56 = 359", True),
    (3, "The answer is \\boxed{359}.", True),
    (3, "The answer is \\boxed{358}.", False),
    (3, "The answer is 359.", False),
    (3, "303 + 56 = 359", False),             # an extra operation where the answer belongs
    (4, "The answer is \\boxed{359}.", False),  # beyond the end
])
def test_check_step(index, step, ok):
    assert check_step(P, index, step) is ok


@pytest.mark.parametrize("solution, labels, answer, correct", [
    (REF, [True, True, True, True], 359, True),
    (REF + "\n\n", [True, True, True, True], 359, True),   # a trailing separator adds no step
    ("47 + 385 = 422\n\n422 - 129 = 293\n\n293 + 56 = 349\n\nThe answer is \\boxed{349}.",
     [False, False, False, False], 349, False),           # an early error poisons every later step
    ("47 + 385 = 432\n\n432 - 129 = 313\n\n313 + 56 = 369\n\nThe answer is \\boxed{359}.",
     [True, False, False, False], 359, False),            # right answer, wrong path: not correct
    ("47 + 385 = 432\n\n432 - 129 = 303\n\nThe answer is \\boxed{303}.", [True, True, False], 303, False),
    ("47 + 385 = 432\n\n432 - 129 = 303\n\n303 + 56 = 359", [True, True, True], None, False),  # no answer
    ("47 + 385 = 432\n\n432 - 129 = 303\n\n303 + 56 = 359\n\nThe answer is \\boxed{359}.\n\nThe answer is \\boxed{359}.",
     [True, True, True, True, False], 359, False),        # trailing extra step
    ("", [], None, False),
])
def test_check_solution(solution, labels, answer, correct):
    c = check_solution(P, solution)
    assert (c.step_ok, c.answer, c.correct) == (labels, answer, correct)


def test_check_steps_matches_engine_style_steps():
    steps = ["47 + 385 = 432\n\n", "432 - 129 = 303\n\n", "303 + 56 = 359\n\n", "The answer is \\boxed{359}."]
    assert check_steps(P, steps).correct
    assert split_steps(REF) == [s.strip("\n") for s in steps]


@pytest.mark.parametrize("text, answer", [
    ("The answer is \\boxed{359}.", 359),
    ("\\boxed{1} then \\boxed{ 42 }", 42),
    ("\\boxed{-7}", -7),
    ("\\boxed{abc}", None),
    ("\\boxed{}", None),
    ("no box 359", None),
    ("\\boxed{3", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_generators_are_seeded_disjoint_and_in_range():
    a = list(problems("train", 0, 300))
    assert a == list(problems("train", 0, 300))
    assert a != list(problems("train", 1, 300))
    held = heldout_set(300)
    assert len({p.text for p in held}) == 300
    assert not {p.text for p in held} & {p.text for p in a}
    assert all(p.split == "heldout" for p in held) and all(p.split == "train" for p in a)
    for p in a + held:
        assert MIN_OPS <= len(p.ops) <= MAX_OPS
        assert all(MIN_VALUE <= v <= MAX_VALUE for v in p.values())  # always three digits
        assert all(MIN_OPERAND <= x <= MAX_OPERAND for _, x in p.ops)
        assert check_solution(p, p.solution).correct
    assert {len(p.ops) for p in a} == set(range(MIN_OPS, MAX_OPS + 1))
    assert {op for p in a for op, _ in p.ops} == {"+", "-"}


def test_fixed_number_of_operations():
    assert {len(p.ops) for p in problems("train", 0, 50, n_ops=5)} == {5}


@pytest.mark.parametrize("solution, prefix, local", [
    (REF, [True, True, True, True], [True, True, True, True]),
    # a slip at step 1, every later step right from the written value: only step 1 is locally wrong
    ("47 + 385 = 432\n\n432 - 129 = 313\n\n313 + 56 = 369\n\nThe answer is \\boxed{369}.",
     [True, False, False, False], [True, False, True, True]),
    # ... and an answer that ignores the written chain is wrong locally too
    ("47 + 385 = 432\n\n432 - 129 = 313\n\n313 + 56 = 369\n\nThe answer is \\boxed{359}.",
     [True, False, False, False], [True, False, True, False]),
    # a step that "repairs" the chain (left operand is not what was written) is locally wrong
    ("47 + 385 = 432\n\n432 - 129 = 313\n\n303 + 56 = 359\n\nThe answer is \\boxed{359}.",
     [True, False, False, False], [True, False, False, True]),
    # wrong operand, skipped operation, unparseable step (nothing after it can be judged right)
    ("47 + 358 = 405\n\n405 - 129 = 276", [False, False], [False, True]),
    ("47 + 385 = 432\n\n303 + 56 = 359", [True, False], [True, False]),
    ("47 + 385 = 432\n\nforty\n\n303 + 56 = 359", [True, False, False], [True, False, False]),
    ("47 + 385 = 432\n\n432 - 129 = 303\n\n303 + 56 = 359\n\nThe answer is \\boxed{359}.\n\n359 + 1 = 360",
     [True, True, True, True, False], [True, True, True, True, False]),
])
def test_local_labels(solution, prefix, local):
    c = check_solution(P, solution)
    assert (c.step_ok, c.step_local) == (prefix, local)


def test_prefix_labels_are_the_running_and_of_local_labels():
    """Random slips (a digit of one step's result changed, later steps right or wrong from there)."""
    rng = random.Random(0)
    for p in heldout_set(50):
        steps = p.steps()
        for _ in range(3):
            i = rng.randrange(len(steps))
            k = rng.randrange(len(steps[i]))
            if steps[i][k].isdigit():
                steps[i] = steps[i][:k] + str((int(steps[i][k]) + 1) % 10) + steps[i][k + 1:]
        c = check_steps(p, steps)
        assert c.step_ok == [all(c.step_local[:i + 1]) for i in range(len(steps))]
