"""System 1: pfengine's native particle filter (one Engine, all prompts batched; value head or a
separate PRM model with its own forked cache)."""
from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from typing import Iterator

from bench.common import NEVER_DELIMITER, distinct_prefixes, peak_rss_mb
from bench.roofline import code_isa
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


@contextmanager
def cpu_isa_forced(isa: str | None) -> Iterator[None]:
    """``PFENGINE_CPU_ISA=isa`` while the block runs (no change for None)."""
    if isa is None:
        yield
        return
    before = os.environ.get("PFENGINE_CPU_ISA")
    os.environ["PFENGINE_CPU_ISA"] = isa
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PFENGINE_CPU_ISA")
        else:
            os.environ["PFENGINE_CPU_ISA"] = before


class DecodeTimer:
    """Times every policy decode step of ``engine`` without the profiler -- the forward of all
    particles' new tokens plus their logits, what the ``pfengine::decode`` range covers: wall and
    process CPU seconds (with one thread, CPU time is the step's own cost whatever else runs), and
    the batch size."""

    def __init__(self, engine) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.batch: list[int] = []
        runner, decoder = engine.policy, engine.policy.decoder
        decode, logits = runner.decode, decoder.logits
        pending: list[tuple[float, float]] = []

        def timed_decode(rows, tokens):
            pending.append((time.perf_counter(), time.process_time()))
            self.batch.append(len(rows))
            return decode(rows, tokens)

        def timed_logits(hidden):
            out = logits(hidden)
            if pending:  # a decode step's logits (prefill's come without one)
                wall, cpu = pending.pop()
                self.wall.append(time.perf_counter() - wall)
                self.cpu.append(time.process_time() - cpu)
            return out

        runner.decode, decoder.logits = timed_decode, timed_logits

    def clear(self) -> None:
        self.wall.clear()
        self.cpu.clear()
        self.batch.clear()


class PfenginePF:
    """``isa``: the instruction set of the C++ kernels (PFENGINE_CPU_ISA) for this system's engine, set
    while it loads (the linear layers are packed for it) and while it runs; None keeps the process's."""

    system = "pfengine"

    def __init__(self, ck: Checkpoints, prm_kind: str = "model", block_size: int = 16, isa: str | None = None) -> None:
        if prm_kind not in ("model", "head"):
            raise ValueError(prm_kind)
        if (ck.prm_dir if prm_kind == "model" else ck.value_head) is None:
            raise ValueError(f"pfengine: no {'PRM dir' if prm_kind == 'model' else 'value head'} given")
        self.ck, self.prm_kind, self.block_size, self.isa = ck, prm_kind, block_size, isa
        self.variant = ("separate PRM" if prm_kind == "model" else "value head") + (f", {isa} code" if isa else "")
        self.engine = None
        self._shape = None

    def _engine(self, wl: Workload, prompt_ids: list[list[int]]):
        from pfengine import Engine

        shape = (wl.prompts, wl.particles, wl.steps, wl.step_tokens)
        if self.engine is None or self._shape != shape:
            self.engine = None
            config = engine_config(self.ck, self.prm_kind, wl, [len(p) for p in prompt_ids], self.block_size)
            with cpu_isa_forced(self.isa):
                self.engine = Engine(config)
            self.timer = DecodeTimer(self.engine)
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
        with cpu_isa_forced(self.isa):
            engine.generate(self.requests(small, seed=10_000))

    def run(self, wl: Workload, prompt_ids: list[list[int]], seed: int) -> dict:
        engine = self._engine(wl, prompt_ids)
        requests = self.requests(wl, seed)
        before = engine.stats()
        self.timer.clear()
        with cpu_isa_forced(self.isa):
            t0 = time.perf_counter()
            results = engine.generate(requests)
            wall = time.perf_counter() - t0
            isa = code_isa()
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
                "steps_run": sum(r.stats.steps for r in results), "peak_rss_mb": peak_rss_mb(),
                "code_isa": isa, "decode_steps": len(self.timer.wall),
                "decode_step_s": statistics.median(self.timer.wall), "decode_step_cpu_s": statistics.median(self.timer.cpu),
                "decode_batch": statistics.median(self.timer.batch)}
