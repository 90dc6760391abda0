"""What a genealogy is drawn from: one finished request's trace, its final candidates and the choice,
from a :class:`PFResult` in memory or from a saved result JSON (``pfengine generate --json``)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable

from pfengine.config import METHODS, SearchParams
from pfengine.search.answers import canonical, extract_answer
from pfengine.state import PFResult, StepTrace

STEP_TRACE_FIELDS = {f.name for f in fields(StepTrace)}


@dataclass
class Run:
    method: str
    trace: list[StepTrace]
    candidates: list[list[int]]
    """Token ids of the method's final candidates (``PFResult.particles``)."""
    answers: list[str | None]
    """Each candidate's extracted answer."""
    best: int
    """Index of the chosen candidate."""
    search: SearchParams | None = None
    """The request's search options (bands: parallel tempering's chains, DVTS's subtrees)."""
    prompt: str | None = None
    correct: list[bool] | None = None
    """Whether each candidate's answer is right (evaluation runs)."""

    def __post_init__(self) -> None:
        assert self.trace, "Run: a genealogy needs at least one round"
        assert 0 <= self.best < len(self.candidates), "Run: best must index a candidate"

    @property
    def n_particles(self) -> int:
        return len(self.trace[0].tokens)

    @property
    def verdict(self) -> str:
        answer = self.answers[self.best]
        text = f"Chosen candidate {self.best}: answer {answer if answer is not None else '(none)'}"
        if self.correct is not None:
            text += " — correct" if self.correct[self.best] else " — wrong"
        return text


def grader(reference: str) -> Callable[[str], bool]:
    """Whether a particle's text ends in ``reference`` (compared in the canonical form answers vote in)."""
    want = canonical(reference)
    return lambda text: extract_answer(text) == want


def prompt_text(prompt: str | list[dict]) -> str:
    """A request's prompt as text: the string, or the last user message of a chat."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return str(users[-1]) if users else ""


def from_result(result: PFResult, search: SearchParams | None = None, prompt: str | list[dict] | None = None,
                grade: Callable[[str], bool] | None = None) -> Run:
    particles = result.particles
    return Run(method=result.method, trace=result.trace, candidates=[list(p.token_ids) for p in particles],
               answers=[p.answer for p in particles], best=result.best, search=search,
               prompt=None if prompt is None else prompt_text(prompt),
               correct=None if grade is None else [grade(p.text) for p in particles])


def from_json(data: Any, source: str = "result", grade: Callable[[str], bool] | None = None) -> Run:
    """A run from a result as ``pfengine generate --json`` / ``pfengine trace`` write it; every field
    it uses is checked, and a malformed one is named in the error."""
    _expect(isinstance(data, dict), source, "a JSON object (a result as `pfengine generate --json` prints it)")
    method = data.get("method", "particle_filter")
    _expect(method in METHODS, f"{source}: method", f"one of {METHODS}")
    trace = _trace(data.get("trace"), f"{source}: trace")
    particles = data.get("particles")
    _expect(isinstance(particles, list) and particles, f"{source}: particles", "a non-empty list")
    for i, p in enumerate(particles):
        where = f"{source}: particles[{i}]"
        _expect(isinstance(p, dict), where, "an object")
        _expect(_ints(p.get("token_ids")), f"{where}.token_ids", "a list of token ids")
        _expect(isinstance(p.get("text", ""), str), f"{where}.text", "a string")
        _expect(p.get("answer") is None or isinstance(p.get("answer"), str), f"{where}.answer", "a string or null")
    best = data.get("best")
    _expect(isinstance(best, int) and 0 <= best < len(particles), f"{source}: best",
            f"an index into particles (0..{len(particles) - 1})")
    search = _search(data.get("search"), f"{source}: search")
    _expect(search is None or search.method == method, f"{source}: search.method", f"the result's method {method!r}")
    prompt = data.get("prompt")
    _expect(prompt is None or isinstance(prompt, str) or (isinstance(prompt, list) and all(
        isinstance(m, dict) and isinstance(m.get("content", ""), str) for m in prompt)), f"{source}: prompt",
            "a string or chat messages ({role, content} objects)")
    return Run(method=method, trace=trace, candidates=[list(p["token_ids"]) for p in particles],
               answers=[p.get("answer") for p in particles], best=best, search=search,
               prompt=None if prompt is None else prompt_text(prompt),
               correct=None if grade is None else [grade(p.get("text", "")) for p in particles])


def _trace(raw: Any, where: str) -> list[StepTrace]:
    _expect(isinstance(raw, list) and raw, where, "a non-empty list of rounds")
    rounds: list[StepTrace] = []
    for k, t in enumerate(raw):
        rounds.append(_round(t, f"{where}[{k}]", len(rounds[0].tokens) if rounds else None))
        _expect(k == 0 or rounds[-2].sweep <= rounds[-1].sweep, f"{where}[{k}].sweep", "sweeps in increasing order")
    return rounds


def _round(t: Any, at: str, n: int | None) -> StepTrace:
    """One round of a saved trace; ``n``: the particle count of round 0 (None for round 0 itself)."""
    _expect(isinstance(t, dict), at, "an object")
    tokens = t.get("tokens")
    _expect(isinstance(tokens, list) and tokens and all(_ints(x) for x in tokens), f"{at}.tokens",
            "a non-empty list of token-id lists (one per particle)")
    _expect(n is None or len(tokens) == n, f"{at}.tokens", f"{n} particles, as in round 0")
    n = len(tokens)
    _expect(isinstance(t.get("scored"), list) and len(t["scored"]) == n
            and all(isinstance(s, bool) for s in t["scored"]), f"{at}.scored", f"{n} booleans")
    _expect(isinstance(t.get("scores"), list) and len(t["scores"]) == n
            and all(_number(x) and 0 <= x <= 1 for x in t["scores"]), f"{at}.scores", f"{n} numbers in [0, 1]")
    _expect(isinstance(t.get("log_weights"), list) and len(t["log_weights"]) == n
            and all(_number(x) and x < math.inf for x in t["log_weights"]), f"{at}.log_weights",
            f"{n} numbers (-Infinity for weight 0)")
    _expect(_number(t.get("ess")) and 0 <= t["ess"] < math.inf, f"{at}.ess", "a non-negative number")
    ancestors = t.get("ancestors")
    _expect(ancestors is None or (_ints(ancestors) and len(ancestors) == n and all(0 <= a < n for a in ancestors)),
            f"{at}.ancestors", f"null or {n} particle indices in 0..{n - 1}")
    sweep = t.get("sweep", 0)
    _expect(isinstance(sweep, int) and not isinstance(sweep, bool) and sweep >= 0, f"{at}.sweep",
            "a non-negative integer")
    return StepTrace(**{key: value for key, value in t.items() if key in STEP_TRACE_FIELDS})


def _search(raw: Any, where: str) -> SearchParams | None:
    if raw is None:
        return None
    _expect(isinstance(raw, dict), where, "an object of SearchParams fields")
    known = {f.name for f in fields(SearchParams)}
    unknown = sorted(set(raw) - known)
    _expect(not unknown, where, f"only SearchParams fields, not {unknown}")
    options = dict(raw)
    if isinstance(options.get("temperatures"), list):
        options["temperatures"] = tuple(options["temperatures"])
    try:
        return SearchParams(**options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def _ints(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in x)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def _expect(ok: bool, where: str, expected: str) -> None:
    if not ok:
        raise ValueError(f"{where}: expected {expected}")
