"""The likelihood PRM (a causal LM scoring each step by its own tokens' log-probabilities) against
log-probabilities recomputed by transformers on the full text."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from pfengine import Engine, EngineConfig, PRMConfig, Request, SamplingParams, SearchParams
from pfengine.cli import main
from pfengine.config import InvalidArgument
from pfengine.model.checkpoint import CheckpointError

PROMPT = "Step 1: add 17 and 25."


@pytest.fixture(scope="module")
def hf_logp(policy_dir):
    """``logp(ids)``: transformers' log-probability of each of ``ids[1:]`` given the tokens before it."""
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()

    def logp(ids: list[int]) -> list[float]:
        with torch.no_grad():
            out = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
        return out.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()

    return logp


def likelihood_engine(policy_dir: str, reduction: str = "min") -> Engine:
    return Engine(EngineConfig(model=policy_dir, prm=policy_dir, prm_config=PRMConfig(likelihood=reduction),
                               num_blocks=256, block_size=8))


def step_logp(hf_logp, prompt: list[int], prefix: list[int], step: list[int]) -> list[float]:
    return hf_logp(prompt + prefix + step)[len(prompt) + len(prefix) - 1:]


def count_calls(engine: Engine) -> dict[str, int]:
    calls = {"catch_up": 0}
    catch_up = engine.prm.catch_up

    def counted(*args):
        calls["catch_up"] += 1
        return catch_up(*args)

    engine.prm.catch_up = counted
    return calls


def reduce(logps: list[float], reduction: str) -> float:
    return min(logps) if reduction == "min" else sum(logps) / len(logps)


@pytest.mark.parametrize("reduction", ["min", "mean"])
def test_pf_step_scores_are_the_steps_logprob_through_forks(policy_dir, hf_logp, reduction):
    """Low temperature: siblings merge and fork mid-step (the PRM catches up first), and resampling
    forks every round. Each scored step's probability is its least likely token's (or its tokens'
    geometric mean), the PRM reads each distinct token once and no step tag."""
    engine = likelihood_engine(policy_dir, reduction)
    calls = count_calls(engine)
    req = Request(prompt=PROMPT, sampling=SamplingParams(seed=5, temperature=0.3, max_step_tokens=6, max_steps=4),
                  search=SearchParams(n_particles=8, aggregation="last"))
    result = engine.generate([req])[0]
    assert calls["catch_up"] >= 1 and result.stats.resamples >= 2
    prompt = engine.tokenizer.encode(PROMPT)
    checked = 0
    before = [[] for _ in range(8)]
    for tr in result.trace:
        for i, (tokens, scored, score) in enumerate(zip(tr.tokens, tr.scored, tr.scores)):
            if scored:
                step = tokens[len(before[i]):]
                assert tokens[:len(before[i])] == before[i] and step
                expected = reduce(step_logp(hf_logp, prompt, before[i], step), reduction)
                assert math.log(score) == pytest.approx(expected, abs=1e-4)
                checked += 1
        before = [tr.tokens[a] for a in (tr.ancestors or range(8))]
    assert checked >= 8 * 3
    seqs = [t for tr in result.trace for t in tr.tokens]
    distinct = len({tuple(s[:k]) for s in seqs for k in range(1, len(s) + 1)})
    stats = engine.stats()
    assert stats["prm_tokens_forwarded"] == len(prompt) - 1 + distinct  # recompute ratio 1.00
    assert stats["prm_tags_forwarded"] == 0 and stats["prm_blocks_in_use"] == 0


@pytest.mark.parametrize("seed", [2, 3])
def test_particle_gibbs_reference_prefixes_keep_the_likelihood_exact(policy_dir, hf_logp, seed):
    """The reference slot is cut back to a step boundary in the PRM's cache, one token behind as
    everywhere: each particle's last step is still scored by its tokens' mean log-probability."""
    engine = likelihood_engine(policy_dir, "mean")
    req = Request(prompt=PROMPT, sampling=SamplingParams(seed=seed, temperature=0.7, max_step_tokens=4, max_steps=4),
                  search=SearchParams(method="particle_gibbs", n_particles=8, iterations=2, aggregation="last"))
    result = engine.generate([req])[0]
    prompt = engine.tokenizer.encode(PROMPT)
    assert result.stats.resamples >= 2
    for p in result.particles:
        start = p.step_starts[-1]
        expected = step_logp(hf_logp, prompt, p.token_ids[:start], p.token_ids[start:])
        assert math.log(p.score) == pytest.approx(sum(expected) / len(expected), abs=1e-4)
    assert engine.stats()["prm_blocks_in_use"] == 0


