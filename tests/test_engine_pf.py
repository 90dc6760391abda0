"""Step-wise particle filtering end to end on a tiny model with callable PRMs."""
import random

import pytest
import torch

from pfengine import Engine, EngineConfig, SearchParams, Request, SamplingParams
from pfengine.delimiter import DelimiterMatcher
from pfengine.search.answers import extract_answer


def request(seed: int = 0, n: int = 8, **sampling) -> Request:
    sp = dict(seed=seed, max_step_tokens=6, max_steps=5) | sampling
    return Request(prompt="Step 1: add 17 and 25.", sampling=SamplingParams(**sp), search=SearchParams(n_particles=n))


def distinct_prefixes(prompt_len: int, sequences: list[list[int]]) -> int:
    """Tokens in the union of all particles' distinct prefixes: each trie node is forwarded once."""
    return prompt_len + len({tuple(s[:k]) for s in sequences for k in range(1, len(s) + 1)})


@pytest.mark.parametrize("family", ["qwen2-gqa", "qwen3-qknorm", "granite-mult", "phi3-longrope", "llama-bias"])
def test_recompute_ratio_is_exactly_one(checkpoint_dir, prm_checkpoint_dir, family):
    """Policy and PRM (Qwen2.5-Math-PRM layout) of each family: every distinct prefix forwarded once."""
    engine = Engine(EngineConfig(model=checkpoint_dir(family), prm=prm_checkpoint_dir(family), num_blocks=512,
                                 block_size=8))
    results = engine.generate([request(seed=s, n=16) for s in (1, 2)])
    stats = engine.stats()
    union = sum(distinct_prefixes(r.stats.prompt_tokens, [t for tr in r.trace for t in tr.tokens]) for r in results)
    assert all(r.stats.resamples >= 2 for r in results)
    assert stats["policy_tokens_forwarded"] == union
    assert stats["prm_tokens_forwarded"] == union
    scored = {tuple(t) for r in results for tr in r.trace for t, s in zip(tr.tokens, tr.scored) if s}
    assert stats["prm_tags_forwarded"] == len(scored)
    assert stats["policy_blocks_in_use"] == stats["prm_blocks_in_use"] == 0


def test_preferred_particle_takes_over(policy_dir):
    """A PRM that scores the first particle it sees each round near 1 and the rest near 0."""
    seen: list[str] = []

    def prm(prompt: str, steps: list[str]) -> float:
        seen.append(steps[-1])
        return 1.0 if len(seen) % 8 == 1 else 0.0

    engine = Engine(EngineConfig(model=policy_dir, num_blocks=256, block_size=8), prm_fn=prm)
    result = engine.generate([request(n=8, max_steps=3)])[0]
    first = result.trace[0]
    assert first.ancestors == [0] * 8
    winner = first.tokens[0]
    for p in result.particles:
        assert p.token_ids[:len(winner)] == winner
    assert result.stats.resamples == 2  # the last round has nothing left to extend


def test_finished_particles_stay_frozen(policy_dir):
    engine = Engine(EngineConfig(model=policy_dir, num_blocks=256, block_size=8),
                    prm_fn=lambda prompt, steps: min(0.9, 0.1 + 0.1 * len(steps[-1])))
    engine.eos_ids = frozenset(range(0, 384, 4))  # a quarter of the vocabulary ends a particle
    result = engine.generate([request(n=8, max_steps=6, seed=5)])[0]
    finished_at: dict[tuple[int, ...], int] = {}
    for k, tr in enumerate(result.trace):
        for i, toks in enumerate(tr.tokens):
            t = tuple(toks)
            if t in finished_at:  # a copy of a finished particle: unchanged, not re-scored
                assert not tr.scored[i]
            elif toks and toks[-1] in engine.eos_ids:
                finished_at[t] = k
    assert finished_at, "no particle finished early; the test needs EOS to happen"
    assert any(k < len(result.trace) - 1 for k in finished_at.values())
    for p in result.particles:  # each particle says why it ended: end-of-text, or cut off by the step budget
        ended = p.token_ids[-1] in engine.eos_ids
        assert p.finish_reason == ("eos" if ended else "max_steps") and p.cut_off == (not ended)
        assert ended or len(p.steps) == 6


def test_particles_say_which_limit_cut_them_off(policy_dir):
    """With EOS impossible, every particle ends at a limit, and says which: the step budget, the
    token budget, or the context (less the PRM's step-tag room)."""
    def ended(engine: Engine, **sampling) -> set[tuple[str, int]]:
        engine.eos_ids = frozenset()
        result = engine.generate([request(n=2, max_step_tokens=4, **sampling)])[0]
        assert all(p.cut_off for p in result.particles)
        return {(p.finish_reason, len(p.token_ids)) for p in result.particles}

    config = dict(model=policy_dir, num_blocks=256, block_size=8)
    prm = lambda prompt, steps: 0.5  # noqa: E731
    assert ended(Engine(EngineConfig(**config), prm_fn=prm), max_steps=3) == {("max_steps", 12)}
    assert ended(Engine(EngineConfig(**config), prm_fn=prm), max_steps=10, max_tokens=6) == {("max_tokens", 6)}
    prompt = len(Engine(EngineConfig(**config)).tokenizer.encode("Step 1: add 17 and 25."))
    short = Engine(EngineConfig(**config, max_model_len=prompt + 10 + 7), prm_fn=prm)
    assert ended(short, max_steps=10) == {("max_model_len", 7)}


