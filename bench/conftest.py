"""The machine next to the kernel microbenchmarks' tables: its instruction sets, fp32 GEMM GFLOP/s
(torch and pfengine's linear kernel per instruction set) and memory copy GB/s, measured once before
the benchmarks (not with ``--benchmark-disable``) with the benchmarks' own timer (e.g.
``--benchmark-timer time.process_time``, with PFENGINE_BENCH_THREADS=1 the steady choice on a shared
machine); printed above and below the tables and stored in pytest-benchmark's JSON
(``machine_info["pfengine"]``)."""
from __future__ import annotations

import os

import pytest

_MACHINE: dict = {}


def _machine(config: pytest.Config) -> dict | None:
    if config.getoption("benchmark_disable", False):
        return None
    if not _MACHINE:
        from bench.roofline import measure_machine

        from pytest_benchmark.utils import load_timer

        clock = load_timer(config.getoption("benchmark_timer")).target  # option value: "time.process_time"
        _MACHINE.update(measure_machine(int(os.environ.get("PFENGINE_BENCH_THREADS", "2")), clock=clock))
    return _MACHINE


def pytest_report_header(config: pytest.Config) -> str | None:
    from bench.roofline import describe_machine

    machine = _machine(config)
    return describe_machine(machine) if machine else None


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine = _machine(config)
    if machine:
        machine_info["pfengine"] = machine


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    from bench.roofline import describe_machine

    machine = _machine(config)
    if machine:
        terminalreporter.write_line(describe_machine(machine))
