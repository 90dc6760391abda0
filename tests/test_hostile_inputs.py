"""Hostile and broken input at every boundary, Python API and HTTP: each case gets one clear error
naming the option (or flag / field), and afterwards the engine is clean (no request left, no block in
use) and still answers a normal request. ``HOSTILE_TABLE=path`` writes the table of every case
(input -> status / exception -> message -> state afterwards), as the closing note shows it."""
import json
import math
import os
import socket
import time

import pytest

httpx = pytest.importorskip("httpx")

from pfengine import Engine, EngineConfig, Request, SamplingParams, SearchParams  # noqa: E402
from pfengine.config import InvalidArgument  # noqa: E402
from pfengine.http_gate import GateConfig  # noqa: E402
from pfengine.server import ServerConfig  # noqa: E402
from test_server import MODEL, LoopbackServer, serving, wait_idle  # noqa: E402

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = dict(max_request_particles=64, max_iterations=8, max_request_tokens=20_000, max_prompt_chars=20_000)
ROWS: list[tuple[str, str, str, str, str]] = []
"""(surface, input, outcome, message, state afterwards): the table."""


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.fixture(scope="module")
def engine(policy_dir, value_head_file):
    return Engine(EngineConfig(model=policy_dir, prm=value_head_file, num_blocks=256, block_size=8, **LIMITS))


@pytest.fixture(scope="module")
def base_url(engine):
    config = ServerConfig(served_model_name=MODEL, gate=GateConfig(api_key=KEY, max_body_bytes=64 << 10),
                          max_completions=16)
    with LoopbackServer(serving(engine, config)) as url:
        yield url


def normal() -> Request:
    return Request(prompt="Step 1: add 17 and 25.", sampling=SamplingParams(seed=3, max_steps=2, max_step_tokens=4),
                   search=SearchParams(n_particles=4))


