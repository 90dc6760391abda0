"""``pfengine demo`` and ``pfengine generate``."""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from pfengine.config import EngineConfig, SearchParams, Request, SamplingParams
from pfengine.engine import Engine
from pfengine.state import PFResult

DEMO_DIR = Path(".cache/demo-model")
DEMO_PROMPT = "Step 1: add 17 and 25."


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pfengine", description="Particle filtering at inference time.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run PF on the default model and print the answer and particle weights")
    gen = sub.add_parser("generate", help="run PF on a prompt with a local checkpoint")
    gen.add_argument("--model", required=True, help="local Hugging Face checkpoint directory (the policy)")
    gen.add_argument("--prm", help="PRM directory (Qwen2.5-Math-PRM layout) or value-head .safetensors file")
    gen.add_argument("--prompt", required=True, help="the problem text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    for p in (demo, gen):
        p.add_argument("--particles", type=int, default=8, help="number of particles N (default 8)")
        p.add_argument("--temperature", type=float, default=0.8, help="policy sampling temperature (default 0.8)")
        p.add_argument("--max-steps", type=int, default=6, help="steps per particle before it is stopped")
        p.add_argument("--max-step-tokens", type=int, default=24, help="tokens per step before it is cut")
        p.add_argument("--aggregation", default="model", choices=["model", "last", "prod", "min"],
                       help="how step scores combine into a weight (default: model, the paper's best)")
        p.add_argument("--resampling", default="systematic", choices=["systematic", "multinomial"])
        p.add_argument("--seed", type=int, default=0, help="request seed: same seed, same particles")
        p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.command == "demo":
        model, prm, prompt = _demo_checkpoint(), None, DEMO_PROMPT
        prm = str(DEMO_DIR / "value_head.safetensors")
    else:
        model, prm, prompt = args.model, args.prm, args.prompt
        if args.chat:
            prompt = [{"role": "user", "content": prompt}]
    engine = Engine(EngineConfig(model=model, prm=prm, num_blocks=2048))
    request = Request(prompt=prompt,
                      sampling=SamplingParams(temperature=args.temperature, seed=args.seed, max_steps=args.max_steps,
                                              max_step_tokens=args.max_step_tokens),
                      search=SearchParams(n_particles=args.particles, aggregation=args.aggregation,
                                  resampling=args.resampling))
    start = time.perf_counter()
    result = engine.generate([request])[0]
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps(asdict(result) | {"engine": engine.stats()}, indent=1))
        return
    print_result(result, engine.stats(), seconds)


def _demo_checkpoint() -> str:
    from pfengine.random_model import save_random_model, save_value_head

    if not (DEMO_DIR / "value_head.safetensors").is_file():
        print(f"Building a random-weight Qwen2 checkpoint in {DEMO_DIR} (no trained model is bundled yet; "
              "its text is noise, but it loads and runs through the same path as any HF checkpoint).")
        save_random_model(DEMO_DIR, "qwen2", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2)
        save_value_head(DEMO_DIR / "value_head.safetensors", 128)
    print(f"Model: {DEMO_DIR} (random weights) + value-head PRM {DEMO_DIR / 'value_head.safetensors'}")
    return str(DEMO_DIR)


def print_result(result: PFResult, stats: dict[str, int], seconds: float) -> None:
    print("\nRounds (score -> weights -> resample):")
    print(f"{'round':>5} {'ESS':>6}  ancestors")
    for k, tr in enumerate(result.trace):
        print(f"{k + 1:>5} {tr.ess:>6.2f}  {tr.ancestors if tr.ancestors is not None else '(all finished: kept)'}")
    print("\nParticles:")
    print(f"{'#':>3} {'weight':>7} {'score':>6} {'steps':>5}  text")
    for i, p in enumerate(result.particles):
        mark = "*" if i == result.best else " "
        print(f"{i:>2}{mark} {p.weight:>7.3f} {p.score:>6.3f} {len(p.steps):>5}  {p.text[:60]!r}")
    s = result.stats
    print(f"\nAnswer (particle {result.best}, highest weight): {result.answer!r}")
    print(f"{s.generated_tokens} tokens in {seconds:.2f} s ({s.generated_tokens / seconds:.0f} tok/s), "
          f"{s.steps} rounds, {s.resamples} resamples; engine counters: {stats}")


if __name__ == "__main__":
    main()
