"""The ``pfengine`` command line: help texts, generate (table and JSON), bench, profile, serve."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pfengine.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["--particles", "4", "--max-steps", "2", "--max-step-tokens", "4", "--num-blocks", "256", "--block-size", "8",
        "--no-progress"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command, options", [
    (None, ["demo", "generate", "serve", "bench", "profile"]),
    ("generate", ["--model", "--prm", "--prompt", "--chat", "--method", "--particles", "--aggregation", "--resampling",
                  "--ess-threshold", "--beam-width", "--temperatures", "--seed", "--max-steps", "--json"]),
    ("serve", ["--model", "--prm", "--host", "--port", "127.0.0.1", "--num-blocks", "--block-size", "--kv-dtype",
               "--served-model-name", "/v1/chat/completions"]),
    ("bench", ["--requests", "--concurrency", "tokens/s", "--json"]),
    ("profile", ["--out", "Perfetto", "--row-limit", "--json"]),
    ("demo", ["--particles", "--json"]),
])
def test_help_texts_explain_every_option(capsys, command, options):
    with pytest.raises(SystemExit) as exit_:
        main(([command] if command else []) + ["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for option in options:
        assert option in text
    if command:  # every option has a help text
        assert "--model" not in text or "checkpoint directory" in text


def test_generate_json(capsys, policy_dir, value_head_file):
    code, out, _ = run(capsys, "generate", "--model", policy_dir, "--prm", value_head_file, "--prompt", "Step 1: add",
                       *TINY, "--json")
    assert code == 0
    result = json.loads(out)
    assert len(result["particles"]) == 4 and result["method"] == "particle_filter"
    assert result["answer"] == result["particles"][result["best"]]["text"]
    assert abs(sum(p["weight"] for p in result["particles"]) - 1) < 1e-5
    assert result["engine"]["policy_blocks_in_use"] == 0 and result["stats"]["generated_tokens"] > 0


def test_generate_table_and_methods(capsys, policy_dir, value_head_file):
    code, out, _ = run(capsys, "generate", "--model", policy_dir, "--prm", value_head_file, "--prompt", "hi", "--chat",
                       "--method", "beam_search", "--beam-width", "2", *TINY)
    assert code == 0
    assert "Particles (beam_search; * = chosen)" in out and "weight" in out and "Answer (particle" in out
    code, out, _ = run(capsys, "generate", "--model", policy_dir, "--prompt", "hi", "--method", "self_consistency",
                       *TINY, "--json")
    assert code == 0 and json.loads(out)["method"] == "self_consistency"  # no PRM needed


def test_generate_errors_are_readable(capsys, policy_dir):
    code, _, err = run(capsys, "generate", "--model", policy_dir, "--prompt", "hi", *TINY)
    assert code == 2 and "needs a PRM" in err
    code, _, err = run(capsys, "generate", "--model", policy_dir, "--prompt", "hi", "--method", "best_of_n",
                       "--particles", "0")
    assert code == 2 and "--particles: must be >= 1, got 0" in err


def test_bench_reports_tokens_per_second(capsys, policy_dir, value_head_file):
    code, out, _ = run(capsys, "bench", "--model", policy_dir, "--prm", value_head_file, "--requests", "3",
                       "--concurrency", "2", *TINY, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["requests"] == 3 and report["generated_tokens"] > 0 and report["generated_tokens_per_s"] > 0
    code, out, _ = run(capsys, "bench", "--model", policy_dir, "--prm", value_head_file, "--requests", "2",
                       "--warmup", "0", *TINY)
    assert code == 0 and "tok/s" in out


def test_profile_writes_a_chrome_trace(capsys, tmp_path, policy_dir, value_head_file):
    trace = tmp_path / "trace.json"
    code, out, _ = run(capsys, "profile", "--model", policy_dir, "--prm", value_head_file, "--out", str(trace),
                       "--warmup", "0", "--row-limit", "5", *TINY, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["trace"] == str(trace) and 0 < len(report["top_ops"]) <= 5
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") for e in events)  # opens in Perfetto / chrome://tracing


def test_serve_starts_a_server(tmp_path, policy_dir, value_head_file):
    """``pfengine serve`` in a subprocess on a free loopback port: /health and one completion, then stop it."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = tmp_path / "serve.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pfengine.cli", "serve", "--model", policy_dir, "--prm",
                                 value_head_file, "--port", str(port), "--num-blocks", "256", "--block-size", "8",
                                 "--served-model-name", "tiny", "--log-level", "warning"],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "server did not come up"
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "Step 1:", "max_tokens": 3},
                           timeout=30).json()
            assert len(r["choices"]) == 1 and r["usage"]["prompt_tokens"] > 0
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
