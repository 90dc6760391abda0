"""What a genealogy is drawn from: one finished request's trace, its final candidates and the choice,
from a :class:`PFResult` in memory or from a saved result JSON (``pfengine generate --json``)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable

from pfengine.config import METHODS, SearchParams
from pfengine.search.answers import canonical, extract_answer
from pfengine.state import PFResult, StepTrace


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
    _expect(prompt is None or isinstance(prompt, (str, list)), f"{source}: prompt", "a string or chat messages")
    return Run(method=method, trace=trace, candidates=[list(p["token_ids"]) for p in particles],
               answers=[p.get("answer") for p in particles], best=best, search=search,
               prompt=None if prompt is None else prompt_text(prompt),
               correct=None if grade is None else [grade(p.get("text", "")) for p in particles])


def _trace(raw: Any, where: str) -> list[StepTrace]:
    _expect(isinstance(raw, list) and raw, where, "a non-empty list of rounds")
    rounds = []
    for k, t in enumerate(raw):
        at = f"{where}[{k}]"
        _expect(isinstance(t, dict), at, "an object")
        tokens = t.get("tokens")
        _expect(isinstance(tokens, list) and tokens and all(_ints(x) for x in tokens), f"{at}.tokens",
                "a non-empty list of token-id lists (one per particle)")
        n = len(tokens)
        _expect(not rounds or n == len(rounds[0].tokens), f"{at}.tokens", f"{len(rounds[0].tokens) if rounds else n} "
                "particles, as in round 0")
        _expect(isinstance(t.get("scored"), list) and len(t["scored"]) == n
                and all(isinstance(s, bool) for s in t["scored"]), f"{at}.scored", f"{n} booleans")
        for name in ("scores", "log_weights"):
            _expect(isinstance(t.get(name), list) and len(t[name]) == n and all(_number(x) for x in t[name]),
                    f"{at}.{name}", f"{n} numbers")
        _expect(_number(t.get("ess")), f"{at}.ess", "a number")
        ancestors = t.get("ancestors")
        _expect(ancestors is None or (_ints(ancestors) and len(ancestors) == n and all(0 <= a < n for a in ancestors)),
                f"{at}.ancestors", f"null or {n} particle indices in 0..{n - 1}")
        sweep = t.get("sweep", 0)
        _expect(isinstance(sweep, int) and not isinstance(sweep, bool) and sweep >= 0, f"{at}.sweep",
                "a non-negative integer")
        _expect(not rounds or rounds[-1].sweep <= sweep, f"{at}.sweep", "sweeps in increasing order")
        known = {f.name for f in fields(StepTrace)}
        rounds.append(StepTrace(**{key: value for key, value in t.items() if key in known}))
    return rounds


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
