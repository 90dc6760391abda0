import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (importing torch does not import triton)

from kernel_device import DEVICE  # noqa: E402

if DEVICE.type == "cpu":
    # Triton decides when it is first imported (transformers -> torch._dynamo imports it) whether its
    # own language helpers are interpreted; the kernel tests (tests/test_kernel_*.py) run Triton on
    # CPU tensors unless PFENGINE_TEST_DEVICE=cuda (tests/kernel_device.py), so the interpreter must be
    # on before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.register_assert_rewrite("kernel_cases", "kernel_paths")

from pfengine.random_model import save_random_model, save_random_prm, save_value_head  # noqa: E402

torch.set_num_threads(2)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.3, 2.1, 3.7], "long_factor": [1.5, 4.0, 9.0, 20.0]}
CHECKPOINTS = {
    "qwen2-gqa": dict(arch="qwen2"),
    "qwen2-tied": dict(arch="qwen2", tie=True, num_kv_heads=4),
    "llama3-gqa": dict(arch="llama", rope_scaling=LLAMA3_ROPE, num_heads=8, num_kv_heads=2),
    "llama-tied": dict(arch="llama", tie=True, num_kv_heads=1),
    "mistral-gqa": dict(arch="mistral", sliding_window=None),
    "llama-bias": dict(arch="llama", attention_bias=True, mlp_bias=True, norm_std=0.1),
    "qwen3-qknorm": dict(arch="qwen3", tie=True, head_dim=32, norm_std=0.1),  # head_dim != hidden / heads
    "granite-mult": dict(arch="granite", tie=True, embedding_multiplier=3.0, residual_multiplier=0.6,
                         attention_multiplier=0.0625, logits_scaling=2.0, norm_std=0.1),
    "phi3-fused": dict(arch="phi3", norm_std=0.1),  # phi-4's options: fused projections, GQA, plain RoPE
    "phi3-longrope": dict(arch="phi3", partial_rotary_factor=0.5, rope_scaling=LONGROPE,
                          original_max_position_embeddings=64, norm_std=0.1),
}
"""Tiny random checkpoints, one per architecture and distinctive option set; the parity tests run on each."""


@pytest.fixture(autouse=True)
def _triton_path(request, monkeypatch):
    """Tests marked ``triton`` run the kernels on their Triton path (interpreted on CPU). Set per
    test, not at import, so every other test keeps the default path."""
    if request.node.get_closest_marker("triton") is None:
        return
    triton = pytest.importorskip("triton")
    if DEVICE.type == "cpu" and type(triton.language.standard.zeros).__name__ != "InterpretedFunction":
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set", pytrace=False)
    monkeypatch.setenv("PFENGINE_TRITON", "1")


@pytest.fixture(autouse=True)
def _cpp_path(request, monkeypatch):
    """Tests marked ``cpp`` run the kernels' default CPU dispatch, which takes the C++ extension; they
    are skipped when ``pfengine._cpp`` is not built (a built one must load)."""
    if request.node.get_closest_marker("cpp") is None:
        return
    if importlib.util.find_spec("pfengine._cpp") is None:
        pytest.skip("pfengine._cpp is not built (pip install --no-build-isolation -e .)")
    importlib.import_module("pfengine._cpp")
    monkeypatch.delenv("PFENGINE_TRITON", raising=False)
    monkeypatch.delenv("PFENGINE_CPP", raising=False)


@pytest.fixture()
def one_thread():
    """One torch thread: a tiny model's steps are Python-bound, and a second thread only spins (on a
    shared 2-core box, OpenMP's barriers make every op up to 100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """``checkpoint_dir(name)``: a tiny random checkpoint saved once per session."""
    made: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in made:
            made[name] = str(save_random_model(tmp_path_factory.mktemp(name), **CHECKPOINTS[name]))
        return made[name]

    return get


@pytest.fixture(scope="session")
def policy_dir(checkpoint_dir) -> str:
    return checkpoint_dir("qwen2-gqa")


@pytest.fixture(scope="session")
def prm_checkpoint_dir(tmp_path_factory):
    """``prm_checkpoint_dir(name)``: a random PRM in the Qwen2.5-Math-PRM layout on the backbone of
    ``CHECKPOINTS[name]`` (untied: a PRM has no LM head), saved once per session."""
    made: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in made:
            options = {k: v for k, v in CHECKPOINTS[name].items() if k != "tie"}
            made[name] = str(save_random_prm(tmp_path_factory.mktemp(f"prm-{name}"), **options))
        return made[name]

    return get


@pytest.fixture(scope="session")
def prm_dir(prm_checkpoint_dir) -> str:
    return prm_checkpoint_dir("qwen2-gqa")


@pytest.fixture(scope="session")
def value_head_file(tmp_path_factory) -> str:
    return str(save_value_head(tmp_path_factory.mktemp("vh") / "value_head.safetensors", 64))
