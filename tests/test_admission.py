"""Admission and cleanup: a request that fits is not stuck behind one that does not, the one that does
not is not starved either, and however a ``generate()`` call ends its requests leave the engine."""
import pytest

from pfengine import Engine, EngineConfig, Request, SamplingParams, SearchParams


def req(seed: int, n: int, steps: int = 2, step_tokens: int = 4, **search) -> Request:
    return Request(prompt=f"Step {seed}: add 17 and 25.",
                   sampling=SamplingParams(seed=seed, max_steps=steps, max_step_tokens=step_tokens, stop_on_eos=False),
                   search=SearchParams(n_particles=n, **search))


def engine_with(policy_dir: str, **config) -> Engine:
    return Engine(EngineConfig(model=policy_dir, num_blocks=512, block_size=8, **config), prm_fn=lambda p, s: 0.5)


def admission_order(engine: Engine, requests: list[Request]) -> list[int]:
    """Ids in the order the engine started them, running everything to the end."""
    ids = [engine.add_request(r) for r in requests]
    started: list[int] = []
    while engine.has_work:
        engine.step()
        started += [r.id for r in engine.running if r.id not in started]
    assert sorted(started) == sorted(ids)
    return [ids.index(i) for i in started]


def test_a_request_that_fits_starts_before_one_that_does_not(policy_dir):
    """22 cache rows: the first request takes 12 + 1 (its prompt's row), the second (10 + 1) must wait
    for it; the small third one (2 + 1) fits beside the first and starts at once."""
    engine = engine_with(policy_dir, max_particles=22)
    order = admission_order(engine, [req(0, 12, steps=6), req(1, 10), req(2, 2)])
    assert order == [0, 2, 1]


def test_a_waiting_request_is_passed_over_at_most_max_overtakes_times(policy_dir):
    engine = engine_with(policy_dir, max_particles=22, max_overtakes=2)
    small = [req(10 + k, 2, steps=1) for k in range(6)]
    order = admission_order(engine, [req(0, 12, steps=8), req(1, 10)] + small)
    assert order[:4] == [0, 2, 3, 1], "after two overtakes the big waiting request goes first"


def test_generate_cleans_up_after_an_interrupt(policy_dir, monkeypatch):
    engine = engine_with(policy_dir)
    decode, calls = engine._decode, []

    def interrupted(running):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return decode(running)

    monkeypatch.setattr(engine, "_decode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.generate([req(0, 8, steps=4), req(1, 4, steps=4)])
    assert not engine.has_work and engine.stats()["policy_blocks_in_use"] == 0
    assert len(engine.scheduler.free_rows) == engine.config.max_particles
    monkeypatch.undo()
    assert len(engine.generate([req(2, 4)])[0].particles) == 4


def test_an_engine_fault_fails_the_requests_it_touched_and_the_engine_goes_on(policy_dir, monkeypatch):
    engine = engine_with(policy_dir)
    decode = engine._decode

    def broken(running):
        raise RuntimeError("a kernel failed")

    monkeypatch.setattr(engine, "_decode", broken)
    with pytest.raises(RuntimeError, match="a kernel failed"):
        engine.generate([req(0, 4)])
    assert not engine.has_work and engine.stats()["policy_blocks_in_use"] == 0
    monkeypatch.setattr(engine, "_decode", decode)
    assert len(engine.generate([req(1, 4)])[0].particles) == 4


def test_closing_a_stream_early_aborts_its_request(policy_dir):
    engine = engine_with(policy_dir)
    events = engine.stream(req(0, 4, steps=6))
    next(events)
    events.close()
    assert not engine.has_work and engine.stats()["policy_blocks_in_use"] == 0


def test_a_second_thread_cannot_drive_the_engine_at_once(policy_dir):
    engine = engine_with(policy_dir)
    engine._driving.acquire()  # as if another thread were inside step()
    try:
        with pytest.raises(RuntimeError, match="driven by another thread"):
            engine.step()
    finally:
        engine._driving.release()
