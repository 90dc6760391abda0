"""Host overhead of the engine loop: iterations of a model so small that its forward is negligible
(hidden 32, one layer, vocab 384, value-head PRM), particle filtering with fixed 32-token steps, for
16 / 256 / 1,024 particles spread over 1 / 4 / 16 / 64 requests.

What a GPU would expose: a decode step of a 1.5B model over a few hundred particles takes ~10-20 ms
there, so the Python around it must stay well below that. Reported per configuration: engine
iterations, ms per iteration and µs per particle-token (median of --repeats, process CPU time with one
torch thread, which stays steady on a shared machine) -- once as it runs, once with the model's
forward replaced by a stub returning zeros (what is left is the engine's own host work: sampling,
particle bookkeeping, block tables, rounds) -- plus the profiler's phase table for 256 particles in
4 requests.

    .venv/bin/python bench/host_overhead.py [--repeats 3] [--tag host-overhead]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pfengine import Engine, EngineConfig, Request, SamplingParams, SearchParams
from pfengine.random_model import save_random_model, save_value_head

NEVER = "\x00\x00bench:no-step-delimiter\x00\x00"
SHAPES = [(16, 1), (16, 4), (16, 16), (256, 1), (256, 4), (256, 16), (256, 64),
          (1024, 1), (1024, 4), (1024, 16), (1024, 64)]
STEPS, STEP_TOKENS = 4, 32


def tiny_engine(root: Path) -> Engine:
    policy = save_random_model(root / "policy", arch="qwen2", hidden_size=32, num_layers=1, num_heads=2,
                               num_kv_heads=1, vocab_size=384)
    head = save_value_head(root / "value_head.safetensors", 32)
    return Engine(EngineConfig(model=str(policy), prm=str(head), num_blocks=20_000, block_size=16,
                               max_particles=1100, max_request_particles=1024, max_request_tokens=1 << 24))


def requests(particles: int, n_requests: int, seed: int) -> list[Request]:
    sampling = dict(max_steps=STEPS, max_step_tokens=STEP_TOKENS, step_delimiter=NEVER, stop_on_eos=False)
    return [Request(prompt=f"Problem {k}: add 17 and 25.", sampling=SamplingParams(seed=seed + k, **sampling),
                    search=SearchParams(n_particles=particles // n_requests)) for k in range(n_requests)]


def stub_model(engine: Engine) -> None:
    """The policy's forward returns zeros: iterations then cost only the engine's own work."""
    decoder = engine.policy.decoder
    hidden = torch.zeros(4096, decoder.cfg.hidden_size)
    logits = torch.zeros(4096, decoder.cfg.vocab_size)
    decoder.forward = lambda batch: hidden[:batch.tokens.numel()]
    decoder.logits = lambda h: logits[:h.shape[0]]


def measure(engine: Engine, particles: int, n_requests: int, seed: int) -> dict:
    for r in requests(particles, n_requests, seed):
        engine.add_request(r)
    iterations, tokens = 0, 0
    cpu, wall = time.process_time(), time.perf_counter()
    while engine.has_work:
        for event in engine.step():
            if event.result is not None:
                tokens += event.result.stats.generated_tokens
        iterations += 1
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"iterations": iterations, "tokens": tokens, "cpu_s": cpu, "wall_s": wall,
            "ms_per_iteration": 1e3 * cpu / iterations, "us_per_particle_token": 1e6 * cpu / tokens}


def phase_table(engine: Engine, out: Path) -> dict:
    from pfengine.profiling import phase_table as table_of
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        engine.generate(requests(256, 4, 99))
        seconds = time.perf_counter() - start
    prof.export_chrome_trace(str(out))
    return table_of(out, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tag", default="host-overhead")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        engine, stubbed = tiny_engine(Path(tmp) / "a"), tiny_engine(Path(tmp) / "b")
        stub_model(stubbed)
        for e in (engine, stubbed):
            measure(e, 64, 4, 0)  # warm-up
        rows = []
        for particles, n_requests in SHAPES:
            row = {"particles": particles, "requests": n_requests}
            for name, e in (("", engine), ("engine_only_", stubbed)):
                runs = [measure(e, particles, n_requests, 1000 * k) for k in range(args.repeats)]
                row |= {"iterations": runs[0]["iterations"], "tokens": runs[0]["tokens"]}
                for key in ("ms_per_iteration", "us_per_particle_token"):
                    row[name + key] = round(statistics.median(r[key] for r in runs), 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
        phases = phase_table(engine, Path(tempfile.mkdtemp()) / "trace.json")
    lines = [f"Host overhead ({time.strftime('%Y-%m-%d')}, process CPU time, 1 torch thread, medians of "
             f"{args.repeats}; tiny Qwen2 policy: hidden 32, 1 layer, vocab 384; value-head PRM; PF, "
             f"{STEPS} steps x {STEP_TOKENS} tokens)", "",
             "| particles | requests | iterations | ms / iteration | µs / particle-token | engine only: ms / iteration "
             "| engine only: µs / particle-token |", "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['particles']} | {r['requests']} | {r['iterations']} | {r['ms_per_iteration']:.3f} | "
              f"{r['us_per_particle_token']:.2f} | {r['engine_only_ms_per_iteration']:.3f} | "
              f"{r['engine_only_us_per_particle_token']:.2f} |" for r in rows]
    lines += ["", "Phases, 256 particles in 4 requests (wall, profiled):", "", "| phase | seconds | share |",
              "|---|---:|---:|"]
    wall = phases["wall_s"] or 1e-9
    lines += [f"| {k} | {v:.3f} | {100 * v / wall:.1f} % |" for k, v in phases["phases"].items()]
    (out / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    (out / f"{args.tag}.json").write_text(json.dumps({"rows": rows, "phases": phases["phases"],
                                                      "wall_s": phases["wall_s"]}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
