"""System 5b: vLLM offline — an in-process ``LLM`` (policy, prefix caching on) + ``LLM(runner="pooling")``
(the Qwen2.5-Math-PRM-layout PRM, STEP pooling) with a PF loop written for it: one ``generate`` per step
for every particle of every prompt (token-id prompts: prompt + the particle's steps, ``max_tokens=L``,
``ignore_eos``), one ``encode`` per step for every full prefix + step tag.

Runs in the vLLM venv, as a worker process of the harness (start-up stays out of the timed region):

    .venv-vllm/bin/python bench/vllm_pf.py --policy DIR --prm DIR --step-tag-id 3

prints ``PFBENCH {"ready": ...}`` once loaded, then for each JSON line on stdin
(``{"workload": {...}, "prompt_ids": [[...]], "seed": 0}``) one ``PFBENCH {...}`` result line;
``{"quit": true}`` ends it. Other stdout lines are vLLM's logs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo root, not bench/ (no shadowing)

from bench.common import peak_rss_mb, run_pf  # noqa: E402

PREFIX = "PFBENCH "


def emit(obj: dict) -> None:
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


class VllmOffline:
    def __init__(self, args: argparse.Namespace) -> None:
        from vllm import LLM
        from vllm.config import PoolerConfig

        common = dict(dtype="float32", enforce_eager=True, block_size=args.block_size, seed=args.seed,
                      max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
                      max_num_seqs=args.max_num_seqs)
        t0 = time.perf_counter()
        self.llm = LLM(model=args.policy, enable_prefix_caching=True, **common)
        t1 = time.perf_counter()
        self.prm = None
        if args.prm:
            self.prm = LLM(model=args.prm, runner="pooling",
                           pooler_config=PoolerConfig(step_tag_id=args.step_tag_id), **common)
        self.step_tag_id = args.step_tag_id
        self.startup = {"policy_s": t1 - t0, "prm_s": time.perf_counter() - t1}
        self.counts: dict[str, int] = {}

    def extend(self, seqs: list[list[int]], step_tokens: int, temperature: float) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sp = SamplingParams(n=1, temperature=temperature, top_p=1.0, top_k=0, max_tokens=step_tokens,
                            min_tokens=0, ignore_eos=True, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], sp, use_tqdm=False)
        new = []
        for s, o in zip(seqs, outs):
            cached = o.num_cached_tokens or 0
            self.counts["policy_tokens"] += len(s) - cached + step_tokens - 1
            self.counts["policy_cached"] += cached
            new.append(list(o.outputs[0].token_ids))
        return new

    def score(self, seqs: list[list[int]]) -> list[float]:
        from vllm.inputs import TokensPrompt

        outs = self.prm.encode([TokensPrompt(prompt_token_ids=s + [self.step_tag_id]) for s in seqs],
                               pooling_task="token_classify", use_tqdm=False)
        probs = []
        for s, o in zip(seqs, outs):
            data = o.outputs.data  # [tags, 2]: softmax over the two classes at each step tag
            probs.append(float(data[-1][1]))
            cached = getattr(o, "num_cached_tokens", 0) or 0
            self.counts["prm_tokens"] += len(s) - min(cached, len(s))
            self.counts["prm_cached"] += cached
            self.counts["prm_tags"] += 1
        return probs

    def run(self, wl: dict, prompt_ids: list[list[int]], seed: int) -> dict:
        self.counts = {k: 0 for k in ("policy_tokens", "policy_cached", "prm_tokens", "prm_cached", "prm_tags")}
        phases: dict[str, float] = {}
        t0 = time.perf_counter()
        trace = run_pf(prompt_ids, wl["particles"], wl["steps"], wl["step_tokens"], seed,
                       lambda s: self.extend(s, wl["step_tokens"], wl["temperature"]), self.score, phases)
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "generated_tokens": trace.generated(), **self.counts,
                "union_tokens": trace.union(), "phases": phases, "peak_rss_mb": peak_rss_mb()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--policy", required=True)
    p.add_argument("--prm", required=True)
    p.add_argument("--step-tag-id", type=int, required=True)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--max-num-seqs", type=int, default=256)
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    try:
        worker = VllmOffline(args)
    except Exception as e:  # noqa: BLE001
        import traceback

        emit({"ready": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]})
        return 1
    emit({"ready": True, "startup": worker.startup})
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        if msg.get("quit"):
            break
        try:
            emit(worker.run(msg["workload"], msg["prompt_ids"], msg["seed"]))
        except Exception as e:  # noqa: BLE001
            import traceback

            emit({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
