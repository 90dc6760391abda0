"""`pfengine distill`: PF traces -> (state, PRM step score) pairs -> a value head the engine runs."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pfengine import Engine, EngineConfig, Request, SamplingParams, SearchParams
from pfengine.cli import main
from pfengine.distill import FitConfig, Head, fit_head, hidden_at, trajectories


def pf(policy_dir, prm_dir, n: int = 6, seed: int = 3, aggregation: str = "last"):
    engine = Engine(EngineConfig(model=policy_dir, prm=prm_dir, num_blocks=512))
    req = Request(prompt="Once upon a time", sampling=SamplingParams(temperature=1.0, seed=seed, max_steps=5,
                                                                    max_step_tokens=3, max_tokens=15),
                  search=SearchParams(n_particles=n, aggregation=aggregation))
    return engine, engine.generate([req])[0]


def test_trajectories_hold_every_scored_state_once(policy_dir, prm_dir):
    """Oracle: the trace itself -- every (tokens, score) a round scored is one state of exactly one
    lineage, at one of its step ends, with that score."""
    engine, result = pf(policy_dir, prm_dir)
    assert any(tr.ancestors not in (None, list(range(6))) for tr in result.trace), "no resampling to test"
    want = {tuple(tr.tokens[i]): tr.scores[i] for tr in result.trace for i in range(len(tr.tokens)) if tr.scored[i]}
    prompt = engine.tokenizer.encode("Once upon a time")
    got = []
    for t in trajectories(prompt, result):
        assert t.prompt == prompt and t.ends == sorted(set(t.ends)) and t.ends[-1] == len(t.tokens)
        got += [(tuple(t.tokens[:e]), s) for e, s in zip(t.ends, t.scores)]
    assert len(got) == len(set(k for k, _ in got)) == len(want)
    assert dict(got) == want


def test_fit_head_recovers_a_known_judge():
    """Soft targets from a known logistic judge on random features: the fitted head reproduces them."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4000, 16, generator=g)
    w = torch.randn(16, generator=g) / 2
    target = torch.sigmoid(hidden @ w)
    head = fit_head(hidden, target, FitConfig(epochs=40, seed=1))
    with torch.no_grad():
        fitted = torch.sigmoid(head.logit(hidden))
    assert float((target - target.mean()).abs().mean()) > 0.25  # a constant would be far off
    assert float((fitted - target).abs().mean()) < 0.03


def test_distill_command_writes_a_head_the_engine_runs(policy_dir, prm_dir, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"problem": p, "answer": "1"}) for p in ["One", "Two two", "Three"]) + "\n")
    out = tmp_path / "head.safetensors"
    argv = ["distill", str(data), "--model", policy_dir, "--prm", prm_dir, "--particles", "4", "--no-chat",
            "--aggregation", "last", "--max-steps", "3", "--max-step-tokens", "4", "--epochs", "2",
            "--out", str(out), "--json", "--no-progress"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompts"] == 3 and report["states"] > 3
    again = tmp_path / "again.safetensors"
    assert main(argv[:-4] + ["--out", str(again), "--json", "--no-progress"]) == 0
    assert again.read_bytes() == out.read_bytes()  # same seed, same bytes
    # Oracle: the written head on transformers' hidden states scores every state PF scored with it.
    engine, result = pf(policy_dir, str(out))
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    head = Head(policy.config.hidden_size)
    head.score.load_state_dict({k[len("score."):]: v for k, v in load_file(str(out)).items()})
    prompt = engine.tokenizer.encode("Once upon a time")
    states = [(toks, score) for tr in result.trace for toks, score, on in zip(tr.tokens, tr.scores, tr.scored) if on]
    hidden = hidden_at(policy, [prompt + t for t, _ in states], [[len(prompt) + len(t) - 1] for t, _ in states],
                       engine.tokenizer.pad_token_id or 0)
    with torch.no_grad():
        want = torch.sigmoid(head.logit(hidden))
    assert torch.allclose(torch.tensor([score for _, score in states]), want, atol=1e-4)


GOOD = json.dumps({"problem": "a", "answer": "1"})


@pytest.mark.parametrize("lines, extra, message", [
    (["{not json"], [], ":1: not JSON"),
    ([GOOD, json.dumps({"answer": "b"})], [], ":2: 'problem' must be a non-empty string"),
    ([], [], "no problems in the file"),
    ([GOOD], ["--particles", "0"], "--particles"),
    ([GOOD], ["--aggregation", "min"], "distill traces particle_filter under model or last, got particle_filter / min"),
    ([GOOD], ["--method", "best_of_n"], "got best_of_n / model"),
    ([GOOD], ["--out", "head.bin"], "expected a .safetensors file name"),
])
def test_distill_rejects_bad_input(policy_dir, prm_dir, tmp_path, capsys, lines, extra, message):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(lines))
    args = ["distill", str(data), "--model", policy_dir, "--prm", prm_dir, "--no-chat", "--no-progress", "--out",
            str(tmp_path / "h.safetensors")] + extra
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_distill_needs_a_separate_prm(policy_dir, tmp_path, capsys):
    head = tmp_path / "head.safetensors"
    head.write_bytes(b"")
    data = tmp_path / "prompts.jsonl"
    data.write_text(GOOD)
    assert main(["distill", str(data), "--model", policy_dir, "--prm", str(head), "--out",
                 str(tmp_path / "h.safetensors")]) == 2
    assert "expected a PRM checkpoint directory" in capsys.readouterr().err