def test_seeded_runs_repeat_exactly_alone_or_batched(policy_dir):
    engine = Engine(EngineConfig(model=policy_dir, num_blocks=512, block_size=8),
                    prm_fn=lambda prompt, steps: (len(steps[-1]) % 7 + 1) / 8)
    alone = engine.generate([request(seed=11)])[0]
    again = engine.generate([request(seed=11)])[0]
    mixed = engine.generate([request(seed=3, n=5), request(seed=11), request(seed=4, n=3)])[1]
    for other in (again, mixed):
        assert [p.token_ids for p in other.particles] == [p.token_ids for p in alone.particles]
        assert [p.weight for p in other.particles] == [p.weight for p in alone.particles]
        assert [tr.ancestors for tr in other.trace] == [tr.ancestors for tr in alone.trace]
    assert engine.stats()["policy_blocks_in_use"] == 0


def test_many_requests_share_the_cache_and_finish_clean(policy_dir, value_head_file):
    engine = Engine(EngineConfig(model=policy_dir, prm=value_head_file, num_blocks=256, block_size=8, max_particles=40))
    reqs = [request(seed=s, n=n) for s, n in enumerate([1, 4, 16, 8, 12, 3])]  # more than fits at once
    results = engine.generate(reqs)
    assert len(results) == 6
    for r, req in zip(results, reqs):
        assert len(r.particles) == req.search.n_particles
        assert sum(p.weight for p in r.particles) == pytest.approx(1.0, abs=1e-5)
        assert r.text == r.particles[r.best].text and r.answer == r.particles[r.best].answer
        assert r.answer == extract_answer(r.text)
        assert r.best == max(range(len(r.particles)), key=lambda i: r.particles[i].weight)
    assert engine.stats()["policy_blocks_in_use"] == 0
    engine.policy.blocks.check_invariants()


def test_step_ends_on_a_token_that_merges_the_delimiter():
    texts = {1000: "so", 1001: " 5.\n", 1002: "\nThe", 1003: "x\n\ny"}
    for tokens, ends in [([1000, 1001, 1002], 3), ([1003], 1), ([1000, 1001], None)]:
        matcher, state = DelimiterMatcher("\n\n", texts.__getitem__, 1100), torch.zeros(1, dtype=torch.int64)
        for k, t in enumerate(tokens, 1):
            state, done = matcher.advance(state, torch.tensor([t]))
            assert bool(done[0]) == (k == ends)


@pytest.mark.parametrize("seed", range(5))
def test_the_delimiter_is_found_on_token_ids_where_text_matching_finds_it(seed):
    """The matcher (a string automaton over token texts, transitions cached per (state, token)) ends
    a step exactly where searching the step's text for the delimiter would: random vocabularies of
    texts built from the delimiter's own characters, many rows advancing at once."""
    rng = random.Random(seed)
    delimiter = rng.choice(["\n\n", "abab", "aab", "xyzx", "\n"])
    alphabet = sorted(set(delimiter)) + ["q"]
    texts = {t: "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4))) for t in range(60)}
    matcher = DelimiterMatcher(delimiter, texts.__getitem__, 60)
    rows = [[rng.randrange(60) for _ in range(30)] for _ in range(8)]
    state = torch.zeros(len(rows), dtype=torch.int64)
    text = [""] * len(rows)
    for k in range(30):
        new = torch.tensor([r[k] for r in rows])
        state, done = matcher.advance(state, new)
        for i, t in enumerate(new.tolist()):
            piece = texts[t]
            text[i] += piece
            tail = text[i][-(len(piece) + len(delimiter) - 1):] if piece else ""
            expected = delimiter in tail
            assert bool(done[i]) == expected, (delimiter, text[i])
            if expected:
                text[i] = ""  # the next step begins


def test_greedy_particles_are_identical(policy_dir):
    engine = Engine(EngineConfig(model=policy_dir, num_blocks=256, block_size=8), prm_fn=lambda p, s: 0.5)
    result = engine.generate([request(n=4, temperature=0.0)])[0]
    assert len({tuple(p.token_ids) for p in result.particles}) == 1


def test_kv_exhaustion_preempts_and_results_match_a_large_cache(policy_dir, prm_dir):
    reqs = [request(seed=s, n=8, max_steps=4) for s in range(6)]
    big = Engine(EngineConfig(model=policy_dir, prm=prm_dir, num_blocks=1024, block_size=8))
    expected = big.generate(reqs)
    peak = big.policy.blocks  # the large run never needs to preempt
    assert big.stats()["preemptions"] == 0 and peak.blocks_in_use == 0
    small = Engine(EngineConfig(model=policy_dir, prm=prm_dir, num_blocks=48, block_size=8))
    got = small.generate(reqs)
    stats = small.stats()
    assert stats["preemptions"] > 0 and stats["recomputed_tokens"] > 0
    for a, b in zip(expected, got):
        assert [p.token_ids for p in a.particles] == [p.token_ids for p in b.particles]
        assert [p.weight for p in a.particles] == pytest.approx([p.weight for p in b.particles], abs=1e-6)
    assert stats["policy_blocks_in_use"] == stats["prm_blocks_in_use"] == 0
    small.policy.blocks.check_invariants()
    small.prm_runner.blocks.check_invariants()


def test_a_request_that_can_never_fit_is_refused(policy_dir):
    engine = Engine(EngineConfig(model=policy_dir, num_blocks=8, block_size=8), prm_fn=lambda p, s: 0.5)
    with pytest.raises(ValueError, match=r"needs about \d+ KV blocks .* the cache has 8"):
        engine.generate([request(n=16)])


def test_a_lone_request_outgrowing_the_cache_fails_clearly(policy_dir):
    engine = Engine(EngineConfig(model=policy_dir, num_blocks=14, block_size=8), prm_fn=lambda p, s: 0.5)
    from pfengine.cache import OutOfBlocks
    with pytest.raises(OutOfBlocks, match="alone outgrows the KV cache"):
        engine.generate([request(n=4, max_steps=40, max_step_tokens=8)])
