"""The OpenAI-compatible server on a loopback port, driven by the official ``openai`` client (and
httpx for raw SSE, disconnects and a burst of concurrent requests)."""
import asyncio
import json
import re
import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from pfengine import Engine, EngineConfig, Request, SamplingParams, SearchParams  # noqa: E402
from pfengine.search.answers import extract_answer  # noqa: E402
from pfengine.server import ServerConfig, create_app  # noqa: E402
from pfengine.state import FINISH_REASONS  # noqa: E402

MODEL = "tiny-pf"
PF = {"method": "particle_filter", "particles": 4, "max_steps": 3, "max_step_tokens": 5}
CHAT = [{"role": "user", "content": "What is 17 + 25?"}]


SERVED: dict[int, list] = {}
"""Engine id -> the AsyncEngines of the apps serving it."""


def serving(engine, config=None):
    """``create_app`` that remembers the app's AsyncEngine, for :func:`wait_idle`."""
    app = create_app(engine, config or ServerConfig(served_model_name=MODEL))
    SERVED.setdefault(id(engine), []).append(app.state.aengine)
    return app


class LoopbackServer:
    """uvicorn in a background thread on 127.0.0.1, on a port the OS picked (the socket is bound
    here and handed over, so nothing can take the port in between)."""

    def __init__(self, app) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()
        assert not self.thread.is_alive(), "server did not shut down"


@pytest.fixture(scope="module")
def engine(policy_dir, value_head_file):
    return Engine(EngineConfig(model=policy_dir, prm=value_head_file, num_blocks=512, block_size=8))


@pytest.fixture(scope="module")
def base_url(engine):
    with LoopbackServer(serving(engine)) as url:
        yield url


@pytest.fixture()
def client(base_url, engine):
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c
    wait_idle(engine)


def wait_idle(engine, timeout: float = 20.0) -> None:
    """The engine has no request left, every KV block is free again and the server's engine loop has
    stopped (so this thread may drive the engine directly)."""
    deadline = time.monotonic() + timeout
    while engine.has_work or engine.stats()["policy_blocks_in_use"] or not all(a.idle for a in SERVED.get(id(engine), [])):
        assert time.monotonic() < deadline, f"engine still busy: {engine.stats()}"
        time.sleep(0.02)


def alone(engine, request: Request):
    """The same request run directly on the engine (the server is idle meanwhile)."""
    wait_idle(engine)
    return engine.generate([request])[0]


def test_models_and_health(client, base_url):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{base_url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["engine"]["policy_blocks_in_use"] == 0


def test_completion_n_samples_and_usage(client, engine):
    prompt = "Step 1: add 17 and 25."
    r = client.completions.create(model=MODEL, prompt=prompt, n=3, max_tokens=10, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") and c.text for c in r.choices)
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))
    assert 3 <= r.usage.completion_tokens <= 30
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.completions.create(model=MODEL, prompt=prompt, n=3, max_tokens=10, seed=3)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded: reproducible
    batch = client.completions.create(model=MODEL, prompt=[prompt, "Then 12 + 5"], max_tokens=4, seed=1)
    assert len(batch.choices) == 2 and batch.choices[0].text == client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=4, seed=1).choices[0].text


def test_chat_stop_and_continue_final_message(client, engine):
    text = None
    for seed in range(20):  # a sample with two letters in a row to use as a stop string
        r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=30, seed=seed)
        text = r.choices[0].message.content
        m = re.search(r"[A-Za-z]{2}", text[1:])
        if m:
            break
    assert m, "no usable stop string in 20 samples"
    assert r.choices[0].message.role == "assistant"
    stop = m.group(0)
    cut = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=30, seed=seed, stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    kept = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=30, seed=seed, stop=stop,
                                          extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].message.content == text[:text.index(stop) + len(stop)]

    partial = CHAT + [{"role": "assistant", "content": "Step 1: add 17 and 25.\n\n"}]
    r = client.chat.completions.create(model=MODEL, messages=partial, max_tokens=5, seed=0,
                                       extra_body={"continue_final_message": True, "add_generation_prompt": False})
    rendered = engine.tokenizer.apply_chat_template(partial, tokenize=False, continue_final_message=True)
    assert rendered.endswith("25.\n\n")
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode(rendered, add_special_tokens=False))


def test_streaming_plain_chat_matches_the_completion(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=40, seed=5)
    done = client.chat.completions.create(**kw)
    full = done.choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2  # streamed as steps finish, not all at the end
    assert "".join(pieces) == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens <= 40


