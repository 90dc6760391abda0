"""System 1: pfengine's native particle filter (one Engine, all prompts batched; value head or a
separate PRM model with its own forked cache)."""
from __future__ import annotations

import time

from bench.common import NEVER_DELIMITER, distinct_prefixes, peak_rss_mb
from bench.workload import Checkpoints, Workload


def engine_config(ck: Checkpoints, prm_kind: str, wl: Workload, prompt_lens: list[int], block_size: int = 16):
    from pfengine import EngineConfig

    prm = ck.value_head if prm_kind == "head" else ck.prm_dir
    per_particle = wl.steps * (wl.step_tokens + 1)
    blocks = sum((t + block_size - 1) // block_size + wl.particles * ((per_particle + block_size - 1) // block_size + 2)
                 for t in prompt_lens)
    # generous: resampling keeps every ancestor's blocks alive until the fork
    return EngineConfig(model=ck.policy, prm=prm, block_size=block_size, num_blocks=2 * blocks + 64,
                        max_particles=wl.prompts * (wl.particles + 2) + 8)


def sampling(wl: Workload, seed: int):
    from pfengine import SamplingParams

    return SamplingParams(temperature=wl.temperature, top_p=1.0, top_k=0, seed=seed, max_step_tokens=wl.step_tokens,
                          max_steps=wl.steps, max_tokens=wl.steps * wl.step_tokens, step_delimiter=NEVER_DELIMITER,
                          stop_on_eos=False)


class PfenginePF:
    system = "pfengine"

    def __init__(self, ck: Checkpoints, prm_kind: str = "model", block_size: int = 16) -> None:
        if prm_kind not in ("model", "head"):
            raise ValueError(prm_kind)
        if (ck.prm_dir if prm_kind == "model" else ck.value_head) is None:
            raise ValueError(f"pfengine: no {'PRM dir' if prm_kind == 'model' else 'value head'} given")
        self.ck, self.prm_kind, self.block_size = ck, prm_kind, block_size
        self.variant = "separate PRM" if prm_kind == "model" else "value head"
        self.engine = None
        self._shape = None

    def _engine(self, wl: Workload, prompt_ids: list[list[int]]):
        from pfengine import Engine

        shape = (wl.prompts, wl.particles, wl.steps, wl.step_tokens)
        if self.engine is None or self._shape != shape:
            self.engine = None
            self.engine = Engine(engine_config(self.ck, self.prm_kind, wl, [len(p) for p in prompt_ids], self.block_size))
            self._shape = shape
        return self.engine

    def requests(self, wl: Workload, seed: int):
        from pfengine import Request, SearchParams

        return [Request(prompt=text, sampling=sampling(wl, seed * 1000 + p),
                        search=SearchParams(n_particles=wl.particles, aggregation="model", resampling="systematic"))
                for p, text in enumerate(wl.prompt_texts())]

    def warmup(self, wl: Workload, prompt_ids: list[list[int]]) -> None:
        from dataclasses import replace

        small = replace(wl, steps=min(wl.steps, 2))
        engine = self._engine(wl, prompt_ids)
        engine.generate(self.requests(small, seed=10_000))

    def run(self, wl: Workload, prompt_ids: list[list[int]], seed: int) -> dict:
        engine = self._engine(wl, prompt_ids)
        requests = self.requests(wl, seed)
        before = engine.stats()
        t0 = time.perf_counter()
        results = engine.generate(requests)
        wall = time.perf_counter() - t0
        after = engine.stats()
        for r, ids in zip(results, prompt_ids):
            assert r.stats.prompt_tokens == len(ids), "pfengine tokenised a prompt differently from the harness"
        union = sum(distinct_prefixes(r.stats.prompt_tokens, [t for tr in r.trace for t in tr.tokens]) for r in results)
        d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        policy = d["policy_tokens_forwarded"]
        prm = d.get("prm_tokens_forwarded", 0)
        return {"wall_s": wall, "generated_tokens": sum(r.stats.generated_tokens for r in results),
                "policy_tokens": policy, "prm_tokens": prm if self.prm_kind == "model" else 0,
                "prm_tags": d.get("prm_tags_forwarded", 0), "union_tokens": union,
                "recomputed_tokens": d["recomputed_tokens"], "preemptions": d["preemptions"],
                "cow_copies": d["cow_copies"], "blocks_in_use_after": after["policy_blocks_in_use"],
                "steps_run": sum(r.stats.steps for r in results), "peak_rss_mb": peak_rss_mb()}
