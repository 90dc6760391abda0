"""Bad input at the API boundary: one clear error per case (type and message), nothing corrupted."""
import logging
import math

import pytest

from pfengine import Engine, EngineConfig, Request, SamplingParams, SearchParams


@pytest.fixture(scope="module")
def engine(policy_dir):
    return Engine(EngineConfig(model=policy_dir, num_blocks=128, block_size=8, max_particles=32, max_model_len=96),
                  prm_fn=lambda prompt, steps: 0.5)


REQUEST_CASES = [
    ("prompt too long", lambda: Request(prompt="7 + 8 = 15. " * 40), ValueError,
     "prompt: .* does not fit EngineConfig.max_model_len=96"),
    ("too many particles", lambda: Request(prompt="hi", search=SearchParams(n_particles=64)), ValueError,
     "n_particles: 64 particles need 65 cache rows; EngineConfig.max_particles is 32"),
    ("needs a PRM", None, ValueError, "method: 'particle_filter' needs a PRM"),
]
PARAM_CASES = [
    ("empty prompt", lambda: Request(prompt=""), ValueError, "prompt: must not be empty"),
    ("empty chat", lambda: Request(prompt=[]), ValueError, "prompt: chat messages must not be empty"),
    ("prompt type", lambda: Request(prompt=42), TypeError, "prompt: expected a string or a list of chat messages"),
    ("zero particles", lambda: SearchParams(n_particles=0), ValueError, "n_particles: must be >= 1, got 0"),
    ("negative budget", lambda: SearchParams(n_particles=-4), ValueError, "n_particles: must be >= 1"),
    ("negative temperature", lambda: SamplingParams(temperature=-0.5), ValueError, "temperature: must be >= 0"),
    ("top_p zero", lambda: SamplingParams(top_p=0.0), ValueError, r"top_p: must be in \(0.0, 1.0\], got 0.0"),
    ("top_p above one", lambda: SamplingParams(top_p=1.2), ValueError, r"top_p: must be in \(0.0, 1.0\]"),
    ("unknown method", lambda: SearchParams(method="mcts"), ValueError, "method: must be one of"),
    ("unknown option", lambda: SearchParams(particles_per_step=3), TypeError, "particles_per_step"),
    ("unknown aggregation", lambda: SearchParams(aggregation="mean"), ValueError, "aggregation: must be one of"),
    ("unknown resampling", lambda: SearchParams(resampling="optimal"), ValueError, "resampling: must be one of"),
    ("bad block size", lambda: EngineConfig(model="x", block_size=12), ValueError,
     "block_size: must be a positive power of two"),
    ("bad kv dtype", lambda: EngineConfig(model="x", kv_dtype="int8"), ValueError, "kv_dtype: must be one of"),
    ("cuda_graphs not a bool", lambda: EngineConfig(model="x", cuda_graphs="no"), TypeError,
     "cuda_graphs: expected true or false, got 'no'"),
]


@pytest.mark.parametrize("name,make,error,message", REQUEST_CASES, ids=[c[0] for c in REQUEST_CASES])
def test_bad_request(engine, policy_dir, name, make, error, message):
    if make is None:
        target = Engine(EngineConfig(model=policy_dir, num_blocks=16))
        request = Request(prompt="hi")
    else:
        target, request = engine, make()
    with pytest.raises(error, match=message):
        target.generate([request])
    assert not target.has_work and target.stats()["policy_blocks_in_use"] == 0


@pytest.mark.parametrize("name,make,error,message", PARAM_CASES, ids=[c[0] for c in PARAM_CASES])
def test_bad_parameters(name, make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, 7.0])
def test_a_prm_that_returns_garbage_only_zeroes_that_particle(policy_dir, caplog, bad):
    calls = []

    def prm(prompt, steps):
        calls.append(1)
        return bad if len(calls) % 4 == 1 else 0.6

    engine = Engine(EngineConfig(model=policy_dir, num_blocks=128, block_size=8), prm_fn=prm)
    with caplog.at_level(logging.WARNING, logger="pfengine"):
        r = engine.generate([Request(prompt="Step 1: add", sampling=SamplingParams(seed=1, max_step_tokens=4,
                                     max_steps=2), search=SearchParams(n_particles=4, resampling="multinomial"))])[0]
    assert "outside [0, 1]" in caplog.text
    first = r.trace[0]
    assert math.exp(first.log_weights[0]) < 1e-6 and 0 not in first.ancestors
    assert all(math.isfinite(p.weight) for p in r.particles)