def test_search_request_returns_the_chosen_particle(client, engine):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, seed=7, extra_body={"search": PF})
    ext = r.model_extra["pfengine"]
    assert ext["method"] == "particle_filter" and len(ext["particles"]) == 4
    assert r.choices[0].message.content == ext["particles"][ext["best"]]["text"]
    assert abs(sum(p["weight"] for p in ext["particles"]) - 1) < 1e-5
    assert r.usage.completion_tokens == ext["stats"]["generated_tokens"] > 0
    ref = alone(engine, Request(prompt=CHAT, sampling=SamplingParams(temperature=1.0, seed=7, max_steps=3,
                                                                     max_step_tokens=5),
                                search=SearchParams(method="particle_filter", n_particles=4)))
    assert [p["text"] for p in ext["particles"]] == [p.text for p in ref.particles]
    assert [p["weight"] for p in ext["particles"]] == pytest.approx([p.weight for p in ref.particles])

    greedy = client.chat.completions.create(model=MODEL, messages=CHAT, extra_body={"search": {"method": "greedy",
                                                                                          "max_steps": 2}})
    assert greedy.model_extra["pfengine"]["method"] == "greedy" and len(greedy.model_extra["pfengine"]["particles"]) == 1

    two = client.chat.completions.create(model=MODEL, messages=CHAT, seed=7, n=2, extra_body={"search": PF})
    weights = [p["weight"] for p in two.model_extra["pfengine"]["particles"]]
    assert two.choices[0].message.content == r.choices[0].message.content
    runner_up = max((i for i in range(4) if i != ext["best"]), key=lambda i: weights[i])
    assert two.choices[1].message.content == ext["particles"][runner_up]["text"]


def test_search_stream_sends_rounds_then_the_answer(client):
    kw = dict(model=MODEL, messages=CHAT, seed=7, extra_body={"search": PF})
    answer = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    rounds = [c.model_extra["pfengine"] for c in chunks[1:-1]]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(len(r["weights"]) == 4 and 0 <= r["leader"] < 4 for r in rounds)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer
    last = chunks[-1]
    assert last.choices[0].finish_reason in ("stop", "length")
    ext = last.model_extra["pfengine"]
    assert ext["text"] == answer and len(ext["particles"]) == 4
    # "answer" is the extracted answer of the chosen particle, not its text
    assert ext["answer"] == extract_answer(answer) == ext["particles"][ext["best"]]["answer"]
    assert all(p["finish_reason"] in FINISH_REASONS for p in ext["particles"])


@pytest.mark.parametrize("kwargs, status, field", [
    (dict(extra_body={"search": {"method": "particle_filter", "particles": 0}}), 400, "search.particles: must be >= 1"),
    (dict(extra_body={"search": {"method": "no_such_method"}}), 400, "method"),
    (dict(extra_body={"search": {"particles": "many"}}), 400, "search.particles"),
    (dict(extra_body={"search": {"bogus": 1}}), 400, "search.bogus"),
    (dict(temperature=-1.0), 400, "temperature"),
    (dict(top_p=0.0), 400, "top_p"),
    (dict(n="three"), 422, "n"),
    (dict(messages=[{"content": "no role"}]), 422, "messages.0.role"),
    (dict(model="gpt-4"), 404, "model"),
    (dict(logprobs=True), 400, "logprobs"),
    (dict(extra_body={"search": {"method": "particle_filter", "particles": 200, "max_step_tokens": 200}}), 400,
     "KV blocks"),
])
def test_bad_requests_name_the_field(client, kwargs, status, field):
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**({"model": MODEL, "messages": CHAT, "max_tokens": 4} | kwargs))
    assert info.value.status_code == status
    assert field in info.value.body["message"]


def test_request_that_outgrows_the_cache_fails_alone(client, base_url, engine):
    big = {"method": "best_of_n", "particles": 64, "max_steps": 20, "max_step_tokens": 8}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Step 1:", max_tokens=100, seed=0, extra_body={"search": big})
    assert info.value.body["code"] == "kv_cache_exhausted" and "KV cache" in info.value.body["message"]
    wait_idle(engine)
    with pytest.raises(openai.APIError, match="KV cache"):  # streaming: the error arrives in-band
        list(client.completions.create(model=MODEL, prompt="Step 1:", max_tokens=100, seed=0, stream=True,
                                       extra_body={"search": big}))
    wait_idle(engine)
    assert httpx.get(f"{base_url}/health", timeout=10).json()["status"] == "ok"
    assert client.completions.create(model=MODEL, prompt="Step 1:", max_tokens=3, seed=0).choices[0].text


