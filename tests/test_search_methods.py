"""Every search method on one engine: semantics pinned with deterministic callable PRMs, the
budget respected, and no token forwarded twice (policy and PRM)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from pfengine import Engine, EngineConfig, Request, SamplingParams, SearchParams
from pfengine.state import FINISH_REASONS


def req(method: str, n: int = 8, seed: int = 0, max_steps: int = 4, step_tokens: int = 5, **search) -> Request:
    return Request(prompt="Step 1: add 17 and 25.",
                   sampling=SamplingParams(seed=seed, max_step_tokens=step_tokens, max_steps=max_steps),
                   search=SearchParams(method=method, n_particles=n, **search))


def length_prm(prompt: str, steps: list[str]) -> float:
    """Deterministic, and different across particles: favours text with many digits."""
    text = "".join(steps)
    return min(0.95, 0.05 + 0.9 * sum(c.isdigit() for c in text) / max(1, len(text)))


@pytest.fixture(scope="module")
def engine(policy_dir):
    return Engine(EngineConfig(model=policy_dir, num_blocks=512, block_size=8), prm_fn=length_prm)


def distinct(prompt_len: int, seqs) -> int:
    return prompt_len + len({tuple(s[:k]) for s in seqs for k in range(1, len(s) + 1)})


def test_beam_keeps_exactly_the_top_n_over_m(engine):
    r = engine.generate([req("beam_search", n=8, beam_width=4)])[0]
    assert 0 < len(r.particles) <= 8
    first = r.trace[0]
    survivors = sorted(set(first.ancestors))
    ranked = sorted(range(8), key=lambda i: first.scores[i], reverse=True)
    assert survivors == sorted(ranked[:2])
    assert sorted(first.ancestors) == sorted(survivors * 4)
    scores = [p.score for p in r.particles]
    assert scores == sorted(scores, reverse=True)
    assert all(p.finish_reason in FINISH_REASONS for p in r.particles)


def test_dvts_subtrees_keep_their_best(engine):
    r = engine.generate([req("dvts", n=8, beam_width=4)])[0]
    assert len(r.particles) == 2  # one answer per subtree of width 4
    for tr in r.trace:
        if tr.ancestors is None:
            continue
        for lo in (0, 4):
            group = tr.ancestors[lo:lo + 4]
            assert len(set(group)) == 1 and lo <= group[0] < lo + 4
            assert tr.scores[group[0]] == max(tr.scores[lo:lo + 4])


def test_best_of_n_returns_the_max_and_never_forks(engine):
    r = engine.generate([req("best_of_n", n=6)])[0]
    assert all(tr.ancestors is None for tr in r.trace)
    assert r.best == max(range(6), key=lambda i: r.particles[i].score)
    assert r.particles[r.best].score == pytest.approx(length_prm("", r.particles[r.best].steps))


def test_self_consistency_returns_the_mode(policy_dir):
    engine = Engine(EngineConfig(model=policy_dir, num_blocks=512, block_size=8))  # no PRM needed
    r = engine.generate([req("self_consistency", n=8, max_steps=3, step_tokens=8)])[0]
    answers = [p.answer for p in r.particles]
    counts = {a: answers.count(a) for a in answers if a is not None}
    assert counts, "random text should contain numbers"
    assert counts[r.particles[r.best].answer] == max(counts.values())


def test_weighted_best_of_n_votes_by_score(engine):
    r = engine.generate([req("weighted_best_of_n", n=8, max_steps=3, step_tokens=8)])[0]
    totals: dict[str, float] = {}
    for p in r.particles:
        if p.answer is not None:
            totals[p.answer] = totals.get(p.answer, 0.0) + p.weight
    assert r.particles[r.best].answer == max(totals, key=totals.get)


def test_greedy_matches_transformers_generate(policy_dir, engine):
    r = engine.generate([req("greedy", n=1, max_steps=3, step_tokens=6)])[0]
    hf = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    prompt = engine.tokenizer.encode("Step 1: add 17 and 25.")
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=18, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()
    assert r.particles[0].token_ids == out[:len(r.particles[0].token_ids)]


def test_particle_gibbs_keeps_its_reference(engine):
    r = engine.generate([req("particle_gibbs", n=8, iterations=2, max_steps=3)])[0]
    sweeps = [[tr for tr in r.trace if tr.sweep == s] for s in (0, 1)]
    assert sweeps[0] and sweeps[1]
    ref_final = sweeps[1][-1].tokens[3]  # the last slot of sweep 2 holds the full reference at the end
    assert ref_final in sweeps[0][-1].tokens, "the reference is one of sweep 1's final particles"
    for k, tr in enumerate(sweeps[1]):
        assert not tr.scored[3]  # the reference is never re-scored
        assert ref_final[:len(tr.tokens[3])] == tr.tokens[3]
    assert len(r.particles) == 4


def test_parallel_tempering_runs_chains_and_answers_from_the_cold_one(engine):
    r = engine.generate([req("parallel_tempering", n=8, temperatures=(1.0, 4.0))])[0]
    assert len(r.particles) == 4
    assert any(tr.ancestors is not None for tr in r.trace)


@pytest.mark.parametrize("resampling", ["systematic", "stratified", "multinomial", "residual"])
def test_pf_resampling_methods_keep_the_budget(engine, resampling):
    r = engine.generate([req("particle_filter", n=8, resampling=resampling)])[0]
    assert len(r.particles) == 8
    for tr in r.trace:
        assert tr.ancestors is None or (len(tr.ancestors) == 8 and all(0 <= a < 8 for a in tr.ancestors))


def test_pf_ess_threshold_zero_never_resamples(engine):
    r = engine.generate([req("particle_filter", ess_threshold=0.0)])[0]
    assert all(tr.ancestors is None for tr in r.trace) and r.stats.resamples == 0


def test_pf_removed_finished_particles_are_never_ancestors(policy_dir):
    engine = Engine(EngineConfig(model=policy_dir, num_blocks=512, block_size=8), prm_fn=length_prm)
    engine.eos_ids = frozenset(range(0, 384, 5))
    r = engine.generate([req("particle_filter", n=8, max_steps=6, finished="remove")])[0]
    finished_seen = 0
    for tr in r.trace:
        if tr.ancestors is None:
            continue
        done = {i for i, t in enumerate(tr.tokens) if t and t[-1] in engine.eos_ids}
        finished_seen += len(done)
        for i, a in enumerate(tr.ancestors):
            assert (a in done) == (i in done) and (i not in done or a == i)
    assert finished_seen


def test_pf_selection_options_and_expected_accuracy(engine):
    vote = engine.generate([req("particle_filter", selection="vote", max_steps=3, step_tokens=8)])[0]
    answers = [p.answer for p in vote.particles]
    ref = next(a for a in answers if a is not None)
    scored = engine.generate([Request(prompt="Step 1: add 17 and 25.", reference_answer=ref,
                                      sampling=SamplingParams(seed=0, max_step_tokens=8, max_steps=3),
                                      search=SearchParams(selection="sample", annealing=True))])[0]
    expected = sum(p.weight for p in scored.particles if p.answer == ref)
    assert scored.expected_accuracy == pytest.approx(expected)
    assert 0 <= scored.best < 8


@pytest.mark.parametrize("method,extra", [
    ("particle_filter", {}), ("beam_search", {"beam_width": 2}), ("dvts", {"beam_width": 2}),
    ("best_of_n", {}), ("parallel_tempering", {}), ("particle_gibbs", {"iterations": 2}),
])
def test_no_token_is_forwarded_twice(policy_dir, prm_dir, method, extra):
    engine = Engine(EngineConfig(model=policy_dir, prm=prm_dir, num_blocks=512, block_size=8))
    r = engine.generate([req(method, n=8, seed=4, aggregation="last", **extra)])[0]
    stats = engine.stats()
    if method == "particle_gibbs":  # sweep 2 reuses the reference's cached prefixes
        ref = r.trace[-1].tokens[-1]
        ref_nodes = {tuple(ref[:k]) for k in range(1, len(ref) + 1)}
        sweep_nodes = [{tuple(t[:k]) for tr in r.trace if tr.sweep == s for t in tr.tokens for k in range(1, len(t) + 1)}
                       for s in (0, 1)]
        expected = r.stats.prompt_tokens + len(sweep_nodes[0]) + len(sweep_nodes[1] - ref_nodes)
    else:
        expected = distinct(r.stats.prompt_tokens, [t for tr in r.trace for t in tr.tokens])
    assert stats["policy_tokens_forwarded"] == expected
    assert stats["prm_tokens_forwarded"] == expected
    assert stats["policy_blocks_in_use"] == stats["prm_blocks_in_use"] == 0


def test_methods_without_a_prm_never_forward_it(policy_dir, prm_dir):
    """Greedy and self-consistency beside a PF request on an engine with a PRM model: the PRM reads
    the PF request's tokens only, and the PRM-free results equal those of an engine without a PRM."""
    engine = Engine(EngineConfig(model=policy_dir, prm=prm_dir, num_blocks=512, block_size=8))
    plain = Engine(EngineConfig(model=policy_dir, num_blocks=512, block_size=8))
    free = [req("greedy", n=1, max_steps=3), req("self_consistency", n=4, seed=2, max_steps=3)]
    pf = req("particle_filter", n=4, seed=3, max_steps=3, aggregation="last")
    with_prm = engine.generate(free + [pf])
    stats = engine.stats()
    pf_result = with_prm[-1]
    assert stats["prm_tokens_forwarded"] == distinct(pf_result.stats.prompt_tokens,
                                                     [t for tr in pf_result.trace for t in tr.tokens])
    assert stats["prm_blocks_in_use"] == stats["policy_blocks_in_use"] == 0
    for a, b in zip(with_prm[:2], plain.generate(free)):
        assert [p.token_ids for p in a.particles] == [p.token_ids for p in b.particles]


def test_bad_search_params():
    with pytest.raises(ValueError, match="method: must be one of"):
        SearchParams(method="mcts")
    with pytest.raises(ValueError, match="multiple of SearchParams.beam_width"):
        SearchParams(method="beam_search", n_particles=6, beam_width=4)
    with pytest.raises(ValueError, match="multiple of SearchParams.iterations"):
        SearchParams(method="particle_gibbs", n_particles=6, iterations=4)
    with pytest.raises(ValueError, match="ess_threshold"):
        SearchParams(ess_threshold=1.5)
