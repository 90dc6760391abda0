"""Smoke test of the toy training script (tiny budget): layout, reproducibility, and that its
outputs load through the engine's public loader and run particle filtering."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2ForCausalLM

from pfengine import Engine, EngineConfig
from pfengine.toy import train
from pfengine.toy.modeling import StepCutter
from pfengine.toy.pf import pf_request
from pfengine.toy.prm_eval import auroc
from pfengine.toy.task import heldout_set
from pfengine.toy.tokenizer import build_tokenizer


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
    assert json.loads((prm / "config.json").read_text())["architectures"] == ["Qwen2ForProcessRewardModel"]
    eos = json.loads((policy / "generation_config.json").read_text())["eos_token_id"]
    H = json.loads((policy / "config.json").read_text())["hidden_size"]
    head = load_file(str(policy / "value_head.safetensors"))
    assert {k: tuple(v.shape) for k, v in head.items()} == {
        "score.0.weight": (H, H), "score.0.bias": (H,), "score.2.weight": (2, H), "score.2.bias": (2,)}
    tensors = load_file(str(prm / "model.safetensors"))
    assert all(k.startswith(("model.", "score.")) for k in tensors)
    assert {"score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"} <= set(tensors)
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
    engine = Engine(EngineConfig(model=str(trained / "policy"), prm=str(path), num_blocks=256))
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


def test_prm_keeps_the_frozen_bottom_of_the_teacher():
    """The embeddings and the bottom ``prm_frozen_layers`` layers leave training exactly as the
    teacher had them; every layer above (the teacher's and the new ones) and the final norm learn."""
    tokenizer = build_tokenizer(seed=0)
    b = train.BUDGETS["tiny"]
    torch.manual_seed(0)
    teacher = Qwen2ForCausalLM(train.qwen2_config(b.policy, tokenizer)).eval()
    stream = train.SlipStream(tokenizer, seed=0)
    backbone, _ = train.train_prm(teacher, tokenizer, [next(stream) for _ in range(8)], b, seed=0)
    before = teacher.model.state_dict()
    for name, value in backbone.state_dict().items():
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        frozen = name.startswith("embed_tokens") or (layer is not None and layer < b.prm_frozen_layers)
        if frozen:
            assert torch.equal(value, before[name]), name
        elif name in before:
            assert not torch.equal(value, before[name]), name
