"""OpenAI-compatible HTTP server over one :class:`~pfengine.async_engine.AsyncEngine`, or over a pool
of engine replicas on Ray (``pfengine serve --replicas K``, :mod:`pfengine.dp.pool`).

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /health``.

A plain request is an ordinary completion: ``n`` independent samples (no PRM involved) with
``temperature`` (default 1.0), ``top_p``, ``max_tokens``, ``stop`` and ``seed``, returned as ``n``
choices. The extension object ``"search"`` selects a search method of the engine and its options::

    "search": {"method": "particle_filter", "particles": 16, "aggregation": "model",
               "resampling": "systematic", "max_steps": 20, "max_step_tokens": 128, ...}

Every :class:`~pfengine.config.SearchParams` field is accepted (``particles`` is an alias of
``n_particles``), plus the step options ``max_steps``, ``max_step_tokens``, ``step_delimiter``,
``top_k``, ``stop_on_eos``, and ``reference_answer`` and ``return_particles`` (default true).
Choice 0 is the chosen answer (with ``n > 1`` the next choices are the other candidates by weight) and
the response carries ``"pfengine": {"method", "best", "answer", "particles": [{text, weight, score,
finish_reason, answer, ...}], "stats", ...}``; ``answer`` is the chosen particle's extracted answer
(the last ``\\boxed{}``, else the last number), the text is choice 0.

``stream: true`` sends OpenAI SSE chunks and ``data: [DONE]``. A plain request streams each choice's
text as its steps finish. A search request sends one chunk per finished round: its ``delta`` holds
the text every surviving particle now shares (settled: it cannot change any more, so the streamed
pieces always add up to the final answer) and ``pfengine`` shows the round (leading particle and its
text, scores, weights, ESS, ancestors); the last chunk completes the answer.

``stop``: in a plain request generation ends at the first stop string of the list (the engine's step
delimiter); the others, and all of them in a search request, cut the returned text afterwards.
vLLM-style extras are honoured: ``include_stop_str_in_output``, ``top_k``, and for chat
``continue_final_message`` / ``add_generation_prompt`` (continue the last assistant message, as
its_hub's step generation asks). Fields pfengine cannot honour (``logprobs``, ``tools``, penalties,
...) are rejected when set; other unknown fields are ignored.

``usage`` counts real tokens: the prompt once, and every token the engine sampled for the request.
Every response body is valid JSON (a non-finite number is sent as ``null``) and every error an
OpenAI-style error object: 422 for a malformed body (numbers are strict: ``n: 2.0`` is refused), 400
naming the field for a bad value or a request over one of the engine's per-request limits, 400
(``kv_cache_exhausted``) for a request that cannot fit in the KV cache, 401 for a missing or wrong API
key, 404 for an unknown model, 413 for a body over the size limit, 500 for an engine fault; once a
stream has started, an error arrives as a ``data: {"error": ...}`` chunk. A client that disconnects
(streaming or not) has its request aborted and its KV blocks freed. Prompts are checked against the
character limit before they are tokenised, and tokenising runs off the event loop.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import time
import typing
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, AsyncIterator, Protocol

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from pfengine.async_engine import AsyncEngine
from pfengine.cache import OutOfBlocks
from pfengine.config import EngineConfig, InvalidArgument, Request, SamplingParams, SearchParams, check_prompt
from pfengine.http_gate import Gate, GateConfig
from pfengine.prompting import (NO_DELIMITER, chat_prompt, common_prefix, encode_prompt, stop_list, stream_safe,
                                trim_at_stop)
from pfengine.search import make_method
from pfengine.state import Event, PFResult, StepTrace

log = logging.getLogger("pfengine.server")

STREAM_STEP_TOKENS = 16
"""A streamed plain request without stop strings is generated in steps of this many tokens."""
PLAIN_STEP_TOKENS = 64
"""A plain request without stop strings is generated in steps of this many tokens (independent
samples never fork, so a step end is only the point where the engine reports progress)."""
DISCONNECT_POLL_SECONDS = 0.25

SEARCH_FIELDS = {f.name for f in fields(SearchParams)}
SAMPLING_KEYS = {"max_steps", "max_step_tokens", "step_delimiter", "top_k", "stop_on_eos"}
REQUEST_KEYS = {"reference_answer", "return_particles"}
SEARCH_ALIASES = {"particles": "n_particles"}
UNSUPPORTED = {"logprobs", "top_logprobs", "echo", "best_of", "suffix", "tools", "functions", "logit_bias",
               "presence_penalty", "frequency_penalty", "response_format"}
"""OpenAI fields pfengine cannot honour: a request that sets one (to anything but its neutral value) gets a 400."""
_SEARCH_TYPES = typing.get_type_hints(SearchParams)
_SAMPLING_TYPES = typing.get_type_hints(SamplingParams)
_EXTRA_TYPES = {"reference_answer": str | None, "return_particles": bool}
_ENGINE_FIELDS = {f.name for f in fields(EngineConfig)}


@dataclass
class ServerConfig:
    """What one server exposes, and what one HTTP request may ask of it (the engine's own
    per-request limits live in :class:`~pfengine.config.EngineConfig`)."""

    served_model_name: str | None = None
    """The model id clients send; default: the checkpoint directory's name (never its path)."""
    gate: GateConfig = field(default_factory=GateConfig)
    max_completions: int = 128
    """Prompts x ``n`` of one request."""
    enable_docs: bool = False
    """Serve ``/docs`` and ``/openapi.json``."""


