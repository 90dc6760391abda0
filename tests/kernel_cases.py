"""Each kernel's random cases, numpy oracle and checks, shared by its Triton tests (test_kernel_*.py)
and its C++ tests (test_cpp_*.py). A check runs the implementation it is given against the torch
reference and, where there is one, the numpy oracle."""
from __future__ import annotations

import random
from typing import Callable

import numpy as np
import pytest
import torch

from pfengine.cache.block_manager import BlockManager
from pfengine.kernels.copy_blocks import copy_blocks_ref
from pfengine.kernels.fork import BlockState, ForkResult, fork_ref
from pfengine.kernels.kv_store import store_kv_ref
from pfengine.kernels.paged_attention import (paged_decode_attention_ref, paged_extend_attention,
                                              paged_extend_attention_ref, plan_extend)
from pfengine.kernels.resample import resample_ref

Tensor = torch.Tensor

# ------------------------------------------------------------------------------------------------
# copy_blocks(kv_cache, pairs)

COPY_CASES = [  # (layers, blocks, B, Hkv, D, dtype)
    (2, 10, 4, 2, 8, torch.float32),
    (3, 8, 16, 1, 16, torch.bfloat16),
    (1, 6, 32, 2, 16, torch.float16),
]
COPY_PAIRS = torch.tensor([[1, 4, 0], [5, 2, 3]])


def kv_cache(layers: int, nb: int, b: int, hkv: int, d: int, dtype: torch.dtype, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, layers, nb, b, hkv, d, generator=g).to(dtype)


def numpy_copy(kv: Tensor, pairs: Tensor) -> np.ndarray:
    src = kv.float().numpy()
    out = src.copy()
    for s, t in pairs.T.tolist():
        if s >= 0 and t >= 0:
            out[:, :, t] = src[:, :, s]
    return out


def check_copy(copy: Callable[[Tensor, Tensor], None], kv: Tensor, pairs: Tensor) -> None:
    """``copy(kv, pairs)`` leaves ``kv`` as the reference and the numpy oracle do."""
    expect = kv.clone()
    copy_blocks_ref(expect, pairs.long())
    oracle = numpy_copy(kv, pairs)
    copy(kv, pairs)
    assert torch.equal(kv, expect)
    np.testing.assert_array_equal(kv.float().numpy(), oracle)


def check_copy_edge_cases(copy: Callable[[Tensor, Tensor], None]) -> None:
    """-1 padding (fork's cow_pairs) in either row is skipped, empty and all-padding pairs copy
    nothing; a single pair and non-contiguous int32 pairs copy."""
    kv = kv_cache(2, 6, 4, 1, 8, torch.float32, seed=7)
    check_copy(copy, kv, torch.tensor([[2, -1, -1, 3], [4, -1, 5, -1]]))
    before = kv.clone()
    copy(kv, torch.empty(2, 0, dtype=torch.int64))
    copy(kv, torch.full((2, 3), -1, dtype=torch.int64))
    assert torch.equal(kv, before)
    check_copy(copy, kv, torch.tensor([[3, 1]]).T)
    assert torch.equal(kv[:, :, 1], kv[:, :, 3])
    strided = torch.tensor([[0, 2], [4, 1]], dtype=torch.int32).T
    assert not strided.is_contiguous()
    check_copy(copy, kv, strided)


# ------------------------------------------------------------------------------------------------
# store_kv(k, v, k_cache, v_cache, slots)

StoreFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], None]

STORE_CASES = [  # (tokens, Hkv, D, B, blocks, K/V dtype, cache dtype)
    (5, 2, 16, 16, 4, torch.float32, torch.float32),
    (7, 1, 64, 32, 3, torch.float32, torch.bfloat16),
    (4, 4, 8, 16, 2, torch.float16, torch.float16),
    (3, 2, 128, 16, 2, torch.bfloat16, torch.float32),
]


