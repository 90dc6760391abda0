"""Malformed or unsupported checkpoints fail with a message that names the problem."""
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from pfengine import Engine, EngineConfig, Request
import torch

from pfengine.model.checkpoint import CheckpointError, read_config
from pfengine.random_model import save_random_prm, save_tokenizer


def broken_copy(src: str, tmp_path, edit_config=None, edit_tensors=None) -> str:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        t = load_file(str(dst / "model.safetensors"))
        edit_tensors(t)
        save_file(t, str(dst / "model.safetensors"))
    return str(dst)


def _set(d, k, v):
    d[k] = v


CASES = [
    ("unsupported architecture", lambda c: _set(c, "architectures", ["GPT2LMHeadModel"]), None, "unsupported"),
    ("missing key", lambda c: c.pop("hidden_size"), None, "missing required key 'hidden_size'"),
    ("bad activation", lambda c: _set(c, "hidden_act", "gelu"), None, "hidden_act 'gelu' unsupported"),
    ("bad rope", lambda c: _set(c, "rope_parameters", {"rope_type": "yarn", "factor": 2.0}), None, "rope type 'yarn'"),
    ("missing tensor", None, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing 1 tensor"),
    ("shape mismatch", lambda c: _set(c, "intermediate_size", 96), None, "config implies"),
]


@pytest.mark.parametrize("name,edit_config,edit_tensors,message", CASES, ids=[c[0] for c in CASES])
def test_bad_checkpoint(policy_dir, tmp_path, name, edit_config, edit_tensors, message):
    path = broken_copy(policy_dir, tmp_path, edit_config, edit_tensors)
    with pytest.raises(CheckpointError, match=message):
        Engine(EngineConfig(model=path, num_blocks=16), prm_fn=lambda p, s: 0.5)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_config(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json"):
        read_config(tmp_path)


def test_sharded_checkpoint_loads(policy_dir, tmp_path):
    """Shards + index, as large Hugging Face checkpoints are saved."""
    path = tmp_path / "sharded"
    shutil.copytree(policy_dir, path)
    tensors = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(path / file))
    index = {"weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    engine = Engine(EngineConfig(model=str(path), num_blocks=16), prm_fn=lambda p, s: 0.5)
    assert engine.policy.decoder.cfg.num_layers == 2


def test_prm_needs_prm_architecture(policy_dir):
    with pytest.raises(CheckpointError, match="Qwen2ForProcessRewardModel"):
        Engine(EngineConfig(model=policy_dir, prm=policy_dir, num_blocks=16))


def test_pf_needs_a_prm(policy_dir):
    engine = Engine(EngineConfig(model=policy_dir, num_blocks=16))  # fine for PRM-free methods
    with pytest.raises(ValueError, match="'particle_filter' needs a PRM"):
        engine.generate([Request(prompt="hi")])


def test_integer_weights_are_refused(policy_dir, tmp_path):
    path = broken_copy(policy_dir, tmp_path, edit_tensors=lambda t: t.update(
        {"model.norm.weight": t["model.norm.weight"].to(torch.int32)}))
    with pytest.raises(CheckpointError, match="model.norm.weight has dtype torch.int32"):
        Engine(EngineConfig(model=path, num_blocks=16), prm_fn=lambda p, s: 0.5)


@pytest.mark.parametrize("missing,message", [("model.safetensors", "no model.safetensors"),
                                             ("tokenizer.json", "cannot load its tokenizer")])
def test_missing_files(policy_dir, tmp_path, missing, message):
    path = broken_copy(policy_dir, tmp_path)
    (tmp_path / "ckpt" / missing).unlink()
    if missing == "tokenizer.json":
        (tmp_path / "ckpt" / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match=message):
        Engine(EngineConfig(model=path, num_blocks=16), prm_fn=lambda p, s: 0.5)


def test_prm_with_another_tokenizer_is_refused(policy_dir, tmp_path):
    prm = save_random_prm(tmp_path / "prm", vocab_size=384)
    save_tokenizer(prm, vocab_size=300)  # same layout, other merges: ids no longer agree
    with pytest.raises(CheckpointError, match="PRM tokenizer differs from the policy's"):
        Engine(EngineConfig(model=policy_dir, prm=str(prm), num_blocks=16))
