"""End to end on CPU: ``Engine.generate`` for one particle-filtering request with the C++ kernels on
and off (``PFENGINE_CPP=0``), side by side in one process on one engine.

    .venv/bin/python -m bench.e2e_cpp [--particles 64] [--repeats 2] [--profile cpp|ref]

The model is a random 34M-parameter Qwen2 (hidden 512, 8 layers, 8 heads / 2 kv heads, vocab 16384,
untied) with a random value-head PRM, built once in ``.cache/bench-qwen2-34m``; the request runs
4 steps of 32 tokens. Runs alternate (cpp, ref, cpp, ref, ...) so background load hits both alike;
the particles must come out identical. Reported: wall time of ``generate``, the policy's decode
step (forward + logits of all particles), and where that step sits against this machine's CPU
roofline (fp32 GEMM ~122 GFLOP/s on 2 threads, memory ~40 GB/s).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from bench.pfengine_pf import DecodeTimer
from pfengine import Engine, EngineConfig, Request, SamplingParams, SearchParams
from pfengine.random_model import save_random_model, save_value_head

ROOT = Path(__file__).resolve().parents[1]

GEMM_FLOPS = 122e9
MEM_BYTES = 40e9
HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB = 512, 8, 8, 2, 16384
CPU_SECONDS: dict[str, list[float]] = {}
"""Process CPU time of each timed generate (with one thread: robust to other jobs on the machine)."""


def model_dir() -> Path:
    path = ROOT / ".cache" / "bench-qwen2-34m"
    if not (path / "value_head.safetensors").exists():
        save_random_model(path, "qwen2", hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                          num_kv_heads=KV_HEADS, vocab_size=VOCAB)
        save_value_head(path / "value_head.safetensors", HIDDEN)
    return path


def run(engine: Engine, n: int, mode: str):
    if mode == "ref":
        os.environ["PFENGINE_CPP"] = "0"
    else:
        os.environ.pop("PFENGINE_CPP", None)
    request = Request(prompt="Step 1: add 17 and 25.",
                      sampling=SamplingParams(seed=0, max_step_tokens=32, max_steps=4, stop_on_eos=False),
                      search=SearchParams(n_particles=n, aggregation="last", resampling="systematic"))
    start, cpu = time.perf_counter(), time.process_time()
    result = engine.generate([request])[0]
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    engine.policy.blocks.check_invariants()
    CPU_SECONDS.setdefault(mode, []).append(cpu)
    return seconds, result


def roofline(n: int, ctx: float, kv_bytes: int) -> tuple[float, float]:
    """Lower bounds of one decode step: GEMM FLOPs at the GEMM rate, bytes (weights + KV) at the copy rate."""
    inter = 2 * HIDDEN
    head_dim = HIDDEN // HEADS
    per_layer = HIDDEN * (HIDDEN + 2 * KV_HEADS * head_dim) + HIDDEN * HIDDEN + HIDDEN * 2 * inter + inter * HIDDEN
    gemm_params = LAYERS * per_layer + VOCAB * HIDDEN
    flops = 2 * n * gemm_params + 4 * n * LAYERS * HEADS * head_dim * ctx  # + attention QK and PV
    bytes_ = 4 * gemm_params + n * ctx * LAYERS * 2 * KV_HEADS * head_dim * kv_bytes
    return flops / GEMM_FLOPS, bytes_ / MEM_BYTES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--particles", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-dtype", default="float32")
    ap.add_argument("--profile", choices=["cpp", "ref"], help="profile one generate in this mode instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = model_dir()
    engine = Engine(EngineConfig(model=str(path), prm=str(path / "value_head.safetensors"), num_blocks=2048,
                                 block_size=16, kv_dtype=args.kv_dtype, max_particles=args.particles + 8))
    from pfengine.kernels import cpu_isa

    print(f"model {path.name}: {sum(p.numel() for p in [engine.policy.decoder.embed]) / 1e6:.1f}M embedding "
          f"params; C++ extension ({cpu_isa()} code); {torch.get_num_threads()} threads; kv {args.kv_dtype}")
    run(engine, 4, "cpp")  # warm-up: allocator, caches
    run(engine, 4, "ref")
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run(engine, args.particles, args.profile)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        return

    times: dict[str, list[float]] = {"cpp": [], "ref": []}
    steps: dict[str, list[float]] = {"cpp": [], "ref": []}
    cpu_steps: dict[str, list[float]] = {"cpp": [], "ref": []}
    timer = DecodeTimer(engine)
    decode_log, cpu_log = timer.wall, timer.cpu
    tokens: dict[str, list] = {}
    ctx = 0.0
    for _ in range(args.repeats):
        for mode in ("cpp", "ref"):
            timer.clear()
            seconds, result = run(engine, args.particles, mode)
            times[mode].append(seconds)
            steps[mode].extend(decode_log)
            cpu_steps[mode].extend(cpu_log)
            tokens.setdefault(mode, [p.token_ids for p in result.particles])
            assert [p.token_ids for p in result.particles] == tokens[mode]
            prompt = result.stats.prompt_tokens
            gen = len(result.particles[0].token_ids)
            ctx = prompt + gen / 2
            print(f"  {mode}: generate {seconds:6.2f} s (CPU {CPU_SECONDS[mode][-1]:6.2f} s), {len(decode_log)} "
                  f"decode steps, median step {statistics.median(decode_log) * 1e3:6.1f} ms", flush=True)
    same = tokens["cpp"] == tokens["ref"]
    prefix = [next((k for k, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
              for x, y in zip(tokens["cpp"], tokens["ref"])]
    t_c, t_r = min(times["cpp"]), min(times["ref"])
    s_c, s_r = statistics.median(steps["cpp"]), statistics.median(steps["ref"])
    compute_floor, memory_floor = roofline(args.particles, ctx, torch.finfo(getattr(torch, args.kv_dtype)).bits // 8)
    compute_floor *= 2 / args.threads  # the GEMM rate was measured on 2 threads
    print(f"\nN={args.particles}, 4 steps x 32 tokens, mean context ~{ctx:.0f} tokens; particles identical: {same}")
    if not same:  # fp32 rounding of attention differs; a flat random-model distribution amplifies it
        print(f"  particles equal: {sum(x == y for x, y in zip(tokens['cpp'], tokens['ref']))}/{len(prefix)}; "
              f"tokens before the first difference: min {min(prefix)}, median {statistics.median(prefix):.0f}")
    print(f"generate (best of {args.repeats}):   C++ {t_c:6.2f} s   reference {t_r:6.2f} s   ratio x{t_r / t_c:.2f}")
    c_c, c_r = min(CPU_SECONDS["cpp"][-args.repeats:]), min(CPU_SECONDS["ref"][-args.repeats:])
    print(f"generate CPU time:     C++ {c_c:6.2f} s   reference {c_r:6.2f} s   ratio x{c_r / c_c:.2f}")
    print(f"decode step (median):  C++ {s_c * 1e3:6.1f} ms  reference {s_r * 1e3:6.1f} ms  ratio x{s_r / s_c:.2f}")
    if args.threads == 1:
        p_c, p_r = statistics.median(cpu_steps["cpp"]), statistics.median(cpu_steps["ref"])
        print(f"decode step CPU time:  C++ {p_c * 1e3:6.1f} ms  reference {p_r * 1e3:6.1f} ms  ratio x{p_r / p_c:.2f}")
        s_c, s_r = p_c, p_r  # one thread: CPU time is the step's own cost, whatever else runs on the machine
    rate = GEMM_FLOPS * args.threads / 2
    print(f"roofline per decode step on {args.threads} thread(s): GEMM compute {compute_floor * 1e3:.1f} ms "
          f"(at {rate / 1e9:.0f} GFLOP/s), memory {memory_floor * 1e3:.1f} ms (at {MEM_BYTES / 1e9:.0f} GB/s) -> "
          f"C++ step at {compute_floor / s_c:.0%} of the compute bound, reference at {compute_floor / s_r:.0%}")


if __name__ == "__main__":
    main()