def test_client_disconnect_frees_the_blocks(base_url, engine, monkeypatch):
    """A client that goes away (mid-stream, or waiting for a plain response) has its request aborted
    long before it would have finished, and its blocks freed. Every engine step is made to take at
    least 5 ms, so a request runs for seconds however fast the kernels are on this machine."""
    step = engine.step

    def slow_step():
        time.sleep(0.005)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    long = {"method": "self_consistency", "particles": 8, "max_steps": 40, "max_step_tokens": 16, "stop_on_eos": False}
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 640, "seed": 1, "stream": True, "search": long}
    full = 8 * 640
    before = engine.stats()["policy_tokens_forwarded"]
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert json.loads(first[5:])["object"] == "chat.completion.chunk"
        # closed mid-stream
    wait_idle(engine)
    after = engine.stats()["policy_tokens_forwarded"]
    assert after - before < full / 2

    body |= {"stream": False}
    with httpx.Client(timeout=0.5) as http, pytest.raises(httpx.TimeoutException):
        http.post(f"{base_url}/v1/chat/completions", json=body)  # the client gives up
    wait_idle(engine)
    assert engine.stats()["policy_tokens_forwarded"] - after < full / 2
    assert engine.stats()["policy_blocks_in_use"] == 0


def test_concurrent_requests_are_isolated(base_url, engine):
    """20 clients at once with different methods and particle counts: every answer equals the same
    request run alone, and no block is left in use."""
    shapes = [("particle_filter", n) for n in (1, 2, 3, 4, 6, 8, 16, 5, 12, 7)] + \
             [("best_of_n", 4), ("beam_search", 8), ("dvts", 8), ("self_consistency", 6), ("particle_filter", 10),
              ("weighted_best_of_n", 3)] + [(None, n) for n in (1, 2, 3, 4)]
    prompts = [f"Step {k}: add {k} and 25." for k in range(len(shapes))]

    def body(k: int) -> dict:
        method, n = shapes[k]
        b = {"model": MODEL, "prompt": prompts[k], "seed": 100 + k}
        if method is None:
            return b | {"n": n, "max_tokens": 6}
        return b | {"search": {"method": method, "particles": n, "max_steps": 3, "max_step_tokens": 4}}

    async def burst():
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
            responses = await asyncio.gather(*(http.post("/v1/completions", json=body(k)) for k in range(len(shapes))))
        return [r.json() for r in responses]

    out = asyncio.run(burst())
    wait_idle(engine)
    assert engine.stats()["policy_blocks_in_use"] == 0
    engine.policy.blocks.check_invariants()
    for k, ((method, n), r) in enumerate(zip(shapes, out)):
        assert "choices" in r, r
        if method is None:
            assert len(r["choices"]) == n and r["usage"]["completion_tokens"] <= 6 * n
            continue
        ref = alone(engine, Request(prompt=prompts[k], sampling=SamplingParams(temperature=1.0, seed=100 + k,
                                                                                 max_steps=3, max_step_tokens=4),
                                    search=SearchParams(method=method, n_particles=n)))
        ext = r["pfengine"]
        assert ext["method"] == method
        assert [p["text"] for p in ext["particles"]] == [p.text for p in ref.particles], k
        assert r["choices"][0]["text"] == ref.text and ext["answer"] == ref.answer
        assert r["usage"]["completion_tokens"] == ref.stats.generated_tokens


@pytest.mark.parametrize("search", [
    {"method": "particle_filter", "particles": 4},
    {"method": "particle_gibbs", "particles": 4, "iterations": 2},
    {"method": "parallel_tempering", "particles": 4},
    {"method": "beam_search", "particles": 4, "beam_width": 2},
    {"method": "dvts", "particles": 4, "beam_width": 2},
    {"method": "best_of_n", "particles": 3},
    {"method": "greedy"},
])
def test_streamed_text_adds_up_to_the_answer_for_every_method(client, search):
    """Only settled text (shared by every particle that can still become the answer) is streamed,
    so the pieces always add up to the final answer; at a low temperature the particles agree early
    and text arrives before the end."""
    kw = dict(model=MODEL, messages=CHAT, seed=11, temperature=0.05,
              extra_body={"search": search | {"max_steps": 3, "max_step_tokens": 4}})
    answer = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == answer
    if search["method"] in ("particle_filter", "greedy", "best_of_n"):
        assert "".join(pieces[:-1])  # some of it before the final chunk