class EngineFront(Protocol):
    """What the app reads of the engine it serves: an :class:`~pfengine.engine.Engine`, or the
    front of a pool of engine replicas (:class:`pfengine.dp.front.Front`)."""

    config: EngineConfig
    tokenizer: Any
    max_len: int
    eos_ids: frozenset[int]

    def detokenize(self, tokens: list[int]) -> str: ...


class Backend(Protocol):
    """What runs the app's requests: an :class:`~pfengine.async_engine.AsyncEngine`, or a pool of
    engine replicas on Ray (:class:`pfengine.dp.pool.EnginePool`)."""

    def astream(self, request: Request) -> AsyncIterator[Event]: ...

    async def agenerate(self, request: Request) -> PFResult: ...

    async def health(self) -> dict: ...


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------------
# Request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # other OpenAI fields are accepted and ignored

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    include_stop_str_in_output: bool = False
    search: dict[str, Any] | None = None


class CompletionBody(_Body):
    prompt: str | list[str]


class ChatMessageBody(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[ChatMessageBody]
    max_completion_tokens: int | None = None
    continue_final_message: bool = False
    add_generation_prompt: bool = True


class Job:
    """One engine request made from one prompt of an HTTP request, and how to report it."""

    def __init__(self, request: Request, plain: bool, n: int, stops: list[str], include_stop: bool,
                 return_particles: bool, prompt_tokens: int) -> None:
        self.request, self.plain, self.n, self.stops = request, plain, n, stops
        self.include_stop, self.return_particles, self.prompt_tokens = include_stop, return_particles, prompt_tokens


def _coerce(name: str, value: Any, hint: Any, where: str) -> Any:
    """``value`` as the option's type, strictly (``4.0`` is not an int, ``"4"`` not a number)."""
    if isinstance(value, list) and typing.get_origin(hint) is tuple:
        value = tuple(value)
    try:
        return TypeAdapter(hint).validate_python(value, strict=True)
    except ValidationError as e:
        raise APIError(400, f"{where}.{name}: {e.errors()[0]['msg']}, got {value!r}", f"{where}.{name}") from None


def build_job(engine: EngineFront, prompt: str | list[dict], body: _Body, max_tokens: int | None,
              plain_max_tokens: int) -> Job:
    """Validate an HTTP body's options for one prompt and make the engine request. Tokenises: run it
    off the event loop."""
    if body.n < 1:
        raise APIError(400, f"n: must be at least 1, got {body.n}", "n")
    try:
        stops = stop_list(body.stop)
    except ValueError as e:
        raise APIError(400, str(e), "stop") from None
    plain = body.search is None
    search_kw: dict[str, Any] = {}
    sampling_kw: dict[str, Any] = {}
    extra: dict[str, Any] = {"reference_answer": None, "return_particles": True}
    if body.search is not None and "particles" in body.search and "n_particles" in body.search:
        raise APIError(400, "search.particles: give particles or n_particles, not both", "search.particles")
    for key, value in (body.search or {}).items():
        name = SEARCH_ALIASES.get(key, key)
        if name in SEARCH_FIELDS:
            search_kw[name] = _coerce(key, value, _SEARCH_TYPES[name], "search")
        elif name in SAMPLING_KEYS:
            sampling_kw[name] = _coerce(key, value, _SAMPLING_TYPES[name], "search")
        elif name in REQUEST_KEYS:
            extra[name] = _coerce(key, value, _EXTRA_TYPES[name], "search")
        else:
            known = sorted(SEARCH_FIELDS | SAMPLING_KEYS | REQUEST_KEYS | set(SEARCH_ALIASES))
            raise APIError(400, f"search.{key}: unknown option; expected one of {known}", f"search.{key}")
    if plain:
        search_kw = {"method": "self_consistency", "n_particles": body.n}
    else:
        default_n = 1 if search_kw.get("method") == "greedy" else max(body.n, SearchParams().n_particles)
        search_kw.setdefault("n_particles", default_n)
    try:
        search = SearchParams(**search_kw)
    except InvalidArgument as e:
        raise _invalid(e) from None
    candidates = make_method(search).n_candidates
    if not plain and body.n > candidates:
        raise APIError(400, f"n: a {search.method} search returns at most {candidates} candidates, "
                            f"asked for {body.n}", "n")

    try:
        check_prompt(prompt)
    except InvalidArgument as e:
        raise _invalid(e) from None
    try:
        prompt_tokens = len(encode_prompt(engine.tokenizer, prompt)[1])
    except Exception as e:  # a chat template may refuse a conversation
        raise APIError(400, f"prompt: cannot be tokenised: {type(e).__name__}: {e}", "prompt") from None
    if body.top_k is not None:
        sampling_kw.setdefault("top_k", body.top_k)
    sampling_kw["temperature"] = 1.0 if body.temperature is None else body.temperature
    if body.top_p is not None:
        sampling_kw["top_p"] = body.top_p
    sampling_kw["seed"] = body.seed
    if plain:
        # Never more than the context holds: the engine reserves KV blocks for a whole step up front.
        max_tokens = plain_max_tokens if max_tokens is None else max_tokens
        max_tokens = min(max_tokens, max(1, engine.max_len - prompt_tokens - 1)) if max_tokens > 0 else max_tokens
        if stops:  # the engine ends the only step at the first stop string; others are cut afterwards
            sampling_kw |= {"step_delimiter": stops[0], "max_steps": 1, "max_step_tokens": max(max_tokens, 1)}
        else:  # steps of a few tokens (one SSE chunk each when streaming); no step delimiter
            step = STREAM_STEP_TOKENS if body.stream else PLAIN_STEP_TOKENS
            sampling_kw |= {"step_delimiter": NO_DELIMITER, "max_step_tokens": step,
                            "max_steps": max(1, math.ceil(max_tokens / step))}
    if max_tokens is not None:
        sampling_kw["max_tokens"] = max_tokens
    try:
        sampling = SamplingParams(**sampling_kw)
    except InvalidArgument as e:
        raise _invalid(e) from None
    return Job(Request(prompt=prompt, sampling=sampling, search=search, reference_answer=extra["reference_answer"]),
               plain, body.n, stops, body.include_stop_str_in_output, extra["return_particles"], prompt_tokens)


# ------------------------------------------------------------------------------------------------
# Results -> OpenAI objects


def _finish_reason(engine: EngineFront, token_ids: list[int], stopped: bool) -> str:
    if stopped or (token_ids and token_ids[-1] in engine.eos_ids):
        return "stop"
    return "length"


def _choices(engine: EngineFront, job: Job, result: PFResult) -> list[tuple[str, str, int]]:
    """``(text, finish_reason, particle)`` per choice: every sample for a plain request; the chosen
    answer first (then the other candidates by weight) for a search."""
    if job.plain:
        order = list(range(len(result.particles)))
    else:
        rest = sorted((i for i in range(len(result.particles)) if i != result.best),
                      key=lambda i: -result.particles[i].weight)
        order = [result.best] + rest[:job.n - 1]
    out = []
    for i in order:
        p = result.particles[i]
        text, stopped = trim_at_stop(p.text, job.stops, job.include_stop)
        out.append((text, _finish_reason(engine, p.token_ids, stopped), i))
    return out


def _extension(job: Job, result: PFResult) -> dict:
    ext: dict[str, Any] = {"method": result.method, "best": result.best, "answer": result.answer,
                           "stats": asdict(result.stats), "rounds": len(result.trace)}
    if result.expected_accuracy is not None:
        ext["expected_accuracy"] = result.expected_accuracy
    if job.return_particles:
        ext["particles"] = [{"index": i, "text": p.text, "weight": p.weight, "score": p.score,
                             "finish_reason": p.finish_reason, "answer": p.answer, "steps": p.steps,
                             "num_tokens": len(p.token_ids)}
                            for i, p in enumerate(result.particles)]
    return ext


def _usage(jobs: list[Job], results: list[PFResult]) -> dict:
    prompt = sum(r.stats.prompt_tokens or j.prompt_tokens for j, r in zip(jobs, results))
    completion = sum(r.stats.generated_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _round_info(engine: EngineFront, trace: StepTrace, round_no: int) -> dict:
    leader = max(range(len(trace.log_weights)), key=lambda i: trace.log_weights[i]) if trace.log_weights else 0
    return {"round": round_no, "sweep": trace.sweep, "leader": leader,
            "leader_text": engine.detokenize(trace.tokens[leader]) if trace.tokens else "",
            "scores": trace.scores, "weights": [math.exp(w) for w in trace.log_weights], "ess": trace.ess,
            "ancestors": trace.ancestors}


# ------------------------------------------------------------------------------------------------
# The app


class _JSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return _json(content).encode("utf-8", "backslashreplace")


def create_app(engine: EngineFront, config: ServerConfig | None = None, aengine: Backend | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``; ``aengine`` runs its requests (default: one
    :class:`AsyncEngine` that batches them all)."""
    config = config or ServerConfig()
    name = config.served_model_name or Path(engine.config.model).name
    aengine = aengine or AsyncEngine(engine)
    created = int(time.time())
    docs = config.enable_docs
    app = FastAPI(title="pfengine", description="OpenAI-compatible server with particle-filtering search",
                  default_response_class=_JSONResponse, docs_url="/docs" if docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)
    app.add_middleware(Gate, config=config.gate)
    app.state.engine, app.state.aengine, app.state.model_name = engine, aengine, name

    @app.exception_handler(APIError)
    async def _api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
        return _JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def _internal_error(_: HTTPRequest, e: Exception) -> JSONResponse:
        log.exception("unhandled server error", exc_info=e)
        return _JSONResponse(APIError(500, f"internal server error ({type(e).__name__})", kind="server_error").body(),
                             status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        parts = []
        for err in errors[:3]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {err.get('msg')}")
        first = ".".join(str(x) for x in errors[0].get("loc", ()) if x != "body") if errors else None
        return _JSONResponse(APIError(422, "; ".join(parts), first or None).body(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        return _JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name} | await aengine.health()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "pfengine",
                                            "max_model_len": engine.max_len}]}

    def check_size(body: _Body, prompts: list, chars: list[int]) -> None:
        """Refuse what is too big before any tokenising: prompt length, prompts x n."""
        limit = engine.config.max_prompt_chars
        for k, c in enumerate(chars):
            if c > limit:
                raise APIError(400, f"prompt: {c} characters; this server allows at most {limit} "
                                    f"(--max-prompt-chars)", "prompt" if len(chars) == 1 else f"prompt[{k}]")
        if len(prompts) * body.n > config.max_completions:
            raise APIError(400, f"n: {len(prompts)} prompt(s) x n={body.n} = {len(prompts) * body.n} completions; "
                                f"this server allows at most {config.max_completions} (--max-completions)", "n")

    def chat_job(messages: list[dict], body: ChatBody, max_tokens: int | None) -> Job:
        try:
            prompt = chat_prompt(engine.tokenizer, messages, body.continue_final_message, body.add_generation_prompt)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e) if str(e).startswith(("messages", "continue")) else f"messages: {e}",
                           "messages") from None
        except Exception as e:  # the chat template refused the conversation
            raise APIError(400, f"messages: the chat template refused them: {type(e).__name__}: {e}",
                           "messages") from None
        return build_job(engine, prompt, body, max_tokens, plain_max_tokens=SamplingParams().max_tokens)

    def check_model(body: _Body) -> None:
        if body.model is not None and body.model != name:
            raise APIError(404, f"model: the model {body.model!r} does not exist; this server serves {name!r}",
                           "model", "model_not_found")
        for key, value in (body.model_extra or {}).items():
            if key in UNSUPPORTED and not (value in (None, False, 0, [], {}) or value == {"type": "text"}
                                           or (key == "best_of" and value == body.n)):
                raise APIError(400, f"{key}: not supported by pfengine (got {value!r})", key)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        check_model(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise APIError(400, "prompt: must not be empty", "prompt")
        if body.stream and len(prompts) > 1:
            raise APIError(400, "prompt: streaming takes a single prompt", "prompt")
        check_size(body, prompts, [len(p) for p in prompts])
        jobs = await asyncio.to_thread(
            lambda: [build_job(engine, p, body, body.max_tokens, plain_max_tokens=16) for p in prompts])
        if body.stream:
            return await _stream(engine, aengine, http, jobs[0], name, chat=False,
                                 include_usage=bool((body.stream_options or {}).get("include_usage")))
        results = await _run_all(aengine, http, jobs)
        choices = []
        for k, (job, result) in enumerate(zip(jobs, results)):
            for j, (text, reason, _) in enumerate(_choices(engine, job, result)):
                choices.append({"index": k * body.n + j, "text": text, "logprobs": None, "finish_reason": reason})
        out = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
               "model": name, "choices": choices, "usage": _usage(jobs, results)}
        if not jobs[0].plain:
            exts = [_extension(j, r) for j, r in zip(jobs, results)]
            out["pfengine"] = exts[0] if isinstance(body.prompt, str) else exts
        return out

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HTTPRequest):
        check_model(body)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError(400, "max_completion_tokens: give max_tokens or max_completion_tokens, not both",
                           "max_completion_tokens")
        messages = [m.model_dump() for m in body.messages]
        check_size(body, [messages], [sum(_chars(m.get("content")) for m in messages)])
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        job = await asyncio.to_thread(chat_job, messages, body, max_tokens)
        if body.stream:
            return await _stream(engine, aengine, http, job, name, chat=True,
                                 include_usage=bool((body.stream_options or {}).get("include_usage")))
        result = (await _run_all(aengine, http, [job]))[0]
        choices = [{"index": j, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": reason} for j, (text, reason, _) in enumerate(_choices(engine, job, result))]
        out = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
               "model": name, "choices": choices, "usage": _usage([job], [result])}
        if not job.plain:
            out["pfengine"] = _extension(job, result)
        return out

    return app


def _http_name(field: str) -> str:
    """An API option as an HTTP client knows it: a body field, a ``search`` field, or a server flag."""
    if field in _ENGINE_FIELDS:
        return f"the server's --{field.replace('_', '-')}"
    if field in SEARCH_FIELDS or field in SAMPLING_KEYS:
        return f"search.{'particles' if field == 'n_particles' else field}"
    return field


def _invalid(e: InvalidArgument) -> APIError:
    message = e.render(_http_name)
    code = "kv_cache_exhausted" if "KV blocks" in message else None
    return APIError(400, message, _http_name(e.field), code)


def _chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p.get("text", "")) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def _engine_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, InvalidArgument):
        return _invalid(e)
    if isinstance(e, OutOfBlocks):
        return APIError(400, f"the request does not fit in the KV cache: {e}", None, "kv_cache_exhausted")
    if isinstance(e, (ValueError, TypeError)):
        message = str(e)
        code = "kv_cache_exhausted" if "KV blocks" in message or "KV cache" in message else None
        param = message.split(":")[0] if ":" in message and " " not in message.split(":")[0] else None
        return APIError(400, message, param, code)
    log.exception("engine failure", exc_info=e)
    return APIError(500, f"engine failure: {type(e).__name__}: {e}", kind="server_error")


async def _run_all(aengine: Backend, http: HTTPRequest, jobs: list[Job]) -> list[PFResult]:
    """Run the jobs concurrently; a client that goes away cancels them (which aborts them in the
    engine and frees their blocks)."""
    tasks = [asyncio.ensure_future(aengine.agenerate(j.request)) for j in jobs]
    everything = asyncio.gather(*tasks)
    try:
        while True:
            done, _ = await asyncio.wait({everything}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                break
            if await http.is_disconnected():
                raise APIError(499, "client disconnected", code="client_disconnected")
        return everything.result()
    except BaseException as e:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if isinstance(e, Exception):
            raise _engine_error(e) from None
        raise


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator however the response ends. Starlette leaves it suspended when a
    disconnect cancels the send of a chunk, and then only garbage collection would run its cleanup
    (the abort of the engine request)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _stream(engine: EngineFront, aengine: Backend, http: HTTPRequest, job: Job, name: str, chat: bool,
                  include_usage: bool) -> StreamingResponse:
    events = aengine.astream(job.request)
    first = asyncio.ensure_future(events.__anext__())
    await asyncio.sleep(0)  # runs add_request: a bad request fails here, before any byte is sent
    if first.done() and first.exception() is not None:
        await events.aclose()
        raise _engine_error(first.exception())
    return _ClosingStreamingResponse(_sse(engine, events, first, job, name, chat, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _sse(engine: EngineFront, events: AsyncIterator[Event], first: asyncio.Future, job: Job, name: str, chat: bool,
               include_usage: bool) -> AsyncIterator[str]:
    cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    n_out = job.n if not job.plain else job.request.search.n_particles
    sent = [""] * n_out

    def chunk(deltas: dict[int, str], finish: dict[int, str] | None = None, ext: dict | None = None,
              usage: dict | None = None, role: bool = False) -> str:
        finish = finish or {}
        choices = []
        for i in sorted(set(deltas) | set(finish)):
            if chat:
                delta = {"role": "assistant", "content": deltas.get(i, "")} if role else {"content": deltas.get(i, "")}
                choices.append({"index": i, "delta": delta, "logprobs": None, "finish_reason": finish.get(i)})
            else:
                choices.append({"index": i, "text": deltas.get(i, ""), "logprobs": None,
                                "finish_reason": finish.get(i)})
        body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk" if chat else "text_completion",
                                "created": created, "model": name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        if ext is not None:
            body["pfengine"] = ext
        return f"data: {_json(body)}\n\n"

    def advance(i: int, text: str) -> str:
        if text.startswith(sent[i]) and len(text) > len(sent[i]):
            delta, sent[i] = text[len(sent[i]):], text
            return delta
        return ""

    search = job.request.search
    rounds = 0
    try:
        if chat:
            yield chunk({i: "" for i in range(n_out)}, role=True)
        event = await first
        while True:
            if event.result is None and event.trace is not None:
                rounds += 1
                tr = event.trace
                if job.plain:
                    deltas = {i: advance(i, stream_safe(engine.detokenize(t), job.stops, job.include_stop))
                              for i, t in enumerate(tr.tokens)}
                    yield chunk({i: d for i, d in deltas.items() if d} or {0: ""})
                else:
                    settled = make_method(search).settled_text and tr.sweep == search.iterations - 1
                    delta = ""
                    if settled:
                        alive = [tr.tokens[a] for a in tr.ancestors] if tr.ancestors is not None else tr.tokens
                        delta = advance(0, stream_safe(engine.detokenize(common_prefix(alive)), job.stops,
                                                       job.include_stop))
                    yield chunk({0: delta}, ext=_round_info(engine, tr, rounds))
            if event.result is not None:
                result = event.result
                deltas, finish = {}, {}
                for j, (text, reason, _) in enumerate(_choices(engine, job, result)):
                    if not text.startswith(sent[j]):
                        log.warning("streamed text of choice %d is not a prefix of the final text", j)
                    deltas[j], finish[j] = text[len(sent[j]):] if text.startswith(sent[j]) else "", reason
                    sent[j] = text
                ext = None if job.plain else _extension(job, result) | {"text": sent[0]}
                yield chunk(deltas, finish, ext=ext)
                if include_usage:
                    yield chunk({}, usage=_usage([job], [result]))
                break
            event = await events.__anext__()
        yield "data: [DONE]\n\n"
    except Exception as e:  # the stream has started: report the error in-band, then end it
        err = _engine_error(e)
        yield f"data: {_json(err.body())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if not first.done():
            first.cancel()  # the cancellation reaches the engine stream, which aborts the request
        else:
            try:
                await events.aclose()  # aborts the request (frees its blocks) unless it finished
            except RuntimeError:  # still running in another task: cancelled along with it
                pass


def _json(obj: Any) -> str:
    return json.dumps(_finite(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float as None: JSON has no NaN or infinity."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def serve(engine: EngineFront, host: str = "127.0.0.1", port: int = 8000, config: ServerConfig | None = None,
          log_level: str = "info", aengine: Backend | None = None) -> None:
    """Run the server in the foreground (``pfengine serve``); ``aengine`` as in :func:`create_app`."""
    import uvicorn

    config = config or ServerConfig()
    if not is_loopback(host) and config.gate.api_key is None:
        log.warning("serving on %s, reachable from other machines, WITHOUT an API key: anyone who can reach it "
                    "can run requests; set --api-key (or PFENGINE_API_KEY)", host)
    uvicorn.run(create_app(engine, config, aengine), host=host, port=port, log_level=log_level)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
