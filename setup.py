"""Packaging entry point; the C++ CPU kernels in csrc/ are added here as an optional extension.

``pfengine._cpp`` is a torch C++ extension (pybind11 bindings, ``at::parallel_for``), built by the
normal ``pip install --no-build-isolation -e .`` once torch is installed (``make install`` does both).
It is optional: when torch is not importable at build time (e.g. build isolation), when
``PFENGINE_BUILD_CPP=0``, or when compiling fails (no compiler, ...), the install still succeeds with a
warning and the engine uses the torch reference kernels (``pfengine.kernels`` logs which path it runs).
"""
from __future__ import annotations

import os
import sys
from glob import glob

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _warn(message: str) -> None:
    print(f"\nWARNING (pfengine): {message}\n", file=sys.stderr, flush=True)


def cpp_kernels() -> dict:
    """``ext_modules`` and ``cmdclass`` for ``pfengine._cpp``, or nothing when it cannot be built."""
    if os.environ.get("PFENGINE_BUILD_CPP", "1") == "0":
        _warn("PFENGINE_BUILD_CPP=0: not building the C++ CPU kernels (torch reference kernels will run)")
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # torch missing (build isolation) or broken
        _warn(f"torch is not importable at build time ({e}); the C++ CPU kernels are not built and the torch "
              "reference kernels will run. Install torch first, then `pip install --no-build-isolation -e .`")
        return {}

    class OptionalBuildExtension(BuildExtension):
        """Builds what it can: a failed extension is reported and left out, never fatal."""

        def build_extensions(self) -> None:
            self.failed: list[str] = []
            try:
                super().build_extensions()  # torch checks the compiler here, before any extension
            except Exception as e:
                self.failed = [ext.name for ext in self.extensions]
                _warn(f"cannot build C++ extensions ({type(e).__name__}: {e}); pfengine will use the torch "
                      "reference kernels on CPU")

        def build_extension(self, ext) -> None:
            try:
                super().build_extension(ext)
            except Exception as e:  # compiler missing or failing, header/ABI mismatch, ...
                self.failed.append(ext.name)
                _warn(f"building the C++ extension {ext.name} failed ({type(e).__name__}: {e}); pfengine will "
                      "use the torch reference kernels on CPU")

        def copy_extensions_to_source(self) -> None:  # editable installs: skip what was not built
            failed = set(getattr(self, "failed", []))
            kept = self.extensions
            self.extensions = [e for e in kept if e.name not in failed]
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = kept

        def get_outputs(self) -> list[str]:
            failed = set(getattr(self, "failed", []))
            return [out for ext, out in zip(self.extensions, super().get_outputs()) if ext.name not in failed]

    sources = sorted(os.path.relpath(p, HERE) for p in glob(os.path.join(HERE, "csrc", "*.cpp")))
    ext = CppExtension(
        "pfengine._cpp",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        # No -march=native: the AVX2 / AVX-512 code in csrc/ is compiled per function and chosen at run
        # time, so the module also loads on CPUs without them. -fopenmp: torch's CPU builds implement
        # at::parallel_for with OpenMP in the header; without the flag its pragma compiles away and every
        # kernel runs on one thread (the libgomp torch already loaded is the one used).
        extra_compile_args=["-O3", "-g0", "-fopenmp"],
        extra_link_args=["-fopenmp"],
        depends=sorted(glob(os.path.join(HERE, "csrc", "*.h"))),
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


setup(**cpp_kernels())
