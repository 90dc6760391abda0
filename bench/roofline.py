"""Where pfengine's decode step sits against this CPU's limits.

Machine: its vector instruction sets (the C++ kernels' ``avx512`` / ``avx2`` / ``portable``), fp32
GEMM FLOP/s and memory bandwidth measured here with torch (2 threads), next to the reference numbers
of ../shared/ENVIRONMENT.md (122 GFLOP/s, 40 GB/s), and the GEMM FLOP/s of pfengine's own linear
kernel on each instruction set (a 1024 x 1024 x 1024 product): forced to run AVX2 code on an AVX-512
machine, pfengine cannot use more than that, so its roofline there is the AVX2 one. Decode step:
FLOPs and bytes of one ``pfengine::decode`` call (policy forward of B tokens at mean context c, LM
head included) and of one ``pfengine::prm_forward`` call (the PRM backbone reading a step's tokens and
tag for every particle in one extend) from the model shape, and their measured times."""
from __future__ import annotations

import os
import time

REFERENCE = {"gemm_gflops": 122.0, "mem_gbs": 40.0}


def cpu_isas() -> list[str]:
    """The instruction sets whose C++ kernels this CPU runs, best first (from /proc/cpuinfo when the
    extension is not built)."""
    from pfengine.kernels import cpp_ops

    ops = cpp_ops()
    if ops is not None:
        return ops.cpu_isas()
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return ["portable"]
    avx2 = {"avx2", "fma", "f16c"} <= flags
    return (["avx512"] if avx2 and "avx512f" in flags else []) + (["avx2"] if avx2 else []) + ["portable"]


def code_isa() -> str | None:
    """The instruction set pfengine's C++ kernels run now (``PFENGINE_CPU_ISA`` or the best); None
    without the extension."""
    from pfengine.kernels import cpp_ops, cpu_isa

    return cpu_isa() if cpp_ops() is not None else None


def _best_seconds(fn, repeats: int, clock, calls: int = 1) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = clock()
        for _ in range(calls):
            fn()
        best = min(best, (clock() - t) / calls)
    return best


def linear_gflops(isa: str, size: int = 1024, repeats: int = 3, clock=time.perf_counter) -> float:
    """GFLOP/s of pfengine's linear kernel for ``isa`` on a ``size``-cubed product (torch's threads)."""
    import torch

    from pfengine.kernels import cpp_ops

    ops = cpp_ops()
    x, w = torch.randn(size, size), torch.randn(size, size)
    packed = ops.pack_linear(w, isa)
    return 2 * size ** 3 / _best_seconds(lambda: ops.packed_linear(x, packed, size, None, isa), repeats, clock) / 1e9


