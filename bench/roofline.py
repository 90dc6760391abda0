"""Where pfengine's decode step sits against this CPU's limits.

Machine: fp32 GEMM FLOP/s and memory bandwidth measured here with torch (2 threads), next to the
reference numbers of ../shared/ENVIRONMENT.md (122 GFLOP/s, 40 GB/s). Decode step: FLOPs and bytes
of one ``pfengine::decode`` call (policy forward of B tokens at mean context c, LM head included) and
of one ``pfengine::prm_forward`` call (the PRM backbone reading a step's tokens and tag for every
particle in one extend) from the model shape, and their measured times from the profiler trace."""
from __future__ import annotations

import time

REFERENCE = {"gemm_gflops": 122.0, "mem_gbs": 40.0}


def measure_machine(threads: int = 2, repeats: int = 5) -> dict:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(4):
                torch.mm(a, b)
            best = min(best, (time.perf_counter() - t) / 4)
        gflops = 2 * 1024 ** 3 / best / 1e9
        x = torch.empty(64 * 1024 * 1024 // 4 * 4)  # 256 MB
        y = torch.empty_like(x)
        y.copy_(x)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            y.copy_(x)
            best = min(best, time.perf_counter() - t)
        gbs = 2 * x.numel() * 4 / best / 1e9  # read + write
    finally:
        torch.set_num_threads(old)
    return {"gemm_gflops": gflops, "mem_gbs": gbs, "threads": threads, "reference": REFERENCE}


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


def place(cost: dict, seconds: float, machine: dict) -> dict:
    """The step against the roofline: arithmetic intensity, bound, achieved rates, fraction of bound."""
    peak, bw = machine["gemm_gflops"] * 1e9, machine["mem_gbs"] * 1e9
    intensity = cost["flops"] / cost["bytes"]
    ridge = peak / bw
    bound_s = max(cost["flops"] / peak, cost["bytes"] / bw)
    return {"flops": cost["flops"], "bytes": cost["bytes"], "intensity_flop_per_byte": intensity,
            "ridge_flop_per_byte": ridge, "bound": "compute" if intensity > ridge else "memory",
            "measured_s": seconds, "roofline_s": bound_s, "fraction_of_roofline": bound_s / seconds if seconds else 0.0,
            "achieved_gflops": cost["flops"] / seconds / 1e9 if seconds else 0.0,
            "achieved_gbs": cost["bytes"] / seconds / 1e9 if seconds else 0.0}


def decode_roofline(policy_dir: str, prm_dir: str | None, table: dict, batch: int, context: float,
                    machine: dict, prm_tokens: int = 0) -> dict:
    """Roofline placement of the mean ``pfengine::decode`` call (``batch`` tokens) and ``::prm_forward``
    call (``prm_tokens`` tokens) of a profiled run."""
    out = {"batch": batch, "context": context, "prm_tokens": prm_tokens}
    r = table["ranges"]
    if r.get("decode", {}).get("count"):
        s = r["decode"]["seconds"] / r["decode"]["count"]
        out["policy"] = place(step_cost(model_shape(policy_dir), batch, context, lm_head=True), s, machine)
    if prm_dir and prm_tokens and r.get("prm_forward", {}).get("count"):
        s = r["prm_forward"]["seconds"] / r["prm_forward"]["count"]
        out["prm"] = place(step_cost(model_shape(prm_dir), prm_tokens, context, lm_head=False), s, machine)
    return out
