"""A bounded loopback load test: 100 concurrent clients, some malformed or hostile (work over the
limits, 8 MB bodies, broken JSON), some cancelled mid-stream. The server stays up, hostile requests
get 4xx, cancelled ones free their blocks, all others complete, and no KV block is left in use.
(``bench/server_load.py`` measures the latencies, quiet against hostile.)"""
import asyncio
import json

import pytest

httpx = pytest.importorskip("httpx")


from pfengine import Engine, EngineConfig  # noqa: E402
from test_server import MODEL, PF, LoopbackServer, serving, wait_idle  # noqa: E402

N_OK, N_BAD, N_CANCEL = 70, 15, 15
BAD_BODIES = [
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "search": {"method": "mcts"}},
    {"model": MODEL},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 3},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "search": {"particles": 0}},
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
     "search": {"method": "particle_gibbs", "particles": 600_000, "iterations": 1000}},
    b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": ',
    b'{"model": "x", "prompt": "' + b"7 " * (4 << 20) + b'"}',
]


@pytest.mark.slow
def test_hundred_concurrent_clients(policy_dir, value_head_file):
    engine = Engine(EngineConfig(model=policy_dir, prm=value_head_file, num_blocks=512, block_size=8))

    async def ok(client: httpx.AsyncClient, k: int) -> tuple[str, int]:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Add {k} and 3."}], "seed": k,
                "max_tokens": 12}
        if k % 2:
            body["search"] = dict(PF, particles=1 + k % 6)
        r = await client.post("/v1/chat/completions", json=body)
        return "ok", r.status_code if r.status_code != 200 or r.json()["choices"][0]["message"]["content"] is None else 200

    async def bad(client: httpx.AsyncClient, k: int) -> tuple[str, int]:
        body = BAD_BODIES[k % len(BAD_BODIES)]
        raw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {}
        r = await client.post("/v1/chat/completions", **({"json": body} if not raw else raw))
        return "bad", r.status_code

    async def cancel(client: httpx.AsyncClient, k: int) -> tuple[str, int]:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Count."}], "stream": True, "seed": k,
                "search": dict(PF, particles=8, max_steps=6)}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    json.loads(line[6:])
                    break  # the client goes away after the first chunk
        return "cancel", r.status_code

    async def main(url: str):
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            jobs = ([ok(client, k) for k in range(N_OK)] + [bad(client, k) for k in range(N_BAD)]
                    + [cancel(client, k) for k in range(N_CANCEL)])
            results = await asyncio.wait_for(asyncio.gather(*jobs), timeout=300)
            health = await client.get("/health")
        return results, health

    with LoopbackServer(serving(engine)) as url:
        results, health = asyncio.run(main(url))
        wait_idle(engine, timeout=60)
    by_kind: dict[str, list[int]] = {}
    for kind, status in results:
        by_kind.setdefault(kind, []).append(status)
    assert by_kind["ok"] == [200] * N_OK
    assert all(400 <= s < 500 for s in by_kind["bad"]), by_kind["bad"]
    assert by_kind["cancel"] == [200] * N_CANCEL
    assert health.status_code == 200
    assert engine.stats()["policy_blocks_in_use"] == 0
    engine.policy.blocks.check_invariants()
