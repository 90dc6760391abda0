"""The engine: load once, then run many PF requests together over one paged cache per model.

Data flow per iteration: admit (prefill prompt, fork it N ways) -> decode one token for every particle
mid-step, of every request, in one forward -> for requests whose particles all reached a step end:
PRM score -> weights -> resample -> fork -> next step; requests whose particles all finished return.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import replace
from itertools import count
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch.profiler import record_function

from pfengine.cache.block_manager import BlockManager
from pfengine.config import AGGREGATIONS, EngineConfig, InvalidArgument, Request, require
from pfengine.model.checkpoint import PRM_ARCHITECTURES, CheckpointError, read_config
from pfengine.model.decoder import load_decoder
from pfengine.model.tokenizer import check_same_tokenizer, eos_ids, load_tokenizer
from pfengine.kernels.prm_score import head_logit, initial_running, running_to_prob, weigh
from pfengine.prm import CallablePRM, EndedStep, ModelPRM, PRMFn, ValueHeadPRM, load_value_head
from pfengine.prompting import encode_prompt
from pfengine.runner import ModelRunner
from pfengine.sampling import sample
from pfengine.scheduler import Scheduler
from pfengine.search import results
from pfengine.search.round import PRM, finish_round, fork, start
from pfengine.state import Event, PFResult, RequestState

log = logging.getLogger("pfengine")


class Engine:
    def __init__(self, config: EngineConfig, prm_fn: PRMFn | None = None) -> None:
        self.config = config
        model_cfg = read_config(config.model)
        self.tokenizer = load_tokenizer(config.model, model_cfg.vocab_size)
        self.max_len = min(config.max_model_len or model_cfg.max_position_embeddings, model_cfg.max_position_embeddings)
        self.policy = self._runner(config.model)
        self.prm_runner: ModelRunner | None = None
        self.prm = self._load_prm(prm_fn, model_cfg.hidden_size)
        self.eos_ids = eos_ids(config.model, model_cfg.eos_token_ids, self.tokenizer)
        self.scheduler = Scheduler(self.runners, config.max_particles, config.max_overtakes)
        self._token_text: dict[int, str] = {}
        self._driving = threading.Lock()
        self._ids = count()
        self._nodes = count(1)

    def _runner(self, path: str) -> ModelRunner:
        c = self.config
        decoder = load_decoder(path, c.num_blocks, c.block_size, getattr(torch, c.kv_dtype), self.max_len, c.device)
        max_blocks = (self.max_len + c.block_size - 1) // c.block_size
        return ModelRunner(decoder, BlockManager(c.num_blocks, c.block_size, c.max_particles, max_blocks, c.device),
                           c.cuda_graphs)

    def _load_prm(self, prm_fn: PRMFn | None, hidden_size: int) -> PRM | None:
        path, pc = self.config.prm, self.config.prm_config
        if prm_fn is not None:
            if path is not None:
                raise ValueError("give either EngineConfig.prm or prm_fn, not both")
            return CallablePRM(prm_fn)
        if path is None:
            return None
        if Path(path).is_file():
            return ValueHeadPRM(load_value_head(path, hidden_size, self.config.device))
        shepherd = pc.good_token is not None
        prm_cfg = read_config(path)
        if prm_cfg.is_prm == shepherd:
            raise CheckpointError(f"{path}: a PRM directory needs architectures [one of {PRM_ARCHITECTURES}] "
                                  f"(Qwen2.5-Math-PRM layout), or a causal LM with PRMConfig.good_token/bad_token "
                                  f"set (Math-Shepherd style)")
        if prm_cfg.max_position_embeddings < self.max_len:
            raise CheckpointError(f"{path}: the PRM computes at most {prm_cfg.max_position_embeddings} positions "
                                  f"({prm_cfg.context_limit or 'max_position_embeddings'}), fewer than the policy's "
                                  f"{self.max_len}; set EngineConfig.max_model_len <= {prm_cfg.max_position_embeddings}")
        check_same_tokenizer(self.tokenizer, load_tokenizer(path), path)
        ids = [self._token_id(t, path) for t in (pc.step_tag, pc.good_token, pc.bad_token) if t is not None]
        self.prm_runner = self._runner(path)
        return ModelPRM(self.prm_runner, ids[0], (ids[1], ids[2]) if shepherd else None)

    def _token_id(self, token: str, path: str) -> int:
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise CheckpointError(f"{path}: PRM token {token!r} is not a single token of the tokenizer (ids {ids})")
        return ids[0]

    @property
    def runners(self) -> list[ModelRunner]:
        return [self.policy] + ([self.prm_runner] if self.prm_runner else [])

    def stats(self) -> dict[str, int]:
        s = {"policy_tokens_forwarded": self.policy.tokens_forwarded,
             "policy_blocks_in_use": self.policy.blocks.blocks_in_use, "cow_copies": self.policy.cow_copies,
             "preemptions": self.scheduler.preemptions, "recomputed_tokens": self.scheduler.recomputed_tokens}
        if self.prm_runner is not None:
            s |= {"prm_tokens_forwarded": self.prm_runner.tokens_forwarded, "prm_tags_forwarded": self.prm.tags_forwarded,
                  "prm_blocks_in_use": self.prm_runner.blocks.blocks_in_use}
        return s

    def score_steps(self, prompt: str | list[dict], steps: list[str] | list[list[int]],
                    aggregation: str = "model") -> list[float]:
        """The aggregated PRM probability after each of ``steps`` (texts or token ids) of a given
        solution: the same PRM code path a particle holding these steps takes. For adapters that
        score text (its_hub); call it while no request is in flight."""
        if self.prm is None:
            raise ValueError("score_steps: the engine has no PRM (set EngineConfig.prm or pass prm_fn)")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        assert not self.scheduler.running, "score_steps: requests are in flight"
        prompt_text, prompt_ids = encode_prompt(self.tokenizer, prompt)
        ids = [s if isinstance(s, list) else self.tokenizer.encode(s, add_special_tokens=False) for s in steps]
        texts = [s if isinstance(s, str) else self.detokenize(s) for s in steps]
        if isinstance(self.prm, CallablePRM):
            logits = [self.prm.score([EndedStep(-1, torch.empty(0), prompt_text, texts[:k + 1], 0)])[0]
                      for k in range(len(steps))]
        else:
            logits = self._step_logits(prompt_ids, ids, keep_tags=aggregation != "model")
        running, seg, scored, out = initial_running(1, aggregation), torch.tensor([0, 1]), torch.tensor([True]), []
        for logit in logits:
            running, _, _ = weigh(logit.reshape(1).float().cpu(), running, scored, seg, aggregation, 1.0)
            out.append(float(running_to_prob(running, aggregation)[0]))
        return out

    def _step_logits(self, prompt_ids: list[int], steps: list[list[int]], keep_tags: bool) -> list[torch.Tensor]:
        """Step logits of the value head or PRM model for one solution, on a borrowed cache row."""
        row = self.scheduler.free_rows.pop()
        prm = self.prm
        runner = self.policy if isinstance(prm, ValueHeadPRM) else prm.runner
        try:
            hidden, logits = runner.extend([row], [prompt_ids]), []
            for step in steps:
                if isinstance(prm, ModelPRM):
                    hidden = prm.score([EndedStep(row, torch.empty(0), "", [], 0, list(step))], keep_tags=keep_tags)
                elif step:
                    hidden = runner.extend([row], [step])
                logits.append(head_logit(hidden, prm.head)[0] if prm.head is not None else hidden[0])
            return logits
        finally:
            runner.blocks.free(torch.tensor([row], dtype=torch.int64))
            self.scheduler.free_rows.append(row)

    def add_request(self, request: Request) -> int:
        """Validate and queue a request; it joins the running batch at the next round boundary."""
        state = self._prepare(request)
        self.scheduler.waiting.append(state)
        return state.id

    def abort(self, request_id: int) -> bool:
        """Drop a request (e.g. its client went away) and free its blocks. False if unknown."""
        return self.scheduler.abort(request_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def running(self) -> list[RequestState]:
        return self.scheduler.running

    @property
    def waiting(self) -> list[RequestState]:
        return self.scheduler.waiting

    def step(self) -> list[Event]:
        """One engine iteration: admit, decode one token for every particle mid-step, and finish the
        rounds (score -> resample -> fork) of requests whose particles all reached a step end.

        A phase that raises fails the requests it was working on (error events, blocks freed); the
        engine and every other request go on. One thread drives an engine (share it through
        :class:`~pfengine.async_engine.AsyncEngine`); a second concurrent driver is refused."""
        if not self._driving.acquire(blocking=False):
            raise RuntimeError("Engine.step: the engine is being driven by another thread; an Engine is not "
                               "thread-safe (share one through pfengine.async_engine.AsyncEngine)")
        try:
            return self._step()
        finally:
            self._driving.release()

    def _step(self) -> list[Event]:
        admitted = self.scheduler.admit()
        events = self._contain(admitted, self._prefill)
        events += self.scheduler.make_room()
        events += self._contain(list(self.scheduler.running), self._decode)
        at_barrier = [r for r in self.scheduler.running if all(p.step_done or p.finished for p in r.particles)]
        if at_barrier:
            events += self._contain(at_barrier, self._finish_round)
        return events

    def _contain(self, reqs: list[RequestState], phase: Callable[[list[RequestState]], list[Event] | None]
                 ) -> list[Event]:
        if not reqs:
            return []
        try:
            return phase(reqs) or []
        except Exception as error:
            log.exception("engine step failed in %s; failing %d request(s)", phase.__name__, len(reqs))
            return [self.scheduler.fail(r, error) for r in reqs if r in self.scheduler.running]

    def _finish_round(self, at_barrier: list[RequestState]) -> list[Event]:
        with record_function("pfengine::round"):  # PRM score -> weights -> resample -> fork
            finish_round(at_barrier, self.prm, self.runners, self.detokenize)
        events = [Event(r.id, r.trace[-1]) for r in at_barrier]
        for r in [r for r in at_barrier if r.done]:
            self.scheduler.finish(r)
            r.stats.seconds = time.perf_counter() - r.started
            events.append(Event(r.id, None, results.build(r, self.detokenize)))
        return events

    def generate(self, requests: list[Request]) -> list[PFResult]:
        """Run requests to completion, batched together (and with any already queued); results in order.
        However this call ends (an error, Ctrl-C), none of its requests is left in the engine."""
        states = [self._prepare(r) for r in requests]  # all valid before any is queued
        self.scheduler.waiting += states
        pending = {s.id for s in states}
        results: dict[int, PFResult] = {}
        try:
            while pending:
                assert self.has_work, "generate: requests vanished from the engine"
                for event in self.step():
                    if event.request_id not in pending:
                        continue
                    if event.error is not None:
                        raise event.error
                    if event.result is not None:
                        results[event.request_id] = event.result
                        pending.discard(event.request_id)
        finally:
            for i in pending:
                self.abort(i)
        return [results[s.id] for s in states]

    def stream(self, request: Request) -> Iterator[Event]:
        """Run one request (with whatever else is queued), yielding its events as rounds finish.
        Closing the iterator early aborts the request."""
        rid = self.add_request(request)
        done = False
        try:
            while not done:
                for event in self.step():
                    if event.request_id == rid:
                        done = event.error is not None or event.result is not None
                        if event.error is not None:
                            raise event.error
                        yield event
        finally:
            if not done:
                self.abort(rid)

    def _prepare(self, request: Request) -> RequestState:
        """Check a request against the engine's limits and tokenise it. Every error names the option."""
        if not isinstance(request, Request):
            raise InvalidArgument("request", f"expected a pfengine.Request, got {type(request).__name__}")
        request.validate()
        c, search, sampling = self.config, request.search, request.sampling
        require(request.prompt_chars <= c.max_prompt_chars, "prompt",
               f"{request.prompt_chars} characters; EngineConfig.max_prompt_chars is {c.max_prompt_chars}")
        require(search.n_particles <= c.max_request_particles, "n_particles",
               f"{search.n_particles} is over this engine's limit, EngineConfig.max_request_particles="
               f"{c.max_request_particles}")
        require(search.iterations <= c.max_iterations, "iterations",
               f"{search.iterations} is over this engine's limit, EngineConfig.max_iterations={c.max_iterations}")
        if search.uses_prm and self.prm is None:
            raise InvalidArgument("method", f"{search.method!r} needs a PRM: set EngineConfig.prm (a PRM directory "
                                            f"or a value-head .safetensors file) or pass prm_fn to Engine")
        if search.method == "greedy" and not sampling.greedy:
            request = replace(request, sampling=replace(sampling, temperature=0.0))
        text, ids = self._encode(request.prompt)
        n = search.particles_per_sweep
        require(n + 2 <= c.max_particles, "n_particles",
               f"{n} particles{' per sweep' if search.iterations > 1 else ''} need {n + 2} cache rows; "
               f"EngineConfig.max_particles is {c.max_particles}")
        require(len(ids) < self.max_len - 1, "prompt",
                f"{len(ids)} tokens does not fit EngineConfig.max_model_len={self.max_len}")
        room = self.max_len - len(ids) - sampling.max_steps  # PRM step tags need room too
        require(room > 0, "max_steps",
               f"{sampling.max_steps} steps reserve a position per step (PRM step tags), which with the prompt's "
               f"{len(ids)} tokens does not fit EngineConfig.max_model_len={self.max_len}; at most {self.max_len - len(ids) - 1}")
        per_particle = min(sampling.max_tokens, sampling.max_steps * sampling.max_step_tokens, room)
        total = search.n_particles * per_particle
        require(total <= c.max_request_tokens, "max_tokens",
               f"SearchParams.n_particles={search.n_particles} x up to {per_particle} tokens per particle = "
               f"{total} generated tokens, over this engine's limit EngineConfig.max_request_tokens="
               f"{c.max_request_tokens}")
        need = self.scheduler.blocks_to_admit(len(ids), n, sampling.max_step_tokens)
        require(need <= c.num_blocks, "n_particles",
               f"the request needs about {need} KV blocks for its prompt and one step of {n} particles "
               f"(SamplingParams.max_step_tokens={sampling.max_step_tokens}); the cache has {c.num_blocks} "
               f"(raise EngineConfig.num_blocks)")
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        return RequestState(id=next(self._ids), request=request, prompt_ids=ids, prompt_text=text, seed=seed)

    def _encode(self, prompt: str | list[dict]) -> tuple[str, list[int]]:
        try:
            return encode_prompt(self.tokenizer, prompt)
        except Exception as e:  # a chat template may refuse a conversation (e.g. roles out of order)
            raise InvalidArgument("prompt", f"cannot be tokenised: {type(e).__name__}: {e}") from None

    def _prefill(self, admitted: list[RequestState]) -> None:
        """Forward the admitted prompts (each once, into its root row) and fork them to every slot."""
        roots = [r.root_row for r in admitted]
        hidden = self.policy.extend(roots, [r.prompt_ids for r in admitted])
        logits = self.policy.decoder.logits(hidden)
        scored = [r for r in admitted if r.request.search.uses_prm]
        if self.prm_runner is not None and scored:
            self.prm_runner.extend([r.root_row for r in scored], [r.prompt_ids for r in scored])
        for k, r in enumerate(admitted):
            r.started = time.perf_counter()
            r.stats.prompt_tokens = len(r.prompt_ids)
            fork(self.runners, r.rows, [r.root_row] * r.n)
            start(r, logits[k:k + 1], hidden[k:k + 1])

    def _decode(self, running: list[RequestState]) -> None:
        """Sample one token for every particle mid-step and forward them all in one batch through
        the policy. The PRM model reads them later, at the step end (``Particle.prm_lag``).

        Siblings that hold the same sequence and sample the same token are forwarded once; the
        others fork from that one afterwards, so no token is ever computed twice."""
        forwarded: list[tuple[RequestState, int]] = []
        dups: list[tuple[RequestState, int, int]] = []
        tokens: list[int] = []
        for r in running:
            idx = [i for i, p in enumerate(r.particles) if not (p.step_done or p.finished)]
            if not idx:
                continue
            lag = int(self.prm_runner is not None and r.request.search.uses_prm)
            first: dict[tuple[int, int], int] = {}
            with record_function("pfengine::sample"):
                new = sample(r.logits[idx], r.request.sampling, r.generator).tolist()
            for i, t in zip(idx, new):
                p = r.particles[i]
                rep = first.setdefault((p.node, t), i)
                if rep == i:
                    p.node = next(self._nodes)
                    forwarded.append((r, i))
                    tokens.append(t)
                else:
                    p.node = r.particles[rep].node
                    dups.append((r, i, rep))
                p.prm_lag += lag
                self._append(r, p, t)
        if not forwarded:
            return
        with record_function("pfengine::decode"):
            hidden = self.policy.decode(torch.tensor([r.rows[i] for r, i in forwarded]), torch.tensor(tokens))
            logits = self.policy.decoder.logits(hidden)
        for k, (r, i) in enumerate(forwarded):
            r.hidden[i], r.logits[i] = hidden[k], logits[k]
        if dups:
            self._catch_up_prm({(id(r), j): (r, j) for r, _, j in dups}.values())
            for runner in self.runners:
                runner.blocks.assign(torch.tensor([r.rows[i] for r, i, _ in dups]),
                                     torch.tensor([r.rows[j] for r, _, j in dups]))
            for r, i, j in dups:
                r.hidden[i], r.logits[i] = r.hidden[j], r.logits[j]
                r.particles[i].prm_lag = r.particles[j].prm_lag

    def _catch_up_prm(self, sources: Iterable[tuple[RequestState, int]]) -> None:
        """Let the PRM model read the pending tokens of particles that siblings fork from mid-step,
        so the forked PRM rows are complete and no token is read twice."""
        behind = [(r, j) for r, j in sources if r.particles[j].prm_lag]
        if not behind:
            return
        assert self.prm_runner is not None
        self.prm.catch_up([r.rows[j] for r, j in behind],
                          [r.particles[j].tokens[-r.particles[j].prm_lag:] for r, j in behind])
        for r, j in behind:
            r.particles[j].prm_lag = 0

    def _append(self, r: RequestState, p, token: int) -> None:
        sp = r.request.sampling
        p.tokens.append(token)
        r.stats.generated_tokens += 1
        text = self._decode_token(token)
        p.step_text += text
        tail = p.step_text[-(len(text) + len(sp.step_delimiter) - 1):] if text else ""
        step_len = len(p.tokens) - p.step_starts[-1]
        context = self.max_len - len(r.prompt_ids) - sp.max_steps
        if sp.stop_on_eos and token in self.eos_ids:
            p.finish_reason = "eos"
        elif len(p.tokens) >= min(sp.max_tokens, context):
            p.finish_reason = "max_tokens" if sp.max_tokens <= context else "max_model_len"
        if p.finished or sp.step_delimiter in tail or step_len >= sp.max_step_tokens:
            p.step_done = True
            if not p.finished and len(p.step_starts) >= sp.max_steps:
                p.finish_reason = "max_steps"

    def _decode_token(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tokenizer.decode([token])
        return text

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
