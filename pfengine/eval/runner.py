"""Running an evaluation: every (method, budget) run submits all its problems to the engine at once
(one batch through the paged cache), grades each result as it arrives and appends it to
``results.jsonl`` -- one JSON line per problem x method x budget. A rerun with the same settings
skips every line already written (failed requests are retried), so an interrupted evaluation
resumes where it stopped and more budgets or methods can be added later."""
from __future__ import annotations

import json
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from pfengine.eval.dataset import Problem
from pfengine.eval.grading import grade, parse_reference

if TYPE_CHECKING:
    from pfengine.config import Request
    from pfengine.engine import Engine
    from pfengine.state import PFResult

RESULTS = "results.jsonl"
SETTINGS = "settings.json"


@dataclass(frozen=True)
class Run:
    method: str
    budget: int


RequestBuilder = Callable[[Problem, Run, int], "Request"]
"""``(problem, run, seed) -> Request``: how the caller turns a problem into an engine request."""
ResultHook = Callable[[int, Problem, Run, "Request", "PFResult"], None]
"""``(index, problem, run, request, result)``: called for every finished request (e.g. to draw its genealogy)."""


def plan_runs(methods: list[str], budgets: list[int]) -> list[Run]:
    """Greedy once, at budget 1 (it has no budget); every other method at every budget. Ordered by
    budget, then in the order the methods were given."""
    runs = {Run(m, 1 if m == "greedy" else b) for m in methods for b in budgets}
    order = {m: k for k, m in enumerate(methods)}
    return sorted(runs, key=lambda r: (r.budget, order[r.method]))


def prepare_out(out: Path, settings: dict, fresh: bool) -> None:
    """Make ``out`` hold results of exactly these ``settings``: a new directory gets them; one with
    results of other settings is an error (unless ``fresh``, which discards its results)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / SETTINGS
    if fresh:
        (out / RESULTS).unlink(missing_ok=True)
    elif path.is_file() and (out / RESULTS).is_file():
        before, now = _flat(json.loads(path.read_text())), _flat(json.loads(json.dumps(settings)))
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        if changed:
            diff = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
            raise ValueError(f"--out {out}: holds results of other settings ({diff}); pass --fresh to discard them "
                             f"or choose another --out")
    path.write_text(json.dumps(settings, indent=1, sort_keys=True))


def _flat(tree: dict, prefix: str = "") -> dict:
    """Nested settings as ``{"sampling.temperature": 0.8, ...}``."""
    out = {}
    for k, v in tree.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def read_records(path: Path) -> dict[tuple[str, str, int], dict]:
    """The last record of each (unique_id, method, budget) in a results file. A final line cut short
    (the run was killed while writing it) is dropped; any other malformed line is an error."""
    if not path.is_file():
        return {}
    records = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise ValueError(f"{path}:{number}: not a JSON line; remove it or pass --fresh") from None
        records[(r["unique_id"], r["method"], r["budget"])] = r
    return records


Todo = list[tuple[Run, list[tuple[int, Problem]]]]
"""Each run with the problems it still lacks, as ``(position in the problem list, problem)``."""


def evaluate(engine: Engine, problems: list[Problem], runs: list[Run], build: RequestBuilder, seed: int, out: Path,
             progress: bool = True, on_result: ResultHook | None = None) -> list[dict]:
    """Run what ``out``'s results file lacks; return the records of every problem x run, in order.
    Problem ``k`` (its position in ``problems``) is sampled with seed ``seed + k`` by every run."""
    todo = plan_todo(problems, runs, build, seed, out)
    with recording(out, todo, progress) as write:
        for run, pending in todo:
            for record in run_batch(engine, run, pending, build, seed, on_result):
                write(record)
    return collect(out, problems, runs)


def plan_todo(problems: list[Problem], runs: list[Run], build: RequestBuilder, seed: int, out: Path) -> Todo:
    """What ``out``'s results file lacks, once the inputs are checked: a budget a method cannot take,
    or an unreadable reference, fails before anything runs."""
    for run in runs:
        build(problems[0], run, seed)
    for p in problems:
        try:
            parse_reference(p.answer)
        except ValueError as e:
            raise ValueError(f"problem {p.unique_id}: {e}") from None
    done = read_records(out / RESULTS)
    return [(run, [(k, p) for k, p in enumerate(problems) if _to_run(done.get((p.unique_id, run.method, run.budget)))])
            for run in runs]


@contextmanager
def recording(out: Path, todo: Todo, progress: bool) -> Iterator[Callable[[dict], None]]:
    """``write(record)``: append a graded record to the results file at once (a killed evaluation
    loses nothing it has written) and advance the progress bar by its budget."""
    total = sum(len(pending) * run.budget for run, pending in todo)
    with _progress_bar(total, not progress) as bar, (out / RESULTS).open("a", encoding="utf-8") as f:
        def write(record: dict) -> None:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            bar.set_postfix_str(f"{record['method']} x{record['budget']}", refresh=False)
            bar.update(record["budget"])

        yield write


def collect(out: Path, problems: list[Problem], runs: list[Run]) -> list[dict]:
    """The records of every problem x run in ``out``'s results file, in run order, then problem order."""
    done = read_records(out / RESULTS)
    return [done[key] for run in runs for p in problems if (key := (p.unique_id, run.method, run.budget)) in done]


