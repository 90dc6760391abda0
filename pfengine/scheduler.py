"""Which requests run: admission by cache rows and blocks, preemption when a step would not fit,
and the pool of cache rows. Model work (prefill, decode, rounds) stays in the engine.

Admission policy (first come, first served, with bounded backfill): waiting requests are taken in
arrival order while their cache rows and first-step blocks fit. One that does not fit yet is passed
over, so a small request is not stuck behind a huge one; but each time a later request starts before
it counts, and once it has been passed over ``max_overtakes`` times nothing more starts until it fits
(the running requests drain, so it does). A preempted request is never passed over, and while one
waits nothing starts until a running request leaves. So every queued request starts eventually,
and every running one ends (its steps and tokens are bounded, and one that outgrows the cache alone
fails): the engine always makes progress and ``has_work`` becomes false."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from pfengine.cache.block_manager import OutOfBlocks
from pfengine.caches import Caches
from pfengine.kernels import cdiv
from pfengine.particles import ParticleTable, Phase
from pfengine.runner import ModelRunner
from pfengine.state import Event, RequestState


class Scheduler:
    def __init__(self, caches: Caches, table: ParticleTable, max_rows: int, max_overtakes: int) -> None:
        self.caches, self.table = caches, table
        self.runners = caches.runners
        self.max_overtakes = max_overtakes
        self.waiting: list[RequestState] = []
        self.running: list[RequestState] = []
        self.free_rows = list(range(max_rows - 1, -1, -1))
        self.admission_paused = False
        """Set by a preemption, cleared when a running request leaves (or none is left): no new
        admissions meanwhile, so a preempted request is not restarted straight into the same shortage."""
        self.preemptions = 0
        self.recomputed_tokens = 0

    @property
    def block_size(self) -> int:
        return self.runners[0].blocks.block_size

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def blocks_to_admit(self, prompt_len: int, n: int, step_tokens: int) -> int:
        """Blocks a request needs to start: its prompt, and one step (+ a COW copy) per particle."""
        B = self.block_size
        return cdiv(prompt_len, B) + n * (cdiv(step_tokens + 1, B) + 1)

    def admit(self) -> list[RequestState]:
        """Start the waiting requests that fit, by the policy in the module docstring; give them rows."""
        if self.admission_paused and self.running:
            return []
        self.admission_paused = False
        free_blocks = min(r.blocks.num_free for r in self.runners)
        admitted: list[RequestState] = []
        passed: list[RequestState] = []
        for r in list(self.waiting):
            if any(p.overtaken >= self.max_overtakes for p in passed):
                break
            need = self.blocks_to_admit(len(r.prompt_ids), r.method.slots, r.request.sampling.max_step_tokens)
            if r.method.rows_needed > len(self.free_rows) or need > free_blocks:
                passed.append(r)
                continue
            free_blocks -= need
            self._give_rows(r)
            self.waiting.remove(r)
            admitted.append(r)
            for p in passed:
                p.overtaken += 1
        self.running += admitted
        return admitted

    def _give_rows(self, r: RequestState) -> None:
        r.rows = torch.tensor([self.free_rows.pop() for _ in range(r.method.slots)], dtype=torch.int64)
        r.root_row = self.free_rows.pop()
        r.method.extra_rows = [self.free_rows.pop() for _ in range(r.method.extra_rows_needed)]

    @contextmanager
    def borrow_row(self) -> Iterator[int]:
        """A free cache row for the duration of the block; freed (in every cache) afterwards."""
        row = self.free_rows.pop()
        try:
            yield row
        finally:
            self.caches.free([row])
            self.free_rows.append(row)

    def make_room(self) -> list[Event]:
        """Preempt the latest-admitted requests until this iteration's worst case fits in every cache:
        one token per particle mid-step, and in a PRM cache also the step's tokens it has not read
        yet and a step tag per particle not yet scored. A request that cannot fit even alone fails
        (an error event); the others go on."""
        while self.running:
            if self._surely_fits():
                return []
            needs = self._worst_case()
            if all(need <= runner.blocks.num_free for runner, need in needs):
                return []
            victim = self.running[-1]
            if len(self.running) == 1:
                total = self.runners[0].blocks.num_blocks
                return [self.fail(victim, OutOfBlocks(
                    max(need for _, need in needs), min(r.blocks.num_free for r, _ in needs),
                    f"request {victim.id} alone outgrows the KV cache ({total} blocks of {self.block_size} "
                    f"tokens): raise EngineConfig.num_blocks or lower n_particles / max_tokens"))]
            self.preempt(victim)
        return []

    def _surely_fits(self) -> bool:
        """A cheap bound first: every particle needing a new block and a copy, in every cache."""
        t, B = self.table, self.block_size
        rows = torch.cat([r.rows for r in self.running])
        bound = 2 * rows.numel()
        if self.caches.prm is not None:
            bound = max(bound, cdiv(int(t.prm_lag[rows].sum()), B) + 4 * rows.numel())
        return bound <= min(runner.blocks.num_free for runner in self.runners)

    def _worst_case(self) -> list[tuple[ModelRunner, int]]:
        t = self.table
        rows = torch.cat([r.rows for r in self.running])
        phase = t.phase[rows]
        needs = [(self.caches.policy, self.caches.policy.blocks.blocks_needed(rows[phase == Phase.GROWING], 1))]
        if self.caches.prm is not None:
            scored = (t.prm_reads[rows] > 0) & (phase != Phase.FROZEN) & (phase != Phase.HELD)
            new = t.prm_lag[rows] + torch.where(phase == Phase.GROWING, 2, 1)
            needs.append((self.caches.prm, self.caches.prm.blocks.blocks_needed(rows[scored], new[scored])))
        return needs

    def preempt(self, r: RequestState) -> None:
        """Free a request's blocks and queue it to restart from its seed; its tokens are recomputed
        (the only recompute the engine does, counted in ``recomputed_tokens``)."""
        self._leave(r)
        self.preemptions += 1
        self.recomputed_tokens += r.stats.prompt_tokens + r.stats.generated_tokens
        r.restart()
        r.overtaken = self.max_overtakes  # never passed over: it already held its place
        self.waiting.insert(0, r)
        self.admission_paused = True

    def finish(self, r: RequestState) -> None:
        self._leave(r)

    def fail(self, r: RequestState, error: Exception) -> Event:
        """End a running request with ``error``; its rows and blocks are freed."""
        self._leave(r)
        return Event(r.id, None, error=error)

    def abort(self, request_id: int) -> bool:
        for r in self.waiting:
            if r.id == request_id:
                self.waiting.remove(r)
                return True
        for r in self.running:
            if r.id == request_id:
                self._leave(r)
                return True
        return False

    def _leave(self, r: RequestState) -> None:
        """A running request stops running (finished, failed, aborted or preempted)."""
        self.running.remove(r)
        self.admission_paused = False
        self.caches.free(r.all_rows)
        self.free_rows += r.all_rows
