"""The engine: load once, then run many PF requests together over one paged cache per model.

Data flow per iteration: admit (prefill prompt, fork it N ways) -> sample and decode one token for
every particle mid-step, of every request, in one batch -> for requests whose particles all reached
a step end: PRM score -> weights -> resample -> fork -> next step; requests whose particles all
finished return. Particles are rows of one :class:`~pfengine.particles.ParticleTable`, so no step of
the loop touches particles one at a time.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import replace
from itertools import count
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.profiler import record_function

from pfengine.cache.block_manager import BlockManager
from pfengine.caches import Caches
from pfengine.config import AGGREGATIONS, EngineConfig, InvalidArgument, Request, require
from pfengine.delimiter import DelimiterMatcher
from pfengine.distributed import DecoderSpec, Group, connect
from pfengine.kernels import cdiv
from pfengine.kernels.prm_score import initial_running, running_to_prob, weigh
from pfengine.model.checkpoint import PRM_ARCHITECTURES, CheckpointError, ModelConfig, read_config
from pfengine.model.shard import Shard, refusal
from pfengine.model.tokenizer import check_same_tokenizer, eos_ids, load_tokenizer
from pfengine.particles import MAX_MODEL_LEN, MAX_TOKENS, ParticleTable, RowLimits
from pfengine.prm import (PRM, CallablePRM, EndedSteps, LikelihoodPRM, ModelPRM, PRMFn, ValueHeadPRM,
                          load_value_head)
from pfengine.prompting import encode_prompt
from pfengine.runner import ModelRunner
from pfengine.sampling import RowGroup, sample
from pfengine.scheduler import Scheduler
from pfengine.search import make_method, results
from pfengine.search.method import RoundContext
from pfengine.search.round import finish_round, start
from pfengine.state import Event, PFResult, RequestState

log = logging.getLogger("pfengine")


class Engine:
    def __init__(self, config: EngineConfig, prm_fn: PRMFn | None = None) -> None:
        self.config = config
        model_cfg = read_config(config.model)
        self.tokenizer = load_tokenizer(config.model, model_cfg.vocab_size)
        self.max_len = min(config.max_model_len or model_cfg.max_position_embeddings, model_cfg.max_position_embeddings)
        self.group = self._connect(model_cfg)
        try:
            self.policy = self._runner(config.model)
            self.prm_runner: ModelRunner | None = None
            self.prm = self._load_prm(prm_fn, model_cfg.hidden_size)
        except BaseException:
            self.close()
            raise
        self.caches = Caches(self.policy, self.prm_runner, isinstance(self.prm, LikelihoodPRM))
        rows, dev = config.max_particles, config.device
        self.table = ParticleTable(rows, self.max_len)
        self.eos_ids = eos_ids(config.model, model_cfg.eos_token_ids, self.tokenizer)
        self.hidden = torch.zeros(rows, model_cfg.hidden_size, device=dev)
        """The policy's final hidden state at each row's last token."""
        self.logits = torch.zeros(rows, model_cfg.vocab_size, device=dev)
        """Each row's next-token logits (a row continues from them after a round)."""
        self.ctx = RoundContext(self.table, self.caches, self.hidden, self.logits, self.policy.decoder.logits)
        self.scheduler = Scheduler(self.caches, self.table, rows, config.max_overtakes)
        self._token_text: dict[int, str] = {}
        self._matchers: dict[str, int] = {}
        self._driving = threading.Lock()
        self._ids = count()

    def _connect(self, model_cfg: ModelConfig) -> Group | None:
        """With ``tensor_parallel_size > 1``: check that every model splits that many ways, then start
        (or, under torchrun, join) the group. None otherwise."""
        size = self.config.tensor_parallel_size
        if size == 1:
            return None
        prm = self.config.prm
        models = [(self.config.model, model_cfg)] + ([(prm, read_config(prm))] if prm and Path(prm).is_dir() else [])
        for path, cfg in models:
            why = refusal(cfg, size)
            require(why is None, "tensor_parallel_size", f"{path}: {why}")
        return connect(size, self.config.device)

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (also done at interpreter exit)."""
        if self.group is not None:
            self.group.close()

    def _runner(self, path: str) -> ModelRunner:
        c = self.config
        spec = DecoderSpec(path, c.num_blocks, c.block_size, c.kv_dtype, self.max_len)
        decoder = spec.load(Shard(), c.device) if self.group is None else self.group.load(spec)
        max_blocks = cdiv(self.max_len, c.block_size)
        return ModelRunner(decoder, BlockManager(c.num_blocks, c.block_size, c.max_particles, max_blocks, c.device),
                           c.cuda_graphs and self.group is None)

    def _load_prm(self, prm_fn: PRMFn | None, hidden_size: int) -> PRM | None:
        path, pc = self.config.prm, self.config.prm_config
        require(pc.kind == "head" or (prm_fn is None and path is not None and Path(path).is_dir()), "prm_config",
                f"PRMConfig {pc.kind} reads a causal LM: EngineConfig.prm must be its directory")
        if prm_fn is not None:
            if path is not None:
                raise ValueError("give either EngineConfig.prm or prm_fn, not both")
            return CallablePRM(prm_fn)
        if path is None:
            return None
        if Path(path).is_file():
            return ValueHeadPRM(load_value_head(path, hidden_size, self.config.device))
        kind, prm_cfg = pc.kind, read_config(path)
        if prm_cfg.is_prm != (kind == "head"):
            raise CheckpointError(f"{path}: a PRM directory needs architectures [one of {PRM_ARCHITECTURES}] "
                                  f"(Qwen2.5-Math-PRM layout), or a causal LM with PRMConfig.good_token/bad_token "
                                  f"set (Math-Shepherd style) or PRMConfig.likelihood set")
        if prm_cfg.max_position_embeddings < self.max_len:
            raise CheckpointError(f"{path}: the PRM computes at most {prm_cfg.max_position_embeddings} positions "
                                  f"({prm_cfg.context_limit or 'max_position_embeddings'}), fewer than the policy's "
                                  f"{self.max_len}; set EngineConfig.max_model_len <= {prm_cfg.max_position_embeddings}")
        check_same_tokenizer(self.tokenizer, load_tokenizer(path), path)
        self.prm_runner = self._runner(path)
        if kind == "likelihood":
            return LikelihoodPRM(self.prm_runner, pc.likelihood)
        ids = [self._token_id(t, path) for t in (pc.step_tag, pc.good_token, pc.bad_token) if t is not None]
        return ModelPRM(self.prm_runner, ids[0], (ids[1], ids[2]) if kind == "shepherd" else None)

    def _token_id(self, token: str, path: str) -> int:
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise CheckpointError(f"{path}: PRM token {token!r} is not a single token of the tokenizer (ids {ids})")
        return ids[0]

    @property
    def eos_ids(self) -> frozenset[int]:
        """Token ids that end a particle (with ``SamplingParams.stop_on_eos``)."""
        return self._eos_ids

    @eos_ids.setter
    def eos_ids(self, ids: frozenset[int]) -> None:
        self._eos_ids = frozenset(ids)
        self.table.eos_ids = torch.tensor(sorted(self._eos_ids), dtype=torch.int64)

    def stats(self) -> dict[str, int]:
        s = {"policy_tokens_forwarded": self.policy.tokens_forwarded,
             "policy_blocks_in_use": self.policy.blocks.blocks_in_use, "cow_copies": self.policy.cow_copies,
             "preemptions": self.scheduler.preemptions, "recomputed_tokens": self.scheduler.recomputed_tokens}
        if self.prm_runner is not None:
            s |= {"prm_tokens_forwarded": self.prm_runner.tokens_forwarded,
                  "prm_tags_forwarded": self.prm_runner.tags_forwarded,
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
        aggregation = self._aggregation(aggregation)
        prompt_text, prompt_ids = encode_prompt(self.tokenizer, prompt)
        ids = [s if isinstance(s, list) else self.tokenizer.encode(s, add_special_tokens=False) for s in steps]
        texts = [s if isinstance(s, str) else self.detokenize(s) for s in steps]
        reads_hidden = self.prm.reads_hidden
        running, seg, scored, out = initial_running(1, aggregation), torch.tensor([0, 1]), torch.tensor([True]), []
        with self.scheduler.borrow_row() as row:
            hidden = self.policy.extend([row], [prompt_ids]) if reads_hidden else self.hidden[:1]
            if self.prm_runner is not None:
                self.prm.read_prompts([row], [prompt_ids])
            partial = torch.zeros(1, 3)
            for k, step in enumerate(ids):
                if reads_hidden and step:
                    hidden = self.policy.extend([row], [step])
                before = ([prompt_ids] + [s for s in ids[:k] if s])[-1][-1]
                ended = EndedSteps(torch.tensor([row]), hidden, [0], aggregation != "model",
                                   pending=lambda step=step: [list(step)], before=lambda before=before: [before],
                                   partial=partial, texts=lambda k=k: [(prompt_text, texts[:k + 1])])
                running, _, _ = weigh(self.prm.score(ended).float().cpu(), running, scored, seg, aggregation, 1.0)
                out.append(float(running_to_prob(running, aggregation)[0]))
        return out

    def _aggregation(self, aggregation: str) -> str:
        """The aggregation this engine's PRM runs for ``aggregation`` (:attr:`PRM.model_aggregation`)."""
        return self.prm.model_aggregation if aggregation == "model" and self.prm is not None else aggregation

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
        at_barrier = [r for r in self.scheduler.running if not r.growing]
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
            finish_round(at_barrier, self.prm, self.ctx, self.detokenize)
        events = [Event(r.id, r.trace[-1]) for r in at_barrier]
        for r in [r for r in at_barrier if r.done]:
            result = results.build(r, self.ctx, self.detokenize)
            self.scheduler.finish(r)
            r.stats.seconds = time.perf_counter() - r.started
            events.append(Event(r.id, None, result))
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
        aggregation = self._aggregation(search.aggregation)
        if aggregation != search.aggregation:
            search = replace(search, aggregation=aggregation)
            request = replace(request, search=search)
        method = make_method(search)
        if method.uses_prm and self.prm is None:
            raise InvalidArgument("method", f"{search.method!r} needs a PRM: set EngineConfig.prm (a PRM directory "
                                            f"or a value-head .safetensors file) or pass prm_fn to Engine")
        run_with = method.sampling(sampling)
        if run_with != sampling:
            request = replace(request, sampling=run_with)
        text, ids = self._encode(request.prompt)
        n = method.slots
        require(method.rows_needed <= c.max_particles, "n_particles",
               f"{n} particles{' per sweep' if search.iterations > 1 else ''} need {method.rows_needed} cache rows; "
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
        return RequestState(id=next(self._ids), request=request, prompt_ids=ids, prompt_text=text, seed=seed,
                            method=method)

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
        scored = [r for r in admitted if r.method.uses_prm]
        if self.prm_runner is not None and scored:
            self.prm.read_prompts([r.root_row for r in scored], [r.prompt_ids for r in scored])
        for k, r in enumerate(admitted):
            r.started = time.perf_counter()
            r.stats.prompt_tokens = len(r.prompt_ids)
            self.table.configure(r.rows, self._limits(r))
            self.caches.assign(r.rows, [r.root_row] * r.n)
            start(r, self.ctx, logits[k:k + 1], hidden[k:k + 1])

    def _limits(self, r: RequestState) -> RowLimits:
        sp = r.request.sampling
        context = self.max_len - len(r.prompt_ids) - sp.max_steps  # room for the PRM's step tags
        return RowLimits(max_tokens=min(sp.max_tokens, context),
                         limit_reason=MAX_TOKENS if sp.max_tokens <= context else MAX_MODEL_LEN,
                         max_step_tokens=sp.max_step_tokens, max_steps=sp.max_steps, stop_on_eos=sp.stop_on_eos,
                         matcher=self._matcher(sp.step_delimiter),
                         prm_reads=self.prm_runner is not None and r.method.uses_prm,
                         prompt_last=r.prompt_ids[-1])

    def _matcher(self, delimiter: str) -> int:
        """The table's matcher for ``delimiter`` (made on first use; their transitions fill lazily)."""
        if delimiter not in self._matchers:
            self._matchers[delimiter] = len(self.table.matchers)
            self.table.matchers.append(DelimiterMatcher(delimiter, self.token_text, self.logits.shape[1]))
        return self._matchers[delimiter]

    def _decode(self, running: list[RequestState]) -> None:
        """Sample one token for every particle mid-step and forward them all in one batch through
        the policy. The PRM model reads them later, at the step end (``ParticleTable.prm_lag``).

        Siblings that hold the same sequence and sample the same token are forwarded once; the
        others fork from that one afterwards, so no token is ever computed twice."""
        growing = [r for r in running if r.growing]
        if not growing:
            return
        t = self.table
        every = torch.cat([r.rows for r in growing])
        mask = t.growing(every)
        rows = every[mask]
        owner = torch.arange(len(growing)).repeat_interleave(torch.tensor([r.n for r in growing]))[mask]
        counts = torch.bincount(owner, minlength=len(growing)).tolist()
        with record_function("pfengine::sample"):
            tokens = sample(self.logits[rows], [RowGroup(r.request.sampling, r.generator, k)
                                                for r, k in zip(growing, counts)]).cpu()
        first = t.merge_identical(rows, tokens)
        ended = t.append(rows, tokens)
        ends = torch.bincount(owner[ended], minlength=len(growing)).tolist()
        for r, k, e in zip(growing, counts, ends):
            r.stats.generated_tokens += k
            r.growing -= e
        leader = first == torch.arange(rows.numel())
        leaders = rows[leader]
        with record_function("pfengine::decode"):
            hidden = self.policy.decode(leaders, tokens[leader])
            self.hidden[leaders] = hidden
            self.logits[leaders] = self.policy.decoder.logits(hidden)
        if not bool(leader.all()):
            self._fork_followers(rows[~leader], rows[first[~leader]])

    def _fork_followers(self, followers: torch.Tensor, leaders: torch.Tensor) -> None:
        """Rows that sampled what their leader sampled become copies of it, in both caches. A PRM
        model first reads the leaders' pending tokens, so the copies are complete and no token is
        read twice."""
        t = self.table
        behind = leaders.unique()
        behind = behind[t.prm_lag[behind] > 0]
        if behind.numel():
            t.prm_partial[behind] = self.prm.catch_up(behind.tolist(), t.pending(behind), t.before_pending(behind),
                                                      t.prm_partial[behind])
            t.prm_lag[behind] = 0
        self.caches.assign(followers, leaders)
        self.hidden[followers], self.logits[followers] = self.hidden[leaders], self.logits[leaders]
        t.prm_lag[followers], t.prm_partial[followers] = t.prm_lag[leaders], t.prm_partial[leaders]

    def token_text(self, token: int) -> str:
        """One token's text as the step delimiter sees it (cached)."""
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tokenizer.decode([token])
        return text

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
