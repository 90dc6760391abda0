"""The incremental, forked PRM (own paged cache) and the value head against from-scratch transformers."""
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2Model

from pfengine import Engine, EngineConfig, SearchParams, Request, SamplingParams


def head_prob(hidden: torch.Tensor, t: dict[str, torch.Tensor]) -> float:
    h = torch.relu(hidden @ t["score.0.weight"].T + t["score.0.bias"])
    return float((h @ t["score.2.weight"].T + t["score.2.bias"]).softmax(-1)[1])


def run_pf(engine: Engine, aggregation: str, seed: int = 3):
    req = Request(prompt="Step 1: add 17 and 25.",
                  sampling=SamplingParams(seed=seed, max_step_tokens=5, max_steps=4),
                  search=SearchParams(n_particles=6, aggregation=aggregation))
    return engine.generate([req])[0]


@pytest.mark.parametrize("aggregation", ["model", "last"])
def test_forked_prm_scores_equal_from_scratch_forward(policy_dir, prm_dir, aggregation):
    engine = Engine(EngineConfig(model=policy_dir, prm=prm_dir, num_blocks=256, block_size=8))
    result = run_pf(engine, aggregation)
    backbone = Qwen2Model.from_pretrained(prm_dir, dtype=torch.float32).eval()
    head = {k: v for k, v in load_file(f"{prm_dir}/model.safetensors").items() if k.startswith("score")}
    tag = engine.tokenizer.convert_tokens_to_ids("<extra_0>")
    prompt = engine.tokenizer.encode("Step 1: add 17 and 25.")
    assert result.stats.resamples >= 2
    for p in result.particles:
        ends = p.step_starts[1:] + [len(p.token_ids)]
        steps = [p.token_ids[s:e] for s, e in zip(p.step_starts, ends)]
        if aggregation == "model":
            ids = prompt + p.token_ids + [tag]
        else:
            ids = prompt + [t for s in steps for t in s + [tag]]
        with torch.no_grad():
            hidden = backbone(torch.tensor([ids])).last_hidden_state[0, -1]
        assert p.score == pytest.approx(head_prob(hidden, head), abs=1e-4)
    assert engine.stats()["prm_blocks_in_use"] == 0


def test_value_head_scores_equal_policy_hidden_state(policy_dir, value_head_file):
    engine = Engine(EngineConfig(model=policy_dir, prm=value_head_file, num_blocks=256, block_size=8))
    result = run_pf(engine, "last")
    hf = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    head = load_file(value_head_file)
    prompt = engine.tokenizer.encode("Step 1: add 17 and 25.")
    for p in result.particles:
        with torch.no_grad():
            hidden = hf.model(torch.tensor([prompt + p.token_ids])).last_hidden_state[0, -1]
        assert p.score == pytest.approx(head_prob(hidden, head), abs=1e-4)
