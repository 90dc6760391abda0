"""``pfengine eval --workers K``: every run's problems spread over a pool of K engines, their results
merged into the results file a single engine writes.

Only this process writes that file, one record per (problem, method, budget) it submitted, when the
result comes back: no record can be written twice, and a worker that dies loses nothing but time
(the pool reruns its requests on another engine, with the same seeds, so with the same results).
Records are appended as they arrive, so an interrupted evaluation resumes like a single engine's.

At most the pool's capacity (K x ``max_particles``, the engines' cache rows) of particles is in
flight: the engines stay full while the rest waits here, and whichever engine frees up first takes
the next problem. Runs overlap (the next run's problems start while the last of the previous run
finish); a run's wall time is from its first request to its last result."""
from __future__ import annotations

import asyncio
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Callable

from pfengine.config import Request
from pfengine.dp.pool import EnginePool
from pfengine.eval.dataset import Problem
from pfengine.eval.runner import RequestBuilder, ResultHook, Run, Todo, collect, make_record, plan_todo, recording
from pfengine.state import PFResult


def evaluate_on_pool(pool: EnginePool, problems: list[Problem], runs: list[Run], build: RequestBuilder, seed: int,
                     out: Path, progress: bool = True, on_result: ResultHook | None = None) -> list[dict]:
    """:func:`pfengine.eval.runner.evaluate` on a pool of engines; the same records (``on_result`` is
    called here, in the driver, as results arrive)."""
    todo = plan_todo(problems, runs, build, seed, out)
    with recording(out, todo, progress) as write:
        asyncio.run(_dispatch(pool, todo, build, seed, write, on_result))
    return collect(out, problems, runs)


class _Room:
    """Particles in flight, at most ``capacity`` (a larger request goes alone)."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.used = capacity, 0
        self.freed = asyncio.Condition()

    async def take(self, n: int) -> None:
        async with self.freed:
            await self.freed.wait_for(lambda: self.used == 0 or self.used + n <= self.capacity)
            self.used += n

    async def give(self, n: int) -> None:
        async with self.freed:
            self.used -= n
            self.freed.notify_all()


async def _dispatch(pool: EnginePool, todo: Todo, build: RequestBuilder, seed: int, write: Callable[[dict], None],
                    on_result: ResultHook | None) -> None:
    room = _Room(pool.capacity)
    solving = []
    for run, pending in todo:
        batch, start = uuid.uuid4().hex[:12], None
        for k, problem in pending:
            record = partial(make_record, problem, k, run, seed + k, batch)
            try:
                request = build(problem, run, seed + k)
            except (ValueError, TypeError) as e:
                write(record(0.0, error=e))
                continue
            await room.take(request.search.n_particles)
            start = start or time.perf_counter()
            hook = partial(on_result, k, problem, run, request) if on_result else None
            solving.append(asyncio.create_task(_solve(pool, request, room, record, write, start, hook)))
    await asyncio.gather(*solving)


async def _solve(pool: EnginePool, request: Request, room: _Room, record: Callable[..., dict],
                 write: Callable[[dict], None], start: float, hook: Callable[[PFResult], None] | None) -> None:
    """Run one request and write its record (a failed one too: a rerun of the evaluation retries it)."""
    try:
        result = await pool.agenerate(request)
    except Exception as e:
        write(record(time.perf_counter() - start, error=e))
    else:
        if hook is not None:
            hook(result)
        write(record(time.perf_counter() - start, result))
    finally:
        await room.give(request.search.n_particles)