def test_score_steps_takes_the_same_path(policy_dir, hf_logp):
    engine = likelihood_engine(policy_dir)
    steps = [" add 17", " and 25", " = 42."]
    got = engine.score_steps(PROMPT, steps, aggregation="last")
    prompt = engine.tokenizer.encode(PROMPT)
    ids = [engine.tokenizer.encode(s, add_special_tokens=False) for s in steps]
    for k, score in enumerate(got):
        prefix = [t for s in ids[:k] for t in s]
        assert math.log(score) == pytest.approx(min(step_logp(hf_logp, prompt, prefix, ids[k])), abs=1e-4)


def test_model_aggregation_judges_the_prefix_by_its_worst_step(policy_dir, hf_logp):
    """Under the default ``model`` aggregation a likelihood PRM's prefix score is its least likely
    step's (``min`` over steps), in score_steps and in a PF run alike."""
    engine = likelihood_engine(policy_dir)
    steps = [" add 17", " and 25", " = 42."]
    assert engine.score_steps(PROMPT, steps) == engine.score_steps(PROMPT, steps, aggregation="min")
    prompt = engine.tokenizer.encode(PROMPT)
    result = engine.generate([Request(PROMPT, SamplingParams(temperature=1.0, seed=3, max_steps=4, max_step_tokens=4),
                                      SearchParams(n_particles=6))])[0]
    assert result.stats.resamples >= 2
    for p in result.particles:
        bounds = list(p.step_starts) + [len(p.token_ids)]
        worst = min(min(step_logp(hf_logp, prompt, p.token_ids[:a], p.token_ids[a:b]))
                    for a, b in zip(bounds, bounds[1:]) if b > a)
        assert math.log(p.score) == pytest.approx(worst, abs=1e-4)


def test_pf_runs_end_to_end_from_the_cli_flag(policy_dir, capsys):
    assert main(["generate", "--model", policy_dir, "--prm", policy_dir, "--prm-likelihood", "min", "--prompt", PROMPT,
                 "--seed", "0", "--max-steps", "3", "--max-step-tokens", "5", "--particles", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    scores = [p["score"] for p in out["particles"]]
    assert len(scores) == 4 and all(0 < s < 1 for s in scores)


def test_cli_flag_is_checked(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--prm-likelihood", "max", "--prompt", PROMPT])
    assert "--prm-likelihood: invalid choice: 'max'" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs,match", [({"likelihood": "max"}, "likelihood"),
                                          ({"likelihood": "min", "good_token": "+", "bad_token": "-"},
                                           "not both")])
def test_bad_likelihood_config_is_refused(kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        PRMConfig(**kwargs)


def test_likelihood_needs_a_causal_lm(policy_dir, prm_dir):
    with pytest.raises(CheckpointError, match="PRMConfig.likelihood"):
        Engine(EngineConfig(model=policy_dir, prm=prm_dir, prm_config=PRMConfig(likelihood="min")))
    with pytest.raises(CheckpointError, match="PRMConfig.likelihood"):
        Engine(EngineConfig(model=policy_dir, prm=policy_dir))


def test_likelihood_needs_a_directory(policy_dir, value_head_file):
    cfg = PRMConfig(likelihood="min")
    with pytest.raises(InvalidArgument, match="prm_config: .*EngineConfig.prm must be its directory"):
        Engine(EngineConfig(model=policy_dir, prm=value_head_file, prm_config=cfg))
    with pytest.raises(InvalidArgument, match="prm_config"):
        Engine(EngineConfig(model=policy_dir, prm_config=cfg), prm_fn=lambda prompt, steps: 0.5)


def test_a_refused_request_leaves_the_likelihood_engine_serving(policy_dir):
    """A request over the engine's limits, then one whose search options are reassigned to nonsense
    after construction: both refused with the field named, no block held in either cache, and the
    next request runs with the worst-step scores of a likelihood PRM."""
    engine = likelihood_engine(policy_dir)
    sampling = SamplingParams(seed=0, max_steps=3, max_step_tokens=4)
    with pytest.raises(InvalidArgument, match="n_particles"):
        engine.generate([Request(PROMPT, sampling, SearchParams(n_particles=10 ** 6))])
    bad = SearchParams(n_particles=4)
    bad.aggregation = "worst"
    with pytest.raises(InvalidArgument, match="aggregation"):
        engine.generate([Request(PROMPT, sampling, bad)])
    stats = engine.stats()
    assert stats["policy_blocks_in_use"] == stats["prm_blocks_in_use"] == 0
    result = engine.generate([Request(PROMPT, sampling, SearchParams(n_particles=4))])[0]
    assert len(result.particles) == 4 and all(0 < p.score < 1 for p in result.particles)
    assert engine.stats()["prm_blocks_in_use"] == 0
