"""Loopback load test of `pfengine serve` with and without hostile traffic (bounded; stops by itself).

100 well-behaved clients each send a few small particle-filtering requests, once alone ("quiet") and
once beside hostile clients that loop until the well-behaved ones are done: work over the per-request
limits, 8 MB bodies, streams they drop after the first chunk, malformed JSON. Reports the
well-behaved clients' p50 / p99 latency per run, requests lost, the server's peak RSS and the KV blocks
in use afterwards. Runs alternate (quiet, hostile, quiet, hostile, ...), each on a fresh server.

    .venv/bin/python bench/server_load.py [--clients 100] [--requests 3] [--repeats 2] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
WELL = {"model": "policy", "prompt": "Step 1: add 17 and 25.", "max_tokens": 64,
        "search": {"method": "particle_filter", "particles": 4, "max_steps": 3, "max_step_tokens": 8}}
HUGE_WORK = {"model": "policy", "prompt": "hi", "search": {"method": "particle_gibbs", "particles": 600_000,
                                                            "iterations": 1000}}
DROPPED = {"model": "policy", "prompt": "Step 1: add 17 and 25.", "stream": True, "seed": 1,
           "search": {"method": "particle_filter", "particles": 16, "max_steps": 20, "max_step_tokens": 16,
                      "stop_on_eos": False}}
BODY_8MB = b'{"prompt": "' + b"7 " * (4 << 20) + b'"}'
HOSTILE = {"huge_work": 10, "huge_body": 4, "dropped_stream": 10, "bad_json": 6}
"""Hostile clients of each kind, each looping until the well-behaved clients are done."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pfengine.cli", "serve", "--port", str(port), "--api-key", KEY,
           "--served-model-name", "policy", "--log-level", "warning"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.poll() is None, f"server exited: {server.stderr.read()}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("server did not start within 120 s")


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


async def well_behaved(client: httpx.AsyncClient, k: int, n: int, latencies: list[float], lost: list[int]) -> None:
    for j in range(n):
        t = time.perf_counter()
        r = await client.post("/v1/completions", json=WELL | {"seed": k * 100 + j})
        latencies.append(time.perf_counter() - t)
        if r.status_code != 200 or not r.json()["choices"]:
            lost.append(r.status_code)


async def hostile(client: httpx.AsyncClient, kind: str, done: asyncio.Event, statuses: dict[str, list[int]]) -> None:
    while not done.is_set():
        try:
            status = await hostile_request(client, kind)
        except httpx.TransportError:  # the server may close a connection whose body it refused
            status = -1
        statuses.setdefault(kind, []).append(status)


async def hostile_request(client: httpx.AsyncClient, kind: str) -> int:
    if kind == "huge_work":
        r = await client.post("/v1/completions", json=HUGE_WORK)
    elif kind == "huge_body":
        r = await client.post("/v1/completions", content=BODY_8MB, headers={"content-type": "application/json"})
    elif kind == "bad_json":
        r = await client.post("/v1/completions", content=b'{"prompt": [1, 2', headers={"content-type": "application/json"})
    else:
        async with client.stream("POST", "/v1/completions", json=DROPPED) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break
    return r.status_code


async def run_clients(url: str, clients: int, requests: int, with_hostile: bool) -> dict:
    latencies: list[float] = []
    lost: list[int] = []
    statuses: dict[str, list[int]] = {}
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=clients + sum(HOSTILE.values()) + 10)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, headers=AUTH) as client:
        hostiles = [asyncio.create_task(hostile(client, kind, done, statuses))
                    for kind, count in (HOSTILE.items() if with_hostile else []) for _ in range(count)]
        t = time.perf_counter()
        await asyncio.gather(*(well_behaved(client, k, requests, latencies, lost) for k in range(clients)))
        wall = time.perf_counter() - t
        done.set()
        await asyncio.gather(*hostiles)
        stats = await wait_idle(client)
    q = statistics.quantiles(latencies, n=100)
    return {"hostile": with_hostile, "requests": len(latencies), "lost": len(lost), "wall_s": round(wall, 2),
            "p50_s": round(statistics.median(latencies), 3), "p99_s": round(q[98], 3),
            "hostile_statuses": {k: sorted(set(v)) for k, v in statuses.items()},
            "hostile_requests": {k: len(v) for k, v in statuses.items()},
            "blocks_in_use_after": stats["policy_blocks_in_use"]}


async def wait_idle(client: httpx.AsyncClient) -> dict:
    for _ in range(600):
        health = (await client.get("/health")).json()
        if not health["running"] and not health["waiting"] and not health["engine"]["policy_blocks_in_use"]:
            return health["engine"]
        await asyncio.sleep(0.1)
    return health["engine"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--requests", type=int, default=3, help="requests per well-behaved client")
    parser.add_argument("--repeats", type=int, default=2, help="quiet + hostile pairs")
    parser.add_argument("--out", default="bench/results/server-load.json")
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeats):
        for with_hostile in (False, True):
            port = free_port()
            server = start_server(port)
            try:
                run = asyncio.run(run_clients(f"http://127.0.0.1:{port}", args.clients, args.requests, with_hostile))
                run["server_peak_rss_mb"] = round(peak_rss_mb(server.pid), 1)
            finally:
                server.terminate()
                server.wait(30)
            runs.append(run)
            print(json.dumps(run), flush=True)
    summary = {kind: {key: statistics.median(r[key] for r in runs if r["hostile"] == h)
                      for key in ("p50_s", "p99_s", "wall_s", "server_peak_rss_mb")}
               for kind, h in (("quiet", False), ("hostile", True))}
    summary["p99_ratio"] = round(summary["hostile"]["p99_s"] / summary["quiet"]["p99_s"], 2)
    summary["lost"] = sum(r["lost"] for r in runs)
    summary["cpu"] = "avx512f" if "avx512f" in Path("/proc/cpuinfo").read_text() else "avx2"
    summary["threads"] = os.cpu_count()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
