"""Answer extraction and canonicalisation over real-world answer formats; voting and selection."""
import pytest
import torch

from pfengine.search.answers import canonical, expected_accuracy, extract_answer, select

CASES = [
    (r"So the answer is $\boxed{42}$.", "42"),
    (r"\boxed{\frac{1}{2}}", "1/2"),
    (r"\boxed{\dfrac{3}{6}}", "1/2"),
    (r"\boxed{\tfrac12}", "1/2"),
    ("the result is 0.5", "1/2"),
    (r"\boxed{1/2}", "1/2"),
    (r"\boxed{1,000}", "1000"),
    (r"\boxed{\$5}", "5"),
    (r"\boxed{5.}", "5"),
    (r"\boxed{-3}", "-3"),
    (r"\boxed{2.50}", "5/2"),
    (r"\boxed{\text{(B)}}", "(B)"),
    (r"\boxed{x^{2}+1}", "x^{2}+1"),
    (r"\boxed{\left(1, 2\right)}", "(1,2)"),
    (r"first \boxed{3} then \boxed{7}", "7"),
    ("x = 12, so we add 15 to get 27.", "27"),
    ("no digits here", None),
    (r"\boxed{", None),
    (r"Thus $\boxed{\sqrt{2}}$", r"\sqrt{2}"),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_equal_values_vote_together():
    forms = ["0.5", "1/2", r"\frac{1}{2}", r"\dfrac{2}{4}", ".5"]
    assert len({canonical(f) for f in forms}) == 1


def test_vote_sums_weights_per_answer():
    g = torch.Generator().manual_seed(0)
    weights = [0.3, 0.25, 0.25, 0.2]
    answers = ["7", "5", "5", None]
    assert select(weights, answers, "argmax", g) == 0
    assert select(weights, answers, "vote", g) in (1, 2)
    assert expected_accuracy(weights, answers, r"\boxed{5}") == pytest.approx(0.5)


def test_sample_selection_follows_weights():
    g = torch.Generator().manual_seed(0)
    picks = [select([0.1, 0.9], [None, None], "sample", g) for _ in range(2000)]
    assert abs(sum(picks) / 2000 - 0.9) < 0.03
