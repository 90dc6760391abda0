"""The engine: load once, then run many PF requests together over one paged cache per model.

Data flow per iteration: admit (prefill prompt, fork it N ways) -> decode one token for every particle
mid-step, of every request, in one forward -> for requests whose particles all reached a step end:
PRM score -> weights -> resample -> fork -> next step; requests whose particles all finished return.
"""
from __future__ import annotations

import json
import secrets
import logging
import time
from dataclasses import replace
from itertools import count
from pathlib import Path
from typing import Iterator

import torch
from torch.profiler import record_function
from transformers import AutoTokenizer

from pfengine.cache.block_manager import BlockManager, OutOfBlocks
from pfengine.config import AGGREGATIONS, KV_DTYPES, EngineConfig, Request
from pfengine.model.checkpoint import CheckpointError, read_config
from pfengine.model.decoder import load_decoder
from pfengine.kernels.prm_score import head_logit, initial_running, running_to_prob, weigh
from pfengine.prm import CallablePRM, EndedStep, ModelPRM, PRMFn, ValueHeadPRM, load_value_head
from pfengine.prompting import encode_prompt
from pfengine.runner import ModelRunner
from pfengine.sampling import sample
from pfengine.search import results
from pfengine.search.round import PRM, finish_round, fork, start
from pfengine.state import Event, PFResult, RequestState

log = logging.getLogger("pfengine")


