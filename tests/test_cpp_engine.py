"""The engine on CPU takes the C++ kernels by default (and says so once in the log), the torch
references with PFENGINE_CPP=0, and a particle-filtering run gives the same particles either way."""
import importlib.util
import logging

import pytest

if importlib.util.find_spec("pfengine._cpp") is None:
    pytest.skip("pfengine._cpp is not built (pip install --no-build-isolation -e .)", allow_module_level=True)

import pfengine.kernels as kernels  # noqa: E402
from pfengine import Engine, EngineConfig, Request, SamplingParams, SearchParams  # noqa: E402
from pfengine import _cpp  # noqa: E402,F401  (built: it must load)

CPP_ENTRY_POINTS = [("paged_attention", "paged_decode_attention_cpp"), ("kv_store", "store_kv_cpp"),
                    ("fork", "fork_cpp"), ("resample", "resample_cpp"), ("copy_blocks", "copy_blocks_cpp"),
                    ("sampling", "temperature_sample_cpp")]


def run(policy_dir: str, prm: str, kv_dtype: str = "float32") -> tuple:
    engine = Engine(EngineConfig(model=policy_dir, prm=prm, num_blocks=96, block_size=8, kv_dtype=kv_dtype))
    r = engine.generate([Request(prompt="Step 1: add 17 and 25.",
                                 sampling=SamplingParams(seed=2, max_step_tokens=6, max_steps=4),
                                 search=SearchParams(n_particles=6, aggregation="last",
                                                     resampling="systematic"))])[0]
    engine.policy.blocks.check_invariants()
    return r, engine.stats()


def count_cpp_launches(monkeypatch) -> dict[str, int]:
    """Wrap each kernel module's C++ entry point to see which path the engine really took."""
    import importlib

    counts: dict[str, int] = {}
    for module_name, name in CPP_ENTRY_POINTS:
        module = importlib.import_module(f"pfengine.kernels.{module_name}")
        counts[name] = 0

        def wrapped(*args, _f=getattr(module, name), _n=name, **kwargs):
            counts[_n] += 1
            return _f(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapped)
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("prm_kind,kv_dtype", [("value_head", "float32"), ("value_head", "bfloat16"),
                                               ("prm_model", "float32")])
def test_cpp_path_by_default_equals_reference_path(policy_dir, prm_dir, value_head_file, monkeypatch, caplog,
                                                   prm_kind, kv_dtype):
    prm = value_head_file if prm_kind == "value_head" else prm_dir
    monkeypatch.delenv("PFENGINE_TRITON", raising=False)
    monkeypatch.setattr(kernels, "_CPP_LOGGED", set())  # see the once-per-process log line again
    launched = count_cpp_launches(monkeypatch)

    monkeypatch.setenv("PFENGINE_CPP", "0")
    with caplog.at_level(logging.INFO, logger="pfengine"):
        ref, ref_stats = run(policy_dir, prm, kv_dtype)
    assert all(n == 0 for n in launched.values()), launched
    assert "CPU kernels: torch reference (PFENGINE_CPP=0)" in caplog.messages

    monkeypatch.delenv("PFENGINE_CPP")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pfengine"):
        cpp, cpp_stats = run(policy_dir, prm, kv_dtype)
    assert all(n > 0 for n in launched.values()), launched
    assert any(m.startswith("CPU kernels: C++ extension") for m in caplog.messages), caplog.messages

    assert [p.token_ids for p in cpp.particles] == [p.token_ids for p in ref.particles]
    assert [tr.ancestors for tr in cpp.trace] == [tr.ancestors for tr in ref.trace]
    assert [p.weight for p in cpp.particles] == pytest.approx([p.weight for p in ref.particles], abs=1e-5)
    assert cpp_stats == ref_stats
    assert any(tr.ancestors is not None for tr in cpp.trace), "no round resampled"


def test_log_says_once_which_cpu_path(monkeypatch, caplog):
    import torch

    monkeypatch.delenv("PFENGINE_CPP", raising=False)
    monkeypatch.setattr(kernels, "_CPP_LOGGED", set())
    t = torch.zeros(1)
    with caplog.at_level(logging.INFO, logger="pfengine"):
        assert kernels.use_cpp(t) and kernels.use_cpp(t)
        monkeypatch.setenv("PFENGINE_CPP", "0")
        assert not kernels.use_cpp(t) and not kernels.use_cpp(t)
    lines = [m for m in caplog.messages if m.startswith("CPU kernels:")]
    assert len(lines) == 2 and "C++ extension" in lines[0] and "PFENGINE_CPP=0" in lines[1], lines
    assert not kernels.use_cpp(torch.zeros(1, device="meta")), "only CPU tensors take the C++ path"
