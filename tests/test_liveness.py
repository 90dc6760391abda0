"""The engine always makes progress: whatever requests arrive, fail, are aborted or preempted, every
request ends (a result or an error) and ``has_work`` becomes false. A hypothesis state machine runs
>= 10,000 random operations on a small cache, with requests that outgrow it, requests refused at the
door, a PRM that raises for some prompts, and engine faults injected into the decode phase."""
import threading

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from pfengine import Engine, EngineConfig, Request, SamplingParams, SearchParams
from pfengine.config import InvalidArgument
from pfengine.cache import OutOfBlocks

EXAMPLES, STEPS = 80, 160  # >= 10,000 operations in all
DRAIN_STEPS = 3000
"""More engine steps than the slowest request mix below can take: draining never needs this many."""
BOOM = "boom"


class Boom(RuntimeError):
    pass


def prm(prompt: str, steps: list[str]) -> float:
    if BOOM in prompt:
        raise Boom("the PRM failed on this prompt")  # the engine reads it as weight 0
    return 0.3 + 0.4 * (len(steps[-1]) % 2)


def faulty(decode, fault: dict):
    """The engine's decode phase, failing once whenever ``fault["armed"]`` is set."""
    def run(running):
        if fault.pop("armed", False):
            raise Boom("injected fault in the decode phase")
        return decode(running)
    return run


KINDS = {
    "pf": lambda seed: Request(prompt=f"Step {seed}: add 17 and 25.", sampling=SamplingParams(
        seed=seed, max_steps=2, max_step_tokens=4), search=SearchParams(n_particles=4)),
    "bon": lambda seed: Request(prompt=f"Add {seed}.", sampling=SamplingParams(
        seed=seed, max_steps=2, max_step_tokens=4, stop_on_eos=False), search=SearchParams("best_of_n", 6)),
    "beam": lambda seed: Request(prompt=f"Beam {seed}", sampling=SamplingParams(seed=seed, max_steps=2, max_step_tokens=4),
                                 search=SearchParams("beam_search", 4, beam_width=2)),
    "gibbs": lambda seed: Request(prompt=f"Gibbs {seed}", sampling=SamplingParams(
        seed=seed, max_steps=2, max_step_tokens=3), search=SearchParams("particle_gibbs", 4, iterations=2)),
    "greedy": lambda seed: Request(prompt=f"Greedy {seed}", sampling=SamplingParams(max_steps=2, max_step_tokens=4),
                                   search=SearchParams("greedy", 1)),
    "outgrows": lambda seed: Request(prompt=f"Long {seed}", sampling=SamplingParams(
        seed=seed, max_steps=6, max_step_tokens=8, stop_on_eos=False), search=SearchParams("best_of_n", 6)),
    "refused": lambda seed: Request(prompt=f"Huge {seed}", sampling=SamplingParams(
        seed=seed, max_step_tokens=64), search=SearchParams("best_of_n", 16)),
    "boom": lambda seed: Request(prompt=f"{BOOM} {seed}", sampling=SamplingParams(seed=seed, max_steps=2,
                                 max_step_tokens=3), search=SearchParams(n_particles=3)),
}


def small_engine(policy_dir: str) -> Engine:
    """48 blocks of 4 tokens and 24 rows: a few requests at once, and ``outgrows`` alone cannot fit."""
    return Engine(EngineConfig(model=policy_dir, num_blocks=48, block_size=4, max_particles=24, max_overtakes=3),
                  prm_fn=prm)


class EngineMachine(RuleBasedStateMachine):
    engine: Engine
    ops = 0

    @initialize()
    def start(self) -> None:
        assert not self.engine.has_work, "the previous example left work in the engine"
        self.added: list[int] = []
        self.ended: dict[int, str] = {}
        self.fault: dict = {}
        self.engine._decode = faulty(type(self.engine)._decode.__get__(self.engine), self.fault)

    @rule(kind=st.sampled_from(sorted(KINDS)), seed=st.integers(0, 50))
    def add(self, kind, seed):
        EngineMachine.ops += 1
        try:
            self.added.append(self.engine.add_request(KINDS[kind](seed)))
        except InvalidArgument as e:  # refused whole at the door: never queued
            assert kind == "refused" and "KV blocks" in str(e)

    @rule(pick=st.integers(0, 1000))
    def abort(self, pick):
        EngineMachine.ops += 1
        live = [i for i in self.added if i not in self.ended]
        if live and self.engine.abort(live[pick % len(live)]):
            self.ended[live[pick % len(live)]] = "aborted"

    @rule()
    def inject_fault(self):
        EngineMachine.ops += 1
        self.fault["armed"] = True

    @rule(n=st.integers(1, 3))
    def step(self, n):
        EngineMachine.ops += 1
        for _ in range(n):
            self.record(self.engine.step())

    def record(self, events) -> None:
        for e in events:
            if e.error is not None:
                assert isinstance(e.error, (OutOfBlocks, Boom)), f"unexpected failure {e.error!r}"
                self.ended[e.request_id] = "error"
            elif e.result is not None:
                self.ended[e.request_id] = "result"

    @invariant()
    def caches_and_rows_are_consistent(self) -> None:
        s = self.engine.scheduler
        self.engine.caches.check_invariants()
        held = [row for r in s.running for row in r.all_rows]
        assert sorted(held + s.free_rows) == list(range(self.engine.config.max_particles))
        if not s.running:
            assert self.engine.stats()["policy_blocks_in_use"] == 0

    def teardown(self) -> None:
        self.fault.clear()
        for _ in range(DRAIN_STEPS):
            if not self.engine.has_work:
                break
            self.record(self.engine.step())
        assert not self.engine.has_work, f"stuck: {len(self.engine.waiting)} waiting, {len(self.engine.running)} running"
        assert set(self.added) == set(self.ended), "a request ended with neither a result nor an error"
        assert self.engine.stats()["policy_blocks_in_use"] == 0


@pytest.mark.slow
def test_engine_always_makes_progress(policy_dir, one_thread):
    EngineMachine.engine = small_engine(policy_dir)
    EngineMachine.ops = 0
    run_state_machine_as_test(EngineMachine, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
        suppress_health_check=list(HealthCheck)))
    assert EngineMachine.ops >= 10_000


def test_queued_requests_run_after_one_outgrows_the_cache(policy_dir):
    """The issue's case: a preemption paused admission, then the request left running failed with
    OutOfBlocks instead of finishing; admission must resume (it used to hang forever)."""
    engine = Engine(EngineConfig(model=policy_dir, num_blocks=40, block_size=16), prm_fn=prm)
    big = engine.add_request(Request(prompt="hello", sampling=SamplingParams(
        max_step_tokens=32, max_steps=10, stop_on_eos=False, seed=0), search=SearchParams("best_of_n", 8)))
    small = Request(prompt="hi", sampling=SamplingParams(seed=1, max_steps=10, max_step_tokens=8, stop_on_eos=False),
                    search=SearchParams(n_particles=4))
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(r=engine.generate([small])), daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "generate() hung behind a request that failed"
    assert len(out["r"][0].particles) == 4
    assert engine.stats()["preemptions"] >= 1
    assert not engine.has_work and engine.stats()["policy_blocks_in_use"] == 0
    assert not engine.abort(big)  # it already ended (with OutOfBlocks)
