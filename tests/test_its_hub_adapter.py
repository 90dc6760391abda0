"""its_hub's algorithms on pfengine through the adapter, and the PRM adapter against the engine's own PRM."""
import asyncio
import math

import pytest

pytest.importorskip("its_hub")
from its_hub.api import ChatMessage, GenerationUsage  # noqa: E402
from its_hub.core.algorithms.beam_search import BeamSearch  # noqa: E402
from its_hub.core.algorithms.bon import BestOfN  # noqa: E402
from its_hub.core.algorithms.particle_gibbs import ParticleFiltering, ParticleGibbs  # noqa: E402
from its_hub.core.algorithms.self_consistency import SelfConsistency  # noqa: E402
from its_hub.core.lms.step_generation import StepGeneration  # noqa: E402

from pfengine import Engine, EngineConfig, Request, SamplingParams, SearchParams  # noqa: E402
from pfengine.its_hub_adapter import (EngineLanguageModel, EngineOutcomeRewardModel,  # noqa: E402
                                      EngineProcessRewardModel)
from pfengine.prompting import chat_prompt  # noqa: E402
from pfengine.search.answers import extract_answer  # noqa: E402
from pfengine.toy import task  # noqa: E402
from pfengine.toy.pf import POLICY, PRM, PRM_CONFIG, is_bundled  # noqa: E402

QUESTION = "What is 17 + 25?"


