"""System 2: its_hub's ``ParticleFiltering`` (its-hub core) over in-process adapters that behave like
its OpenAI-compatible backend: every step each particle is a fresh request that re-sends the prompt
plus all its steps (a full prefill, no cache kept between calls), and the PRM re-scores every
particle's whole prefix. The compute behind the adapters is a pfengine ``Engine`` used as a plain
engine (one single-sample request per particle, no PF-aware caching), so this system differs from
pfengine's native PF only in the algorithmic recompute.

Token ids are carried, not text: the LM adapter remembers the ids of every step string it returned
and rebuilds prompt + steps exactly (its_hub hands the adapters strings; re-tokenising random ids
would change them). ``VllmHttpLM`` / ``VllmHttpPRM`` in bench/vllm_http.py do the same over HTTP.

its_hub details that matter for equal work: ``StepGeneration(max_steps=m)`` produces m + 1 steps
(a particle stops when it already had m steps before the call), so S steps need ``max_steps=S-1``;
``ParticleFiltering`` resamples multinomially (``random.choices``) whatever ``resampling_method``."""
from __future__ import annotations

import asyncio
import random
import time
from typing import Any, Awaitable, Callable

from bench.common import NEVER_DELIMITER, distinct_prefixes, peak_rss_mb
from bench.workload import Checkpoints, Workload


class IdBook:
    """Text <-> token ids for its_hub's string interface: prompts by text, and every response
    (concatenation of step strings) by the ids that produced it."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.prompts: dict[str, list[int]] = {}
        self.responses: dict[str, list[int]] = {"": []}
        self.sequences: dict[str, list[list[int]]] = {}
        """Every generated id sequence (without the prompt), per prompt text: the trie of the run."""
        self.collisions = 0
        self.generated = 0

    def ids(self, prompt: str, response: str) -> list[int]:
        try:
            return self.prompts[prompt] + self.responses[response]
        except KeyError as e:
            raise KeyError(f"its_hub sent text the adapter did not produce: {str(e)[:80]}") from None

    def add_step(self, prompt: str, response: str, new_ids: list[int]) -> str:
        """Record that ``response`` was continued by ``new_ids``; the step's text (what its_hub gets)."""
        text = self.decode(new_ids)
        ids = self.responses[response] + list(new_ids)
        key = response + text
        old = self.responses.get(key)
        if old is not None and old != ids:
            self.collisions += 1
            raise RuntimeError("two different id sequences decode to the same text; the adapter cannot tell "
                               "them apart (use another seed)")
        self.responses[key] = ids
        self.generated += len(new_ids)
        self.sequences.setdefault(prompt, []).append(ids)
        return text

    def union(self) -> int:
        return sum(distinct_prefixes(len(self.prompts[p]), seqs) for p, seqs in self.sequences.items())


def messages_of(conversation: Any) -> tuple[str, str]:
    """(user prompt text, assistant response so far) of one its_hub conversation."""
    user, assistant = None, ""
    for m in conversation:
        role = m.role if hasattr(m, "role") else m["role"]
        content = m.content if hasattr(m, "content") else m["content"]
        if hasattr(m, "extract_text_content"):
            content = m.extract_text_content()
        if role == "user":
            user = content
        elif role == "assistant":
            assistant = content or ""
    assert user is not None, "conversation without a user message"
    return user, assistant


class Batcher:
    """Concurrent calls from one event loop (the P prompts' PF runs) become one batch call."""

    def __init__(self, run_batch: Callable[[list], list]) -> None:
        self.run_batch = run_batch
        self.pending: list[tuple[list, asyncio.Future]] = []

    async def __call__(self, items: list) -> list:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((items, fut))
        if len(self.pending) == 1:
            for _ in range(4):  # let every runnable coroutine of the loop add its call
                await asyncio.sleep(0)
            batch, self.pending = self.pending, []
            flat = [x for items_, _ in batch for x in items_]
            try:
                out = self.run_batch(flat)
            except Exception as e:  # noqa: BLE001
                for _, f in batch:
                    f.set_exception(e)
            else:
                k = 0
                for items_, f in batch:
                    f.set_result(out[k:k + len(items_)])
                    k += len(items_)
        return await fut


