"""Paged decode attention kernel (plain and split-KV) vs its torch reference and a numpy oracle."""
from functools import partial

import pytest
import torch

from kernel_cases import (ATTENTION_CASES, EXTEND_CASES, attention_case, check_attention,
                          check_attention_single_token_and_empty, check_extend_attention, dispatched_extend)
from kernel_device import on_device
from pfengine.kernels.paged_attention import (
    choose_num_splits, paged_decode_attention, paged_decode_attention_ref, paged_decode_attention_triton)

pytest.importorskip("triton")

pytestmark = pytest.mark.triton

SPLITS = [(1, 2, 3), (1, 2), (1, 3), (1, 2, 4), (1, 2)]
"""The split counts each of ATTENTION_CASES runs with."""


@pytest.mark.parametrize("case,splits", zip(ATTENTION_CASES, SPLITS))
def test_matches_reference_and_numpy(case, splits):
    for s in splits:
        check_attention(on_device(partial(paged_decode_attention_triton, num_splits=s)), *case)


def test_split_heuristic_and_wrong_length_hint():
    """A small batch over a wide table splits the KV axis; a too-small max_context_len hint only
    changes the partitioning (the last partition takes the remainder), never the result."""
    lens = [150, 70]
    q, kc, vc, tables, ctx = attention_case(lens, 2, 1, 16, 16, torch.float32, seed=5, width=24)
    assert choose_num_splits(2, 1, 24, torch.device("cpu")) > 1
    assert choose_num_splits(64, 8, 24, torch.device("cpu")) == 1
    ref = paged_decode_attention_ref(q, kc, vc, tables, ctx, 0.3)
    attend = on_device(paged_decode_attention)
    for kw in ({}, {"max_context_len": 16}, {"num_splits": 5, "max_context_len": 40}):
        out = attend(q, kc, vc, tables, ctx, 0.3, **kw)
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5, msg=str(kw))


def test_empty_batch_and_single_token_context():
    check_attention_single_token_and_empty(on_device(paged_decode_attention))


def test_strided_query_and_profiler_ranges():
    """q as a view of a fused QKV projection; the split path shows its two launches by name."""
    lens = [20, 40]
    _, kc, vc, tables, ctx = attention_case(lens, 4, 2, 16, 16, torch.float32, seed=8)
    qkv = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    q = qkv[:, :4]
    assert not q.is_contiguous()
    ref = paged_decode_attention_ref(q, kc, vc, tables, ctx, 0.25)
    attend = on_device(paged_decode_attention)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out1 = attend(q, kc, vc, tables, ctx, 0.25, num_splits=1)
        out2 = attend(q, kc, vc, tables, ctx, 0.25, num_splits=2)
    torch.testing.assert_close(out1, ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out2, ref, rtol=2e-5, atol=2e-5)
    names = {e.name for e in prof.events()}
    assert {"pfengine::paged_attention", "pfengine::paged_attention_split",
            "pfengine::paged_attention_merge"} <= names


@pytest.mark.parametrize("case", EXTEND_CASES)
def test_extend_runs_every_new_token_as_a_decode_row(case):
    """Prefill / PRM extends: each new token attends causally over its sequence's blocks."""
    check_extend_attention(on_device(dispatched_extend), *case)