class RecordingLM(EngineLanguageModel):
    """The adapter, remembering every conversation it was sent and every text it returned."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[list] = []
        self.returned: list[str] = []

    async def agenerate(self, messages, stop=None, **kwargs):
        out = await super().agenerate(messages, stop=stop, **kwargs)
        conversations = [messages] if not isinstance(messages[0], list) else messages
        self.sent += conversations
        self.returned += [r["content"] for r in ([out] if isinstance(out, dict) else out)]
        return out


@pytest.fixture(scope="module")
def engine(policy_dir, value_head_file):
    return Engine(EngineConfig(model=policy_dir, prm=value_head_file, num_blocks=512, block_size=8))


def particle_steps(p) -> list[list[int]]:
    ends = p.step_starts[1:] + [len(p.token_ids)]
    return [p.token_ids[s:e] for s, e in zip(p.step_starts, ends)]


def test_self_consistency_runs_on_the_engine(engine):
    lm = RecordingLM(engine, max_tokens=6, seed=0)
    batches = []
    run = lm._worker._run
    lm._worker._run = lambda requests: batches.append(len(requests)) or run(requests)
    try:
        result = SelfConsistency().infer(lm, QUESTION, budget=4, return_response_only=False)
    finally:
        lm._worker._run = run
    contents = [r["content"] for r in result.responses]
    assert len(contents) == 4 and sorted(contents) == sorted(lm.returned)
    assert all(contents)
    assert result.the_one["content"] in contents
    assert sum(batches) == 4 and len(batches) <= 4
    assert result.usage.completion_tokens > 0 and result.usage.num_calls == 4
    assert engine.stats()["policy_blocks_in_use"] == 0


def test_particle_filtering_runs_on_the_engine(engine):
    lm = RecordingLM(engine, max_tokens=5, seed=1)
    prm = EngineProcessRewardModel(engine)
    pf = ParticleFiltering(StepGeneration(step_token="\n\n", max_steps=3), prm)
    result = pf.infer(lm, QUESTION, budget=4, return_response_only=False)
    assert len(result.responses) == 4 and len(result.log_weights_lst) == 4
    produced = set(lm.returned)
    for response in result.responses:
        steps = response["content"].split("\n\n")
        assert 1 <= len(steps) <= 4 and all(s in produced for s in steps)  # every step came from the engine
    # after the first step, each call continued the particle's assistant message
    continued = [c for c in lm.sent if c[-1].role == "assistant"]
    assert continued and all(c[-1].content.endswith("\n\n") for c in continued)
    assert engine.stats()["policy_blocks_in_use"] == 0


def test_one_call_with_many_conversations_is_one_engine_batch(engine):
    lm = EngineLanguageModel(engine, max_tokens=4, seed=2)
    batches = []
    run = lm._worker._run
    lm._worker._run = lambda requests: batches.append(len(requests)) or run(requests)
    usage = GenerationUsage()
    try:
        out = lm.generate([[ChatMessage("user", f"q{k}")] for k in range(3)], usage_accumulator=usage,
                          temperature=[0.5, 0.8, 1.0])
    finally:
        lm._worker._run = run
    assert batches == [3] and len(out) == 3 and all(r["role"] == "assistant" for r in out)
    assert usage.num_calls == 3 and usage.completion_tokens <= 12
    again = EngineLanguageModel(engine, max_tokens=4, seed=2).generate(
        [[ChatMessage("user", f"q{k}")] for k in range(3)], temperature=[0.5, 0.8, 1.0])
    assert again == out  # seeded adapter: reproducible


def test_stop_strings_cut_the_response(engine):
    lm = EngineLanguageModel(engine, max_tokens=30)
    conv = [{"role": "user", "content": QUESTION}]
    for seed in range(20):
        text = lm.generate(conv, seed=seed)["content"]
        stop = next((text[i:i + 2] for i in range(1, len(text) - 1) if text[i:i + 2].isalpha()), None)
        if stop:
            break
    assert stop, "no usable stop string in 20 samples"
    assert lm.generate(conv, seed=seed, stop=stop)["content"] == text[:text.index(stop)]
    kept = lm.generate(conv, seed=seed, stop=stop, include_stop_str_in_output=True)["content"]
    assert kept == text[:text.index(stop) + len(stop)]


def test_continue_final_message_keeps_the_step_delimiter(engine):
    conv = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Step 1: add.\n\n"}]
    prompt = chat_prompt(engine.tokenizer, conv, continue_final_message=True)
    assert isinstance(prompt, str) and prompt.endswith("<|im_start|>assistant\nStep 1: add.\n\n")
    assert "<|im_end|>" not in prompt.split("<|im_start|>assistant")[-1]


@pytest.mark.parametrize("kind", ["value_head", "prm_model", "prm_model_last", "callable"])
def test_prm_adapter_scores_equal_the_engines(kind, policy_dir, value_head_file, prm_dir):
    aggregation = "last" if kind == "prm_model_last" else "model"
    fn = (lambda prompt, steps: (len("".join(steps)) % 7 + 1) / 9) if kind == "callable" else None
    prm = {"value_head": value_head_file, "callable": None}.get(kind, prm_dir)
    engine = Engine(EngineConfig(model=policy_dir, prm=prm, num_blocks=256, block_size=8), prm_fn=fn)
    for prompt in ("Step 1: add 17 and 25.", [{"role": "user", "content": QUESTION}]):
        sampling = SamplingParams(seed=0, max_steps=3, max_step_tokens=5)
        search = SearchParams(n_particles=4, aggregation=aggregation)
        result = engine.generate([Request(prompt=prompt, sampling=sampling, search=search)])[0]
        for p in result.particles:
            scores = engine.score_steps(prompt, particle_steps(p), aggregation)
            assert scores[-1] == pytest.approx(p.score, abs=1e-5)
            if kind == "callable":  # the callable sees texts: exact on the engine's own step texts
                assert engine.score_steps(prompt, p.steps, aggregation)[-1] == p.score
    assert engine.stats()["policy_blocks_in_use"] == 0 and engine.stats().get("prm_blocks_in_use", 0) == 0

    # its_hub's interface: a response string split into steps at "\n\n", the prompt as a user message
    adapter = EngineProcessRewardModel(engine, aggregation=aggregation)
    responses = ["Step 1: add 17 and 25 to get 42.\n\nThe answer is \\boxed{42}.", "We compute 3 * 4 = 12."]
    scores = adapter.score(QUESTION, responses)
    user = [{"role": "user", "content": QUESTION}]
    expected = [engine.score_steps(user, ["Step 1: add 17 and 25 to get 42.\n\n", "The answer is \\boxed{42}."],
                            aggregation)[-1], engine.score_steps(user, ["We compute 3 * 4 = 12."], aggregation)[-1]]
    assert scores == pytest.approx(expected, abs=1e-6) and all(0 <= s <= 1 for s in scores)
    assert adapter.score(QUESTION, responses[1]) == pytest.approx(scores[1], abs=1e-6)
    if kind == "callable":
        rendered = engine.tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        p = fn(rendered, ["Step 1: add 17 and 25 to get 42.\n\n", "The answer is \\boxed{42}."])
        assert scores[0] == pytest.approx(p, abs=1e-6)
    assert asyncio.run(adapter.ascore(QUESTION, responses)) == pytest.approx(scores, abs=1e-6)
    assert not math.isnan(scores[0])


ALGORITHMS = {
    "ParticleFiltering": lambda prm, orm: ParticleFiltering(StepGeneration(step_token="\n\n", max_steps=3), prm),
    "ParticleGibbs": lambda prm, orm: ParticleGibbs(StepGeneration(step_token="\n\n", max_steps=3), prm,
                                                    num_iterations=2),
    "BeamSearch": lambda prm, orm: BeamSearch(StepGeneration(step_token="\n\n", max_steps=3), prm, beam_width=2),
    "SelfConsistency": lambda prm, orm: SelfConsistency(consistency_space_projection_func=extract_answer),
    "BestOfN": lambda prm, orm: BestOfN(orm),
}


@pytest.mark.parametrize("name", ALGORITHMS)
def test_its_hub_algorithms_run_on_the_engine(engine, name):
    """Each of its_hub's own algorithm classes, on the adapter: its answer is a response the engine
    produced (PRM algorithms: steps it produced), and no KV block is left in use."""
    lm = RecordingLM(engine, max_tokens=5, seed=3)
    algorithm = ALGORITHMS[name](EngineProcessRewardModel(engine), EngineOutcomeRewardModel(engine))
    answer = algorithm.infer(lm, QUESTION, budget=4)["content"]
    produced = set(lm.returned)
    assert answer in produced or all(s in produced for s in answer.rstrip("\n").split("\n\n"))
    assert engine.stats()["policy_blocks_in_use"] == 0


def test_outcome_reward_model_scores_the_whole_response_with_the_prm(engine):
    response = "Step 1: add 17 and 25 to get 42.\n\nThe answer is \\boxed{42}."
    orm = EngineOutcomeRewardModel(engine)
    conversation = [ChatMessage("user", QUESTION), ChatMessage("assistant", response)]
    expected = engine.score_steps([{"role": "user", "content": QUESTION}],
                                  ["Step 1: add 17 and 25 to get 42.\n\n", "The answer is \\boxed{42}."])[-1]
    assert orm.score(conversation) == pytest.approx(expected, abs=1e-6)
    assert orm.score([conversation, conversation[:1] + [ChatMessage("assistant", "12")]])[0] == orm.score(conversation)
    with pytest.raises(ValueError, match="ends with the assistant's response"):
        orm.score(conversation[:1])


@pytest.mark.skipif(not is_bundled(), reason="the bundled toy checkpoints are missing")
def test_particles_end_at_eos_without_a_stop_token():
    """its_hub only sees a particle stop at its stop_token; without one it asks to continue every
    particle up to max_steps. The adapter answers the continuation of a solution the model ended
    (EOS) with an empty step, without running the model, so each particle keeps the solution it
    finished: its text ends with the answer step, and its PRM score does not move."""
    engine = Engine(EngineConfig(model=str(POLICY), prm=str(PRM), prm_config=PRM_CONFIG))
    lm = RecordingLM(engine, max_tokens=64, temperature=0.5, seed=0)
    prm = EngineProcessRewardModel(engine)
    problem = task.heldout_set(1)[0]
    result = ParticleFiltering(StepGeneration(step_token="\n\n", max_steps=len(problem.steps()) + 3), prm).infer(
        lm, problem.text, budget=4, return_response_only=False)
    answered = [r["content"].rstrip("\n") for r in result.responses if "\\boxed{" in r["content"]]
    assert answered, "no particle wrote its answer"
    for solution in answered:  # nothing after the answer step but the delimiters of empty steps
        assert task.ANSWER_RE.fullmatch(solution.split("\n\n")[-1]), solution
    ended = [c for c, r in zip(lm.sent, lm.returned) if r == "" and c[-1].role == "assistant"]
    assert ended, "no particle ended before max_steps"
    runs = []
    run = lm._worker._run
    lm._worker._run = lambda requests: runs.append(len(requests)) or run(requests)
    try:
        assert lm.generate(ended[0]) == {"role": "assistant", "content": ""} and runs == []
    finally:
        lm._worker._run = run
    text = ended[0][-1].content
    assert prm.score(problem.text, text) == prm.score(problem.text, text.rstrip("\n"))
