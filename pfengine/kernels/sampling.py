"""Temperature sampling by inverse CDF (no top-k / top-p): logits -> one token per row."""
from __future__ import annotations

import torch

from pfengine.kernels import cpp_ops, profiled, use_cpp


def temperature_sample(logits: torch.Tensor, temperature: float, u: torch.Tensor) -> torch.Tensor:
    """``logits [n, V]``, ``temperature > 0``, ``u [n, 1]`` fp64 uniforms in [0, 1) -> token ids
    ``[n]`` (int64): the first index whose fp64 running sum of ``softmax(logits / temperature)``
    exceeds ``u * total`` (clamped to ``V - 1``).

    CPU fp32 logits take the fused C++ kernel (identical tokens, no ``[n, V]`` temporaries); anything
    else the torch reference."""
    if use_cpp(logits) and logits.dtype == torch.float32 and logits.dim() == 2:
        return temperature_sample_cpp(logits, temperature, u)
    return temperature_sample_ref(logits, temperature, u)


def temperature_sample_ref(logits: torch.Tensor, temperature: float, u: torch.Tensor) -> torch.Tensor:
    return inverse_cdf((logits.float() / temperature).softmax(-1), u)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``probs [n, V]`` (rows need not sum to 1), ``u [n, 1]`` fp64 uniforms -> the first index whose
    fp64 running sum exceeds ``u * total``. One uniform per row: exact, and far cheaper on CPU than
    ``torch.multinomial`` or a per-token random race at large vocabularies."""
    cdf = probs.double().cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def temperature_sample_cpp(logits: torch.Tensor, temperature: float, u: torch.Tensor) -> torch.Tensor:
    """C++ CPU kernel (``csrc/sampling.cpp``): per row, scale into a small buffer, ATen's own softmax
    kernel, one fp64 running-sum pass and a binary search over it; rows spread over the threads."""
    with profiled("temperature_sample"):
        return cpp_ops().temperature_sample(logits, float(temperature), u)
