"""Hot-path kernels. Each module holds a Triton kernel, its plain-torch reference and the dispatch.

Dispatch (:func:`use_triton`): CUDA tensors take the Triton path when triton is installed;
``PFENGINE_TRITON=1`` forces the Triton path for any device (tests run it on CPU tensors with
``TRITON_INTERPRET=1``), ``PFENGINE_TRITON=0`` turns the Triton path off everywhere.

CPU tensors not on the Triton path take the C++ kernels of ``pfengine._cpp`` (built from ``csrc/`` by
``pip install``; :func:`use_cpp`) when that extension is importable, unless ``PFENGINE_CPP=0``; else
the torch reference. Which CPU path runs is logged once (logger ``pfengine``). With both
``PFENGINE_TRITON=0`` and ``PFENGINE_CPP=0`` every kernel is its torch reference.

The C++ kernels have code for three instruction sets (:func:`cpu_isa`): ``avx512`` (AVX-512F),
``avx2`` (AVX2 + FMA + F16C) and ``portable``; the best one the CPU runs is used unless
``PFENGINE_CPU_ISA`` names another (one the CPU runs), so that the AVX2 and portable code can be
tested and timed on an AVX-512 machine. Linear layers pack their weights for the instruction set in
force when the model loads and keep running that code.

Triton is an optional extra: it is imported only when a kernel is first launched (:class:`lazy_jit`),
so the package imports without it, and whether a kernel is compiled or interpreted is decided by
``TRITON_INTERPRET`` at first launch rather than at import time.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from contextlib import nullcontext
from types import ModuleType
from typing import Any, Callable, ContextManager, TypeVar

import torch

__all__ = ["use_triton", "use_cpp", "cpp_ops", "cpu_isa", "CPU_ISAS", "profiled", "lazy_jit", "next_pow2", "cdiv", "triton_available"]

log = logging.getLogger("pfengine")
IntLike = TypeVar("IntLike", int, torch.Tensor)

_TRITON_AVAILABLE: bool | None = None


def triton_available() -> bool:
    global _TRITON_AVAILABLE
    if _TRITON_AVAILABLE is None:
        try:
            _TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
        except (ImportError, ValueError):
            _TRITON_AVAILABLE = False
    return _TRITON_AVAILABLE


def use_triton(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device take the Triton path (see the module docstring)."""
    force = os.environ.get("PFENGINE_TRITON")
    if force == "0":
        return False
    if force == "1":
        if not t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise RuntimeError("PFENGINE_TRITON=1 on CPU tensors needs TRITON_INTERPRET=1, set before "
                               "triton is first imported")
        return True
    return t.is_cuda and triton_available()


_CPP_MODULE: ModuleType | None = None
_CPP_PATH: str | None = None
"""What :func:`cpp_ops` found, as logged: the C++ extension or why the torch reference runs."""
_CPP_LOGGED: set[str] = set()


def cpp_ops() -> ModuleType | None:
    """The compiled ``pfengine._cpp`` module, imported on first use; None when it is not built or does
    not load (e.g. built against another torch). Logs once which CPU path that leaves."""
    global _CPP_MODULE, _CPP_PATH
    if _CPP_PATH is None:
        try:
            from pfengine import _cpp
        except ImportError as e:  # not built (no compiler, PFENGINE_BUILD_CPP=0, ...) or an ABI mismatch
            _CPP_PATH = f"torch reference (C++ extension not importable: {e or type(e).__name__})"
        else:
            _CPP_MODULE = _cpp
            _CPP_PATH = f"C++ extension (pfengine._cpp; this CPU runs its {', '.join(_cpp.cpu_isas())} code)"
    if _CPP_PATH not in _CPP_LOGGED:
        _log_cpu_path(_CPP_PATH)
    return _CPP_MODULE


def _log_cpu_path(what: str) -> None:
    if what not in _CPP_LOGGED:
        _CPP_LOGGED.add(what)
        log.info("CPU kernels: %s", what)


def use_cpp(t: torch.Tensor) -> bool:
    """Whether a kernel on ``t`` (not on the Triton path) runs the C++ extension: CPU tensors, the
    extension importable, and ``PFENGINE_CPP`` not ``0``."""
    if t.device.type != "cpu":
        return False
    if os.environ.get("PFENGINE_CPP") == "0":
        _log_cpu_path("torch reference (PFENGINE_CPP=0)")
        return False
    return cpp_ops() is not None


CPU_ISAS = ("avx512", "avx2", "portable")
"""The C++ kernels' instruction sets, best first."""
_ISA_CHOICE: tuple[str | None, str] | None = None
"""(PFENGINE_CPU_ISA as last read, the instruction set it resolved to)."""


def cpu_isa() -> str:
    """The instruction set the C++ kernels run now: ``PFENGINE_CPU_ISA`` when set (it must be one of
    :data:`CPU_ISAS` that this CPU runs), else the best this CPU runs. Needs the C++ extension."""
    global _ISA_CHOICE
    forced = os.environ.get("PFENGINE_CPU_ISA") or None
    if _ISA_CHOICE is None or _ISA_CHOICE[0] != forced:
        _ISA_CHOICE = (forced, _resolve_isa(forced))
        _log_cpu_path(f"C++ kernels run the {_ISA_CHOICE[1]} code"
                      + (" (PFENGINE_CPU_ISA)" if forced else f" (this CPU runs {', '.join(cpp_ops().cpu_isas())})"))
    return _ISA_CHOICE[1]


def _resolve_isa(forced: str | None) -> str:
    ops = cpp_ops()
    assert ops is not None, "cpu_isa() needs the C++ extension pfengine._cpp"
    runs = ops.cpu_isas()
    if forced is None:
        return runs[0]
    if forced not in CPU_ISAS:
        raise ValueError(f"PFENGINE_CPU_ISA={forced!r}: expected one of {', '.join(CPU_ISAS)}")
    if forced not in runs:
        raise ValueError(f"PFENGINE_CPU_ISA={forced}: this CPU cannot run that code (it runs {', '.join(runs)})")
    return forced


def profiled(name: str) -> ContextManager[Any]:
    """A named profiler range ``pfengine::<name>`` around a kernel launch while a profiler runs (a range
    costs ~5 us even with no profiler, more than some decode-step kernels take)."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(f"pfengine::{name}")
    return nullcontext()


def cdiv(a: IntLike, b: int) -> IntLike:
    """``ceil(a / b)`` for non-negative ints or integer tensors."""
    return (a + b - 1) // b


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


class lazy_jit:
    """``@triton.jit`` applied on first launch: ``kernel[grid](...)`` as with a jitted function.

    Nothing here imports triton before a kernel is launched: importing pfengine never imports it, so
    ``TRITON_INTERPRET`` may be set any time before the first launch (triton decides at import
    whether its own ``triton.language`` helpers are interpreted or compiled). The first launch binds
    ``triton.language`` as ``tl`` in the kernel's module (its annotations such as ``tl.constexpr``
    are strings, thanks to ``from __future__ import annotations``).

    Kernels wrapped this way must not call each other (the Triton frontend resolves callees by name
    in the module's globals, where it would find this wrapper): each kernel is self-contained.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._jitted: dict[bool, Any] = {}

    def _get(self) -> Any:
        interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")
        jitted = self._jitted.get(interpret)
        if jitted is None:
            import triton
            import triton.language

            self.fn.__globals__["tl"] = triton.language
            jitted = self._jitted[interpret] = triton.jit(self.fn)
        return jitted

    def __getitem__(self, grid: Any) -> Any:
        return self._get()[grid]