def measure_machine(threads: int = 2, repeats: int = 5, clock=time.perf_counter) -> dict:
    """This CPU's instruction sets, torch's fp32 GEMM GFLOP/s, memory copy GB/s and, per instruction
    set, the GEMM GFLOP/s of pfengine's linear kernel; ``threads`` torch threads, times by ``clock``
    (``time.process_time`` with one thread: the cost of the work whatever else runs)."""
    import torch

    from pfengine.kernels import cpp_ops

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        gflops = 2 * 1024 ** 3 / _best_seconds(lambda: torch.mm(a, b), repeats, clock, calls=4) / 1e9
        x = torch.empty(64 * 1024 * 1024 // 4 * 4)  # 256 MB
        y = torch.empty_like(x)
        gbs = 2 * x.numel() * 4 / _best_seconds(lambda: y.copy_(x), repeats, clock) / 1e9  # read + write
        kernel = {isa: linear_gflops(isa, clock=clock) for isa in cpu_isas()} if cpp_ops() is not None else {}
    finally:
        torch.set_num_threads(old)
    return {"cpus": os.cpu_count(), "isas": cpu_isas(), "code_isa": code_isa(), "forced_isa": os.environ.get("PFENGINE_CPU_ISA") or None,
            "gemm_gflops": gflops, "mem_gbs": gbs, "linear_gflops": kernel, "threads": threads,
            "clock": getattr(clock, "__name__", str(clock)), "reference": REFERENCE}


def describe_machine(m: dict) -> str:
    """One line to print next to every table of timings (from :func:`measure_machine`'s record; records
    from before it noted the instruction sets say so)."""
    kernel = ", ".join(f"{isa} {g:.0f}" for isa, g in m.get("linear_gflops", {}).items())
    runs = m.get("code_isa") or "torch reference"
    best = m["isas"][0] if m.get("isas") else "not recorded"
    return (f"CPU: {m.get('cpus', '?')} cores, best instruction set {best} (the C++ kernels run {runs} code"
            f"{', forced by PFENGINE_CPU_ISA' if m.get('forced_isa') else ''}); measured now with {m['threads']} "
            f"thread(s){' in process CPU time' if m.get('clock') == 'process_time' else ''}: fp32 GEMM {m['gemm_gflops']:.0f} GFLOP/s (torch), memory copy {m['mem_gbs']:.1f} GB/s, "
            f"pfengine's linear kernel GEMM GFLOP/s by instruction set: {kernel or '—'}.")


def model_shape(path: str) -> dict:
    from pfengine.model.checkpoint import read_config

    c = read_config(path)
    return {"hidden": c.hidden_size, "layers": c.num_layers, "heads": c.num_heads, "kv_heads": c.num_kv_heads,
            "head_dim": c.head_dim, "inter": c.intermediate_size, "vocab": c.vocab_size, "is_prm": c.is_prm}


def step_cost(shape: dict, batch: int, context: float, lm_head: bool, kv_bytes: int = 4) -> dict:
    """FLOPs and bytes of one decode forward of ``batch`` tokens at mean context ``context``."""
    H, L, D = shape["hidden"], shape["layers"], shape["head_dim"]
    q, kv = shape["heads"] * D, shape["kv_heads"] * D
    per_layer = H * (q + 2 * kv) + q * H + 3 * H * shape["inter"]
    weights = L * per_layer + (shape["vocab"] * H if lm_head else 0)
    flops_linear = 2 * batch * weights
    flops_attn = batch * L * 4 * context * q  # QK^T and PV over the context, every query head
    kv_read = batch * L * context * 2 * kv * kv_bytes
    bytes_ = 4 * weights + kv_read + batch * L * 2 * kv * kv_bytes  # weights + KV read + KV written
    return {"flops": flops_linear + flops_attn, "bytes": bytes_, "weight_bytes": 4 * weights, "kv_read_bytes": kv_read}


def place(cost: dict, seconds: float, machine: dict, isa: str | None = None) -> dict:
    """The step against the roofline: arithmetic intensity, bound, achieved rates, fraction of bound.
    The compute roof is torch's GEMM rate; with ``isa``, also (``isa_*``) the lower of that and the
    GEMM rate of pfengine's linear kernel on ``isa``, the most that instruction set's code can do."""
    peak, bw = machine["gemm_gflops"] * 1e9, machine["mem_gbs"] * 1e9
    intensity = cost["flops"] / cost["bytes"]
    ridge = peak / bw
    bound_s = max(cost["flops"] / peak, cost["bytes"] / bw)
    out = {"flops": cost["flops"], "bytes": cost["bytes"], "intensity_flop_per_byte": intensity,
           "ridge_flop_per_byte": ridge, "bound": "compute" if intensity > ridge else "memory",
           "measured_s": seconds, "roofline_s": bound_s, "fraction_of_roofline": bound_s / seconds if seconds else 0.0,
           "achieved_gflops": cost["flops"] / seconds / 1e9 if seconds else 0.0,
           "achieved_gbs": cost["bytes"] / seconds / 1e9 if seconds else 0.0}
    kernel = machine.get("linear_gflops", {}).get(isa)
    if kernel:
        isa_bound = max(cost["flops"] / min(peak, kernel * 1e9), cost["bytes"] / bw)
        out |= {"isa": isa, "isa_roofline_s": isa_bound, "fraction_of_isa_roofline": isa_bound / seconds if seconds else 0.0}
    return out


def decode_roofline(policy_dir: str, prm_dir: str | None, table: dict, batch: int, context: float,
                    machine: dict, prm_tokens: int = 0, isa: str | None = None) -> dict:
    """Roofline placement of the mean ``pfengine::decode`` call (``batch`` tokens) and ``::prm_forward``
    call (``prm_tokens`` tokens) of a profiled run whose C++ kernels ran ``isa`` code."""
    out = {"batch": batch, "context": context, "prm_tokens": prm_tokens}
    r = table["ranges"]
    if r.get("decode", {}).get("count"):
        s = r["decode"]["seconds"] / r["decode"]["count"]
        out["policy"] = place(step_cost(model_shape(policy_dir), batch, context, lm_head=True), s, machine, isa)
    if prm_dir and prm_tokens and r.get("prm_forward", {}).get("count"):
        s = r["prm_forward"]["seconds"] / r["prm_forward"]["count"]
        out["prm"] = place(step_cost(model_shape(prm_dir), prm_tokens, context, lm_head=False), s, machine, isa)
    return out