def store_case(t: int, hkv: int, d: int, b: int, nb: int, kdtype: torch.dtype, cdtype: torch.dtype, seed: int,
               n_skip: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """K and V rows of ``t`` tokens, random caches and distinct random slots, ``n_skip`` of them -1."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(t, hkv, d, generator=g).to(kdtype)
    v = torch.randn(t, hkv, d, generator=g).to(kdtype)
    kc = torch.randn(nb, b, hkv, d, generator=g).to(cdtype)
    vc = torch.randn(nb, b, hkv, d, generator=g).to(cdtype)
    slots = torch.randperm(nb * b, generator=g)[:t].long()
    slots[torch.randperm(t, generator=g)[:n_skip]] = -1
    return k, v, kc, vc, slots


def numpy_store(k: Tensor, v: Tensor, kc: Tensor, vc: Tensor, slots: Tensor) -> tuple[np.ndarray, np.ndarray]:
    kc, vc = kc.float().numpy().copy(), vc.float().numpy().copy()
    b = kc.shape[1]
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            kc[s // b, s % b] = k[i].float().numpy()
            vc[s // b, s % b] = v[i].float().numpy()
    return kc, vc


def check_store(store: StoreFn, k: Tensor, v: Tensor, kc: Tensor, vc: Tensor, slots: Tensor,
                rtol: float = 0.0) -> None:
    """``store`` writes the caches as the reference and the numpy oracle do: exactly, or to ``rtol``."""
    kc_ref, vc_ref = kc.clone(), vc.clone()
    oracle = numpy_store(k.to(kc.dtype), v.to(vc.dtype), kc, vc, slots)
    store_kv_ref(k, v, kc_ref, vc_ref, slots)
    store(k, v, kc, vc, slots)
    for got, ref, want in zip((kc, vc), (kc_ref, vc_ref), oracle):
        torch.testing.assert_close(got, ref, rtol=rtol, atol=0)
        np.testing.assert_allclose(got.float().numpy(), want, rtol=rtol, atol=0)


def check_store_skips(store: StoreFn) -> None:
    """Slots of -1 and an empty batch write nothing."""
    k, v, kc, vc, slots = store_case(3, 1, 16, 16, 2, torch.float32, torch.float32, seed=3, n_skip=3)
    before_k, before_v = kc.clone(), vc.clone()
    store(k, v, kc, vc, slots)
    store(k[:0], v[:0], kc, vc, slots[:0])
    assert torch.equal(kc, before_k) and torch.equal(vc, before_v)


def check_store_views(store: StoreFn) -> None:
    """K/V as strided views of a fused projection, the caches as layer views of the KV tensor."""
    qkv = torch.randn(6, 3, 2, 16, generator=torch.Generator().manual_seed(1))
    k, v = qkv[:, 1], qkv[:, 2]
    kv = torch.zeros(2, 3, 3, 4, 2, 16)  # [2, layers, blocks, B, Hkv, D]
    slots = torch.tensor([0, 5, -1, 11, 3, 7])
    expect = kv.clone()
    store_kv_ref(k, v, expect[0, 1], expect[1, 1], slots)
    store(k, v, kv[0, 1], kv[1, 1], slots)
    assert torch.equal(kv, expect)


# ------------------------------------------------------------------------------------------------
# paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)

AttendFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, float], Tensor]

ATTENTION_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (context lengths, Hq, Hkv, D, B, dtype): lengths 1, exact block boundaries (16, 32, 64) and ragged
# ends; GQA groups of 1, 2, 4 and 8.
ATTENTION_CASES = [
    ([5, 32, 40], 4, 2, 16, 16, torch.float32),
    ([64, 17], 2, 2, 64, 32, torch.float16),
    ([33, 1], 8, 1, 128, 16, torch.bfloat16),
    ([48], 4, 1, 64, 16, torch.float32),
    ([16, 9, 31, 2], 1, 1, 16, 16, torch.float32),
]


def attention_case(lens: list[int], hq: int, hkv: int, d: int, b: int, dtype: torch.dtype, seed: int,
                   width: int | None = None, qdtype: torch.dtype | None = None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Random caches; each sequence gets distinct random blocks; unused table entries are -1."""
    g = torch.Generator().manual_seed(seed)
    n = len(lens)
    need = [(x + b - 1) // b for x in lens]
    width = width or max(need + [1])
    nb = sum(need) + 2
    q = torch.randn(n, hq, d, generator=g).to(qdtype or dtype)
    kc = torch.randn(nb, b, hkv, d, generator=g).to(dtype)
    vc = torch.randn(nb, b, hkv, d, generator=g).to(dtype)
    perm = torch.randperm(nb, generator=g)
    tables = torch.full((n, width), -1, dtype=torch.int32)
    k = 0
    for i, c in enumerate(need):
        tables[i, :c] = perm[k:k + c].to(torch.int32)
        k += c
    return q, kc, vc, tables, torch.tensor(lens, dtype=torch.int64)


def numpy_attention(q: Tensor, kc: Tensor, vc: Tensor, tables: Tensor, lens: Tensor, scale: float) -> np.ndarray:
    q, kc, vc = (x.double().numpy() for x in (q, kc, vc))
    n, hq, d = q.shape
    b, hkv = kc.shape[1], kc.shape[2]
    out = np.zeros((n, hq, d))
    for i in range(n):
        ctx = int(lens[i])
        blocks = tables[i, :(ctx + b - 1) // b].long().numpy()
        k = kc[blocks].reshape(-1, hkv, d)[:ctx]
        v = vc[blocks].reshape(-1, hkv, d)[:ctx]
        for h in range(hq):
            kvh = h // (hq // hkv)
            s = k[:, kvh] @ q[i, h] * scale
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v[:, kvh]
    return out


def check_attention(attend: AttendFn, lens: list[int], hq: int, hkv: int, d: int, b: int, dtype: torch.dtype) -> None:
    """``attend`` on a random case equals the reference and the numpy oracle to the dtype's tolerance."""
    q, kc, vc, tables, ctx = attention_case(lens, hq, hkv, d, b, dtype, seed=sum(lens) + d)
    scale = d ** -0.5
    ref = paged_decode_attention_ref(q, kc, vc, tables, ctx, scale)
    oracle = torch.from_numpy(numpy_attention(q, kc, vc, tables, ctx, scale))
    tol = ATTENTION_TOL[dtype]
    torch.testing.assert_close(ref.double(), oracle, rtol=tol, atol=tol)
    out = attend(q, kc, vc, tables, ctx, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(out.double(), oracle, rtol=tol, atol=tol)


def check_attention_single_token_and_empty(attend: AttendFn) -> None:
    """A context of one token gives its value row; an empty batch an empty output."""
    q, kc, vc, tables, ctx = attention_case([1], 2, 2, 16, 16, torch.float32, seed=6)
    out = attend(q, kc, vc, tables, ctx, 0.25)
    torch.testing.assert_close(out[0], vc[int(tables[0, 0]), 0], rtol=0, atol=1e-6)
    empty = attend(q[:0], kc, vc, tables[:0], ctx[:0], 0.25)
    assert empty.shape == (0, 2, 16) and empty.dtype == q.dtype


def numpy_extend_attention(q: Tensor, kc: Tensor, vc: Tensor, tables: Tensor, cu_q: list[int], lens: Tensor,
                           scale: float) -> np.ndarray:
    """Sequence s's new tokens are the last ``cu_q[s+1] - cu_q[s]`` of its ``lens[s]``; each attends
    causally (up to and including itself)."""
    q, kc, vc = (x.double().numpy() for x in (q, kc, vc))
    hq, d = q.shape[1:]
    b, hkv = kc.shape[1], kc.shape[2]
    out = np.zeros(q.shape)
    for s, (lo, hi) in enumerate(zip(cu_q[:-1], cu_q[1:])):
        ctx = int(lens[s])
        blocks = tables[s, :(ctx + b - 1) // b].long().numpy()
        k = kc[blocks].reshape(-1, hkv, d)[:ctx]
        v = vc[blocks].reshape(-1, hkv, d)[:ctx]
        visible = np.arange(ctx)[None, :] <= np.arange(ctx - (hi - lo), ctx)[:, None]
        for h in range(hq):
            kvh = h // (hq // hkv)
            sc = np.where(visible, q[lo:hi, h] @ k[:, kvh].T * scale, -np.inf)
            p = np.exp(sc - sc.max(-1, keepdims=True))
            out[lo:hi, h] = (p / p.sum(-1, keepdims=True)) @ v[:, kvh]
    return out


EXTEND_CASES = [([40, 7, 33], [5, 7, 1], 4, 2, 16, 8, torch.float32),
                ([100, 17], [33, 17], 8, 2, 64, 16, torch.bfloat16),
                ([3], [3], 2, 1, 8, 4, torch.float32)]
"""(context lengths, new tokens per sequence, hq, hkv, d, block size, cache dtype)"""


ExtendFn = Callable[[Tensor, Tensor, Tensor, Tensor, list[int], Tensor, float], Tensor]


def dispatched_extend(q: Tensor, kc: Tensor, vc: Tensor, tables: Tensor, cu_q: list[int], ctx: Tensor,
                      scale: float) -> Tensor:
    """The extend the environment selects, laid out by :func:`plan_extend`."""
    return paged_extend_attention(q, kc, vc, plan_extend(tables, cu_q, ctx), scale)


def check_extend_attention(extend: ExtendFn, lens: list[int], new: list[int], hq: int, hkv: int, d: int, b: int,
                           dtype: torch.dtype) -> None:
    """``extend`` (e.g. :func:`dispatched_extend`) equals the numpy oracle, and so does the SDPA reference."""
    _, kc, vc, tables, ctx = attention_case(lens, hq, hkv, d, b, dtype, seed=sum(lens) + d)
    cu_q = np.concatenate([[0], np.cumsum(new)]).tolist()
    q = torch.randn(cu_q[-1], hq, d, generator=torch.Generator().manual_seed(d))
    oracle = torch.from_numpy(numpy_extend_attention(q, kc, vc, tables, cu_q, ctx, d ** -0.5))
    for out in (extend(q, kc, vc, tables, cu_q, ctx, d ** -0.5), paged_extend_attention_ref(q, kc, vc, tables, cu_q, ctx, d ** -0.5)):
        assert out.shape == q.shape and out.dtype == q.dtype
        torch.testing.assert_close(out.double(), oracle, rtol=2e-5, atol=2e-5)


# ------------------------------------------------------------------------------------------------
# resample(weights, seg_starts, uniforms, method, active=None)

ResampleFn = Callable[..., Tensor]

W8 = torch.tensor([0.26, 0.19, 0.155, 0.13, 0.11, 0.085, 0.05, 0.02])  # N * w never an integer


def segments(sizes: list[int], seed: int, power: float = 3.0,
             dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Normalised random weights (skewed by ``power``) in segments of ``sizes``, their starts and
    uniforms."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.tensor([0, *np.cumsum(sizes).tolist()], dtype=torch.int64)
    w = torch.rand(int(seg[-1]), generator=g, dtype=torch.float64) ** power
    for lo, hi in zip(seg[:-1].tolist(), seg[1:].tolist()):
        if hi > lo:
            w[lo:hi] /= w[lo:hi].sum()
    return w.to(dtype), seg, torch.rand(int(seg[-1]), generator=g)


def numpy_resample(w: Tensor, seg: Tensor, u: Tensor, method: str) -> Tensor:
    out = np.arange(len(w))
    for lo, hi in zip(seg[:-1].tolist(), seg[1:].tolist()):
        n = hi - lo
        if n == 0:
            continue
        cdf = np.cumsum(w[lo:hi].double().numpy())
        cdf /= cdf[-1]
        uu = u[lo:hi].double().numpy()
        points = {"systematic": (np.arange(n) + uu[0]) / n, "stratified": (np.arange(n) + uu) / n,
                  "multinomial": uu}[method]
        out[lo:hi] = lo + np.minimum(np.searchsorted(cdf, points, side="right"), n - 1)
    return torch.from_numpy(out)


def check_resample(resample: ResampleFn, method: str, w: Tensor, seg: Tensor, u: Tensor) -> None:
    """The reference's and numpy's ancestors (int64), none outside its segment."""
    got = resample(w, seg, u, method)
    assert got.dtype == torch.int64
    assert torch.equal(got, resample_ref(w, seg, u, method))
    assert torch.equal(got, numpy_resample(w, seg, u, method))
    lo = seg[:-1].repeat_interleave(seg[1:] - seg[:-1])
    hi = seg[1:].repeat_interleave(seg[1:] - seg[:-1])
    assert bool(((got >= lo) & (got < hi)).all()), "an ancestor left its segment"


def check_resample_degenerate(resample: ResampleFn, method: str) -> None:
    """All weight on one particle, zero weights, and uniforms at both ends of [0, 1)."""
    w = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.3, 0.0, 0.7, 0.0])
    seg = torch.tensor([0, 4, 8])
    rand = torch.rand(8, generator=torch.Generator().manual_seed(3))
    for u in (torch.zeros(8), torch.full((8,), 1 - 2 ** -24), rand, torch.rand(8, dtype=torch.float64)):
        got = resample(w, seg, u, method)
        assert torch.equal(got, resample_ref(w, seg, u, method))
        assert torch.equal(got[:4], torch.full((4,), 2)), "all weight on particle 2"
        assert set(got[4:].tolist()) <= {4, 6}, "a zero-weight particle was drawn"


def check_resample_active_single_and_empty(resample: ResampleFn) -> None:
    """An inactive segment keeps its particles, a single particle is its own ancestor, an empty batch
    is empty, and an unknown method raises."""
    w, seg, u = segments([4, 1, 6], seed=5)
    active = torch.tensor([True, True, False])
    got = resample(w, seg, u, "systematic", active=active)
    assert torch.equal(got, resample_ref(w, seg, u, "systematic", active=active))
    assert torch.equal(got[5:], torch.arange(5, 11)), "an inactive segment keeps its particles"
    assert int(got[4]) == 4, "a single particle is its own ancestor"
    empty = resample(torch.zeros(0), torch.tensor([0]), torch.zeros(0), "stratified")
    assert empty.shape == (0,) and empty.dtype == torch.int64
    with pytest.raises(ValueError):
        resample(w, seg, u, "residual")


def replicate_ancestors(resample: ResampleFn, method: str, reps: int, seed: int, weights: Tensor = W8) -> Tensor:
    """``[reps, N]`` ancestors, local to their segment, of ``reps`` segments (independent requests)
    with the same weights."""
    n = weights.numel()
    g = torch.Generator().manual_seed(seed)
    seg = torch.arange(reps + 1, dtype=torch.int64) * n
    anc = resample(weights.repeat(reps), seg, torch.rand(reps * n, generator=g), method)
    return (anc - seg[:-1].repeat_interleave(n)).view(reps, n)


# ------------------------------------------------------------------------------------------------
# fork(state: BlockState, rows, ancestors, writes, block_size)

ForkFn = Callable[..., ForkResult]
State = BlockState


def fork_scenario(seed: int, num_blocks: int = 48, block_size: int = 4, rows: int = 8, width: int = 8,
                  rounds: int = 4) -> BlockManager:
    """A block manager after a prompt, a fan-out and rounds of appends and random forks, so that
    full, partial, shared and private blocks all occur."""
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, block_size, rows, width)
    all_rows = torch.arange(rows)
    bm.reserve(torch.tensor([0]), torch.tensor([rng.randint(1, 2 * block_size + 1)]))
    bm.assign(all_rows[1:], torch.zeros(rows - 1, dtype=torch.int64))
    for _ in range(rounds):
        sub = torch.tensor(sorted(rng.sample(range(rows), rng.randint(1, rows))))
        room = width * block_size - bm.lens[sub]
        n_new = torch.tensor([rng.randint(0, min(3, int(r))) for r in room])
        if bm.blocks_needed(sub, n_new) <= bm.num_free:
            bm.reserve(sub, n_new)
        bm.assign(all_rows, torch.tensor([rng.randrange(rows) for _ in range(rows)]))
    bm.check_invariants()
    return bm


def block_state(bm: BlockManager) -> State:
    """Copies of ``bm``'s tensors as the fork kernels take them: tables, lens, refcounts, free stack,
    ``[num_free]``."""
    return BlockState(bm.tables.clone(), bm.lens.clone(), bm.ref_counts.clone(), bm.free_stack.clone(),
                      torch.tensor([bm.num_free], dtype=torch.int64))


def manager_with(bm: BlockManager, state: State) -> BlockManager:
    """A block manager shaped as ``bm`` holding ``state``."""
    m = BlockManager(bm.num_blocks, bm.block_size, *bm.tables.shape)
    m.tables, m.lens, m.ref_counts, m.free_stack = [x.clone() for x in state[:4]]
    m.num_free = int(state[4][0])
    return m


def check_block_invariants(tables: Tensor, lens: Tensor, refs: Tensor, stack: Tensor, num_free: Tensor,
                           block_size: int) -> None:
    nb = refs.numel()
    used = tables[tables >= 0].long()
    assert torch.equal(torch.bincount(used, minlength=nb).to(refs.dtype), refs), "refcount != references"
    nf = int(num_free[0])
    free = stack[:nf].long()
    assert free.unique().numel() == free.numel(), "a block is free twice"
    assert bool((refs[free] == 0).all()), "a referenced block is on the free stack"
    assert nf + int((refs > 0).sum()) == nb, "a block leaked"
    cols = torch.arange(tables.shape[1])
    covered = cols[None, :] < ((lens + block_size - 1) // block_size)[:, None]
    assert torch.equal(covered, tables >= 0), "a table does not cover its row's length"


def check_fork(fork: ForkFn, seed: int, rows_sel: Tensor, ancestors: Tensor, writes: Tensor, bm: BlockManager,
               block_size: int, **blocks: int) -> tuple[State, State, ForkResult]:
    """``fork`` on a copy of ``bm``'s state equals the reference exactly (the live part of the free
    stack included) and keeps the block invariants. Returns the state before, after, and the result."""
    before = block_state(bm)
    s_ref, after = block_state(bm), block_state(bm)
    res_ref = fork_ref(s_ref, rows_sel, ancestors, writes, block_size)
    res = fork(after, rows_sel, ancestors, writes, block_size, **blocks)
    for name, a, b in zip(("tables", "lens", "refs", "num_free"), after[:3] + after[4:], s_ref[:3] + s_ref[4:]):
        assert torch.equal(a, b), f"seed {seed}: {name} differ"
    nf = int(s_ref[4][0])
    assert torch.equal(after[3][:nf], s_ref[3][:nf]), f"seed {seed}: free stacks differ"
    for a, b in zip(res, res_ref):
        assert a.dtype == b.dtype and torch.equal(a, b), f"seed {seed}: results differ"
    check_block_invariants(*after, block_size)
    _check_cow(seed, rows_sel, ancestors, writes, before, after, res, block_size)
    return before, after, res


def _check_cow(seed: int, rows_sel: Tensor, ancestors: Tensor, writes: Tensor, before: State, after: State,
               res: ForkResult, block_size: int) -> None:
    """COW destinations are distinct, unreferenced once the tables were gathered, popped from the top
    of the stack and private to their child; no writing child shares a partial last block any more."""
    n_cow = int(res.num_cow[0])
    pairs = res.cow_pairs
    assert bool((pairs[:, n_cow:] == -1).all())
    dst = pairs[1, :n_cow]
    assert dst.unique().numel() == n_cow, "COW destinations not distinct"
    gathered = before[0].clone()
    gathered[rows_sel] = before[0][rows_sel[ancestors]]
    unreferenced = torch.bincount(gathered[gathered >= 0].long(), minlength=before[2].numel()) == 0
    assert bool(unreferenced[dst].all()), "COW destination was not free"
    top = int(after[4][0])
    assert sorted(after[3][top:top + n_cow].tolist()) == sorted(dst.tolist()), "not popped from the stack top"
    assert bool((after[2][dst] == 1).all())
    if int(res.missing[0]) == 0:
        for i in torch.nonzero(writes).flatten().tolist():
            r = int(rows_sel[i])
            n = int(after[1][r])
            if n % block_size:
                assert int(after[2][int(after[0][r, n // block_size])]) == 1, f"seed {seed}: child {i} shares"


def check_lazy_equivalent(bm: BlockManager, rows_sel: Tensor, ancestors: Tensor, writes: Tensor, before: State,
                          after: State, res: ForkResult) -> None:
    """The block manager's assign + reserve(writers, 1) copies lazily what the fork copied eagerly:
    reserving after the fork copies nothing and ends in the identical state (unless the lazy copies
    do not fit)."""
    lazy = manager_with(bm, before)
    lazy.assign(rows_sel, rows_sel[ancestors])
    wr = rows_sel[writes]
    ones = torch.ones(wr.numel(), dtype=torch.int64)
    if lazy.blocks_needed(wr, ones) > lazy.num_free:
        return
    slots_lazy, cow_lazy = lazy.reserve(wr, ones)
    eager = manager_with(bm, after)
    slots_eager, cow_eager = eager.reserve(wr, ones)
    assert cow_eager.shape[1] == 0, "reserve still had to copy after the eager fork"
    n = int(res.num_cow[0])
    assert torch.equal(res.cow_pairs[:, :n], cow_lazy), "COW pairs differ from the block manager's"
    assert torch.equal(slots_eager, slots_lazy)
    assert torch.equal(eager.tables, lazy.tables) and torch.equal(eager.lens, lazy.lens)
    assert torch.equal(eager.ref_counts, lazy.ref_counts)
    assert eager.num_free == lazy.num_free
    assert torch.equal(eager.free_stack[:eager.num_free], lazy.free_stack[:lazy.num_free])
    eager.check_invariants()


def check_random_fork(fork: ForkFn, seed: int) -> None:
    """A fork of a random subset of the rows (the others may still share blocks: readers outside it)."""
    rng = random.Random(1000 + seed)
    bm = fork_scenario(seed)
    rows = bm.tables.shape[0]
    rows_sel = torch.tensor(sorted(rng.sample(range(rows), rng.randint(1, rows))), dtype=torch.int64)
    m = rows_sel.numel()
    ancestors = torch.tensor([rng.randrange(m) for _ in range(m)], dtype=torch.int64)
    writes = torch.tensor([rng.random() < 0.75 for _ in range(m)])
    before, after, res = check_fork(fork, seed, rows_sel, ancestors, writes, bm, bm.block_size)
    check_lazy_equivalent(bm, rows_sel, ancestors, writes, before, after, res)


def check_writers_of_shared_partial_block(fork: ForkFn) -> None:
    """Three children of one particle with a partial last block, all writing: the lowest index keeps
    the block, two copy; with a non-writing sibling, every writer copies."""
    bm = BlockManager(16, 4, 4, 4)
    bm.reserve(torch.tensor([0]), torch.tensor([6]))  # blocks: one full, one with 2 tokens
    rows = torch.arange(3)
    anc = torch.zeros(3, dtype=torch.int64)
    all_write = torch.ones(3, dtype=torch.bool)
    before, after, res = check_fork(fork, 0, rows, anc, all_write, bm, 4)
    assert int(res.num_cow[0]) == 2
    last = int(before[0][0, 1])
    assert int(after[0][0, 1]) == last, "the lowest-index writer keeps the block in place"
    assert torch.equal(res.cow_pairs[0, :2], torch.tensor([last, last]))
    assert int(after[0][0, 0]) == int(after[0][1, 0]) == int(after[0][2, 0]), "full blocks stay shared"
    check_lazy_equivalent(bm, rows, anc, all_write, before, after, res)

    writes = torch.tensor([True, True, False])
    before, after, res = check_fork(fork, 1, rows, anc, writes, bm, 4)
    assert int(res.num_cow[0]) == 2 and int(after[0][2, 1]) == last, "the reader keeps the original"
    check_lazy_equivalent(bm, rows, anc, writes, before, after, res)


def check_block_boundary_and_dead_blocks(fork: ForkFn) -> None:
    """A context ending exactly on a block boundary shares only full blocks: nothing to copy. The
    blocks of particles that leave no offspring return to the free stack, ascending."""
    bm = BlockManager(16, 4, 3, 4)
    bm.reserve(torch.tensor([0, 1, 2]), torch.tensor([8, 5, 3]))
    rows = torch.arange(3)
    anc = torch.zeros(3, dtype=torch.int64)
    writes = torch.ones(3, dtype=torch.bool)
    before, after, res = check_fork(fork, 0, rows, anc, writes, bm, 4)
    assert int(res.num_cow[0]) == 0 and bool((res.cow_pairs == -1).all())
    freed = sorted(before[0][1:][before[0][1:] >= 0].tolist())
    nf0 = int(before[4][0])
    assert after[3][nf0:nf0 + len(freed)].tolist() == freed
    check_lazy_equivalent(bm, rows, anc, writes, before, after, res)


def check_out_of_blocks(fork: ForkFn) -> None:
    """Too few free blocks for the copies: reported, none done, and the state is exactly the block
    manager's after assign alone."""
    bm = BlockManager(4, 4, 4, 2)
    bm.reserve(torch.tensor([0]), torch.tensor([6]))  # 2 blocks used, 2 free
    bm.reserve(torch.tensor([3]), torch.tensor([1]))  # 1 more used by an outside row: 1 free
    rows = torch.arange(3)
    anc = torch.zeros(3, dtype=torch.int64)
    before, after, res = check_fork(fork, 0, rows, anc, torch.ones(3, dtype=torch.bool), bm, 4)
    assert int(res.missing[0]) == 1 and int(res.num_cow[0]) == 0 and bool((res.cow_pairs == -1).all())
    assert int(after[4][0]) == 1, "no block was popped"
    plain = manager_with(bm, before)
    plain.assign(rows, rows[anc])
    assert torch.equal(plain.tables, after[0]) and torch.equal(plain.ref_counts, after[2])


def check_empty_single_and_many_children(fork: ForkFn, rows: int, num_blocks: int, **blocks: int) -> None:
    """No children, one child, then ``rows`` children over ``num_blocks`` blocks of 2 tokens."""
    bm = fork_scenario(3)
    none = torch.zeros(0, dtype=torch.int64)
    empty = fork(block_state(bm), none, none, none.bool(), bm.block_size)
    assert empty.cow_pairs.shape == (2, 0) and int(empty.num_cow[0]) == 0 and int(empty.missing[0]) == 0
    check_fork(fork, 1, torch.tensor([5]), torch.tensor([0]), torch.tensor([True]), bm, bm.block_size)
    big = fork_scenario(9, num_blocks=num_blocks, block_size=2, rows=rows, width=18, rounds=3)
    rng = random.Random(9)
    all_rows = torch.arange(rows)
    anc = torch.tensor([rng.randrange(rows) for _ in range(rows)])
    writes = torch.tensor([rng.random() < 0.8 for _ in range(rows)])
    before, after, res = check_fork(fork, 9, all_rows, anc, writes, big, 2, **blocks)
    check_lazy_equivalent(big, all_rows, anc, writes, before, after, res)
