"""Microbenchmarks: the C++ CPU kernels (pfengine._cpp) vs the torch references.

    .venv/bin/python -m pytest bench/bench_kernels.py --benchmark-columns=median,min,rounds

(2 torch threads; ``PFENGINE_BENCH_THREADS=1`` for one, which is steadier on a shared machine)
(``make test`` runs this file once with ``--benchmark-disable``, untimed, so it cannot rot). Paged decode attention at
N in {16, 64} particles x context in {256, 2048} (Hq=8, Hkv=2, D=64, B=16, fp32 and bf16 cache,
each particle on its own randomly placed blocks), and a resampling round -- resample + fork of the
block tables -- at N in {64, 1024}, and the row-invariant linear layer at 8, 128 and 4224 rows. Each group's table shows, in parentheses, every time relative
to the fastest in the group (the C++ kernel): the reference's median ratio is the speed-up.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from pfengine.cache.block_manager import BlockManager
from pfengine.kernels import cpp_ops
from pfengine.kernels.fork import fork_cpp, fork_ref
from pfengine.kernels.linear import Weight, linear, linear_ref, prepare
from pfengine.kernels.paged_attention import paged_decode_attention_cpp, paged_decode_attention_ref
from pfengine.kernels.resample import resample_cpp, resample_ref

if importlib.util.find_spec("pfengine._cpp") is None:
    pytest.skip("pfengine._cpp is not built", allow_module_level=True)

torch.set_num_threads(int(os.environ.get("PFENGINE_BENCH_THREADS", "2")))

HQ, HKV, D, B = 8, 2, 64, 16


def _attention_case(n: int, ctx: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(n + ctx)
    per = ctx // B
    kc = torch.randn(n * per + 1, B, HKV, D, generator=g).to(dtype)
    vc = torch.randn(n * per + 1, B, HKV, D, generator=g).to(dtype)
    tables = torch.randperm(n * per, generator=g)[:n * per].view(n, per).to(torch.int32)
    q = torch.randn(n, HQ, D, generator=g)
    return q, kc, vc, tables, torch.full((n,), ctx, dtype=torch.int64)


@pytest.mark.parametrize("impl", ["cpp", "ref"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,ctx", [(16, 256), (16, 2048), (64, 256), (64, 2048)])
def test_paged_attention(benchmark, n, ctx, dtype, impl):
    q, kc, vc, tables, lens = _attention_case(n, ctx, dtype)
    fn = paged_decode_attention_cpp if impl == "cpp" else paged_decode_attention_ref
    benchmark.group = f"paged_attention N={n} ctx={ctx} {str(dtype)[6:]}"
    cost = n * ctx / (16 * 256)  # reference calls at N=64, ctx=2048 take ~0.6 s: keep rounds few
    rounds = max(3, int(40 / cost)) if impl == "ref" else max(10, int(400 / cost))
    out = benchmark.pedantic(fn, args=(q, kc, vc, tables, lens, D ** -0.5), rounds=rounds, warmup_rounds=1)
    if impl == "cpp" and n * ctx <= 16 * 2048:  # the timed kernel is the right one
        ref = paged_decode_attention_ref(q, kc, vc, tables, lens, D ** -0.5)
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


def _pf_state(n: int):
    """N particles of one request after a prompt of 100 tokens and 40 more each (block size 16):
    shared full prompt blocks, private tails, a partial last block."""
    bm = BlockManager(n * 8 + 16, B, n, 16)
    bm.reserve(torch.tensor([0]), torch.tensor([100]))
    bm.assign(torch.arange(1, n), torch.zeros(n - 1, dtype=torch.int64))
    bm.reserve(torch.arange(n), torch.full((n,), 40))
    g = torch.Generator().manual_seed(n)
    w = torch.rand(n, generator=g, dtype=torch.float64) ** 4
    return bm, w / w.sum(), torch.rand(n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("impl", ["cpp", "ref"])
@pytest.mark.parametrize("n", [64, 1024])
def test_resample_and_fork(benchmark, n, impl):
    bm, w, u = _pf_state(n)
    resample, fork = (resample_cpp, fork_cpp) if impl == "cpp" else (resample_ref, fork_ref)
    seg = torch.tensor([0, n])
    rows = torch.arange(n)
    writes = torch.ones(n, dtype=torch.bool)

    def setup():
        state = (bm.tables.clone(), bm.lens.clone(), bm.ref_counts.clone(), bm.free_stack.clone(),
                 torch.tensor([bm.num_free], dtype=torch.int64))
        return state, {}

    def step(*state):
        anc = resample(w, seg, u, "systematic")
        return fork(*state, rows, anc, writes, B)

    benchmark.group = f"resample+fork N={n}"
    res = benchmark.pedantic(step, setup=setup, rounds=200 if n == 64 else 50, warmup_rounds=2)
    assert int(res.num_cow[0]) > 0


@pytest.mark.parametrize("impl", ["cpp", "ref"])
@pytest.mark.parametrize("rows", [8, 128, 4224])
def test_linear(benchmark, rows, impl):
    """The benchmark model's MLP up-projection (gate+up, 2048 x 512): a decode batch of 4 or 64
    particles x 2 prompts, and a PRM extend of 128 sequences x 33 tokens."""
    if impl == "cpp" and not cpp_ops().has_packed_linear():
        pytest.skip("packed_linear needs AVX-512F")
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 512, generator=g), torch.randn(2048, 512, generator=g) / 512 ** 0.5
    weight = prepare(w) if impl == "cpp" else Weight(w, None, 2048)
    benchmark.group = f"linear rows={rows} 2048x512"
    out = benchmark.pedantic(linear, args=(x, weight), rounds=max(5, 20000 // rows), warmup_rounds=1)
    torch.testing.assert_close(out, linear_ref(x, w), rtol=1e-4, atol=1e-4)
