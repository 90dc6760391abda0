"""The engine on CPU takes the C++ kernels by default (and says so once in the log), the torch
references with PFENGINE_CPP=0, and a particle-filtering run gives the same particles either way."""
import logging

import pytest
import torch

import pfengine.kernels as kernels
from kernel_paths import assert_same_run, count_launches, run_pf

pytestmark = pytest.mark.cpp

CPP_ENTRY_POINTS = [("paged_attention", "paged_decode_attention_cpp"), ("kv_store", "store_kv_cpp"),
                    ("fork", "fork_cpp"), ("resample", "resample_cpp"), ("copy_blocks", "copy_blocks_cpp"),
                    ("sampling", "temperature_sample_cpp")]
RUN = dict(particles=6, steps=4, step_tokens=6, num_blocks=96)


@pytest.mark.slow
@pytest.mark.parametrize("prm_kind,kv_dtype", [("value_head", "float32"), ("value_head", "bfloat16"),
                                               ("prm_model", "float32")])
def test_cpp_path_by_default_equals_reference_path(policy_dir, prm_dir, value_head_file, monkeypatch, caplog,
                                                   prm_kind, kv_dtype):
    prm = value_head_file if prm_kind == "value_head" else prm_dir
    monkeypatch.setattr(kernels, "_CPP_LOGGED", set())  # see the once-per-process log line again
    launched = count_launches(monkeypatch, CPP_ENTRY_POINTS)

    monkeypatch.setenv("PFENGINE_CPP", "0")
    with caplog.at_level(logging.INFO, logger="pfengine"):
        ref = run_pf(policy_dir, prm, kv_dtype=kv_dtype, **RUN)
    assert all(n == 0 for n in launched.values()), launched
    assert "CPU kernels: torch reference (PFENGINE_CPP=0)" in caplog.messages

    monkeypatch.delenv("PFENGINE_CPP")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pfengine"):
        cpp = run_pf(policy_dir, prm, kv_dtype=kv_dtype, **RUN)
    assert all(n > 0 for n in launched.values()), launched
    assert any(m.startswith("CPU kernels: C++ extension") for m in caplog.messages), caplog.messages

    assert_same_run(cpp, ref)
    assert any(tr.ancestors is not None for tr in cpp[0].trace), "no round resampled"


@pytest.mark.slow
@pytest.mark.parametrize("isa", kernels.CPU_ISAS)
def test_each_instruction_set_gives_the_reference_run(policy_dir, prm_dir, monkeypatch, caplog, isa):
    """PFENGINE_CPU_ISA forces an instruction set's code (linear layers and attention) for the whole
    engine; each one gives the same particles as the torch references."""
    if isa not in kernels.cpp_ops().cpu_isas():
        pytest.skip(f"this CPU cannot run the {isa} code")
    monkeypatch.setenv("PFENGINE_CPP", "0")
    ref = run_pf(policy_dir, prm_dir, **RUN)
    monkeypatch.delenv("PFENGINE_CPP")
    monkeypatch.setenv("PFENGINE_CPU_ISA", isa)
    monkeypatch.setattr(kernels, "_ISA_CHOICE", None)  # see the log line again
    monkeypatch.setattr(kernels, "_CPP_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="pfengine"):
        got = run_pf(policy_dir, prm_dir, **RUN)
    assert f"CPU kernels: C++ kernels run the {isa} code (PFENGINE_CPU_ISA)" in caplog.messages
    assert_same_run(got, ref)


def test_log_says_once_which_cpu_path(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_CPP_LOGGED", set())
    t = torch.zeros(1)
    with caplog.at_level(logging.INFO, logger="pfengine"):
        assert kernels.use_cpp(t) and kernels.use_cpp(t)
        monkeypatch.setenv("PFENGINE_CPP", "0")
        assert not kernels.use_cpp(t) and not kernels.use_cpp(t)
    lines = [m for m in caplog.messages if m.startswith("CPU kernels:")]
    assert len(lines) == 2 and "C++ extension" in lines[0] and "PFENGINE_CPP=0" in lines[1], lines
    assert not kernels.use_cpp(torch.zeros(1, device="meta")), "only CPU tensors take the C++ path"
