"""``pfengine serve --replicas 2`` on a local Ray cluster: one OpenAI-compatible endpoint in front of
two engine processes, with the single server's API key, error objects, SSE stream and disconnect
aborts; 50 concurrent clients are all answered while one replica is killed (SIGKILL) mid-run, and
Ray puts a new process in its place."""
import asyncio
import json
import os
import re
import signal
import time

import pytest

pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

from pfengine.toy.pf import is_bundled  # noqa: E402
from bench.ray_command import RayCommand  # noqa: E402
from bench.server_load import free_port  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not is_bundled(), reason="the bundled toy checkpoints are missing")]

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTION = "Start with 47. Add 38. Subtract 29. Add 16. Subtract 45. Add 21. Subtract 30. What is the result?"


def chat(k: int, **extra) -> dict:
    """A PF request of the toy task; budgets and steps vary with ``k`` so requests end at different times."""
    search = {"method": "particle_filter", "particles": 1 + k % 8, "max_steps": 4 + k % 7}
    return {"messages": [{"role": "user", "content": QUESTION}], "seed": k, "search": search} | extra


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "log"
    with RayCommand(["serve", "--replicas", 2, "--port", port, "--api-key", KEY, "--log-level", "warning"],
                    log) as command:
        url = f"http://127.0.0.1:{port}"
        command.wait_until_serving(url, 120)
        yield url, command


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=30).json()


def both(h: dict) -> dict | bool:
    """``h`` if both replicas answered it (its counters are summed over the live ones), else False."""
    return sum("engine" in r for r in h["replicas"]) == 2 and h


def wait_until(check, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.1)
    return found


def test_one_endpoint_keeps_the_single_servers_contract(server):
    url, _ = server
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        assert httpx.post(f"{url}/v1/chat/completions", json=chat(0), timeout=10).status_code == 401
        bad = client.post("/v1/chat/completions", json=chat(0, temperature=-1))
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"
        over = client.post("/v1/chat/completions", json=chat(0, search={"particles": 600_000}))  # the replica refuses it
        assert over.status_code == 400, over.text
        assert over.json()["error"]["message"].startswith("search.particles: 600000 is over this engine's limit")
        whole = client.post("/v1/chat/completions", json=chat(3)).json()
        text = ""
        with client.stream("POST", "/v1/chat/completions", json=chat(3, stream=True)) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        for line in lines[:-1]:
            text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        assert text == whole["choices"][0]["message"]["content"] and whole["pfengine"]["answer"]


def test_a_client_that_disconnects_has_its_request_aborted_on_its_replica(server):
    url, _ = server
    long = {"method": "self_consistency", "particles": 8, "max_steps": 40, "max_step_tokens": 10, "stop_on_eos": False}
    body = {"messages": [{"role": "user", "content": QUESTION}], "seed": 1, "stream": True, "search": long}
    before = wait_until(lambda: both(health(url)), 30, "answer from both replicas")["engine"]["policy_tokens_forwarded"]
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            next(line for line in response.iter_lines() if line.startswith("data: "))
        # gone after the first chunk
    idle = wait_until(lambda: (h := health(url))["running"] + h["waiting"] == 0 and both(h), 30, "idle replicas")
    assert idle["engine"]["policy_blocks_in_use"] == 0
    forwarded = idle["engine"]["policy_tokens_forwarded"] - before
    assert forwarded < 8 * 400 / 2


def test_fifty_clients_are_answered_while_a_replica_is_killed(server):
    url, command = server

    async def run() -> tuple[list, list[dict]]:
        limits = httpx.Limits(max_connections=60)
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=180, limits=limits) as client:
            async def ask(k: int):
                r = await client.post("/v1/chat/completions", json=chat(k))
                return r.status_code, r.json()

            asking = [asyncio.create_task(ask(k)) for k in range(50)]
            while True:  # both replicas have answered someone, and replica 0 is still busy
                replicas = (await client.get("/health")).json()["replicas"]
                if all(r.get("served", 0) >= 1 for r in replicas) and replicas[0]["load"] > 0:
                    break
                assert not all(t.done() for t in asking), "every request ended before the kill"
                await asyncio.sleep(0.05)
            os.kill(replicas[0]["pid"], signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*asking), 300), replicas

    answers, before_kill = asyncio.run(run())
    assert [status for status, _ in answers] == [200] * 50, [a for a in answers if a[0] != 200][:3]
    assert all(body["choices"][0]["message"]["content"] for _, body in answers)
    assert all(r["served"] >= 1 for r in before_kill)
    lost = re.search(r"engine replica 0 \(pid \d+ on .*\) is gone .*in flight \((\d+) particles\)", command.text())
    assert lost and int(lost[1]) > 0, command.text()  # it had requests, and they were answered elsewhere
    back = wait_until(lambda: (r := health(url)["replicas"][0])["up"] and r, 120, "replica 0 back")
    assert back["pid"] != before_kill[0]["pid"] and back["deaths"] == 1
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:  # the new process takes requests
        for k in range(4):
            assert client.post("/v1/chat/completions", json=chat(k)).status_code == 200
    assert health(url)["replicas"][0]["served"] >= 1
