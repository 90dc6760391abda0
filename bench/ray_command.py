"""A ``pfengine`` command that starts a local Ray cluster (``eval --workers``, ``serve --replicas``),
run in a process group of its own, its output in a log file: the tests and ``bench.serve_replicas``
stop it with SIGTERM (it shuts its cluster down) and, should that fail, kill the whole group, since
Ray's agents outlive a driver that is killed outright."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


class RayCommand:
    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        with log.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "pfengine.cli", *map(str, argv)], cwd=REPO,
                                         env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=err,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> "RayCommand":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def text(self) -> str:
        return self.log.read_text()

    def engine_pids(self) -> list[int]:
        """The engine processes the command reported (``engine K: pid N ...``), by K."""
        found = dict(re.findall(r"^engine (\d+): pid (\d+)", self.text(), re.M))
        return [int(found[k]) for k in sorted(found, key=int)]

    def wait_for(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"the command ended before {what}:\n{self.text()}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{self.text()}"
            time.sleep(0.1)

    def wait_until_serving(self, url: str, timeout: float) -> None:
        """Until the server this command started answers ``GET url/health``."""
        import httpx

        def up() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        self.wait_for(up, timeout, f"an answer from {url}/health")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the command did not end in {timeout} s:\n{self.text()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of its group is left
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
