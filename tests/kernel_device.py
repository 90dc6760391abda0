"""The device the Triton kernel tests (test_kernel_*.py) run the implementation under test on.

``PFENGINE_TEST_DEVICE`` unset or ``cpu``: CPU tensors, Triton interpreted (``TRITON_INTERPRET=1``,
set by conftest). ``PFENGINE_TEST_DEVICE=cuda`` (``make gpu-check``): the kernels compile and run on
the GPU. Either way the cases, the torch references and the numpy oracles stay on the CPU: only the
implementation under test, wrapped by :func:`on_device`, sees device tensors."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import pytest
import torch

DEVICE = torch.device(os.environ.get("PFENGINE_TEST_DEVICE", "cpu"))



def cpu_only(why: str) -> pytest.MarkDecorator:
    """For a test that means something on the CPU test device only (it says ``why``)."""
    return pytest.mark.skipif(DEVICE.type != "cpu", reason=f"CPU test device only: {why}")


def on_device(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run on :data:`DEVICE`. Each tensor argument is copied there with its storage, so a view
    keeps its strides and views of one tensor stay views of one tensor; after the call every copied
    storage is written back (kernels write in place) and the results return to the CPU. Dataclass
    arguments (e.g. a PRM head) are rebuilt from copies of their tensor fields. On the CPU the copies
    are CPU tensors, so the default run goes through this wrapper too."""

    def run(*args: Any, **kwargs: Any) -> Any:
        bases: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        out = fn(*(_moved(a, bases) for a in args), **{k: _moved(v, bases) for k, v in kwargs.items()})
        for cpu, dev in bases.values():
            cpu.copy_(dev)
        return _to_cpu(out)

    return run


def _moved(x: Any, bases: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> Any:
    if isinstance(x, torch.Tensor):
        base = x if x._base is None else x._base
        if id(base) not in bases:
            copy = torch.empty_strided(base.shape, base.stride(), dtype=base.dtype, device=DEVICE)
            bases[id(base)] = (base, copy.copy_(base))
        return bases[id(base)][1].as_strided(x.shape, x.stride(), x.storage_offset() - base.storage_offset())
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a NamedTuple of tensors (the fork's BlockState)
        return type(x)(*(_moved(v, bases) for v in x))
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        fields = {f.name: _moved(getattr(x, f.name), bases) for f in dataclasses.fields(x)
                  if f.init and isinstance(getattr(x, f.name), torch.Tensor)}
        return dataclasses.replace(x, **fields)
    return x


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, tuple):
        items = [_to_cpu(v) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
    return x