def _to_run(record: dict | None) -> bool:
    """Not run yet, or its request failed (a rerun retries it)."""
    return record is None or "error" in record


def run_batch(engine: Engine, run: Run, pending: list[tuple[int, Problem]], build: RequestBuilder,
              seed: int, on_result: ResultHook | None = None) -> Iterator[dict]:
    """Submit every pending problem of one run, step the engine until all are done, and yield each
    graded record as its request finishes (a failed request yields a record with its ``error``)."""
    batch, start, cpu_start = uuid.uuid4().hex[:12], time.perf_counter(), time.process_time()

    def record(k: int, problem: Problem, result: PFResult | None = None, error: BaseException | None = None) -> dict:
        return make_record(problem, k, run, seed + k, batch, time.perf_counter() - start, result, error,
                           cpu=time.process_time() - cpu_start)

    waiting: dict[int, tuple[int, Problem, Request]] = {}
    for k, problem in pending:
        try:
            request = build(problem, run, seed + k)
            waiting[engine.add_request(request)] = (k, problem, request)
        except (ValueError, TypeError) as e:
            yield record(k, problem, error=e)
    while waiting:
        for event in engine.step():
            if (event.result is None and event.error is None) or event.request_id not in waiting:
                continue
            k, problem, request = waiting.pop(event.request_id)
            if event.result is not None and on_result is not None:
                on_result(k, problem, run, request, event.result)
            yield record(k, problem, event.result, event.error)


def make_record(problem: Problem, index: int, run: Run, seed: int, batch: str, elapsed: float,
                result: PFResult | None = None, error: BaseException | None = None, cpu: float | None = None) -> dict:
    """A result graded (or a failed request) as one line of the results file; ``elapsed``: seconds
    since its ``batch`` started; ``cpu``: CPU seconds this process spent since then, where the batch
    ran in this process (all threads)."""
    record = {"unique_id": problem.unique_id, "index": index, "method": run.method, "budget": run.budget,
              "seed": seed, "reference": problem.answer, "batch": batch, "elapsed_s": elapsed}
    if cpu is not None:
        record["cpu_s"] = cpu
    if result is None:
        return record | {"correct": False, "error": f"{type(error).__name__}: {error}", "generated_tokens": 0}
    g = grade(problem.answer, result.text)
    if result.expected_accuracy is not None and run.method == "particle_filter":
        record["expected_accuracy"] = result.expected_accuracy
    return record | {"correct": g.correct, "graded_answer": g.extracted, "answer": result.answer,
                     "finish_reason": result.particles[result.best].finish_reason,
                     "prompt_tokens": result.stats.prompt_tokens, "generated_tokens": result.stats.generated_tokens,
                     "rounds": result.stats.steps, "text": result.text}


def _progress_bar(total: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="eval", unit="particle", disable=disable, file=sys.stderr, dynamic_ncols=True)
