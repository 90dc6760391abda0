"""Linear layers whose result for a row does not depend on how many other rows share the batch.

A seeded run promises the same tokens alone or batched with other requests, so a particle's logits
must not depend on the batch. CPU BLAS breaks that: it picks other code paths (and so other
rounding) for very small row counts; on this machine F.linear differs at the last bit for 1-3, 5-7
and 9-11 rows but agrees for 4, 8 and >= 12. Two row-invariant CPU paths:

- C++ (``pfengine._cpp.packed_linear``, csrc/linear.cpp; fp32 CPU weights): the weight is packed into
  column panels once, when the model loads (:func:`prepare`), for the instruction set in force then
  (:func:`pfengine.kernels.cpu_isa`: AVX-512F, AVX2 + FMA or portable code), and every output is one
  multiply-add chain over the inputs in order. For decode-sized batches it is also several times
  faster than MKL, whose skinny-GEMM code runs far below memory bandwidth.
- torch reference (``PFENGINE_CPP=0``, other dtypes): F.linear with small batches padded to
  ``MIN_ROWS`` rows.

On CUDA both are F.linear (cuBLAS); there is no Triton kernel for plain GEMMs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pfengine.kernels import cpp_ops, cpu_isa, profiled, use_cpp

MIN_ROWS = 12


@dataclass(frozen=True)
class Weight:
    """A linear layer's weight ``[out_features, in_features]`` in the form its path wants: the tensor
    itself, or (C++ path) only its panels packed for the instruction set ``isa``."""

    tensor: torch.Tensor | None
    packed: torch.Tensor | None
    out_features: int
    isa: str | None = None


def prepare(weight: torch.Tensor) -> Weight:
    """Pack ``weight`` for the C++ kernel when it runs here (decided once, at load), else keep it."""
    if weight.dtype == torch.float32 and use_cpp(weight):
        isa = cpu_isa()
        return Weight(None, cpp_ops().pack_linear(weight, isa), weight.shape[0], isa)
    return Weight(weight, None, weight.shape[0])


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if weight.packed is not None:
        with profiled("linear"):
            return cpp_ops().packed_linear(x, weight.packed, weight.out_features, bias, weight.isa)
    return linear_ref(x, weight.tensor, bias)


def vocab_projection(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    """``x @ weight.T`` for a wide ``weight`` (the LM head, ``[vocab, H]``)."""
    if weight.packed is not None:
        return linear(x, weight)
    return vocab_projection_ref(x, weight.tensor)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    rows = x.shape[0]
    if rows >= MIN_ROWS or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    return F.linear(_pad(x), weight, bias)[:rows]


def vocab_projection_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """On CPU computed as ``(weight @ x.T).T``: MKL runs that orientation 1.3-1.6x faster for
    decode-sized batches (a tall left operand instead of a skinny one), and it is row-invariant from
    ``MIN_ROWS`` rows on too."""
    rows = x.shape[0]
    if x.device.type != "cpu":
        return F.linear(x, weight)
    padded = x if rows >= MIN_ROWS else _pad(x)
    return torch.mm(weight, padded.t()).t()[:rows].contiguous()


def _pad(x: torch.Tensor) -> torch.Tensor:
    padded = torch.zeros(MIN_ROWS, *x.shape[1:], dtype=x.dtype)
    padded[:x.shape[0]] = x
    return padded
