"""``pfengine eval --workers 2`` on a local Ray cluster against one engine in this process: the same
record for every problem x method x budget, each written once, also when a worker process is killed
(SIGKILL) mid-run and when the run resumes a results file another run started."""
import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

pytest.importorskip("ray")

from pfengine.cli import main  # noqa: E402
from pfengine.eval.dataset import write_problems  # noqa: E402
from pfengine.toy.pf import is_bundled  # noqa: E402
from pfengine.toy.task import heldout_set  # noqa: E402
from bench.ray_command import RayCommand  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not is_bundled(), reason="the bundled toy checkpoints are missing")]

PROBLEMS = 32
WORKLOAD = ["--method", "particle_filter,best_of_n", "--budgets", "4,16", "--max-steps", "14", "--max-step-tokens",
            "24", "--temperature", "0.5", "--no-progress"]
TIMING = ("batch", "elapsed_s", "cpu_s")
"""What may differ between two evaluations of the same settings: when each result came."""


def keyed(path: Path) -> dict[tuple, dict]:
    """The results file as {(problem, method, budget): record without its timing}; a key written
    twice fails."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    keys = [(r["unique_id"], r["method"], r["budget"]) for r in records]
    assert len(set(keys)) == len(keys), "a record was written twice"
    return {k: {f: v for f, v in r.items() if f not in TIMING} for k, r in zip(keys, records)}


def accuracy(out: Path) -> list[tuple]:
    return [(r["method"], r["budget"], r["correct"], r["total"]) for r in json.loads((out / "summary.json").read_text())]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from pfengine.toy import demo

    return demo.export(heldout_set(PROBLEMS), tmp_path_factory.mktemp("dp") / "toy.jsonl")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The evaluation by one engine in this process (--workers 1), on one torch thread as each worker
    uses (the results do not depend on it; this keeps a shared 2-core machine responsive)."""
    import torch

    out = tmp_path_factory.mktemp("one-engine")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["eval", str(data), *WORKLOAD, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert len(keyed(out / "results.jsonl")) == PROBLEMS * 4
    return out


def test_two_workers_give_one_engines_results(data, reference, tmp_path):
    """...and the driver draws the genealogies of --trace-html from the results the workers send."""
    out, traces = tmp_path / "out", tmp_path / "traces"
    with RayCommand(["eval", data, *WORKLOAD, "--workers", 2, "--out", out, "--trace-html", traces, "--trace-problems", 2],
                    tmp_path / "log") as command:
        assert command.wait(timeout=300) == 0, command.text()
    text = command.text()
    assert len(command.engine_pids()) == 2 and text.count("1 torch thread(s)") == 2, text
    assert keyed(out / "results.jsonl") == keyed(reference / "results.jsonl")
    assert accuracy(out) == accuracy(reference)
    pages = sorted(str(p.relative_to(traces)) for p in traces.rglob("*.html"))
    assert pages == sorted(f"{m}-{b}/{k:04d}-{k}.html" for m in ("best_of_n", "particle_filter") for b in (4, 16)
                           for k in range(2)), pages


def test_a_killed_worker_loses_nothing_and_nothing_is_written_twice(data, reference, tmp_path):
    """A quarter of the results is already there (an interrupted run); the rest runs on two workers,
    one of which is killed once it is under way. Its requests are rerun on the other engine."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(reference / "settings.json", out)
    lines = (reference / "results.jsonl").read_text().splitlines(keepends=True)
    seeded = len(lines) // 4
    (out / "results.jsonl").write_text("".join(lines[:seeded]))

    def written() -> int:
        return len((out / "results.jsonl").read_text().splitlines())

    with RayCommand(["eval", data, *WORKLOAD, "--workers", 2, "--out", out], tmp_path / "log") as command:
        command.wait_for(lambda: len(command.engine_pids()) == 2 and written() > seeded, 180, "new results")
        at_kill = written()
        os.kill(command.engine_pids()[0], signal.SIGKILL)
        assert command.wait(timeout=300) == 0, command.text()
    assert at_kill < len(lines)
    lost = re.search(r"engine replica 0 \(pid \d+ on .*\) is gone .*in flight \((\d+) particles\)", command.text())
    assert lost and int(lost[1]) > 0, command.text()
    assert keyed(out / "results.jsonl") == keyed(reference / "results.jsonl")
