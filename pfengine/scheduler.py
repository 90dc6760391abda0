"""Which requests run: admission by cache rows and blocks, preemption when a step would not fit,
and the pool of cache rows. Model work (prefill, decode, rounds) stays in the engine."""
from __future__ import annotations

import torch

from pfengine.cache.block_manager import OutOfBlocks
from pfengine.runner import ModelRunner
from pfengine.state import Event, RequestState


class Scheduler:
    def __init__(self, runners: list[ModelRunner], max_rows: int) -> None:
        self.runners = runners
        self.waiting: list[RequestState] = []
        self.running: list[RequestState] = []
        self.free_rows = list(range(max_rows - 1, -1, -1))
        self.admission_paused = False
        """Set by a preemption, cleared when a request finishes: no new admissions meanwhile, so a
        preempted request is not restarted straight into the same shortage."""
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
        return (prompt_len + B - 1) // B + n * ((step_tokens + 1 + B - 1) // B + 1)

    def admit(self) -> list[RequestState]:
        """Take waiting requests in order while their rows and first-step blocks fit; give them rows."""
        admitted: list[RequestState] = []
        if self.admission_paused:
            return admitted
        free_blocks = min(r.blocks.num_free for r in self.runners)
        while self.waiting:
            r = self.waiting[0]
            n = r.search.particles_per_sweep
            n_rows = n + 1 + (r.search.method == "particle_gibbs")
            need = self.blocks_to_admit(len(r.prompt_ids), n, r.request.sampling.max_step_tokens)
            if n_rows > len(self.free_rows) or need > free_blocks:
                break
            free_blocks -= need
            r.rows = [self.free_rows.pop() for _ in range(n)]
            r.root_row = self.free_rows.pop()
            if r.search.method == "particle_gibbs":
                r.ref_row = self.free_rows.pop()
            admitted.append(self.waiting.pop(0))
        self.running += admitted
        return admitted

    def make_room(self) -> list[Event]:
        """Preempt the latest-admitted requests until this iteration's worst case fits in every cache:
        one token per particle mid-step, and in a PRM cache also the step's tokens it has not read
        yet and a step tag per particle not yet scored. A request that cannot fit even alone fails (an error event); the others go on."""
        while self.running:
            needs = self._worst_case()
            if all(need <= runner.blocks.num_free for runner, need in needs):
                return []
            victim = self.running.pop()
            if not self.running:
                self.release(victim)
                total = self.runners[0].blocks.num_blocks
                return [Event(victim.id, None, error=OutOfBlocks(
                    max(need for _, need in needs), min(r.blocks.num_free for r, _ in needs),
                    f"request {victim.id} alone outgrows the KV cache ({total} blocks of {self.block_size} "
                    f"tokens): raise EngineConfig.num_blocks or lower n_particles / max_tokens"))]
            self.preempt(victim)
        return []

    def _worst_case(self) -> list[tuple[ModelRunner, int]]:
        policy_rows, prm_rows, prm_new = [], [], []
        for r in self.running:
            for i, p in enumerate(r.particles):
                if not (p.step_done or p.finished):
                    policy_rows.append(r.rows[i])
                if r.request.search.uses_prm and not (p.frozen or p.held):
                    prm_rows.append(r.rows[i])
                    prm_new.append(p.prm_lag + (1 if p.step_done or p.finished else 2))
        policy, *prm = self.runners
        needs = [(policy, policy.blocks.blocks_needed(torch.tensor(policy_rows, dtype=torch.int64), 1))]
        for runner in prm:
            needs.append((runner, runner.blocks.blocks_needed(torch.tensor(prm_rows, dtype=torch.int64),
                                                              torch.tensor(prm_new, dtype=torch.int64))))
        return needs

    def preempt(self, r: RequestState) -> None:
        """Free a request's blocks and queue it to restart from its seed; its tokens are recomputed
        (the only recompute the engine does, counted in ``recomputed_tokens``)."""
        self.release(r)
        self.preemptions += 1
        self.recomputed_tokens += r.stats.prompt_tokens + r.stats.generated_tokens
        r.restart()
        self.waiting.insert(0, r)
        self.admission_paused = True

    def finish(self, r: RequestState) -> None:
        self.running.remove(r)
        self.release(r)
        self.admission_paused = False

    def abort(self, request_id: int) -> bool:
        for queue in (self.waiting, self.running):
            for r in queue:
                if r.id == request_id:
                    queue.remove(r)
                    if r.rows:
                        self.release(r)
                    return True
        return False

    def release(self, r: RequestState) -> None:
        for runner in self.runners:
            runner.blocks.free(torch.tensor(r.all_rows, dtype=torch.int64))
        self.free_rows += r.all_rows
