"""The ``pfengine`` command line: help texts, generate (table and JSON), bench, profile, serve."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pfengine import Engine
from pfengine.cli import build_parser, engine_config, main, make_engine
from pfengine.config import EngineConfig, PRMConfig, SamplingParams, SearchParams
from pfengine.search.answers import extract_answer
from pfengine.state import FINISH_REASONS
from pfengine.toy.pf import POLICY, PRM, PRM_CONFIG, VALUE_HEAD, is_bundled
from pfengine.toy.task import heldout_set

REPO = Path(__file__).resolve().parents[1]
TINY = ["--particles", "4", "--max-steps", "2", "--max-step-tokens", "4", "--num-blocks", "256", "--block-size", "8",
        "--no-progress"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command, options", [
    (None, ["demo", "eval", "distill", "generate", "serve", "bench", "profile", "separate PRM"]),
    ("generate", ["--model", "--prm", "--prompt", "--chat", "--no-chat", "--system-prompt", "--method", "--particles",
                  "--aggregation", "--resampling", "--ess-threshold", "--beam-width", "--temperatures", "--seed",
                  "--max-steps", "--json"]),
    ("serve", ["--model", "--prm", "--host", "--port", "127.0.0.1", "--num-blocks", "--block-size", "--kv-dtype",
               "--served-model-name", "/v1/chat/completions"]),
    ("bench", ["--requests", "--concurrency", "tokens/s", "--fixed-steps", "--no-fixed-steps", "--json"]),
    ("profile", ["--out", "Perfetto", "--row-limit", "--fixed-steps", "--json"]),
    ("distill", ["DATA.jsonl", "--out", "--limit", "--epochs", "--prm", "--particles", "--aggregation",
                 "value head", "no PRM model"]),
    ("demo", ["--problems", "--budgets", "--particles", "--temperature", "--out", "pfengine eval"]),
    ("eval", ["DATA.jsonl", "--method", "--budgets", "--limit", "--out", "--fresh", "grade each answer", "Wilson",
              "results.jsonl", "--temperature", "--chat"]),
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


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--method", "greedy"], ["eval"], ["generate", "--help"],
                                  ["bench", "--particles", "x"]])
def test_help_and_argument_errors_do_not_import_torch(argv):
    """Help and argument errors come back before torch (3-7 s to import here) is loaded."""
    code = ("import sys\nfrom pfengine.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "False False", out.stderr


def test_commands_accept_only_flags_they_honour(capsys):
    """`demo` runs a fixed preset: it has no --method, --json or --max-steps to ignore."""
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--method", "greedy", "--json", "--max-steps", "2"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --method greedy --json --max-steps 2" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "bench", "profile", "eval", "serve"])
def test_defaults_are_the_apis(command):
    """One default for every command and the Python API: the step budget, cache size and search options."""
    extra = {"generate": ["--prompt", "x"], "eval": ["data.jsonl"]}.get(command, [])
    args = build_parser().parse_args([command, *extra])
    config = EngineConfig(model="m")
    assert (args.num_blocks, args.block_size) == (config.num_blocks, config.block_size)
    if command in ("serve",):
        return
    search, sampling = SearchParams(), SamplingParams()
    assert (args.aggregation, args.resampling, args.beam_width) == (search.aggregation, search.resampling,
                                                                   search.beam_width)
    assert args.temperature == sampling.temperature and args.max_tokens == sampling.max_tokens
    if command in ("generate", "eval"):  # bench / profile measure a fixed workload instead (test below)
        assert (args.max_steps, args.max_step_tokens) == (sampling.max_steps, sampling.max_step_tokens)
    if command != "eval":
        assert (args.method, args.particles) == (search.method, search.n_particles)


def test_generate_json(capsys, policy_dir, value_head_file):
    code, out, _ = run(capsys, "generate", "--model", policy_dir, "--prm", value_head_file, "--prompt", "Step 1: add",
                       *TINY, "--json")
    assert code == 0
    result = json.loads(out)
    assert len(result["particles"]) == 4 and result["method"] == "particle_filter"
    best = result["particles"][result["best"]]
    assert result["text"] == best["text"] and result["answer"] == best["answer"]  # answer: extracted, not the text
    assert all(p["finish_reason"] in FINISH_REASONS for p in result["particles"])
    assert abs(sum(p["weight"] for p in result["particles"]) - 1) < 1e-5
    assert result["engine"]["policy_blocks_in_use"] == 0 and result["stats"]["generated_tokens"] > 0


def test_generate_table_and_methods(capsys, policy_dir, value_head_file):
    code, out, _ = run(capsys, "generate", "--model", policy_dir, "--prm", value_head_file, "--prompt", "hi", "--chat",
                       "--method", "beam_search", "--beam-width", "2", *TINY)
    assert code == 0
    assert "Particles (beam_search; * = chosen" in out and "weight" in out and "Answer: " in out and "(particle" in out
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
    # the default workload is fixed: 3 requests x 4 particles x 2 steps x exactly 4 tokens
    assert report["workload"]["requests"] == 3 and report["workload"]["fixed_steps"]
    assert report["generated_tokens"] == 3 * 4 * 2 * 4 and report["generated_tokens_per_s"] > 0
    assert report["particles_ended_by"] == {"max_steps": 12}
    code, out, _ = run(capsys, "bench", "--model", policy_dir, "--prm", value_head_file, "--requests", "2",
                       "--warmup", "0", *TINY)
    assert code == 0 and "tok/s" in out and "2 request(s) x 4 particles (particle_filter), every particle 2 steps of " \
        "exactly 4 tokens" in out
    code, out, _ = run(capsys, "bench", "--model", policy_dir, "--prm", value_head_file, "--requests", "2",
                       "--no-fixed-steps", *TINY, "--json")
    assert code == 0 and not json.loads(out)["workload"]["fixed_steps"]


def test_profile_writes_a_chrome_trace(capsys, tmp_path, policy_dir, value_head_file):
    trace = tmp_path / "trace.json"
    code, out, _ = run(capsys, "profile", "--model", policy_dir, "--prm", value_head_file, "--out", str(trace),
                       "--warmup", "0", "--row-limit", "5", *TINY, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["trace"] == str(trace) and 0 < len(report["top_ops"]) <= 5
    assert report["generated_tokens"] == 4 * 2 * 4 and report["workload"]["fixed_steps"]
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


needs_toy = pytest.mark.skipif(not is_bundled(), reason="the bundled toy checkpoints are missing")


@needs_toy
def test_every_command_defaults_to_the_separate_prm():
    """... read as the teacher it is (a likelihood PRM); an explicit --prm is read as given."""
    for argv in (["generate", "--prompt", "x"], ["serve"], ["bench"], ["profile"], ["eval", "data.jsonl"]):
        config = make_engine(build_parser().parse_args(argv)).config
        assert (config.prm, config.prm_config) == (str(PRM), PRM_CONFIG), argv
    config = engine_config(build_parser().parse_args(["generate", "--prompt", "x", "--prm", str(VALUE_HEAD)]))
    assert (config.prm, config.prm_config) == (str(VALUE_HEAD), PRMConfig())


@needs_toy
def test_generate_defaults_work_on_the_bundled_model(capsys):
    """No flags but the prompt: the chat template is applied, the step budget is the API's, and the
    longest problem is solved to its end (the old defaults, 6 steps without --chat, printed noise
    or cut it off and still said 'done yes'). A limit that cuts particles off says so."""
    problem = max(heldout_set(20), key=lambda p: len(p.steps()))
    assert len(problem.steps()) > 6
    code, out, err = run(capsys, "generate", "--prompt", problem.text, "--particles", "2", "--no-progress", "--json")
    assert code == 0 and f"PRM {PRM}" in err
    result = json.loads(out)
    assert all(p["finish_reason"] == "eos" and p["answer"] is not None for p in result["particles"])
    assert result["answer"] == extract_answer(result["text"]) and result["text"].endswith("}.")
    code, out, _ = run(capsys, "generate", "--prompt", problem.text, "--particles", "2", "--max-steps", "3",
                       "--no-progress")
    assert code == 0 and out.count(" cut: max_steps ") == 2  # both particles, in the table
    assert "a limit cut it off before the model ended it: raise --max-steps" in out
    code, out, _ = run(capsys, "generate", "--prompt", problem.text, "--particles", "1", "--method", "greedy",
                       "--no-chat", "--no-progress", "--json")
    raw = json.loads(out)["stats"]["prompt_tokens"]
    assert code == 0 and raw == len(Engine(EngineConfig(model=str(POLICY))).tokenizer.encode(problem.text))
    assert raw < result["stats"]["prompt_tokens"]  # the chat template adds its markers


@needs_toy
def test_bench_default_measures_fixed_length_steps(capsys):
    code, out, _ = run(capsys, "bench", "--requests", "2", "--warmup", "0", "--no-progress", "--json")
    report = json.loads(out)
    w = report["workload"]
    assert code == 0 and (w["particles"], w["max_steps"], w["max_step_tokens"]) == (8, 4, 32)
    assert report["generated_tokens"] == 2 * 8 * 4 * 32  # not one token per particle