def state_after(engine, base_url: str | None) -> str:
    """The engine is idle with every block free, and a normal request is still answered."""
    wait_idle(engine)
    stats = engine.stats()
    assert stats["policy_blocks_in_use"] == 0 and not engine.has_work
    if base_url is None:
        assert len(engine.generate([normal()])[0].particles) == 4
    else:
        r = httpx.post(f"{base_url}/v1/completions", headers=AUTH, timeout=60,
                       json={"model": MODEL, "prompt": "Step 1:", "max_tokens": 3, "seed": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
    wait_idle(engine)
    return f"idle, 0 blocks in use, normal request answered, RSS {rss_mb():.0f} MB"


API_CASES = [
    ("n_particles=4.0", lambda: SearchParams(n_particles=4.0), "n_particles: expected an integer, got 4.0"),
    ("n_particles=True", lambda: SearchParams(n_particles=True), "n_particles: expected an integer, got True"),
    ("n_particles=0", lambda: SearchParams(n_particles=0), "n_particles: must be >= 1, got 0"),
    ("temperature=inf", lambda: SamplingParams(temperature=math.inf), "temperature: must be a finite number"),
    ("temperature=nan", lambda: SamplingParams(temperature=math.nan), "temperature: must be a finite number"),
    ("temperature='hot'", lambda: SamplingParams(temperature="hot"), "temperature: expected a number"),
    ("weight_temperature=inf", lambda: SearchParams(weight_temperature=math.inf),
     "weight_temperature: must be a finite number"),
    ("weight_temperature=1e-300", lambda: SearchParams(weight_temperature=1e-300),
     r"weight_temperature: must be in \[0.0001, 10000.0\]"),
    ("temperatures=(1, nan)", lambda: SearchParams(method="parallel_tempering", temperatures=(1.0, math.nan)),
     "temperatures: must be a finite number"),
    ("seed=2**64", lambda: SamplingParams(seed=2**64), r"seed: must be an integer in \[0, 18446744073709551615\]"),
    ("seed=-1", lambda: SamplingParams(seed=-1), "seed: must be an integer in"),
    ("seed='7'", lambda: SamplingParams(seed="7"), "seed: expected an integer, got '7'"),
    ("top_k=1.5", lambda: SamplingParams(top_k=1.5), "top_k: expected an integer"),
    ("max_steps=-3", lambda: SamplingParams(max_steps=-3), "max_steps: must be >= 1"),
    ("stop_on_eos='no'", lambda: SamplingParams(stop_on_eos="no"), "stop_on_eos: expected true or false"),
    ("step_delimiter=''", lambda: SamplingParams(step_delimiter=""), "step_delimiter: must be a non-empty string"),
    ("step_delimiter of 65 characters", lambda: SamplingParams(step_delimiter="=" * 65),
     "step_delimiter: must be a non-empty string of at most 64 characters, got 65"),
    ("message without role", lambda: Request(prompt=[{"content": "hi"}]), r"prompt\[0\].role: expected a string"),
    ("message without content", lambda: Request(prompt=[{"role": "user"}]), r"prompt\[0\].content: expected a string"),
    ("message not a dict", lambda: Request(prompt=["hi"]), r"prompt\[0\]: expected a message"),
    ("lone surrogate in prompt", lambda: Request(prompt="x\ud800y"), "prompt: contains a lone surrogate .* at index 1"),
    ("reference_answer=5", lambda: Request(prompt="hi", reference_answer=5), "reference_answer: expected a string"),
    ("sampling=dict", lambda: Request(prompt="hi", sampling={"temperature": 1}), "sampling: expected a SamplingParams"),
]
ENGINE_CASES = [
    ("a dict instead of a Request", lambda: {"prompt": "hi"}, "request: expected a pfengine.Request"),
    ("prompt over max_prompt_chars", lambda: Request(prompt="x" * 20_001),
     "prompt: 20001 characters; EngineConfig.max_prompt_chars is 20000"),
    ("n_particles over max_request_particles", lambda: Request(prompt="hi", search=SearchParams(n_particles=65)),
     "n_particles: 65 is over this engine's limit, EngineConfig.max_request_particles=64"),
    ("particle_gibbs 600000 x 1000 sweeps", lambda: Request(prompt="hi", search=SearchParams(
        "particle_gibbs", 600_000, iterations=1000)), "n_particles: 600000 is over this engine's limit"),
    ("iterations over max_iterations", lambda: Request(prompt="hi", search=SearchParams(
        "particle_gibbs", 18, iterations=9)), "iterations: 9 is over this engine's limit"),
    ("max_steps=10**6", lambda: Request(prompt="hi", sampling=SamplingParams(max_steps=10**6)),
     "max_steps: 1000000 steps reserve a position per step"),
    ("tokens over max_request_tokens", lambda: Request(prompt="hi", search=SearchParams(n_particles=64),
                                                       sampling=SamplingParams(max_step_tokens=64)),
     "max_tokens: SearchParams.n_particles=64 x up to .* over this engine's limit EngineConfig.max_request_tokens"),
    ("mutated after construction", lambda: _mutated(), "n_particles: expected an integer, got 2.5"),
]


def _mutated() -> Request:
    r = normal()
    r.search.n_particles = 2.5  # dataclasses can be changed after their checks ran: the engine checks again
    return r


@pytest.mark.parametrize("name,make,message", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_refuses_bad_values_at_construction(engine, name, make, message):
    with pytest.raises(InvalidArgument, match=message) as info:
        make()
    ROWS.append(("API", name, f"{type(info.value).__name__} at construction", str(info.value),
                 state_after(engine, None)))


@pytest.mark.parametrize("name,make,message", ENGINE_CASES, ids=[c[0] for c in ENGINE_CASES])
def test_engine_refuses_requests_over_its_limits(engine, name, make, message):
    with pytest.raises(InvalidArgument, match=message) as info:
        engine.generate([make()])
    ROWS.append(("API", name, f"{type(info.value).__name__} from generate()", str(info.value),
                 state_after(engine, None)))


def post(base_url: str, path: str = "/v1/completions", body=None, headers=None, content: bytes | None = None):
    kwargs = {"content": content} if content is not None else {"json": body}
    return httpx.post(f"{base_url}{path}", headers={**AUTH, **(headers or {})}, timeout=60, **kwargs)


PROMPT = {"model": MODEL, "prompt": "Step 1:", "max_tokens": 4}
HTTP_CASES = [
    ("no Authorization header", lambda u: httpx.post(f"{u}/v1/completions", json=PROMPT, timeout=30), 401,
     "invalid_api_key"),
    ("wrong API key", lambda u: httpx.post(f"{u}/v1/completions", json=PROMPT, timeout=30,
                                           headers={"Authorization": "Bearer wrong"}), 401, "Incorrect"),
    ("Basic auth instead of Bearer", lambda u: httpx.post(f"{u}/v1/models", timeout=30,
                                                          headers={"Authorization": f"Basic {KEY}"}), 401, "API key"),
    ("body over the limit (Content-Length)", lambda u: post(u, content=b"{" + b" " * (70 << 10) + b"}",
                                                            headers={"content-type": "application/json"}), 413,
     "body over this server's limit"),
    ("body over the limit (chunked)", lambda u: post(u, content=iter([b" " * (40 << 10)] * 3),
                                                     headers={"content-type": "application/json"}), 413,
     "body over this server's limit"),
    ("invalid JSON", lambda u: post(u, content=b'{"prompt": ', headers={"content-type": "application/json"}), 422,
     "JSON"),
    ("JSON array instead of an object", lambda u: post(u, body=[1, 2]), 422, "body"),
    ("n=2.0", lambda u: post(u, body=PROMPT | {"n": 2.0}), 422, "n: Input should be a valid integer"),
    ("search.particles=4.0", lambda u: post(u, body=PROMPT | {"search": {"particles": 4.0}}), 400,
     "search.particles"),
    ("search.weight_temperature=1e-300", lambda u: post(u, body=PROMPT | {"search": {"weight_temperature": 1e-300}}),
     400, "search.weight_temperature: must be in"),
    ("temperature=NaN", lambda u: post(u, content=json.dumps(PROMPT | {"temperature": math.nan}).encode(),
                                       headers={"content-type": "application/json"}), 400,
     "temperature: must be a finite number"),
    ("seed=2**70", lambda u: post(u, body=PROMPT | {"seed": 2**70}), 400, "seed: must be an integer in"),
    ("lone surrogate in prompt", lambda u: post(u, content=b'{"model": "%s", "prompt": "a\\ud800b"}' % MODEL.encode(),
                                                headers={"content-type": "application/json"}), 400,
     "prompt: contains a lone surrogate"),
    ("30,000-character prompt", lambda u: post(u, body=PROMPT | {"prompt": "7" * 30_000}), 400,
     "prompt: 30000 characters; this server allows at most 20000"),
    ("prompts x n over max_completions", lambda u: post(u, body=PROMPT | {"prompt": ["a", "b"], "n": 9}), 400,
     "n: 2 prompt(s) x n=9 = 18 completions"),
    ("search.particles over the limit", lambda u: post(u, body=PROMPT | {"search": {"particles": 200}}), 400,
     "search.particles: 200 is over this engine's limit, the server's --max-request-particles=64"),
    ("particle_gibbs 600000 x 1000", lambda u: post(u, body=PROMPT | {"search": {
        "method": "particle_gibbs", "particles": 600_000, "iterations": 1000}}), 400, "--max-request-particles"),
    ("search.max_steps=10**6", lambda u: post(u, body=PROMPT | {"search": {"max_steps": 10**6}}), 400,
     "search.max_steps: 1000000 steps"),
    ("max_tokens=-1", lambda u: post(u, body=PROMPT | {"max_tokens": -1}), 400, "max_tokens: must be >= 1"),
    ("stop=['']", lambda u: post(u, body=PROMPT | {"stop": [""]}), 400, "stop"),
    ("unknown model", lambda u: post(u, body=PROMPT | {"model": "gpt-4"}), 404, "does not exist"),
    ("chat message without role", lambda u: post(u, "/v1/chat/completions", body={
        "model": MODEL, "messages": [{"content": "hi"}]}), 422, "messages.0.role"),
    ("chat message content of another type", lambda u: post(u, "/v1/chat/completions", body={
        "model": MODEL, "messages": [{"role": "user", "content": 5}]}), 422, "messages.0.content"),
    ("search not an object", lambda u: post(u, body=PROMPT | {"search": "fast"}), 422, "search"),
    ("deeply nested JSON", lambda u: post(u, content=b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                          headers={"content-type": "application/json"}), 400, "parsing the body"),
    ("streamed request with a bad option", lambda u: post(u, body=PROMPT | {"stream": True, "top_p": 0}), 400,
     "top_p: must be in"),
    ("GET on a POST route", lambda u: httpx.get(f"{u}/v1/completions", headers=AUTH, timeout=30), 405, ""),
    ("/docs (off by default)", lambda u: httpx.get(f"{u}/docs", timeout=30), 404, ""),
    ("/openapi.json (off by default)", lambda u: httpx.get(f"{u}/openapi.json", timeout=30), 404, ""),
]


@pytest.mark.parametrize("name,send,status,message", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_http_refuses_hostile_requests(engine, base_url, name, send, status, message):
    response = send(base_url)
    assert response.status_code == status, response.text
    body = response.json()  # every error is a JSON error object
    assert set(body["error"]) >= {"message", "type", "code"}
    assert message in body["error"]["message"] or message in str(body["error"]["code"])
    ROWS.append(("HTTP", name, str(status), body["error"]["message"][:160], state_after(engine, base_url)))


def test_large_bodies_leave_memory_at_baseline(engine, base_url):
    """An 8 MB body and a 60,000-character prompt are refused before any tokenising; the server's
    memory stays where it was."""
    state_after(engine, base_url)
    before = rss_mb()
    huge = b'{"prompt": "' + b"7 " * (4 << 20) + b'"}'
    for _ in range(3):
        assert post(base_url, content=huge, headers={"content-type": "application/json"}).status_code == 413
        assert post(base_url, body=PROMPT | {"prompt": "8 " * 30_000}).status_code in (400, 413)
    state_after(engine, base_url)
    grew = rss_mb() - before
    assert grew < 64, f"RSS grew by {grew:.0f} MB after rejecting large inputs"
    ROWS.append(("HTTP", "8 MB body, 3 times", "413", "body over this server's limit", f"RSS +{grew:.0f} MB"))


def test_non_finite_numbers_never_reach_the_wire(engine, base_url, monkeypatch):
    """A result holding NaN (a degenerate PRM) is still sent as valid JSON, plain and streamed."""
    from pfengine.search import results

    build = results.build

    def degenerate(*args, **kwargs):
        out = build(*args, **kwargs)
        out.particles[0].weight = math.nan
        out.particles[0].score = math.inf
        return out

    monkeypatch.setattr(results, "build", degenerate)
    body = PROMPT | {"search": {"particles": 2, "max_steps": 1, "max_step_tokens": 2}}
    plain = post(base_url, body=body)
    assert plain.status_code == 200
    particle = json.loads(plain.text, parse_constant=_refuse)["pfengine"]["particles"][0]
    assert particle["weight"] is None and particle["score"] is None
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body | {"stream": True}, headers=AUTH,
                      timeout=60) as stream:
        chunks = [line[5:] for line in stream.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    for chunk in chunks:
        json.loads(chunk, parse_constant=_refuse)
    state_after(engine, base_url)


def _refuse(token: str):
    raise AssertionError(f"non-JSON number {token} on the wire")


def test_model_id_is_the_directory_name_not_its_path(engine):
    with LoopbackServer(serving(engine, ServerConfig())) as url:
        models = httpx.get(f"{url}/v1/models", timeout=30).json()
        health = httpx.get(f"{url}/health", timeout=30).json()
    name = os.path.basename(engine.config.model)
    assert models["data"][0]["id"] == name and health["model"] == name
    assert os.path.dirname(engine.config.model) not in json.dumps(models) + json.dumps(health)


def test_allowed_hosts_refuses_other_host_headers(engine):
    config = ServerConfig(gate=GateConfig(allowed_hosts=("localhost", "127.0.0.1")))
    with LoopbackServer(serving(engine, config)) as url:
        ok = httpx.get(f"{url}/v1/models", timeout=30)
        rebound = httpx.get(f"{url}/v1/models", timeout=30, headers={"Host": "evil.example:8000"})
    assert ok.status_code == 200
    assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "invalid_host"


def test_health_needs_no_key_but_v1_does(engine, base_url):
    assert httpx.get(f"{base_url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{base_url}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{base_url}/v1/models", timeout=30, headers=AUTH).status_code == 200


def test_serving_beyond_loopback_without_a_key_warns(engine, monkeypatch, caplog):
    import uvicorn

    from pfengine.server import serve

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    serve(engine, host="0.0.0.0", port=_free_port())
    assert "WITHOUT an API key" in caplog.text
    caplog.clear()
    serve(engine, host="127.0.0.1", port=_free_port())
    serve(engine, host="0.0.0.0", port=_free_port(), config=ServerConfig(gate=GateConfig(api_key=KEY)))
    assert "WITHOUT an API key" not in caplog.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_write_table():
    """Runs last in this module: at least 30 hostile inputs were walked through; the table is written
    where ``HOSTILE_TABLE`` points."""
    assert len(ROWS) >= 30
    path = os.environ.get("HOSTILE_TABLE")
    if path:
        lines = ["| surface | input | status / exception | message | afterwards |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in ROWS]
        with open(path, "w") as f:
            f.write("\n".join(lines) + f"\n\n{len(ROWS)} cases, {time.strftime('%Y-%m-%d')}\n")
