"""Many concurrent clients on one Engine: one worker thread owns the engine (so every add, step and
abort is serialised without blocking the event loop) and routes each request's events to its own
queue. Requests submitted at any time join the running decode batch at the next round boundary
(continuous batching), and each sees only its own events."""
from __future__ import annotations

import asyncio
from concurrent.futures import Future, ThreadPoolExecutor
from typing import AsyncIterator

from pfengine.config import Request
from pfengine.engine import Engine
from pfengine.state import Event, PFResult


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pfengine-engine")
        self._queues: dict[int, asyncio.Queue[Event]] = {}
        self._task: asyncio.Task | None = None

    async def astream(self, request: Request) -> AsyncIterator[Event]:
        """Events of one request as its rounds finish; the last carries the result. Leaving the
        iteration early (a client disconnect) aborts the request and frees its blocks."""
        loop = asyncio.get_running_loop()
        added = self._worker.submit(self.engine.add_request, request)
        try:
            rid = await asyncio.wrap_future(added)  # bad input raises here
        except asyncio.CancelledError:  # the client left before the request was queued: drop it once it is
            self._worker.submit(self._abort_added, added)
            raise
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._queues[rid] = queue
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        finished = False
        try:
            while not finished:
                event = await queue.get()
                if event.error is not None:
                    finished = True
                    raise event.error
                finished = event.result is not None
                yield event
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self._worker.submit(self.engine.abort, rid)  # between two steps, off the event loop

    def _abort_added(self, added: Future[int]) -> None:
        """Runs on the worker after ``added`` (the worker is FIFO), so the request id is known by now."""
        if not added.cancelled() and added.exception() is None:
            self.engine.abort(added.result())

    async def agenerate(self, request: Request) -> PFResult:
        async for event in self.astream(request):
            if event.result is not None:
                return event.result
        raise RuntimeError("request ended without a result")

    async def health(self) -> dict:
        """Requests running and waiting, and the engine's counters (the server's ``/health``)."""
        return {"running": len(self.engine.running), "waiting": len(self.engine.waiting), "engine": self.engine.stats()}

    @property
    def idle(self) -> bool:
        """No engine loop is running (it stops when the engine has no work left)."""
        return self._task is None or self._task.done()

    async def flush(self) -> None:
        """Wait until everything submitted to the engine's worker so far (aborts included) is done."""
        await asyncio.get_running_loop().run_in_executor(self._worker, lambda: None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                events = await loop.run_in_executor(self._worker, self._step)
            except Exception as error:  # an engine fault fails the requests in flight, not the server
                for rid, queue in list(self._queues.items()):
                    queue.put_nowait(Event(rid, None, error=error))
                    self._worker.submit(self.engine.abort, rid)
                return
            if events is None:
                return
            for event in events:
                queue = self._queues.get(event.request_id)
                if queue is not None:
                    queue.put_nowait(event)

    def _step(self) -> list[Event] | None:
        """One engine step, or None when there is nothing left to do (checked on the worker thread)."""
        return self.engine.step() if self.engine.has_work else None
