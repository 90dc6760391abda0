"""System 4 (optional): llama.cpp through ``llama-cpp-python``.

The intended setup: the checkpoint converted to GGUF with ``convert_hf_to_gguf.py`` (shipped in the
llama-cpp-python sdist, not in the wheel), particles as sequences of one context with
``kv_unified=True``, resampling by ``llama_memory_seq_cp`` (copy an ancestor's cells to a child
sequence) and ``llama_memory_seq_rm``, one ``llama_decode`` batch per token for all particles.

llama-cpp-python builds from source here (~10 min of both cores), so it is not installed by any make
target; without it this system is skipped with the message below. It is not implemented beyond this
check: nothing here has been run."""
from __future__ import annotations


class Unavailable(RuntimeError):
    """A peer that cannot run on this machine; the harness reports the message and goes on."""


def check() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise Unavailable("llama.cpp skipped: llama-cpp-python is not installed (it builds from source, ~10 min of "
                          "both cores: `.venv/bin/pip install llama-cpp-python`; the HF->GGUF converter is in its "
                          "sdist). The llama.cpp PF loop is not implemented yet.") from None
    raise Unavailable("llama.cpp skipped: llama-cpp-python is installed but the llama.cpp PF loop "
                      "(GGUF conversion + seq_cp resampling) is not implemented yet.")


class LlamaCppPF:
    system = "llama.cpp"

    def __init__(self, *args, **kwargs) -> None:
        check()
