"""Microbenchmarks: the C++ CPU kernels (pfengine._cpp) vs the torch references.

    .venv/bin/python -m pytest bench/bench_kernels.py --benchmark-columns=median,min,rounds

(2 torch threads; ``PFENGINE_BENCH_THREADS=1`` for one, which is steadier on a shared machine)
(``make test`` runs this file once with ``--benchmark-disable``, untimed, so it cannot rot). Paged decode attention at
N in {16, 64} particles x context in {256, 2048} (Hq=8, Hkv=2, D=64, B=16, fp32 and bf16 cache,
each particle on its own randomly placed blocks), a resampling round -- resample + fork of the
block tables -- at N in {64, 1024}, and the row-invariant linear layer on the code of each
instruction set this CPU runs (avx512, avx2, portable; PFENGINE_CPU_ISA is not needed here) and torch:
the benchmark model's gate+up projection and LM head at 1, 8, 64 and 512 rows, and every linear of one
decode step of that model at 8 and 128 rows (N = 4 and 64 particles x 2 prompts) with its 105 MB of
distinct weights streaming from memory as in the engine. Each group's table shows, in parentheses,
every time relative to the fastest in the group. The machine (instruction sets, GEMM GFLOP/s, copy
GB/s) is measured first and printed above and below the tables (bench/conftest.py).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from pfengine.cache.block_manager import BlockManager
from pfengine.kernels import cpp_ops
from pfengine.kernels.fork import BlockState, fork_cpp, fork_ref
from pfengine.kernels.linear import Weight, linear, linear_ref, vocab_projection_ref
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
        state = BlockState(bm.tables.clone(), bm.lens.clone(), bm.ref_counts.clone(), bm.free_stack.clone(),
                           torch.tensor([bm.num_free], dtype=torch.int64))
        return state, {}

    def step(*state):
        anc = resample(w, seg, u, "systematic")
        return fork(BlockState(*state), rows, anc, writes, B)

    benchmark.group = f"resample+fork N={n}"
    res = benchmark.pedantic(step, setup=setup, rounds=200 if n == 64 else 50, warmup_rounds=2)
    assert int(res.num_cow[0]) > 0


LINEAR_IMPLS = ["avx512", "avx2", "portable", "torch"]
LAYERS = {"gate_up": (2048, 512), "lm_head": (16384, 512)}
STEP_LAYERS = [(768, 512), (512, 512), (2048, 512), (512, 1024)] * 8 + [(16384, 512)]
"""The benchmark model's linears in decode-step order: 8 x (qkv, o, gate+up, down), then the LM head."""


def _linear_weight(w: torch.Tensor, impl: str, lm_head: bool = False) -> tuple:
    """(the call, its weight argument) for ``impl``: an instruction set's packed kernel or torch's."""
    if impl == "torch":
        return (vocab_projection_ref if lm_head else linear_ref), w
    if impl not in cpp_ops().cpu_isas():
        pytest.skip(f"this CPU cannot run the {impl} code")
    return linear, Weight(None, cpp_ops().pack_linear(w, impl), w.shape[0], impl)


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
@pytest.mark.parametrize("rows", [1, 8, 64, 512])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_linear(benchmark, layer, rows, impl):
    """One layer, its weight reused call after call (cache-warm where it fits): torch is F.linear padded
    to 12 rows (gate+up) and the transposed product (LM head), as the torch reference path runs them."""
    n, k = LAYERS[layer]
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5
    fn, weight = _linear_weight(w, impl, lm_head=layer == "lm_head")
    benchmark.group = f"linear {layer} {n}x{k} rows={rows}"
    rounds = min(2000, max(5, int(1e10 / (2 * rows * n * k))))
    out = benchmark.pedantic(fn, args=(x, weight), rounds=rounds, warmup_rounds=1)
    torch.testing.assert_close(out, x @ w.T, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def step_weights() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, k, generator=g) / k ** 0.5 for n, k in STEP_LAYERS]


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
@pytest.mark.parametrize("rows", [8, 128])
def test_decode_step_linears(benchmark, step_weights, rows, impl):
    """Every linear of one decode step of the benchmark model, 105 MB of distinct weights."""
    calls = [_linear_weight(w, impl, lm_head=i == len(step_weights) - 1) for i, w in enumerate(step_weights)]
    xs = {k: torch.randn(rows, k, generator=torch.Generator().manual_seed(k)) for k in (512, 1024)}

    def step():
        return [fn(xs[w.shape[1] if isinstance(w, torch.Tensor) else w.packed.shape[1]], w) for fn, w in calls]

    benchmark.group = f"decode step linears rows={rows} (34M model, 105 MB)"
    outs = benchmark.pedantic(step, rounds=40 if rows == 8 else 10, warmup_rounds=1)
    torch.testing.assert_close(outs[-1], xs[512] @ step_weights[-1].T, rtol=1e-4, atol=1e-4)
