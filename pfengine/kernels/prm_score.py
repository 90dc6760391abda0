"""PRM scoring: the value head on step-end hidden states -> step logit (:func:`head_logit`), and
step logits -> aggregate -> tempered weights normalised per request -> ESS (:func:`weigh`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pfengine.kernels.linear import Weight, linear, prepare
from pfengine.kernels import cdiv, lazy_jit, next_pow2, profiled, use_triton

tl = None  # triton.language, bound by lazy_jit when a kernel is first launched

P_CLIP = 1e-7
LOGIT_CLIP = math.log((1 - P_CLIP) / P_CLIP)


@dataclass
class PRMHead:
    """``Linear(H, H) -> ReLU -> Linear(H, 2)``; class 1 is "step is correct"."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    w1_prepared: Weight = field(init=False, repr=False)
    """``w1`` in the form the row-invariant CPU linear wants, prepared once."""

    def __post_init__(self) -> None:
        self.w1_prepared = prepare(self.w1.float())

    @staticmethod
    def shapes(hidden_size: int, prefix: str = "score.") -> dict[str, tuple[int, ...]]:
        """The head's tensors as a Qwen2.5-Math-PRM checkpoint (or a value-head file) names them."""
        H = hidden_size
        return {prefix + "0.weight": (H, H), prefix + "0.bias": (H,), prefix + "2.weight": (2, H), prefix + "2.bias": (2,)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], prefix: str = "score.") -> PRMHead:
        return cls(t[prefix + "0.weight"], t[prefix + "0.bias"], t[prefix + "2.weight"], t[prefix + "2.bias"])


