"""Smoke test of the toy training script (tiny budget): layout, reproducibility, and that its
outputs load through the engine's public loader and run particle filtering."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2ForCausalLM

from pfengine import Engine, EngineConfig, PRMConfig
from pfengine.toy import train
from pfengine.toy.modeling import StepCutter, label
from pfengine.toy.pf import MAX_STEP_TOKENS, PRM_CONFIG, pf_request
from pfengine.toy import prm_eval
from pfengine.toy.prm_eval import auroc
from pfengine.toy.task import heldout_set
from pfengine.toy.tokenizer import build_tokenizer, prompt_ids, step_ids


def run_tiny(out) -> None:
    """One thread: tiny matmuls only lose to threading overhead, badly so on a busy machine."""
    threads = torch.get_num_threads()
    try:
        train.main(["--out", str(out), "--budget", "tiny", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy-tiny")
    run_tiny(out)
    return out


def test_layout(trained):
    policy, prm = trained / "policy", trained / "prm"
    for d in (policy, prm):
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (d / f).is_file(), f"{d / f} missing"
    assert json.loads((policy / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert json.loads((prm / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    eos = json.loads((policy / "generation_config.json").read_text())["eos_token_id"]
    H = json.loads((policy / "config.json").read_text())["hidden_size"]
    head = load_file(str(policy / "value_head.safetensors"))
    assert {k: tuple(v.shape) for k, v in head.items()} == {
        "score.0.weight": (H, H), "score.0.bias": (H,), "score.2.weight": (2, H), "score.2.bias": (2,)}
    assert load_file(str(prm / "model.safetensors")).keys() == load_file(str(policy / "model.safetensors")).keys()
    report = json.loads((trained / "report.json").read_text())
    assert report["tokenizer"]["same_ids_after_reload"]
    assert report["vocab_size"] > 259
    engine = Engine(EngineConfig(model=str(policy), num_blocks=64), prm_fn=lambda prompt, steps: 0.5)
    assert engine.tokenizer.convert_ids_to_tokens(eos) == "<|im_end|>"


def test_reproducible(trained, tmp_path):
    run_tiny(tmp_path)
    for f in ("policy/model.safetensors", "policy/value_head.safetensors", "prm/model.safetensors"):
        a, b = load_file(str(trained / f)), load_file(str(tmp_path / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


@pytest.mark.parametrize("prm", ["value_head", "model"])
def test_outputs_run_pf_through_the_engine(trained, prm):
    path = trained / "policy" / "value_head.safetensors" if prm == "value_head" else trained / "prm"
    engine = Engine(EngineConfig(model=str(trained / "policy"), prm=str(path), num_blocks=256,
                                 prm_config=PRM_CONFIG if prm == "model" else PRMConfig()))
    problem = heldout_set(1)[0]
    result = engine.generate([pf_request(problem, n_particles=4, seed=0, max_steps=3, max_step_tokens=6)])[0]
    assert len(result.particles) == 4
    assert all(0.0 <= p.score <= 1.0 for p in result.particles)
    assert all(len(p.steps) <= 3 for p in result.particles)
    assert engine.stats()["policy_blocks_in_use"] == 0


def test_step_cutter_matches_engine_steps(trained):
    """Labels are computed on steps cut like the engine cuts them."""
    engine = Engine(EngineConfig(model=str(trained / "policy"), num_blocks=256), prm_fn=lambda prompt, steps: 0.5)
    result = engine.generate([pf_request(heldout_set(1)[0], n_particles=3, seed=1, max_steps=4, max_step_tokens=5)])[0]
    cutter = StepCutter(engine.tokenizer, max_step_tokens=5)
    for p in result.particles:
        spans = cutter.spans(p.token_ids)
        assert [s for s, _ in spans] == p.step_starts[:len(spans)]


@pytest.mark.parametrize("scores, labels, want", [
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),
    ([1, 2, 3, 4], [0, 0, 1, 1], 1.0),
    ([4, 3, 2, 1], [0, 0, 1, 1], 0.0),
    ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1], 0.5),       # ties count one half
    ([0.2, 0.5, 0.5, 0.9], [0, 0, 1, 1], 0.875),
])
def test_auroc(scores, labels, want):
    assert auroc(scores, labels) == pytest.approx(want)


def test_auroc_matches_pairwise_definition():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 20, (300,), generator=g).float().numpy()
    y = (torch.rand(300, generator=g) < 0.3).numpy()
    pos, neg = s[y], s[~y]
    pairs = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert auroc(s, y) == pytest.approx(pairs)


def test_likelihood_scores_are_the_least_likely_token_of_a_step_and_of_a_prefix(trained):
    """prm_eval's view of the teacher: a step's score is its least likely token's probability (each
    token scored alone here, from the text before it), a prefix's the minimum over its steps."""
    teacher = Qwen2ForCausalLM.from_pretrained(str(trained / "prm")).eval()
    tokenizer = build_tokenizer(seed=0)
    cutter = StepCutter(tokenizer, MAX_STEP_TOKENS)
    samples = [label(cutter, p, prompt_ids(tokenizer, p.text), [t for s in step_ids(tokenizer, steps) for t in s])
               for p in heldout_set(2) for steps in (p.steps(), ["12 + 3 = 15"] + p.steps()[1:])]
    step, prefix = prm_eval.likelihood_probs(teacher, samples, tokenizer.pad_token_id)
    want = []
    with torch.no_grad():
        for s in samples:
            ids = s.prompt + s.tokens
            for a, e in s.spans:
                logps = [float(torch.log_softmax(teacher(input_ids=torch.tensor([ids[:k]])).logits[0, -1], -1)[ids[k]])
                         for k in range(len(s.prompt) + a, len(s.prompt) + e)]
                want.append(math.exp(min(logps)))
    assert step == pytest.approx(want, rel=1e-4)
    k = 0
    for s in samples:
        n = len(s.spans)
        assert list(prefix[k:k + n]) == [min(step[k:k + i + 1]) for i in range(n)]
        k += n
