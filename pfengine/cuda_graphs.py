"""CUDA graphs of the decode forward, one per batch-size bucket (the way vLLM and SGLang capture theirs).

A decode batch of ``n`` rows (one new token each) runs as the graph of the smallest bucket >= ``n``:
its inputs are copied into static buffers, rows ``n..`` of the bucket repeat row 0 with slot -1 (they
read what row 0 reads and write nothing to the cache), the graph replays, and the first ``n`` rows of
its output are returned. Batches above the largest bucket run eagerly. A bucket's graph is captured
the first time a batch needs it, from padding rows only (slot -1, empty context: the capture reads and
writes no cache block), after one eager warm-up of the same inputs on the capture stream (Triton
compiles, cuBLAS sets up its workspace).

Capture needs a decode forward that launches everything without a host sync, at shapes that depend
on the bucket only. The Triton paths do: their grids follow from the batch size and the block-table
width, and context lengths and slots are read on the device. The torch references do not (boolean
masks, ``.max()`` to the host), so graphs are used only where the Triton kernels run
(:func:`decode_graphs`). ``tests/test_cuda_graphs.py`` runs this forward on the meta device, where any
host sync raises, at the shape of Qwen2.5-Math-1.5B."""
from __future__ import annotations

import logging
from bisect import bisect_left
from typing import Callable

import torch

from pfengine.kernels import use_triton
from pfengine.model.decoder import ForwardBatch, PagedDecoder

log = logging.getLogger("pfengine")

LARGEST_BUCKET = 512
"""Decode batches above this run eagerly: there the GPU's work per step dwarfs the launch overhead."""


def bucket_sizes(max_batch: int, largest: int = LARGEST_BUCKET) -> list[int]:
    """1, 2, 4, then multiples of 8 below 64, of 16 below 256 and of 32 beyond (coarser where a step
    costs more than its padding), up to ``min(max_batch, largest)``, which is always the last bucket."""
    assert max_batch >= 1 and largest >= 1
    top = min(max_batch, largest)
    steps = [1, 2, 4, *range(8, 64, 8), *range(64, 256, 16), *range(256, top, 32)]
    return [s for s in steps if s < top] + [top]


def bucket_for(n: int, sizes: list[int]) -> int | None:
    """The smallest bucket that holds ``n`` rows; None above the largest."""
    i = bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


class StaticDecodeInputs:
    """A decode batch's inputs at fixed addresses, ``size`` rows at most: what a graph reads."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.tokens, self.positions, self.slots, self.rows, self.context_lens = (
            torch.zeros(size, dtype=torch.int64, device=device) for _ in range(5))

    def batch(self, size: int) -> ForwardBatch:
        """The first ``size`` rows as a decode batch (views: the same addresses every time)."""
        return ForwardBatch(self.tokens[:size], self.positions[:size], self.slots[:size], self.rows[:size],
                            list(range(size + 1)), self.context_lens[:size])

    def load(self, batch: ForwardBatch, size: int) -> None:
        """Copy ``batch`` in; rows beyond it up to ``size`` repeat its first row with slot -1."""
        n = batch.tokens.numel()
        assert batch.is_decode and 1 <= n <= size <= self.tokens.numel()
        for dst, src in self._pairs(batch):
            dst[:n].copy_(src)
            dst[n:size].copy_(src[:1].expand(size - n))
        self.slots[n:size].fill_(-1)

    def clear(self, size: int) -> None:
        """Padding rows only: token 0 at position 0 of table row 0, slot -1, no context."""
        for t in (self.tokens, self.positions, self.rows, self.context_lens):
            t[:size].zero_()
        self.slots[:size].fill_(-1)

    def _pairs(self, batch: ForwardBatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.tokens, batch.tokens), (self.positions, batch.positions), (self.slots, batch.slots),
                (self.rows, batch.rows), (self.context_lens, batch.context_lens)]


class DecodeGraphs:
    """``forward(batch)`` for decode batches, as :meth:`PagedDecoder.forward`, through a graph per bucket.

    The graphs read the decoder's block tables and KV cache where they were at construction: both
    must be updated in place from then on (the block manager and the COW copies do)."""

    def __init__(self, decoder: PagedDecoder, max_batch: int, largest: int = LARGEST_BUCKET) -> None:
        assert decoder.tables is not None, "decode graphs: the decoder has no block tables yet"
        self.decoder = decoder
        self.sizes = bucket_sizes(max_batch, largest)
        self.inputs = StaticDecodeInputs(self.sizes[-1], decoder.kv_cache.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        """Captured buckets: the graph and its output buffer."""
        self.pool = torch.cuda.graph_pool_handle()
        """One memory pool for all buckets (one runs at a time; each output is copied out at once)."""
        self.stream = torch.cuda.Stream(decoder.kv_cache.device)
        self.replays = 0
        self._bound = self._addresses()

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        n = batch.tokens.numel()
        size = bucket_for(n, self.sizes) if n else None
        if size is None:
            return self.decoder.forward(batch)
        assert self._addresses() == self._bound, "decode graphs: the block tables or the KV cache were reallocated"
        graph, out = self._graph(size)
        self.inputs.load(batch, size)
        graph.replay()
        self.replays += 1
        return out[:n].clone()

    def _graph(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The bucket's graph and output buffer, captured from padding rows the first time."""
        if size not in self.graphs:
            self.inputs.clear(size)
            static = self.inputs.batch(size)
            self.graphs[size] = capture_graph(lambda: self.decoder.forward(static), self.pool, self.stream)
            log.info("captured the decode graph of %d rows", size)
        return self.graphs[size]

    def _addresses(self) -> tuple[int, int]:
        return self.decoder.tables.data_ptr(), self.decoder.kv_cache.data_ptr()


def capture_graph(fn: Callable[[], torch.Tensor], pool: tuple[int, int], stream: torch.cuda.Stream
                  ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """``fn``'s kernels as a CUDA graph, captured on ``stream`` into memory ``pool`` after one eager run
    of ``fn`` on that stream; the graph and ``fn``'s output, which every replay rewrites in place."""
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        fn()
    current.wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
        out = fn()
    return graph, out


def decode_graphs(decoder: PagedDecoder, max_batch: int) -> DecodeGraphs | None:
    """Graphs for ``decoder``'s decode batches when it runs on CUDA with the Triton kernels, else None
    (decode runs eagerly)."""
    if decoder.kv_cache.device.type != "cuda":
        return None
    if not use_triton(decoder.kv_cache):
        log.warning("CUDA graphs off: capturing the decode step needs the Triton kernels "
                    "(triton is not installed, or PFENGINE_TRITON=0)")
        return None
    return DecodeGraphs(decoder, max_batch)