def initial_running(n: int, aggregation: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Aggregate before any step: ``min`` starts at the top, everything else at 0."""
    return torch.full((n,), LOGIT_CLIP if aggregation == "min" else 0.0, device=device)


def head_logit(hidden: torch.Tensor, head: PRMHead) -> torch.Tensor:
    """logit(p_correct) = l1 - l0 of the head on ``hidden [M, H]``, clipped as the paper clips p
    to [1e-7, 1 - 1e-7]."""
    if use_triton(hidden):
        return head_logit_triton(hidden, head)
    return head_logit_ref(hidden, head)


def head_logit_ref(hidden: torch.Tensor, head: PRMHead) -> torch.Tensor:
    """Row-invariant (a particle's score does not depend on the batch it is scored in): the H x H

    layer is the row-invariant linear, and the two output logits are per-row dot products (BLAS
    rounds a 2-column GEMM differently for different row counts)."""
    h = torch.relu(linear(hidden.float(), head.w1_prepared, head.b1))
    l0, l1 = ((h * head.w2[k]).sum(-1) + head.b2[k] for k in (0, 1))
    return (l1 - l0).clamp(-LOGIT_CLIP, LOGIT_CLIP)


def weigh(step_logit: torch.Tensor, running: torch.Tensor, scored: torch.Tensor, seg_starts: torch.Tensor,
          aggregation: str, temperature: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns the new running aggregate, per-segment normalised log-weights and ESS per segment.

    ``running`` holds logit(r) for ``model``/``last``/``min`` and sum(log p) for ``prod``.
    """
    if use_triton(step_logit):
        return weigh_triton(step_logit, running, scored, seg_starts, aggregation, temperature)
    return weigh_ref(step_logit, running, scored, seg_starts, aggregation, temperature)


def weigh_ref(step_logit: torch.Tensor, running: torch.Tensor, scored: torch.Tensor, seg_starts: torch.Tensor,
              aggregation: str, temperature: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    step_logit = step_logit.float()
    if aggregation in ("model", "last"):
        new = step_logit
    elif aggregation == "min":
        new = torch.minimum(running, step_logit)
    elif aggregation == "prod":
        new = running + torch.nn.functional.logsigmoid(step_logit)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}")
    running = torch.where(scored, new, running)
    if aggregation == "prod":
        logit = running - torch.log(-torch.expm1(running.clamp(max=math.log1p(-P_CLIP))))
    else:
        logit = running
    log_w = logit.clamp(-LOGIT_CLIP, LOGIT_CLIP) / temperature
    seg = _segment_ids(seg_starts, log_w.shape[0])
    n_seg = seg_starts.numel() - 1
    seg_max = torch.full((n_seg,), -math.inf, device=log_w.device).scatter_reduce(0, seg, log_w, "amax")
    exp = torch.exp(log_w - seg_max[seg])
    seg_sum = torch.zeros(n_seg, device=log_w.device).index_add_(0, seg, exp)
    log_w = log_w - seg_max[seg] - torch.log(seg_sum[seg])
    w = log_w.exp()
    ess = 1.0 / torch.zeros(n_seg, device=log_w.device).index_add_(0, seg, w * w)
    return running, log_w, ess


def running_to_prob(running: torch.Tensor, aggregation: str) -> torch.Tensor:
    """The aggregated probability r behind a running aggregate."""
    return running.exp() if aggregation == "prod" else torch.sigmoid(running)


def _segment_ids(seg_starts: torch.Tensor, m: int) -> torch.Tensor:
    counts = seg_starts[1:] - seg_starts[:-1]
    return torch.arange(counts.numel(), device=seg_starts.device).repeat_interleave(counts)[:m]


# --------------------------------------------------------------------------------------------------
# Triton path: the head's H x H GEMM stays a library GEMM and one row-wise kernel does its epilogue
# (bias, ReLU, H x 2 projection, logit clip); weighing is one row-wise kernel (aggregation,
# temperature) and one per-segment kernel (log-sum-exp normalisation, ESS). No value is read back
# to the host.

_AGG = {"model": 0, "last": 0, "min": 1, "prod": 2}
PROD_CAP = math.log1p(-P_CLIP)


def head_logit_triton(hidden: torch.Tensor, head: PRMHead, block_m: int | None = None,
                      block_h: int | None = None) -> torch.Tensor:
    """``block_*`` override the tile sizes (tests shrink them to exercise the chunk loop)."""
    m = hidden.shape[0]
    with profiled("prm_head_gemm"):
        pre = torch.matmul(hidden.float(), head.w1.float().T)
    out = torch.empty(m, dtype=torch.float32, device=hidden.device)
    if m:
        hdim = pre.shape[1]
        block_m = block_m or min(32, next_pow2(m))
        block_h = block_h or min(128, next_pow2(hdim))
        w2 = head.w2.float()
        with profiled("prm_head_epilogue"):
            _head_epilogue_kernel[(cdiv(m, block_m),)](
                pre, head.b1.float().contiguous(), w2, head.b2.float().contiguous(), out, m, hdim, *pre.stride(),
                *w2.stride(), LOGIT_CLIP, BLOCK_M=block_m, BLOCK_H=block_h)
    return out


def weigh_triton(step_logit: torch.Tensor, running: torch.Tensor, scored: torch.Tensor, seg_starts: torch.Tensor,
                 aggregation: str, temperature: float | torch.Tensor, block_m: int | None = None,
                 block_seg: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grid ``(cdiv(M, BLOCK_M),)`` for the rows, ``(R,)`` for the segments; ``block_*`` override
    the tile sizes (tests shrink them to exercise the chunk loops)."""
    if aggregation not in _AGG:
        raise ValueError(f"unknown aggregation {aggregation!r}")
    x = step_logit.float().contiguous()
    m = x.shape[0]
    dev = x.device
    n_seg = seg_starts.numel() - 1
    running = running.float().contiguous()
    seg_starts = seg_starts.contiguous()
    new_running = torch.empty(m, dtype=torch.float32, device=dev)
    log_w = torch.empty(m, dtype=torch.float32, device=dev)
    ess = torch.empty(n_seg, dtype=torch.float32, device=dev)
    if isinstance(temperature, torch.Tensor):
        temp_t, temp_s, per_row = temperature.to(device=dev, dtype=torch.float32).expand(m).contiguous(), 1.0, True
    else:
        temp_t, temp_s, per_row = new_running, float(temperature), False
    scored_u8 = scored.to(torch.uint8).contiguous()
    if m:
        block_m = block_m or min(32, next_pow2(m))
        with profiled("prm_score_rows"):
            _prm_rows_kernel[(cdiv(m, block_m),)](
                x, running, scored_u8, temp_t, temp_s, new_running, log_w, m, LOGIT_CLIP, PROD_CAP,
                AGG=_AGG[aggregation], PER_ROW_TEMP=per_row, BLOCK_M=block_m)
    if n_seg:
        block_seg = block_seg or min(1024, max(16, next_pow2(m)))
        with profiled("prm_normalise"):
            _segment_normalise_kernel[(n_seg,)](log_w, ess, seg_starts, BLOCK=block_seg)
    return new_running, log_w, ess


@lazy_jit
def _head_epilogue_kernel(pre_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, M, H, s_pm, s_ph, s_w2r, s_w2c, logit_clip,
                          BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """``out = clip((relu(pre + b1) . w2[1] + b2[1]) - (relu(pre + b1) . w2[0] + b2[0]))`` per row."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < M
    l0 = tl.zeros([BLOCK_M], tl.float32)
    l1 = tl.zeros([BLOCK_M], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        h_ok = hh < H
        pre = tl.load(pre_ptr + rows[:, None] * s_pm + hh[None, :] * s_ph, mask=r_ok[:, None] & h_ok[None, :],
                      other=0.0)
        b1 = tl.load(b1_ptr + hh, mask=h_ok, other=0.0)
        act = tl.maximum(pre + b1[None, :], 0.0)
        w20 = tl.load(w2_ptr + hh * s_w2c, mask=h_ok, other=0.0)
        w21 = tl.load(w2_ptr + s_w2r + hh * s_w2c, mask=h_ok, other=0.0)
        l0 += tl.sum(act * w20[None, :], 1)
        l1 += tl.sum(act * w21[None, :], 1)
    step = (l1 + tl.load(b2_ptr + 1)) - (l0 + tl.load(b2_ptr))
    tl.store(out_ptr + rows, tl.minimum(tl.maximum(step, -logit_clip), logit_clip), mask=r_ok)


@lazy_jit
def _prm_rows_kernel(x_ptr, running_ptr, scored_ptr, temp_ptr, temp_scalar, new_running_ptr, logw_ptr,
                     M, logit_clip, prod_cap,
                     AGG: tl.constexpr, PER_ROW_TEMP: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < M
    step = tl.load(x_ptr + rows, mask=r_ok, other=0.0)
    step = tl.minimum(tl.maximum(step, -logit_clip), logit_clip)

    running = tl.load(running_ptr + rows, mask=r_ok, other=0.0)
    if AGG == 0:  # model / last
        new = step
    elif AGG == 1:  # min
        new = tl.minimum(running, step)
    else:  # prod: running + logsigmoid(step) = running + min(step, 0) - log1p(exp(-|step|))
        z = tl.exp(-tl.abs(step))
        log1p_z = tl.where(z < 1e-4, z * (1.0 - z * (0.5 - z / 3.0)), tl.log(1.0 + z))
        new = running + (tl.minimum(step, 0.0) - log1p_z)
    scored = tl.load(scored_ptr + rows, mask=r_ok, other=0) != 0
    running = tl.where(scored, new, running)
    tl.store(new_running_ptr + rows, running, mask=r_ok)

    if AGG == 2:  # logit(r) from log r: log r - log(-expm1(log r)), log r capped at log1p(-P_CLIP)
        r = tl.minimum(running, prod_cap)
        # expm1 without cancellation near 0 (fp32 exp(r) - 1 loses all digits for |r| ~ 1e-7):
        # Taylor series to r^7 for |r| < 0.1 (error < 1e-13 relative), exp(r) - 1 beyond.
        series = r * (1.0 + r / 2.0 * (1.0 + r / 3.0 * (1.0 + r / 4.0 * (1.0 + r / 5.0 * (1.0 + r / 6.0
                                                                                       * (1.0 + r / 7.0))))))
        expm1 = tl.where(r > -0.1, series, tl.exp(r) - 1.0)
        logit = running - tl.log(-expm1)
    else:
        logit = running
    logit = tl.minimum(tl.maximum(logit, -logit_clip), logit_clip)
    if PER_ROW_TEMP:
        temp = tl.load(temp_ptr + rows, mask=r_ok, other=1.0)
    else:
        temp = temp_scalar
    tl.store(logw_ptr + rows, logit / temp, mask=r_ok)


@lazy_jit
def _segment_normalise_kernel(logw_ptr, ess_ptr, seg_ptr, BLOCK: tl.constexpr):
    """One program per segment, chunks of BLOCK: max, sum of exp, then normalise in place + ESS."""
    seg = tl.program_id(0).to(tl.int64)
    lo = tl.load(seg_ptr + seg)
    hi = tl.load(seg_ptr + seg + 1)
    offs = tl.arange(0, BLOCK)
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(lo, hi, BLOCK):
        idx = start + offs
        mx = tl.maximum(mx, tl.load(logw_ptr + idx, mask=idx < hi, other=float("-inf")))
    seg_max = tl.max(mx, 0)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(lo, hi, BLOCK):
        idx = start + offs
        x = tl.load(logw_ptr + idx, mask=idx < hi, other=float("-inf"))
        acc += tl.where(idx < hi, tl.exp(x - seg_max), 0.0)
    log_sum = tl.log(tl.sum(acc, 0))
    sq = tl.zeros([BLOCK], tl.float32)
    for start in range(lo, hi, BLOCK):
        idx = start + offs
        ok = idx < hi
        y = tl.load(logw_ptr + idx, mask=ok, other=0.0) - seg_max - log_sum
        tl.store(logw_ptr + idx, y, mask=ok)
        w = tl.exp(y)
        sq += tl.where(ok, w * w, 0.0)
    tl.store(ess_ptr + seg, 1.0 / tl.sum(sq, 0))
