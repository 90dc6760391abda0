"""``pfengine serve --replicas 2`` under 50 concurrent loopback clients, twice: once as is, once with
replica 0's process SIGKILLed (by the PID ``/health`` reports) while it holds requests. Reported per
round: HTTP statuses, wall seconds, latency percentiles, and per replica the requests routed to it
and served by it (``/health``); for the kill round also what the driver logged and how long Ray
took to put a new process in place. The clients' requests are the toy task's PF requests with
budgets 4-16 and 6-12 steps of up to 16 tokens (not stopped at the end of the answer), seeded, so
the rounds do the same work.

    .venv/bin/python -m bench.serve_replicas [--clients 50] [--tag serve-replicas]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.data_parallel import save
from bench.ray_command import RayCommand
from bench.server_load import free_port

KEY = "bench"
QUESTION = "Start with 47. Add 38. Subtract 29. Add 16. Subtract 45. Add 21. Subtract 30. What is the result?"


def chat(k: int) -> dict:
    search = {"method": "particle_filter", "particles": 4 + k % 13, "max_steps": 6 + k % 7, "max_step_tokens": 16,
              "stop_on_eos": False}
    return {"messages": [{"role": "user", "content": QUESTION}], "seed": k, "search": search}


def replicas(url: str) -> list[dict]:
    return [{f: r.get(f) for f in ("index", "up", "pid", "routed", "served", "deaths", "load")}
            for r in httpx.get(f"{url}/health", timeout=30).json()["replicas"]]


async def round_of(url: str, clients: int, kill: bool) -> dict:
    """``clients`` concurrent requests; with ``kill``, replica 0 is SIGKILLed once it has answered one
    of them, while it holds others."""
    before = replicas(url)
    killed = None
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300,
                                 limits=httpx.Limits(max_connections=clients + 10)) as client:
        async def ask(k: int) -> tuple[int, float]:
            start = time.perf_counter()
            r = await client.post("/v1/chat/completions", json=chat(k))
            return r.status_code, time.perf_counter() - start

        start = time.perf_counter()
        asking = [asyncio.create_task(ask(k)) for k in range(clients)]
        while kill and killed is None and not all(t.done() for t in asking):
            now = (await client.get("/health")).json()["replicas"]
            if now[0].get("served", 0) > before[0]["served"] and now[0]["load"] > 0:
                os.kill(now[0]["pid"], signal.SIGKILL)
                killed = {"pid": now[0]["pid"], "at_s": round(time.perf_counter() - start, 2), "at": time.monotonic(),
                          "particles_in_flight": now[0]["load"], "answered_before": sum(t.done() for t in asking)}
            await asyncio.sleep(0.05)
        answers = await asyncio.gather(*asking)
        wall = time.perf_counter() - start
    assert not kill or killed, "every request ended before replica 0 could be killed"
    latencies = sorted(s for _, s in answers)
    return {"clients": clients, "statuses": {str(c): sum(1 for s, _ in answers if s == c) for c in {s for s, _ in answers}},
            "wall_s": round(wall, 2), "latency_s": {"p50": round(statistics.median(latencies), 2),
                                                    "p95": round(latencies[int(0.95 * (len(latencies) - 1))], 2),
                                                    "max": round(latencies[-1], 2)},
            "replicas_before": before, "replicas_after": replicas(url), "killed": killed}


def wait_back(url: str, index: int, since: float, timeout: float = 300) -> float:
    """Seconds from ``since`` (a ``time.monotonic()``) until replica ``index`` is up."""
    while not replicas(url)[index]["up"]:
        assert time.monotonic() - since < timeout, f"replica {index} not back after {timeout} s"
        time.sleep(0.1)
    return time.monotonic() - since


def answered(r: dict) -> list[int | None]:
    """Requests each replica answered in round ``r``, by its ``served`` count; one that died (its new
    process counts from 0) answered the rest, as every request was answered once."""
    counts = [a["served"] - b["served"] if a["pid"] == b["pid"] else None
              for a, b in zip(r["replicas_after"], r["replicas_before"])]
    return [r["clients"] - sum(c for c in counts if c is not None) if c is None else c for c in counts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--tag", default="serve-replicas")
    opts = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, RayCommand(
            ["serve", "--replicas", 2, "--port", port, "--api-key", KEY, "--log-level", "warning"],
            Path(tmp) / "log") as server:
        server.wait_until_serving(url, 180)
        rounds = {"no kill": asyncio.run(round_of(url, opts.clients, kill=False)),
                  "replica 0 SIGKILLed": asyncio.run(round_of(url, opts.clients, kill=True))}
        killed = rounds["replica 0 SIGKILLed"]["killed"]
        killed["back_after_s"] = round(wait_back(url, 0, killed.pop("at")), 1)
        rounds["replica 0 SIGKILLed"]["replicas_after"] = replicas(url)
        logged = re.findall(r"^.*engine replica \d+ .*(?:is gone|is back).*$", server.text(), re.M)
    report = {"command": "pfengine serve --replicas 2 (local Ray cluster, 1 CPU / torch thread per replica)",
              "cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "rounds": rounds, "driver_log": logged}
    lines = [f"`pfengine serve --replicas 2`, {opts.clients} concurrent loopback clients per round (toy PF requests, "
             f"4-16 particles, 6-12 steps of up to 16 tokens); {os.cpu_count()} CPUs, load average before {load_before[0]:.1f}, after "
             f"{os.getloadavg()[0]:.1f}", "",
             "| round | HTTP statuses | wall s | latency p50 / p95 / max s | routed to replica 0, 1 (reruns) | "
             "answered by replica 0, 1 |", "|---|---|---:|---|---|---|"]
    for name, r in rounds.items():
        routed = [a["routed"] - b["routed"] for a, b in zip(r["replicas_after"], r["replicas_before"])]
        by = answered(r)
        lat = r["latency_s"]
        lines.append(f"| {name} | {r['statuses']} | {r['wall_s']} | {lat['p50']} / {lat['p95']} / {lat['max']} | "
                     f"{routed[0]}, {routed[1]} ({sum(routed) - r['clients']}) | {by[0]}, {by[1]} |")
    k = rounds["replica 0 SIGKILLed"]["killed"]
    lines += ["", f"Replica 0 (pid {k['pid']}) SIGKILLed {k['at_s']} s into its round, holding "
              f"{k['particles_in_flight']} particles, {k['answered_before']} requests answered before; Ray's new process "
              f"(pid {rounds['replica 0 SIGKILLed']['replicas_after'][0]['pid']}) was up {k['back_after_s']} s after "
              "the kill.", "", "Driver log:", "", *[f"    {line}" for line in logged]]
    save(opts.tag, report, lines)


if __name__ == "__main__":
    main()
