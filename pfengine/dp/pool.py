"""K engine replicas on Ray behind one interface: the server's backend (``astream``, ``agenerate``,
``health``), and what an evaluation's workers are.

Routing: a request goes to the live replica with the fewest particles in flight (ties: the one
given work least recently), so concurrent requests spread over all replicas and each replica's
engine batches what it holds.

Failures: a replica whose process dies (Ray reports ``RayActorError`` on its calls) is marked down.
Ray restarts its actor (``max_restarts=-1``), which loads the engine again, and the pool takes it
back once it answers. Every request it held goes to another replica: one that has delivered nothing
yet is simply run again there (a seeded request gives the same result on any engine); a stream
that has already sent events ends with an error instead, since an unseeded rerun could contradict
them. A request whose replica dies under it :data:`MAX_DEATHS` times fails, so a request that kills
engines cannot take them all down in turn."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from itertools import count
from typing import Any, AsyncIterator

import ray
from ray.exceptions import RayActorError

from pfengine.config import EngineConfig, Request
from pfengine.dp.actor import EngineActor, Identity
from pfengine.dp.cluster import Placement
from pfengine.dp.errors import PortableError
from pfengine.dp.front import Front
from pfengine.state import Event, PFResult

log = logging.getLogger("pfengine.dp")

MAX_DEATHS = 3
"""Replica deaths one request survives (it is rerun after each)."""
PROBE_S = 0.5
"""How often a replica that is down is asked whether it is back."""
DOWN_TIMEOUT_S = 900.0
"""A request waits this long for some replica to be up before it fails."""
HEALTH_TIMEOUT_S = 10.0
START_REPORT_S = 60.0


class ReplicaLost(RuntimeError):
    """A request's replica died and it could not be rerun (or not any more)."""


@dataclass(eq=False)
class Replica:
    index: int
    handle: Any
    pid: int | None = None
    host: str | None = None
    threads: int | None = None
    up: bool = False
    load: int = 0
    """Particles of the requests in flight on it."""
    routed: int = 0
    """Requests given to it (reruns included)."""
    deaths: int = 0
    last_pick: int = -1
    revival: asyncio.Task | None = field(default=None, repr=False)