class IdPromptTokenizer:
    """Wraps an Engine's tokenizer so a request prompt can be given as token ids: the engine encodes
    a string prompt with ``tokenizer.encode``; a registered marker string encodes to its ids.
    (pfengine's Request takes text or chat messages only; see the report.)"""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self._ids: dict[str, list[int]] = {}

    def marker(self, ids: list[int]) -> str:
        key = f"\x00pfbench-ids:{len(self._ids)}\x00"
        self._ids[key] = list(ids)
        return key

    def release(self) -> None:
        self._ids.clear()

    def encode(self, text, *args, **kwargs):
        ids = self._ids.get(text) if isinstance(text, str) else None
        return list(ids) if ids is not None else self._tok.encode(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def _abstract_bases():
    from its_hub.api import AbstractLanguageModel, AbstractProcessRewardModel

    return AbstractLanguageModel, AbstractProcessRewardModel


def make_lm(generate_ids: Callable[[list[list[int]], int, float], Awaitable[list[list[int]]]], book: IdBook):
    """its_hub ``AbstractLanguageModel`` whose backend call is ``generate_ids(seqs, max_tokens, temperature)``."""
    AbstractLanguageModel, _ = _abstract_bases()

    class IdLM(AbstractLanguageModel):
        async def agenerate(self, messages, stop=None, max_tokens=None, max_completion_tokens=None,
                            temperature=None, include_stop_str_in_output=None, **kwargs):
            single = not isinstance(messages[0], list)
            convs = [messages] if single else list(messages)
            limit = max_completion_tokens if max_completion_tokens is not None else max_tokens
            assert stop is None and limit, "the benchmark's steps end by token count"
            temps = temperature if isinstance(temperature, list) else [temperature] * len(convs)
            assert len(set(temps)) == 1
            pairs = [messages_of(c) for c in convs]
            new = await generate_ids([book.ids(p, r) for p, r in pairs], limit, temps[0])
            out = [{"role": "assistant", "content": book.add_step(p, r, ids)} for (p, r), ids in zip(pairs, new)]
            return out[0] if single else out

        def generate(self, messages, stop=None, **kwargs):
            return asyncio.run(self.agenerate(messages, stop=stop, **kwargs))

    return IdLM()


def make_prm(score_ids: Callable[[list[list[int]]], Awaitable[list[float]]], book: IdBook):
    """its_hub ``AbstractProcessRewardModel`` scoring prompt + whole response with ``score_ids``."""
    _, AbstractProcessRewardModel = _abstract_bases()

    class IdPRM(AbstractProcessRewardModel):
        async def ascore(self, prompt_or_messages, response_or_responses):
            from its_hub.api import ChatMessages

            prompt = ChatMessages.from_prompt_or_messages(prompt_or_messages).to_prompt()
            single = isinstance(response_or_responses, str)
            responses = [response_or_responses] if single else list(response_or_responses)
            scores = await score_ids([book.ids(prompt, r) for r in responses])
            return scores[0] if single else scores

        def score(self, prompt_or_messages, response_or_responses):
            return asyncio.run(self.ascore(prompt_or_messages, response_or_responses))

    return IdPRM()


async def run_its_hub_pf(lm, prm, book: IdBook, wl: Workload, prompt_texts: list[str], seed: int) -> dict:
    """its_hub's ParticleFiltering on every prompt, the prompts concurrently (one event loop)."""
    from its_hub.core.algorithms.particle_gibbs import ParticleFiltering
    from its_hub.core.lms.step_generation import StepGeneration

    random.seed(seed)
    import numpy as np

    np.random.seed(seed)
    sg = StepGeneration(max_steps=wl.steps - 1, tokens_per_step=wl.step_tokens, temperature=wl.temperature)
    pf = ParticleFiltering(sg, prm, resampling_method="systematic")  # (ignored by its_hub 1.2: multinomial)
    results = await asyncio.gather(*[pf.ainfer(lm, text, budget=wl.particles, return_response_only=False)
                                     for text in prompt_texts])
    return {"steps_used": [max(r.steps_used_lst) for r in results]}


class ItsHubPF:
    """its_hub ParticleFiltering + in-process adapters on two pfengine Engines (policy without PRM;
    PRM engine), each call a fresh request."""

    system = "its_hub"

    def __init__(self, ck: Checkpoints, prm_kind: str = "model") -> None:
        from pfengine import Engine, EngineConfig

        self.ck, self.prm_kind = ck, prm_kind
        self.variant = "separate PRM" if prm_kind == "model" else "value head"
        self.lm_engine = Engine(EngineConfig(model=ck.policy, prm=None, num_blocks=8192, block_size=16,
                                             max_particles=600))
        prm = ck.prm_dir if prm_kind == "model" else ck.value_head
        self.prm_engine = Engine(EngineConfig(model=ck.policy, prm=prm, num_blocks=512, block_size=16,
                                              max_particles=8))
        for e in (self.lm_engine, self.prm_engine):
            e.tokenizer = IdPromptTokenizer(e.tokenizer)
        self.decode = lambda ids: self.lm_engine.tokenizer.decode(ids)
        self._rng = random.Random(0)

    # --- backend calls (synchronous engine work inside the event loop: its_hub awaits them in turn)
    def _generate_batch(self, items: list[tuple[list[int], int, float]]) -> list[list[int]]:
        from pfengine import Request, SamplingParams, SearchParams

        tok = self.lm_engine.tokenizer
        reqs = [Request(prompt=tok.marker(ids), search=SearchParams(method="self_consistency", n_particles=1),
                        sampling=SamplingParams(temperature=t, top_p=1.0, top_k=0, seed=self._rng.getrandbits(62),
                                                max_steps=1, max_step_tokens=n, max_tokens=n,
                                                step_delimiter=NEVER_DELIMITER, stop_on_eos=False))
                for ids, n, t in items]
        try:
            results = self.lm_engine.generate(reqs)
        finally:
            tok.release()
        return [r.particles[0].token_ids for r in results]

    def _score_batch(self, seqs: list[list[int]]) -> list[float]:
        """Each full prefix as one step of a fresh solution: prefill prompt + steps, one tag, the head."""
        tok = self.prm_engine.tokenizer
        out = []
        for ids in seqs:
            n_prompt = self._prompt_len(ids)
            out.append(self.prm_engine.score_steps(tok.marker(ids[:n_prompt]), [ids[n_prompt:]], "model")[-1])
        tok.release()
        return out

    def _prompt_len(self, ids: list[int]) -> int:
        for p in self.book.prompts.values():
            if ids[:len(p)] == p:
                return len(p)
        raise KeyError("unknown prompt")

    def _adapters(self, wl: Workload, prompt_texts: list[str], prompt_ids: list[list[int]]):
        self.book = IdBook(self.decode)
        self.book.prompts = dict(zip(prompt_texts, prompt_ids))
        gen = Batcher(self._generate_batch)
        score = Batcher(self._score_batch)

        async def generate_ids(seqs, max_tokens, temperature):
            return await gen([(s, max_tokens, temperature) for s in seqs])

        async def score_ids(seqs):
            return await score(seqs)

        return make_lm(generate_ids, self.book), make_prm(score_ids, self.book)

    def warmup(self, wl: Workload, prompt_ids: list[list[int]]) -> None:
        from dataclasses import replace

        self.run(replace(wl, steps=1, particles=min(wl.particles, 4)), prompt_ids, seed=10_000)

    def run(self, wl: Workload, prompt_ids: list[list[int]], seed: int) -> dict:
        texts = wl.prompt_texts()
        lm, prm = self._adapters(wl, texts, prompt_ids)
        self._rng = random.Random(seed)
        b_lm, b_prm = self.lm_engine.stats(), self.prm_engine.stats()
        t0 = time.perf_counter()
        info = asyncio.run(run_its_hub_pf(lm, prm, self.book, wl, texts, seed))
        wall = time.perf_counter() - t0
        a_lm, a_prm = self.lm_engine.stats(), self.prm_engine.stats()
        prm_key = "prm_tokens_forwarded" if self.prm_kind == "model" else "policy_tokens_forwarded"
        return {"wall_s": wall, "generated_tokens": self.book.generated,
                "policy_tokens": a_lm["policy_tokens_forwarded"] - b_lm["policy_tokens_forwarded"],
                "prm_tokens": a_prm[prm_key] - b_prm[prm_key],
                "prm_tags": a_prm.get("prm_tags_forwarded", 0) - b_prm.get("prm_tags_forwarded", 0),
                "union_tokens": self.book.union(), "steps_used": info["steps_used"], "peak_rss_mb": peak_rss_mb()}