class Engine:
    def __init__(self, config: EngineConfig, prm_fn: PRMFn | None = None) -> None:
        self.config = config
        model_cfg = read_config(config.model)
        self.tokenizer = _load_tokenizer(config.model, model_cfg.vocab_size)
        self.max_len = min(config.max_model_len or model_cfg.max_position_embeddings, model_cfg.max_position_embeddings)
        self.policy = self._runner(config.model)
        self.prm_runner: ModelRunner | None = None
        self.prm = self._load_prm(prm_fn, model_cfg.hidden_size)
        self.eos_ids = _eos_ids(config.model, model_cfg.eos_token_ids, self.tokenizer)
        self._token_text: dict[int, str] = {}
        self._free_rows = list(range(config.max_particles - 1, -1, -1))
        self._ids = count()
        self._nodes = count(1)
        self._admission_paused = False
        self.waiting: list[RequestState] = []
        self.running: list[RequestState] = []
        self.preemptions = 0
        self.recomputed_tokens = 0

    def _runner(self, path: str) -> ModelRunner:
        c = self.config
        decoder = load_decoder(path, c.num_blocks, c.block_size, KV_DTYPES[c.kv_dtype], self.max_len, c.device)
        max_blocks = (self.max_len + c.block_size - 1) // c.block_size
        return ModelRunner(decoder, BlockManager(c.num_blocks, c.block_size, c.max_particles, max_blocks, c.device))

    def _load_prm(self, prm_fn: PRMFn | None, hidden_size: int) -> PRM | None:
        path, pc = self.config.prm, self.config.prm_config
        if prm_fn is not None:
            if path is not None:
                raise ValueError("give either EngineConfig.prm or prm_fn, not both")
            return CallablePRM(prm_fn)
        if path is None:
            return None
        if Path(path).is_file():
            return ValueHeadPRM(load_value_head(path, hidden_size))
        shepherd = pc.good_token is not None
        if read_config(path).is_prm == shepherd:
            raise CheckpointError(f"{path}: a PRM directory needs architectures ['Qwen2ForProcessRewardModel'], or a "
                                  f"causal LM with PRMConfig.good_token/bad_token set (Math-Shepherd style)")
        _check_same_tokenizer(self.tokenizer, _load_tokenizer(path), path)
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
             "preemptions": self.preemptions, "recomputed_tokens": self.recomputed_tokens}
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
        assert not self.running, "score_steps: requests are in flight"
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
        row = self._free_rows.pop()
        prm = self.prm
        runner = self.policy if isinstance(prm, ValueHeadPRM) else prm.runner
        try:
            hidden, logits = runner.extend([row], [prompt_ids]), []
            for step in steps:
                if step:
                    hidden = runner.extend([row], [step])
                if isinstance(prm, ModelPRM):
                    hidden = prm.score([EndedStep(row, torch.empty(0), "", [], 0)], keep_tags=keep_tags)
                logits.append(head_logit(hidden, prm.head)[0] if prm.head is not None else hidden[0])
            return logits
        finally:
            runner.blocks.free(torch.tensor([row], dtype=torch.int64))
            self._free_rows.append(row)

    def add_request(self, request: Request) -> int:
        """Validate and queue a request; it joins the running batch at the next round boundary."""
        state = self._prepare(request)
        self.waiting.append(state)
        return state.id

    def abort(self, request_id: int) -> bool:
        """Drop a request (e.g. its client went away) and free its blocks. False if unknown."""
        for queue in (self.waiting, self.running):
            for r in queue:
                if r.id == request_id:
                    queue.remove(r)
                    if r.rows:
                        self._release(r)
                    return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[Event]:
        """One engine iteration: admit, decode one token for every particle mid-step, and finish the
        rounds (score -> resample -> fork) of requests whose particles all reached a step end."""
        if not self._admission_paused:
            with record_function("pfengine::prefill"):
                self.running += self._admit(self.waiting)
        events = self._make_room(self.running, self.waiting)
        self._decode(self.running)
        at_barrier = [r for r in self.running if all(p.step_done or p.finished for p in r.particles)]
        if not at_barrier:
            return events
        with record_function("pfengine::round"):  # PRM score -> weights -> resample -> fork
            finish_round(at_barrier, self.prm, self.runners, self.detokenize)
        events += [Event(r.id, r.trace[-1]) for r in at_barrier]
        for r in [r for r in at_barrier if r.done]:
            self.running.remove(r)
            events.append(Event(r.id, None, self._finish(r)))
            self._admission_paused = False
        return events

    def generate(self, requests: list[Request]) -> list[PFResult]:
        """Run requests to completion, batched together (and with any already queued); results in order."""
        states = [self._prepare(r) for r in requests]  # all valid before any is queued
        self.waiting += states
        ids = [s.id for s in states]
        results: dict[int, PFResult] = {}
        while any(i not in results for i in ids):
            for event in self.step():
                if event.error is not None and event.request_id in ids:
                    for i in ids:
                        self.abort(i)
                    raise event.error
                if event.result is not None:
                    results[event.request_id] = event.result
        return [results[i] for i in ids]

    def stream(self, request: Request) -> Iterator[Event]:
        """Run one request (with whatever else is queued), yielding its events as rounds finish."""
        rid = self.add_request(request)
        while True:
            for event in self.step():
                if event.request_id == rid:
                    if event.error is not None:
                        raise event.error
                    yield event
                    if event.result is not None:
                        return

    def _make_room(self, running: list[RequestState], waiting: list[RequestState]) -> list[Event]:
        """Preempt the latest-admitted requests until this iteration's worst case fits in every cache:
        one token per particle mid-step, and in the PRM also a step tag per particle not yet scored.
        A request that cannot fit even alone fails (an error event); the others go on."""
        while running:
            policy_rows, prm_rows, prm_new = [], [], []
            for r in running:
                for i, p in enumerate(r.particles):
                    if not (p.step_done or p.finished):
                        policy_rows.append(r.rows[i])
                    if not (p.frozen or p.held):
                        prm_rows.append(r.rows[i])
                        prm_new.append(1 if p.step_done or p.finished else 2)
            needs = [(self.policy, self.policy.blocks.blocks_needed(torch.tensor(policy_rows, dtype=torch.int64), 1))]
            if self.prm_runner is not None:
                needs.append((self.prm_runner, self.prm_runner.blocks.blocks_needed(
                    torch.tensor(prm_rows, dtype=torch.int64), torch.tensor(prm_new, dtype=torch.int64))))
            if all(need <= runner.blocks.num_free for runner, need in needs):
                return []
            victim = running.pop()
            if not running:
                self._release(victim)
                return [Event(victim.id, None, error=OutOfBlocks(
                    max(need for _, need in needs), min(r.blocks.num_free for r, _ in needs),
                    f"request {victim.id} alone outgrows the KV cache ({self.config.num_blocks} blocks of "
                    f"{self.config.block_size} tokens): raise EngineConfig.num_blocks or lower n_particles / max_tokens"))]
            self._preempt(victim)
            waiting.insert(0, victim)
        return []

    def _release(self, r: RequestState) -> None:
        for runner in self.runners:
            runner.blocks.free(torch.tensor(r.all_rows, dtype=torch.int64))
        self._free_rows += r.all_rows

    def _preempt(self, r: RequestState) -> None:
        """Free a request's blocks and restart it later from its seed; its tokens are recomputed
        (the only recompute the engine does, counted in ``recomputed_tokens``)."""
        self._release(r)
        self.preemptions += 1
        self.recomputed_tokens += r.stats.prompt_tokens + r.stats.generated_tokens
        r.restart()
        self._admission_paused = True

    def _prepare(self, request: Request) -> RequestState:
        prompt = request.prompt
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt: chat messages must not be empty")
        if isinstance(prompt, str) and not prompt:
            raise ValueError("prompt: must not be empty")
        if not isinstance(prompt, (str, list)):
            raise TypeError(f"prompt: expected a string or a list of chat messages, got {type(prompt).__name__}")
        text, ids = encode_prompt(self.tokenizer, prompt)
        search = request.search
        if search.uses_prm and self.prm is None:
            raise ValueError(f"search method {search.method!r} needs a PRM: set EngineConfig.prm (a PRM directory or "
                             f"a value-head .safetensors file) or pass prm_fn to Engine")
        if search.method == "greedy" and request.sampling.temperature != 0:
            request = replace(request, sampling=replace(request.sampling, temperature=0.0))
        n = search.particles_per_sweep
        if n + 2 > self.config.max_particles:
            raise ValueError(f"n_particles={search.n_particles} needs {n + 2} cache rows; "
                             f"EngineConfig.max_particles is {self.config.max_particles}")
        room = self.max_len - len(ids) - request.sampling.max_steps  # PRM step tags need room too
        if room <= 0:
            raise ValueError(f"prompt: {len(ids)} tokens (+{request.sampling.max_steps} step tags) does not fit "
                             f"max_model_len={self.max_len}")
        need = self._blocks_to_admit(len(ids), n, request.sampling.max_step_tokens)
        if need > self.config.num_blocks:
            raise ValueError(f"request needs about {need} KV blocks for its prompt and one step of {n} particles; "
                             f"the cache has {self.config.num_blocks} (raise EngineConfig.num_blocks)")
        seed = request.sampling.seed if request.sampling.seed is not None else secrets.randbits(63)
        return RequestState(id=next(self._ids), request=request, prompt_ids=ids, prompt_text=text, seed=seed)

    def _blocks_to_admit(self, prompt_len: int, n: int, step_tokens: int) -> int:
        B = self.config.block_size
        return (prompt_len + B - 1) // B + n * ((step_tokens + 1 + B - 1) // B + 1)

    def _admit(self, waiting: list[RequestState]) -> list[RequestState]:
        """Prefill as many waiting requests as fit (rows, and blocks for their first step), in order."""
        admitted: list[RequestState] = []
        free_blocks = min(r.blocks.num_free for r in self.runners)
        while waiting:
            r = waiting[0]
            n = r.search.particles_per_sweep
            n_rows = n + 1 + (r.search.method == "particle_gibbs")
            need = self._blocks_to_admit(len(r.prompt_ids), n, r.request.sampling.max_step_tokens)
            if n_rows > len(self._free_rows) or need > free_blocks:
                break
            free_blocks -= need
            r.rows = [self._free_rows.pop() for _ in range(n)]
            r.root_row = self._free_rows.pop()
            if r.search.method == "particle_gibbs":
                r.ref_row = self._free_rows.pop()
            admitted.append(waiting.pop(0))
        if not admitted:
            return admitted
        roots = [r.root_row for r in admitted]
        hidden = self.policy.extend(roots, [r.prompt_ids for r in admitted])
        logits = self.policy.decoder.logits(hidden)
        if self.prm_runner is not None:
            self.prm_runner.extend(roots, [r.prompt_ids for r in admitted])
        for k, r in enumerate(admitted):
            r.started = time.perf_counter()
            r.stats.prompt_tokens = len(r.prompt_ids)
            fork(self.runners, r.rows, [r.root_row] * r.n)
            start(r, logits[k:k + 1], hidden[k:k + 1])
        return admitted

    def _decode(self, running: list[RequestState]) -> None:
        """Sample one token for every particle mid-step and forward them all in one batch.

        Siblings that hold the same sequence and sample the same token are forwarded once; the
        others fork from that one afterwards, so no token is ever computed twice."""
        forwarded: list[tuple[RequestState, int]] = []
        dups: list[tuple[RequestState, int, int]] = []
        tokens: list[int] = []
        for r in running:
            idx = [i for i, p in enumerate(r.particles) if not (p.step_done or p.finished)]
            if not idx:
                continue
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
                self._append(r, p, t)
        if not forwarded:
            return
        rows_t, tokens_t = torch.tensor([r.rows[i] for r, i in forwarded]), torch.tensor(tokens)
        with record_function("pfengine::decode"):
            hidden = self.policy.decode(rows_t, tokens_t)
            logits = self.policy.decoder.logits(hidden)
        if self.prm_runner is not None:  # the PRM reads every token once, in step with the policy
            with record_function("pfengine::prm_decode"):
                self.prm_runner.decode(rows_t, tokens_t)
        for k, (r, i) in enumerate(forwarded):
            r.hidden[i], r.logits[i] = hidden[k], logits[k]
        if dups:
            for runner in self.runners:
                runner.blocks.assign(torch.tensor([r.rows[i] for r, i, _ in dups]),
                                     torch.tensor([r.rows[j] for r, _, j in dups]))
            for r, i, j in dups:
                r.hidden[i], r.logits[i] = r.hidden[j], r.logits[j]

    def _append(self, r: RequestState, p, token: int) -> None:
        sp = r.request.sampling
        p.tokens.append(token)
        r.stats.generated_tokens += 1
        text = self._decode_token(token)
        p.step_text += text
        tail = p.step_text[-(len(text) + len(sp.step_delimiter) - 1):] if text else ""
        step_len = len(p.tokens) - p.step_starts[-1]
        limit = min(sp.max_tokens, self.max_len - len(r.prompt_ids) - sp.max_steps)
        if (sp.stop_on_eos and token in self.eos_ids) or len(p.tokens) >= limit:
            p.finished = True
        if p.finished or sp.step_delimiter in tail or step_len >= sp.max_step_tokens:
            p.step_done = True
            p.finished = p.finished or len(p.step_starts) >= sp.max_steps

    def _decode_token(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tokenizer.decode([token])
        return text

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _finish(self, r: RequestState) -> PFResult:
        self._release(r)
        r.stats.seconds = time.perf_counter() - r.started
        return results.build(r, self.detokenize)


def _load_tokenizer(path: str, vocab_size: int | None = None):
    """The checkpoint's tokenizer; an empty one (transformers builds that when the files are missing)
    or one with ids beyond the model's embedding table is refused."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load its tokenizer ({e})") from None
    if len(tokenizer) < 2:
        raise CheckpointError(f"{path}: cannot load its tokenizer (no tokenizer.json, or vocab.json + merges.txt)")
    if vocab_size is not None and len(tokenizer) > vocab_size:
        top = max(tokenizer.get_vocab().values())
        if top >= vocab_size:
            raise CheckpointError(f"{path}: tokenizer has token id {top} but the model's vocab_size is {vocab_size}")
    return tokenizer


def _check_same_tokenizer(policy, prm, prm_path: str) -> None:
    pv, rv = policy.get_vocab(), prm.get_vocab()
    differ = [t for t, i in pv.items() if rv.get(t) != i]
    if differ:
        raise CheckpointError(f"{prm_path}: PRM tokenizer differs from the policy's ({len(differ)} tokens map to "
                              f"other ids, e.g. {differ[0]!r}); the PRM must share the policy's tokenizer")


def _eos_ids(path: str, config_ids: tuple[int, ...], tokenizer) -> frozenset[int]:
    ids = set(config_ids)
    gen_cfg = Path(path) / "generation_config.json"
    if gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
