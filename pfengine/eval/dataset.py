"""Problem sets as JSON lines, one problem per line::

    {"problem": "What is 17 + 25?", "answer": "42", "solution": "... \\boxed{42}", "unique_id": "add/1"}

``problem`` and ``answer`` are required (an answer may be a JSON number, as in AMC-2023);
``solution`` is optional; ``unique_id`` defaults to the problem's position in the file. Other keys
are ignored. This is the format of MATH-500, AIME-2024 and AMC-2023 as the paper's code reads them."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    problem: str
    answer: str
    unique_id: str
    solution: str | None = None


def read_problems(path: str | Path) -> list[Problem]:
    """Every problem of a JSON-lines file, validated; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file (expected JSON lines with 'problem' and 'answer')")
    problems: list[Problem] = []
    lines: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        problem = _parse_line(line, f"{path}:{number}", default_id=str(len(problems)))
        if problem.unique_id in lines:
            first = lines[problem.unique_id]
            raise ValueError(f"{path}:{number}: unique_id {problem.unique_id!r} repeats line {first}")
        lines[problem.unique_id] = number
        problems.append(problem)
    if not problems:
        raise ValueError(f"{path}: no problems in the file")
    return problems


def _parse_line(line: str, where: str, default_id: str) -> Problem:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    text, answer = row.get("problem"), row.get("answer")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: 'problem' must be a non-empty string")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or str(answer).strip() == "":
        raise ValueError(f"{where}: 'answer' must be a non-empty string or a number, got {answer!r}")
    uid, solution = row.get("unique_id", default_id), row.get("solution")
    if isinstance(uid, bool) or not isinstance(uid, (str, int)):
        raise ValueError(f"{where}: 'unique_id' must be a string or an integer, got {uid!r}")
    if solution is not None and not isinstance(solution, str):
        raise ValueError(f"{where}: 'solution' must be a string when present")
    return Problem(problem=text, answer=str(answer), unique_id=str(uid), solution=solution)


def write_problems(problems: list[Problem], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{k: v for k, v in asdict(p).items() if v is not None} for p in problems]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path
