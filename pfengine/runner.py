"""One model over its paged cache: reserve slots (copy-on-write), build the batch, forward, count tokens."""
from __future__ import annotations

import torch

from pfengine.cache.block_manager import BlockManager
from pfengine.cuda_graphs import decode_graphs
from pfengine.distributed import DrivenDecoder
from pfengine.model.decoder import ForwardBatch, PagedDecoder


class ModelRunner:
    def __init__(self, decoder: PagedDecoder | DrivenDecoder, blocks: BlockManager, cuda_graphs: bool = False) -> None:
        self.decoder, self.blocks = decoder, blocks
        decoder.tables = blocks.tables
        self.graphs = decode_graphs(decoder, blocks.tables.shape[0]) if cuda_graphs else None
        """Decode through CUDA graphs (on CUDA with the Triton kernels; see :mod:`pfengine.cuda_graphs`)."""
        self.tokens_forwarded = 0
        """Content tokens forwarded (prompts and generated tokens)."""
        self.tags_forwarded = 0
        """PRM step tags forwarded (``extend(..., tagged=True)``), counted apart from content."""
        self.cow_copies = 0

    def extend(self, rows: list[int], token_lists: list[list[int]], tagged: bool = False,
               every: bool = False) -> torch.Tensor:
        """Append several tokens to each row (prompt prefill, PRM steps); hidden state of each row's
        last token (``every``: of every new token, rows after one another). ``tagged``: each list
        ends with a PRM step tag."""
        assert all(token_lists), "extend: every row needs at least one token"
        dev = self.blocks.device
        rows_t = torch.tensor(rows, dtype=torch.int64, device=dev)
        n_new = torch.tensor([len(t) for t in token_lists], dtype=torch.int64, device=dev)
        start = self.blocks.lens[rows_t].clone()
        slots = self._reserve(rows_t, n_new)
        positions = torch.cat([torch.arange(s, s + n, device=dev) for s, n in zip(start.tolist(), n_new.tolist())])
        cu = [0, *torch.cumsum(n_new, 0).tolist()]
        tokens = torch.tensor([t for ts in token_lists for t in ts], dtype=torch.int64, device=dev)
        hidden = self.decoder.forward(ForwardBatch(tokens, positions, slots, rows_t, cu, start + n_new))
        if tagged:
            self.tokens_forwarded -= len(rows)
            self.tags_forwarded += len(rows)
        return hidden if every else hidden[[c - 1 for c in cu[1:]]]

    def decode(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token to each row; their hidden states ``[n, H]``."""
        rows, tokens = rows.to(self.blocks.device), tokens.to(self.blocks.device)
        positions = self.blocks.lens[rows].clone()
        slots = self._reserve(rows, 1)
        cu = list(range(rows.numel() + 1))
        return (self.graphs or self.decoder).forward(ForwardBatch(tokens, positions, slots, rows, cu, positions + 1))

    def fork(self, rows: torch.Tensor, ancestors: torch.Tensor, writes: torch.Tensor) -> None:
        """Resampling fork of this cache (see :meth:`BlockManager.fork`), copies included."""
        pairs = self.blocks.fork(rows, ancestors, writes)
        self.decoder.copy_blocks(pairs)
        self.cow_copies += int((pairs[0] >= 0).sum())

    def _reserve(self, rows: torch.Tensor, n_new: torch.Tensor | int) -> torch.Tensor:
        slots, cow = self.blocks.reserve(rows, n_new)
        self.decoder.copy_blocks(cow)
        self.cow_copies += cow.shape[1]
        self.tokens_forwarded += slots.numel()
        return slots
