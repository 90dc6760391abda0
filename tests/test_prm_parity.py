"""The incremental, forked PRM (own paged cache) and the value head against from-scratch transformers."""
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM

from pfengine import Engine, EngineConfig, PRMConfig, SearchParams, Request, SamplingParams
from pfengine.model.checkpoint import CheckpointError
from pfengine.prm import load_value_head


def head_prob(hidden: torch.Tensor, t: dict[str, torch.Tensor]) -> float:
    h = torch.relu(hidden @ t["score.0.weight"].T + t["score.0.bias"])
    return float((h @ t["score.2.weight"].T + t["score.2.bias"]).softmax(-1)[1])


def run_pf(engine: Engine, aggregation: str, seed: int = 3):
    req = Request(prompt="Step 1: add 17 and 25.",
                  sampling=SamplingParams(seed=seed, max_step_tokens=5, max_steps=4),
                  search=SearchParams(n_particles=6, aggregation=aggregation))
    return engine.generate([req])[0]


def hf_backbone(path: str):
    """transformers' base model for the checkpoint's family (Qwen2Model, GraniteModel, ...)."""
    return AutoModel.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("backbone,aggregation", [("qwen2-gqa", "model"), ("qwen2-gqa", "last"),
                                                  ("qwen3-qknorm", "model"), ("granite-mult", "model"),
                                                  ("phi3-longrope", "last"), ("llama-bias", "model")])
def test_forked_prm_scores_equal_from_scratch_forward(checkpoint_dir, prm_checkpoint_dir, backbone, aggregation):
    """A Qwen2.5-Math-PRM-layout PRM on each backbone (the policy of the same family)."""
    prm_dir = prm_checkpoint_dir(backbone)
    engine = Engine(EngineConfig(model=checkpoint_dir(backbone), prm=prm_dir, num_blocks=256, block_size=8))
    result = run_pf(engine, aggregation)
    model = hf_backbone(prm_dir)
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
            hidden = model(torch.tensor([ids])).last_hidden_state[0, -1]
        assert p.score == pytest.approx(head_prob(hidden, head), abs=1e-4)
    assert engine.stats()["prm_blocks_in_use"] == 0


@pytest.mark.parametrize("backbone", ["llama-bias", "mistral-gqa", "qwen3-qknorm", "granite-mult"])
def test_math_shepherd_prm_matches_from_scratch(policy_dir, checkpoint_dir, backbone):
    """A causal-LM PRM read as P('+') / (P('+') + P('-')) at the step tag (Granite: after its logits scaling)."""
    prm_dir = checkpoint_dir(backbone)
    cfg = PRMConfig(step_tag="<extra_0>", good_token="+", bad_token="-")
    engine = Engine(EngineConfig(model=policy_dir, prm=prm_dir, prm_config=cfg, num_blocks=256, block_size=8))
    r = engine.generate([Request(prompt="Step 1: add 17 and 25.",
                                 sampling=SamplingParams(seed=0, max_step_tokens=5, max_steps=3),
                                 search=SearchParams(n_particles=4, aggregation="last"))])[0]
    hf = AutoModelForCausalLM.from_pretrained(prm_dir, dtype=torch.float32).eval()
    tok = engine.tokenizer
    tag, good, bad = (tok.encode(t, add_special_tokens=False)[0] for t in ("<extra_0>", "+", "-"))
    prompt = tok.encode("Step 1: add 17 and 25.")
    for p in r.particles:
        ends = p.step_starts[1:] + [len(p.token_ids)]
        ids = prompt + [t for s, e in zip(p.step_starts, ends) for t in p.token_ids[s:e] + [tag]]
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1]
        expected = float(torch.softmax(logits[[good, bad]], 0)[0])
        assert p.score == pytest.approx(expected, abs=1e-4)


def test_prm_with_a_shorter_context_is_refused(checkpoint_dir, prm_checkpoint_dir):
    """A LongRoPE PRM computes exactly only within its original context: the policy must stay within it."""
    prm = prm_checkpoint_dir("phi3-longrope")
    with pytest.raises(CheckpointError, match="the PRM computes at most 64 positions .*max_model_len <= 64"):
        Engine(EngineConfig(model=checkpoint_dir("qwen2-gqa"), prm=prm, num_blocks=64))
    engine = Engine(EngineConfig(model=checkpoint_dir("qwen2-gqa"), prm=prm, num_blocks=64, max_model_len=64))
    assert engine.max_len == 64


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


def test_value_head_is_loaded_on_the_policys_device(value_head_file):
    """The head reads the policy's hidden states where they are (meta stands for a GPU here)."""
    head = load_value_head(value_head_file, 64, "meta")
    assert {t.device.type for t in (head.w1, head.b1, head.w2, head.b2)} == {"meta"}


def test_prm_reads_each_step_in_one_extend_and_siblings_fork_mid_step(policy_dir, prm_dir):
    """Low temperature: siblings often sample the same token, so the PRM catches up on the shared
    tokens before they fork mid-step. The PRM never runs a per-token decode, reads each distinct token
    once, and its scores still equal a from-scratch forward."""
    engine = Engine(EngineConfig(model=policy_dir, prm=prm_dir, num_blocks=256, block_size=8))
    calls = {"decode": 0, "extend_rows": [], "catch_up": 0}
    runner, prm = engine.prm_runner, engine.prm
    decode, extend, catch_up = runner.decode, runner.extend, prm.catch_up

    def count_decode(*a, **k):
        calls["decode"] += 1
        return decode(*a, **k)

    def count_extend(rows, token_lists, **kw):
        calls["extend_rows"].append(len(rows))
        return extend(rows, token_lists, **kw)

    def count_catch_up(*args):
        calls["catch_up"] += 1
        return catch_up(*args)

    runner.decode, runner.extend, prm.catch_up = count_decode, count_extend, count_catch_up
    req = Request(prompt="Step 1: add 17 and 25.",
                  sampling=SamplingParams(seed=5, temperature=0.3, max_step_tokens=6, max_steps=4),
                  search=SearchParams(n_particles=8))
    result = engine.generate([req])[0]
    assert calls["decode"] == 0 and calls["catch_up"] >= 1
    # one extend for the prompt, one per round, one per catch-up
    assert len(calls["extend_rows"]) == 1 + result.stats.steps + calls["catch_up"]
    seqs = [t for tr in result.trace for t in tr.tokens]
    union = result.stats.prompt_tokens + len({tuple(s[:k]) for s in seqs for k in range(1, len(s) + 1)})
    assert engine.stats()["prm_tokens_forwarded"] == union
    backbone = hf_backbone(prm_dir)
    head = {k: v for k, v in load_file(f"{prm_dir}/model.safetensors").items() if k.startswith("score")}
    tag = engine.tokenizer.convert_tokens_to_ids("<extra_0>")
    prompt = engine.tokenizer.encode("Step 1: add 17 and 25.")
    for p in result.particles:
        with torch.no_grad():
            hidden = backbone(torch.tensor([prompt + p.token_ids + [tag]])).last_hidden_state[0, -1]
        assert p.score == pytest.approx(head_prob(hidden, head), abs=1e-4)
