"""The README's "Scaling" arithmetic (``bench/scaling.py``): parameter counts against transformers'
own Qwen2 models of those configs (built on the meta device: no memory, no download), the KV formula
per rank, and the README's tables are the script's output."""
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model

from bench.scaling import POLICY, POLICY_CONFIG, PRM, PRM_CONFIG, Group, report

README = Path(__file__).resolve().parents[1] / "README.md"


def counted(model_class, config: dict) -> int:
    fields = {k: v for k, v in config.items() if k != "architectures"}
    with torch.device("meta"):
        model = model_class(Qwen2Config(**fields))
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_are_transformers():
    assert POLICY.params == counted(Qwen2ForCausalLM, POLICY_CONFIG)
    h = PRM_CONFIG["hidden_size"]
    assert PRM.params == counted(Qwen2Model, PRM_CONFIG) + (h * h + h) + (2 * h + 2)  # score.0, score.2


def test_kv_bytes_per_token_per_rank():
    for k in (2, 4, 8):  # layers x KV heads / TP x head dim x (K, V) x 2 bytes
        assert POLICY.kv_bytes_per_token(k) == 64 * (8 // k) * 128 * 2 * 2
        assert PRM.kv_bytes_per_token(k) == 80 * (8 // k) * 128 * 2 * 2
    g = Group(4)
    assert g.blocks * 16 * g.kv_per_token <= g.kv_room < (g.blocks + 1) * 16 * g.kv_per_token


def test_readme_tables_are_the_scripts():
    assert report(0.5) in README.read_text()
