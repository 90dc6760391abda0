"""Data parallelism on one machine: the same evaluation (bundled toy task, ``pfengine eval`` options)
by one engine with 2 torch threads in this process (``--workers 1``), by 2 Ray workers with 1 thread
each (``--workers 2``), and by 1 Ray worker with 2 threads (``--workers 1 --worker-cpus 2`` on a
cluster), in rounds that alternate the three, on a machine others may be using.

Reported per setup (medians over the rounds): wall seconds of the evaluation (engines loaded; Ray
started beforehand), generated tokens per second, and CPU seconds (the engine processes' and this
process', which grades) with tokens per CPU second -- the steadier measure when other jobs share the
cores. Every setup's records must be the same (checked), so each does the same work.

On a 2-core machine shared with other jobs, torch's OpenMP threads spin while they wait for each
other (the default, active wait policy): an engine driven from the main thread with 2 threads
then ran 20x slower than with 1 (2026-12-07). ``OMP_WAIT_POLICY=PASSIVE`` in the environment
removes that; the report says which policy was in force.

    .venv/bin/python -m bench.data_parallel [--problems 32] [--rounds 3] [--tag data-parallel]
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m bench.data_parallel --tag data-parallel-omp-passive
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import ray
import torch

from pfengine.cli import build_parser, engine_config, eval_requests, make_engine
from pfengine.dp.cluster import LOCAL_SYSTEM_CONFIG, Placement
from pfengine.dp.eval import evaluate_on_pool
from pfengine.dp.pool import EnginePool
from pfengine.eval import runner
from pfengine.eval.dataset import Problem, read_problems
from pfengine.server import EngineFront
from pfengine.toy import demo
from pfengine.toy.task import heldout_set

RESULTS = Path(__file__).parent / "results"
OPTIONS = ["--method", "particle_filter,best_of_n", "--budgets", "4,16", "--max-steps", "14", "--max-step-tokens", "24",
           "--temperature", "0.5", "--no-progress"]
TIMING = ("batch", "elapsed_s", "cpu_s")


def evaluation(args: argparse.Namespace, engine: EngineFront, run: Callable) -> tuple[list[dict], float]:
    """Records and wall seconds of one fresh evaluation; ``run(runs, build, out)`` evaluates."""
    runs = runner.plan_runs(args.method, args.budgets)
    build = eval_requests(args, engine)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        records = run(runs, build, Path(out))
        return records, time.perf_counter() - start


def in_process(problems: list[Problem], args: argparse.Namespace, threads: int) -> Callable[[], dict]:
    torch.set_num_threads(threads)
    engine = make_engine(args)

    def measure() -> dict:
        torch.set_num_threads(threads)
        cpu = time.process_time()
        records, wall = evaluation(args, engine, lambda runs, build, out: runner.evaluate(
            engine, problems, runs, build, args.seed, out, progress=False))
        return {"records": records, "wall_s": wall, "cpu_s": time.process_time() - cpu}

    return measure


def on_ray(problems: list[Problem], args: argparse.Namespace, workers: int, threads: int) -> Callable[[], dict]:
    pool = EnginePool(engine_config(args), Placement(workers, cpus=threads))
    pool.start()

    def engines_cpu() -> float:
        return sum(r["cpu_s"] for r in asyncio.run(pool.health())["replicas"])

    def measure() -> dict:
        cpu, engines = time.process_time(), engines_cpu()
        records, wall = evaluation(args, pool.front, lambda runs, build, out: evaluate_on_pool(
            pool, problems, runs, build, args.seed, out, progress=False))
        return {"records": records, "wall_s": wall, "cpu_s": time.process_time() - cpu + engines_cpu() - engines}

    return measure


def keyed(records: list[dict]) -> dict:
    return {(r["unique_id"], r["method"], r["budget"]): {k: v for k, v in r.items() if k not in TIMING} for r in records}


def save(tag: str, report: dict, lines: list[str]) -> None:
    """``report`` as bench/results/<tag>.json, ``lines`` (Markdown) as <tag>.md and on stdout."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{tag}.json").write_text(json.dumps(report, indent=1))
    (RESULTS / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tag", default="data-parallel")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = demo.export(heldout_set(opts.problems), Path(tmp) / "toy.jsonl")
        args = build_parser().parse_args(["eval", str(data), *OPTIONS])
        problems = read_problems(data)
        load_before = os.getloadavg()
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 _system_config=LOCAL_SYSTEM_CONFIG)  # room for both Ray setups at once
        setups = {"--workers 1: 1 engine x 2 threads, this process's main thread": in_process(problems, args, 2),
                  "--workers 2: 2 Ray workers x 1 thread": on_ray(problems, args, 2, 1),
                  "1 Ray worker x 2 threads (--worker-cpus 2)": on_ray(problems, args, 1, 2)}
        samples: dict[str, list[dict]] = {name: [] for name in setups}
        for _ in range(opts.rounds):
            for name, measure in setups.items():
                samples[name].append(measure())
        ray.shutdown()
    first = keyed(samples[next(iter(setups))][0]["records"])
    assert all(keyed(s["records"]) == first for runs in samples.values() for s in runs), "setups disagree"
    tokens = sum(r["generated_tokens"] for r in samples[next(iter(setups))][0]["records"])
    rows = {name: {"wall_s": statistics.median(s["wall_s"] for s in runs),
                   "cpu_s": statistics.median(s["cpu_s"] for s in runs),
                   "walls": [round(s["wall_s"], 2) for s in runs]} for name, runs in samples.items()}
    wait = os.environ.get("OMP_WAIT_POLICY", "unset (active)")
    report = {"workload": f"{opts.problems} toy problems x {' '.join(OPTIONS)}", "generated_tokens": tokens,
              "omp_wait_policy": wait,
              "rounds": opts.rounds, "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "avx512": "avx512f" in Path("/proc/cpuinfo").read_text(), "setups": rows}
    lines = [f"Workload: {report['workload']}; {tokens} generated tokens per evaluation; medians of {opts.rounds} "
             f"alternating rounds; OMP_WAIT_POLICY {wait}; load average before {load_before[0]:.1f}, after "
             f"{os.getloadavg()[0]:.1f}", "",
             "| setup | wall s | tokens/s | CPU s | tokens per CPU s | walls |", "|---|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['wall_s']:.2f} | {tokens / r['wall_s']:.0f} | {r['cpu_s']:.2f} | "
                     f"{tokens / r['cpu_s']:.0f} | {r['walls']} |")
    save(opts.tag, report, lines)


if __name__ == "__main__":
    main()