class EnginePool:
    def __init__(self, config: EngineConfig, placement: Placement) -> None:
        if placement.gpus and config.device == "cpu":
            config = replace(config, device="cuda")  # Ray hands each actor its own GPUs as cuda:0..
        remote = ray.remote(num_cpus=placement.cpus, num_gpus=placement.gpus, max_restarts=-1,
                            max_task_retries=0)(EngineActor)
        self.config, self.placement = config, placement
        self.replicas = [Replica(k, remote.remote(config, placement.cpus)) for k in range(placement.engines)]
        self.front: Front | None = None
        """Set by :meth:`start`."""
        self._picks = count()

    @property
    def capacity(self) -> int:
        """Particles all replicas hold at once (their cache rows)."""
        return len(self.replicas) * self.config.max_particles

    def start(self) -> Front:
        """Wait until every replica has loaded its engine (saying so every :data:`START_REPORT_S`
        while some have not); their front (they are all the same). A replica that cannot load it
        raises that error."""
        calls = [r.handle.describe.remote() for r in self.replicas]
        while len(ray.wait(calls, num_returns=len(calls), timeout=START_REPORT_S)[0]) < len(calls):
            ready = len(ray.wait(calls, num_returns=len(calls), timeout=0)[0])
            log.warning("%d of %d engines loaded; Ray starts the others as soon as a node has %d CPU(s) and %d GPU(s) "
                        "free for each", ready, len(calls), self.placement.cpus, self.placement.gpus)
        try:
            described = ray.get(calls)
        except RayActorError as e:
            raise ReplicaLost(f"an engine replica died while loading its engine (out of memory?): {e}") from None
        for replica, answer in zip(self.replicas, described):
            self._take_back(replica, answer)
        self.front = described[0].front
        return self.front

    def _take_back(self, replica: Replica, answer: Identity | PortableError) -> None:
        if isinstance(answer, PortableError):
            raise answer.rebuild()
        replica.pid, replica.host, replica.threads = answer.pid, answer.host, answer.threads
        replica.up = True

    async def agenerate(self, request: Request) -> PFResult:
        cost = request.search.n_particles
        for _ in range(MAX_DEATHS):
            replica = await self._pick(cost)
            call = replica.handle.generate.remote(request)
            try:
                answer = await call
            except RayActorError as e:
                self._lost(replica, e)
                continue
            except asyncio.CancelledError:  # the caller went away: the actor aborts the request
                ray.cancel(call)
                raise
            finally:
                replica.load -= cost
            if isinstance(answer, PortableError):
                raise answer.rebuild()
            return answer
        raise ReplicaLost(f"the engine replica running this request died {MAX_DEATHS} times; giving up on it")

    async def astream(self, request: Request) -> AsyncIterator[Event]:
        """The request's events from one replica. Leaving the iteration early aborts the request there."""
        cost = request.search.n_particles
        for _ in range(MAX_DEATHS):
            replica = await self._pick(cost)
            events = replica.handle.stream.remote(request)
            delivered = finished = False
            try:
                async for ref in events:
                    item = await ref
                    if isinstance(item, PortableError):
                        finished = True
                        raise item.rebuild()
                    delivered = True
                    yield item
                finished = True
                return
            except RayActorError as e:
                finished = True
                self._lost(replica, e)
                if delivered:
                    raise ReplicaLost(f"engine replica {replica.index} died while streaming this request") from None
            finally:
                replica.load -= cost
                if not finished:
                    ray.cancel(events)
        raise ReplicaLost(f"the engine replica running this request died {MAX_DEATHS} times; giving up on it")

    async def _pick(self, cost: int) -> Replica:
        deadline = time.monotonic() + DOWN_TIMEOUT_S
        while not (live := [r for r in self.replicas if r.up]):
            self._revive_all()
            if time.monotonic() > deadline:
                raise ReplicaLost(f"no engine replica has been up for {DOWN_TIMEOUT_S:.0f} s")
            await asyncio.sleep(PROBE_S)
        replica = min(live, key=lambda r: (r.load, r.last_pick))
        replica.load += cost
        replica.routed += 1
        replica.last_pick = next(self._picks)
        return replica

    def _lost(self, replica: Replica, error: BaseException) -> None:
        if replica.up:
            replica.up = False
            replica.deaths += 1
            log.warning("engine replica %d (pid %s on %s) is gone (%s); its requests in flight (%d particles) go to "
                        "the other replicas while Ray restarts it", replica.index, replica.pid, replica.host,
                        type(error).__name__, replica.load)
        self._revive_all()

    def _revive_all(self) -> None:
        """Ask every replica that is down, until it answers, whether Ray has restarted it (one
        task per replica, in the running event loop)."""
        for replica in self.replicas:
            if not replica.up and (replica.revival is None or replica.revival.done()):
                replica.revival = asyncio.get_running_loop().create_task(self._revive(replica))

    async def _revive(self, replica: Replica) -> None:
        while True:
            try:
                answer = await replica.handle.describe.remote()
            except RayActorError:  # still restarting
                await asyncio.sleep(PROBE_S)
                continue
            if isinstance(answer, PortableError):  # restarted, but its engine did not load: have Ray try again
                log.error("engine replica %d restarted but cannot load its engine: %s", replica.index, answer.rebuild())
                ray.kill(replica.handle, no_restart=False)
                await asyncio.sleep(10 * PROBE_S)
                continue
            self._take_back(replica, answer)
            log.warning("engine replica %d is back (pid %d on %s)", replica.index, replica.pid, replica.host)
            return

    async def health(self) -> dict:
        """Requests running and waiting and the engines' counters, summed over the live replicas,
        and each replica's own."""
        replicas = await asyncio.gather(*(self._replica_health(r) for r in self.replicas))
        live = [r for r in replicas if "engine" in r]
        engine: dict[str, int] = {}
        for r in live:
            for key, value in r["engine"].items():
                engine[key] = engine.get(key, 0) + value
        return {"running": sum(r["running"] for r in live), "waiting": sum(r["waiting"] for r in live),
                "engine": engine, "replicas": replicas}

    async def _replica_health(self, replica: Replica) -> dict:
        mine = {"index": replica.index, "up": replica.up, "pid": replica.pid, "host": replica.host,
                "load": replica.load, "routed": replica.routed, "deaths": replica.deaths}
        if not replica.up:
            return mine
        try:
            return mine | await asyncio.wait_for(replica.handle.health.remote(), HEALTH_TIMEOUT_S)
        except RayActorError as e:
            self._lost(replica, e)
            return mine | {"up": False}
        except asyncio.TimeoutError:
            return mine | {"error": f"no answer in {HEALTH_TIMEOUT_S:.0f} s"}
