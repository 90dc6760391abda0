"""its_hub on pfengine: its language-model, process-reward-model and outcome-reward-model interfaces
backed by an in-process :class:`~pfengine.engine.Engine`, so its_hub's algorithms (particle filtering,
particle Gibbs, beam search, self-consistency, best-of-N, ...) run on pfengine unchanged::

    from its_hub.core.algorithms.particle_gibbs import ParticleFiltering
    from its_hub.core.lms.step_generation import StepGeneration
    from pfengine.its_hub_adapter import EngineLanguageModel, EngineProcessRewardModel

    lm = EngineLanguageModel(engine, max_tokens=256)
    prm = EngineProcessRewardModel(engine)            # the engine's own PRM
    pf = ParticleFiltering(StepGeneration(step_token="\\n\\n", max_steps=8), prm)
    pf.infer(lm, "Start with 47. Add 38. Subtract 29. Add 16. Subtract 45. Add 21. Subtract 30. What is the result?", budget=8)

Every call is a batch of engine requests, one per conversation, each a single independent sample
(``method="self_consistency"``, one particle, one step that ends at the first stop string). Calls made
concurrently from one event loop (its_hub's orchestrator sends a self-consistency budget as N
single calls) are gathered into one engine batch. A conversation ending in an assistant message is
continued ("continue final message"), which is how its_hub's step generation asks for the next step.

Particles end at end-of-text without a ``stop_token``: its_hub's step generation only knows a
particle stopped when its ``stop_token`` appears in a step, and otherwise keeps asking for steps
until ``max_steps``. When the model ended a conversation's answer (it sampled EOS), the adapter
answers every later request to continue that conversation with an empty step, without running the
model; the particle's text and (through :class:`EngineProcessRewardModel`, which ignores trailing
step delimiters) its score stay as they were, as a finished particle's do in the paper's PF.

The adapters drive the engine from one worker thread per engine; they must be its only user (do not
run an :class:`~pfengine.async_engine.AsyncEngine` or the server on the same engine at the same time).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import random
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from its_hub.api import (AbstractLanguageModel, AbstractOutcomeRewardModel, AbstractProcessRewardModel, ChatMessage,
                         ChatMessages, GenerationUsage)

from pfengine.config import AGGREGATIONS, Request, SamplingParams, SearchParams
from pfengine.engine import Engine
from pfengine.prompting import NO_DELIMITER, chat_prompt, normalise_messages, stop_list, trim_at_stop
from pfengine.state import PFResult

__all__ = ["EngineLanguageModel", "EngineOutcomeRewardModel", "EngineProcessRewardModel"]


# ------------------------------------------------------------------------------------------------
# One worker thread per engine: batches of requests and PRM scoring, never two at once.


class _EngineWorker:
    GATHER_SECONDS = 0.002
    """After the first call of a batch arrives, wait until no other call has arrived for this long."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pfengine-its-hub")
        self._pending: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    async def call(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def generate(self, requests: list[Request]) -> list[PFResult | Exception]:
        """Results (or the exception of each failed request), in order; concurrent callers of one
        event loop share one engine batch."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            pending = self._pending.setdefault(loop, [])
            pending.append((requests, future))
            first = len(pending) == 1
        if first:
            loop.create_task(self._flush(loop))
        return await future

    async def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        seen = -1
        while True:
            with self._lock:
                count = len(self._pending.get(loop, []))
            if count == seen:
                break
            seen = count
            await asyncio.sleep(self.GATHER_SECONDS)
        with self._lock:
            batch = self._pending.pop(loop, [])
        flat = [r for requests, _ in batch for r in requests]
        try:
            outcomes = await self.call(lambda: self._run(flat))
        except BaseException as e:  # an engine fault: every caller of the batch sees it
            for _, future in batch:
                if not future.done():
                    future.set_exception(e if isinstance(e, Exception) else RuntimeError("batch cancelled"))
            if not isinstance(e, Exception):
                raise
            return
        k = 0
        for requests, future in batch:
            if not future.done():
                future.set_result(outcomes[k:k + len(requests)])
            k += len(requests)

    def _run(self, requests: list[Request]) -> list[PFResult | Exception]:
        """In the worker thread: add every request (a bad one fails alone), step until all are done."""
        engine = self.engine
        out: list[PFResult | Exception | None] = [None] * len(requests)
        ids: dict[int, int] = {}
        for k, request in enumerate(requests):
            try:
                ids[engine.add_request(request)] = k
            except (ValueError, TypeError) as e:
                out[k] = e
        try:
            while any(out[k] is None for k in ids.values()):
                for event in engine.step():
                    k = ids.get(event.request_id)
                    if k is None:
                        continue
                    if event.error is not None:
                        out[k] = event.error
                    elif event.result is not None:
                        out[k] = event.result
        except BaseException:
            for rid, k in ids.items():
                if out[k] is None:
                    engine.abort(rid)
            raise
        return out  # type: ignore[return-value]


_WORKERS: weakref.WeakKeyDictionary[Engine, _EngineWorker] = weakref.WeakKeyDictionary()
_WORKERS_LOCK = threading.Lock()


def _worker(engine: Engine) -> _EngineWorker:
    with _WORKERS_LOCK:
        w = _WORKERS.get(engine)
        if w is None:
            w = _WORKERS[engine] = _EngineWorker(engine)
        return w


def _messages(conversation: Any, system_prompt: str | None) -> list[dict[str, str]]:
    if isinstance(conversation, (str, ChatMessages)):
        conversation = ChatMessages.from_prompt_or_messages(conversation).to_chat_messages()
    msgs = normalise_messages(m.to_dict() if isinstance(m, ChatMessage) else m for m in conversation)
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    return msgs


def _key(msgs: list[dict[str, str]]) -> str:
    """A conversation's identity for "did the model end it": trailing whitespace of the last message
    does not count (its_hub appends the step delimiter to a particle's text before continuing it)."""
    parts = [(m["role"], m["content"]) for m in msgs[:-1]] + [(msgs[-1]["role"], msgs[-1]["content"].rstrip())]
    return hashlib.sha1(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Language model


class EngineLanguageModel(AbstractLanguageModel):
    """its_hub's ``AbstractLanguageModel`` on a pfengine :class:`Engine`.

    Responses are ``{"role": "assistant", "content": text}``; with ``stop`` the text ends before the
    first stop string (or with it, ``include_stop_str_in_output=True``), as with vLLM. ``max_tokens``,
    ``temperature``, ``top_p``, ``top_k`` and ``seed`` are the defaults for calls that do not set
    them; with a ``seed`` the adapter's whole sequence of samples is reproducible. A conversation
    whose assistant message the model ended (EOS) is answered with an empty step from then on.
    """

    MAX_ENDED = 1 << 18
    """Ended conversations remembered (as 40-byte digests); the oldest are forgotten beyond this."""

    def __init__(self, engine: Engine, max_tokens: int = 256, temperature: float = 0.8, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, system_prompt: str | None = None) -> None:
        self.engine = engine
        self.max_tokens, self.temperature, self.top_p, self.top_k = max_tokens, temperature, top_p, top_k
        self.system_prompt = system_prompt
        self._seeds = random.Random(seed)
        self._worker = _worker(engine)
        self._ended: OrderedDict[str, None] = OrderedDict()
        """Keys of conversations whose assistant message the model ended with EOS (oldest first)."""
        SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens)  # validate

    async def agenerate(self, messages: list[ChatMessage] | list[list[ChatMessage]],
                        stop: str | list[str] | None = None,
                        max_tokens: int | None = None, max_completion_tokens: int | None = None,
                        temperature: float | list[float] | None = None, include_stop_str_in_output: bool | None = None,
                        tools: list[dict] | None = None, tool_choice: str | dict | None = None,
                        response_format: dict | None = None, usage_accumulator: GenerationUsage | None = None,
                        top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                        **kwargs: Any) -> dict | list[dict]:
        """One conversation -> one response dict; a list of conversations -> a list, in one engine batch."""
        if not messages:
            raise ValueError("messages: must not be empty")
        single = not isinstance(messages[0], list)
        conversations = [messages] if single else list(messages)
        temperatures = temperature if isinstance(temperature, list) else [temperature] * len(conversations)
        if len(temperatures) != len(conversations):
            raise ValueError(f"temperature: {len(temperatures)} values for {len(conversations)} conversations")
        if tools or tool_choice not in (None, "none"):
            raise ValueError("tools: tool calls are not supported by pfengine")
        if response_format is not None:
            raise ValueError("response_format: structured outputs are not supported by pfengine")
        if max_tokens is not None and max_completion_tokens is not None:
            raise ValueError("max_completion_tokens: give max_tokens or max_completion_tokens, not both")
        limit = max_completion_tokens if max_completion_tokens is not None else max_tokens
        stops = stop_list(stop)
        msgs = [_messages(conv, self.system_prompt) for conv in conversations]
        live = [k for k, m in enumerate(msgs) if _key(m) not in self._ended]
        requests = [self._request(msgs[k], stops, limit, temperatures[k], top_p, top_k,
                                  None if seed is None else seed + k) for k in live]
        outcomes = await self._worker.generate(requests) if requests else []
        texts = [""] * len(msgs)  # a conversation the model already ended gets an empty step
        for k, outcome in zip(live, outcomes):
            if isinstance(outcome, Exception):
                raise outcome
            texts[k], stopped = trim_at_stop(outcome.particles[0].text, stops, bool(include_stop_str_in_output))
            if outcome.particles[0].finish_reason == "eos" and not stopped:
                self._remember_ended(msgs[k], texts[k])
            if usage_accumulator is not None:
                usage_accumulator.add(outcome.stats.prompt_tokens, outcome.stats.generated_tokens)
        responses = [{"role": "assistant", "content": text} for text in texts]
        return responses[0] if single else responses

    def _remember_ended(self, msgs: list[dict[str, str]], text: str) -> None:
        """The conversation ``msgs`` + ``text`` ended at EOS: later requests to continue it get an empty step."""
        if msgs[-1]["role"] == "assistant":
            ended = msgs[:-1] + [{"role": "assistant", "content": msgs[-1]["content"] + text}]
        else:
            ended = msgs + [{"role": "assistant", "content": text}]
        self._ended[_key(ended)] = None
        if len(self._ended) > self.MAX_ENDED:
            self._ended.popitem(last=False)

    async def agenerate_single(self, messages: list[ChatMessage], stop: str | list[str] | None = None,
                               **kwargs: Any) -> dict:
        """What its_hub's orchestrator calls, once per sample; concurrent calls share an engine batch."""
        kwargs.pop("loop", None)
        return await self.agenerate(messages, stop=stop, **kwargs)

    def generate(self, messages: list[ChatMessage] | list[list[ChatMessage]], stop: str | list[str] | None = None,
                 **kwargs: Any) -> dict | list[dict]:
        """Synchronous :meth:`agenerate` (not from inside a running event loop)."""
        return asyncio.run(self.agenerate(messages, stop=stop, **kwargs))

    def _request(self, msgs: list[dict[str, str]], stops: list[str], max_tokens: int | None,
                 temperature: float | None, top_p: float | None, top_k: int | None, seed: int | None) -> Request:
        prompt = chat_prompt(self.engine.tokenizer, msgs, continue_final_message=msgs[-1]["role"] == "assistant")
        n_tokens = self.max_tokens if max_tokens is None else max_tokens
        sampling = SamplingParams(
            temperature=self.temperature if temperature is None else temperature,
            top_p=self.top_p if top_p is None else top_p, top_k=self.top_k if top_k is None else top_k,
            seed=self._seeds.getrandbits(62) if seed is None else seed,
            max_steps=1, max_step_tokens=max(n_tokens, 1), max_tokens=n_tokens,
            step_delimiter=stops[0] if stops else NO_DELIMITER)
        return Request(prompt=prompt, sampling=sampling, search=SearchParams(method="self_consistency", n_particles=1))


# ------------------------------------------------------------------------------------------------
# Process reward model


class EngineProcessRewardModel(AbstractProcessRewardModel):
    """its_hub's ``AbstractProcessRewardModel`` with the engine's own PRM (value head, PRM model or
    callable). A response is split into steps at ``step_delimiter`` (each step but the last keeps
    it, as the engine's steps do) and scored as the engine scores a particle with those steps after
    the prompt (the conversation rendered with the chat template, as :class:`EngineLanguageModel`
    sends it). The score is the aggregated probability r in [0, 1] (``aggregation`` as in
    :class:`~pfengine.config.SearchParams`)."""

    def __init__(self, engine: Engine, step_delimiter: str = "\n\n", aggregation: str = "model",
                 system_prompt: str | None = None) -> None:
        if engine.prm is None:
            raise ValueError("engine: it has no PRM (set EngineConfig.prm or pass prm_fn to Engine)")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if not step_delimiter:
            raise ValueError("step_delimiter must be a non-empty string")
        self.engine, self.step_delimiter, self.aggregation = engine, step_delimiter, aggregation
        self.system_prompt = system_prompt
        self._worker = _worker(engine)

    def split_steps(self, response: str) -> list[str]:
        """Steps of ``response``; trailing delimiters are not steps (its_hub appends one for every
        empty step of a particle the model ended)."""
        d = self.step_delimiter
        while response.endswith(d):
            response = response[:-len(d)]
        pieces = response.split(d)
        steps = [p + d for p in pieces[:-1]]
        if pieces[-1]:
            steps.append(pieces[-1])
        return steps

    async def ascore(self, prompt_or_messages: str | list[ChatMessage] | ChatMessages,
                     response_or_responses: str | list[str]) -> float | list[float]:
        single = isinstance(response_or_responses, str)
        responses = [response_or_responses] if single else list(response_or_responses)
        prompt = _messages(prompt_or_messages, self.system_prompt)
        scores = await self.score_solutions([(prompt, r) for r in responses])
        return scores[0] if single else scores

    def score(self, prompt_or_messages: str | list[ChatMessage] | ChatMessages,
              response_or_responses: str | list[str]) -> float | list[float]:
        return asyncio.run(self.ascore(prompt_or_messages, response_or_responses))

    async def score_solutions(self, solutions: list[tuple[list[dict[str, str]], str]]) -> list[float]:
        """The score after the last step of each ``(messages, response)`` (0.5: an empty response),
        in one call on the engine's worker."""
        split = [(msgs, self.split_steps(response)) for msgs, response in solutions]
        return await self._worker.call(
            lambda: [self.engine.score_steps(msgs, steps, self.aggregation)[-1] if steps else 0.5
                     for msgs, steps in split])


# ------------------------------------------------------------------------------------------------
# Outcome reward model


class EngineOutcomeRewardModel(AbstractOutcomeRewardModel):
    """its_hub's ``AbstractOutcomeRewardModel`` (what ``BestOfN`` ranks with) from the engine's PRM:
    a conversation's final assistant message is scored as a whole solution after the messages
    before it -- split into steps and aggregated as in :class:`EngineProcessRewardModel` (with
    ``model`` aggregation, the PRM's score of the whole solution)."""

    def __init__(self, engine: Engine, step_delimiter: str = "\n\n", aggregation: str = "model",
                 system_prompt: str | None = None) -> None:
        self.prm = EngineProcessRewardModel(engine, step_delimiter, aggregation, system_prompt)

    async def ascore(self, messages: list[ChatMessage] | ChatMessages | list[list[ChatMessage]],
                     orchestrator: Any = None, **kwargs: Any) -> float | list[float]:
        """One conversation -> one score; a list of conversations -> a list of scores."""
        single = isinstance(messages, ChatMessages) or not (messages and isinstance(messages[0], (list, ChatMessages)))
        conversations = [messages] if single else list(messages)
        scores = await self.prm.score_solutions([self._solution(c) for c in conversations])
        return scores[0] if single else scores

    def score(self, messages: list[ChatMessage] | ChatMessages | list[list[ChatMessage]],
              **kwargs: Any) -> float | list[float]:
        return asyncio.run(self.ascore(messages))

    def _solution(self, conversation: Any) -> tuple[list[dict[str, str]], str]:
        msgs = _messages(conversation, self.prm.system_prompt)
        if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
            raise ValueError("messages: an outcome reward model scores a conversation that ends with the "
                             f"assistant's response, got one ending with a {msgs[-1]['role']!r} message")
        return msgs[:-1], msgs[-1]["content"]
