"""Helpers for the tests that compare whole kernel paths (Triton, C++, torch reference): a short
particle-filtering run of the engine, counting which kernel entry points it launched, every kernel in
a fresh interpreter that cannot import one of the optional dependencies, and the decoder at a real
model's shape on the meta device (shapes and dtypes without memory or data)."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pfengine import Engine, EngineConfig, PFResult, Request, SamplingParams, SearchParams
from pfengine.model.checkpoint import expected_shapes, parse_config
from pfengine.model.decoder import ForwardBatch, PagedDecoder
from pfengine.random_model import QWEN2_5_MATH_1_5B

Run = tuple[PFResult, dict[str, int]]


def run_pf(policy_dir: str, prm: str, particles: int, steps: int, step_tokens: int, **config) -> Run:
    """One request's particle filtering (systematic resampling) and the engine's stats; the block
    invariants must hold at the end."""
    engine = Engine(EngineConfig(model=policy_dir, prm=prm, block_size=8, **config))
    r = engine.generate([Request(prompt="Step 1: add 17 and 25.",
                                 sampling=SamplingParams(seed=2, max_step_tokens=step_tokens, max_steps=steps),
                                 search=SearchParams(n_particles=particles, aggregation="last",
                                                     resampling="systematic"))])[0]
    engine.policy.blocks.check_invariants()
    return r, engine.stats()


def assert_same_run(got: Run, ref: Run) -> None:
    """The same particles, ancestry and stats; the same weights up to rounding."""
    (a, a_stats), (b, b_stats) = got, ref
    assert [p.token_ids for p in a.particles] == [p.token_ids for p in b.particles]
    assert [tr.ancestors for tr in a.trace] == [tr.ancestors for tr in b.trace]
    assert [p.weight for p in a.particles] == pytest.approx([p.weight for p in b.particles], abs=1e-5)
    assert a_stats == b_stats


def count_launches(monkeypatch: pytest.MonkeyPatch, entry_points: list[tuple[str, str]]) -> dict[str, int]:
    """Wrap each ``(kernel module, function)`` to see which path the engine really took."""
    counts: dict[str, int] = {}
    for module_name, name in entry_points:
        module = importlib.import_module(f"pfengine.kernels.{module_name}")
        counts[name] = 0

        def wrapped(*args, _f=getattr(module, name), _n=name, **kwargs):
            counts[_n] += 1
            return _f(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapped)
    return counts


BLOCKED = """
import logging, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r} or name.startswith({module!r} + "."):
            raise ImportError({module!r} + " blocked by the test")
sys.meta_path.insert(0, Block())
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
import torch
from pfengine.kernels import copy_blocks, fork, kv_store, paged_attention, prm_score, resample, sampling
{checks}
k = torch.randn(2, 1, 4)
kc = torch.zeros(2, 4, 1, 4)
kv_store.store_kv(k, k, kc, kc.clone(), torch.tensor([0, 5]))
out = paged_attention.paged_decode_attention(torch.randn(1, 1, 4), kc, kc, torch.tensor([[1, 0]], dtype=torch.int32),
                                             torch.tensor([6]), 0.5)
assert out.shape == (1, 1, 4)
anc = resample.resample(torch.tensor([0.5, 0.5]), torch.tensor([0, 2]), torch.tensor([0.1, 0.2]), "systematic")
assert anc.tolist() == [0, 1]
copy_blocks.copy_blocks(torch.zeros(2, 1, 3, 4, 1, 4), torch.tensor([[0], [1]]))
tok = sampling.temperature_sample(torch.randn(2, 10), 0.8, torch.rand(2, 1, dtype=torch.float64))
assert tok.shape == (2,)
assert {module!r} not in sys.modules
print("ok")
"""


def run_without(module: str, checks: str) -> str:
    """Every kernel once on its default path in a fresh interpreter where ``module`` cannot be
    imported, after the Python lines ``checks``; returns the output, the INFO log included."""
    env = {k: v for k, v in os.environ.items() if k not in ("PFENGINE_TRITON", "PFENGINE_CPP")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    script = BLOCKED.format(module=module, checks=checks)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
    return proc.stdout


def meta_decoder(kv_dtype: torch.dtype) -> PagedDecoder:
    """Qwen2.5-Math-1.5B's shape on the meta device (4,096 blocks of 16, 1,024 table rows): no memory,
    no data, and any read of data (a host sync on a GPU) raises."""
    cfg = parse_config(QWEN2_5_MATH_1_5B)
    tensors = {name: torch.empty(shape, device="meta") for name, shape in expected_shapes(cfg).items()
               if name != "lm_head.weight"}
    decoder = PagedDecoder(cfg, tensors, 4096, 16, kv_dtype, cfg.max_position_embeddings, "meta")
    decoder.tables = torch.full((1024, cfg.max_position_embeddings // 16), -1, dtype=torch.int32, device="meta")
    return decoder


def meta_batch(n: int) -> ForwardBatch:
    """A decode batch of ``n`` rows on the meta device, with the runner's dtypes."""
    ints = [torch.empty(n, dtype=torch.int64, device="meta") for _ in range(5)]
    return ForwardBatch(*ints[:4], list(range(n + 1)), ints[4])
