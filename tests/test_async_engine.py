"""Concurrent clients on one engine: continuous batching, isolation, streaming, disconnects."""
import asyncio
import threading

import pytest

from pfengine import Engine, EngineConfig, Request, SamplingParams, SearchParams
from pfengine.async_engine import AsyncEngine


def request(seed: int, n: int, method: str = "particle_filter") -> Request:
    return Request(prompt=f"Step {seed}: add 17 and 25.",
                   sampling=SamplingParams(seed=seed, max_step_tokens=5, max_steps=3),
                   search=SearchParams(method=method, n_particles=n))


@pytest.fixture(scope="module")
def engine(policy_dir, value_head_file):
    return Engine(EngineConfig(model=policy_dir, prm=value_head_file, num_blocks=512, block_size=8))


def test_concurrent_requests_are_isolated_and_batched(engine):
    reqs = [request(s, n, m) for s, (n, m) in enumerate(
        [(1, "particle_filter"), (4, "best_of_n"), (8, "particle_filter"), (2, "particle_filter"),
         (8, "beam_search"), (3, "particle_filter"), (6, "self_consistency"), (16, "particle_filter")])]
    alone = [engine.generate([r])[0] for r in reqs]

    async def main():
        aengine = AsyncEngine(engine)

        async def client(k: int):
            await asyncio.sleep(0.01 * k)  # arrive while others are running
            return await aengine.agenerate(reqs[k])

        return await asyncio.gather(*(client(k) for k in range(len(reqs))))

    together = asyncio.run(main())
    for a, b in zip(alone, together):
        assert [p.token_ids for p in a.particles] == [p.token_ids for p in b.particles]
        assert [p.weight for p in a.particles] == [p.weight for p in b.particles]
    assert engine.stats()["policy_blocks_in_use"] == 0
    engine.policy.blocks.check_invariants()


def test_stream_yields_rounds_then_the_result(engine):
    async def main():
        return [e async for e in AsyncEngine(engine).astream(request(1, 4))]

    events = asyncio.run(main())
    assert all(e.trace is not None for e in events[:-1]) and events[-1].result is not None
    assert len(events) - 1 == len(events[-1].result.trace)


def test_client_disconnect_frees_blocks(engine):
    async def main():
        aengine = AsyncEngine(engine)
        stream = aengine.astream(request(2, 8))
        first = await stream.__anext__()
        await stream.aclose()  # the client goes away mid-request
        await aengine.flush()
        return first

    assert asyncio.run(main()).trace is not None
    assert not engine.has_work
    assert engine.stats()["policy_blocks_in_use"] == 0


def test_client_that_leaves_while_its_request_is_being_queued(engine, monkeypatch):
    """Cancelled while add_request runs on the worker: the request still gets queued, and must then
    be aborted rather than left to run with nobody listening."""
    gate = threading.Event()
    add = engine.add_request

    def slow_add(r: Request) -> int:
        gate.wait(5)
        return add(r)

    monkeypatch.setattr(engine, "add_request", slow_add)

    async def main():
        aengine = AsyncEngine(engine)
        pending = asyncio.ensure_future(aengine.astream(request(4, 8)).__anext__())
        await asyncio.sleep(0.05)  # the worker is inside add_request now
        pending.cancel()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await aengine.flush()

    asyncio.run(main())
    assert not engine.has_work
    assert engine.stats()["policy_blocks_in_use"] == 0


def test_bad_request_fails_alone(engine):
    async def main():
        aengine = AsyncEngine(engine)
        good = asyncio.ensure_future(aengine.agenerate(request(3, 4)))
        with pytest.raises(ValueError, match="prompt: must not be empty"):
            await aengine.agenerate(Request(prompt=""))
        return await good

    assert len(asyncio.run(main()).particles) == 4
