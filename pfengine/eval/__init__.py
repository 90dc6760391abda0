"""``pfengine eval``: search methods on problem sets, graded like a mathematician would.

- :mod:`~pfengine.eval.dataset`: problem sets as JSON lines (``problem``, ``answer``, and
  ``solution`` / ``unique_id`` when present -- the format of MATH-500, AIME-2024 and AMC-2023);
- :mod:`~pfengine.eval.grading`: answers graded with math-verify;
- :mod:`~pfengine.eval.runner`: every (method, budget) run as one engine batch, each result written
  as one JSON line the moment it is graded (a rerun skips what is done);
- :mod:`~pfengine.eval.report`: accuracy with Wilson intervals (Markdown, JSON) and a plot.
"""
