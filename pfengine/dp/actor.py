"""One engine in a Ray actor process (made remote by :class:`~pfengine.dp.pool.EnginePool`).

An async actor: concurrent calls are batched together by the engine's
:class:`~pfengine.async_engine.AsyncEngine` (continuous batching), and a call Ray cancels (its
caller went away) aborts its request and frees its blocks. Errors come back as
:class:`~pfengine.dp.errors.PortableError` values, never raised: an actor whose constructor raises
is never restarted, and most engine errors do not survive Ray's pickling."""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import AsyncIterator

from pfengine.async_engine import AsyncEngine
from pfengine.config import EngineConfig, Request
from pfengine.dp.errors import PortableError
from pfengine.dp.front import Front
from pfengine.engine import Engine
from pfengine.state import Event, PFResult


@dataclass(frozen=True)
class Identity:
    """Who answered: an actor's engine front, and where it runs."""

    front: Front
    pid: int
    host: str
    threads: int
    """Its torch threads."""


class EngineActor:
    def __init__(self, config: EngineConfig, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.served = 0
        self.aengine: AsyncEngine | None = None
        self.failure: PortableError | None = None
        try:
            self.aengine = AsyncEngine(Engine(config))
        except Exception as e:
            self.failure = PortableError.of(e)

    async def describe(self) -> Identity | PortableError:
        """Who it is, or why its engine did not load."""
        if self.aengine is None:
            return self.failure
        return Identity(Front.of(self.aengine.engine), os.getpid(), socket.gethostname(), self.threads)

    async def generate(self, request: Request) -> PFResult | PortableError:
        try:
            result = await self.aengine.agenerate(request)
        except Exception as e:
            return PortableError.of(e)
        self.served += 1
        return result

    async def stream(self, request: Request) -> AsyncIterator[Event | PortableError]:
        """The request's events; an error is the last item."""
        try:
            async for event in self.aengine.astream(request):
                yield event
        except Exception as e:
            yield PortableError.of(e)
            return
        self.served += 1

    async def health(self) -> dict:
        """Its process, requests served, CPU seconds used, and the engine's state."""
        return {"pid": os.getpid(), "served": self.served, "cpu_s": time.process_time()} | await self.aengine.health()
