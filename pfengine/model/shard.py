"""Tensor-parallel shards of a checkpoint (Megatron layout) and the collectives the decoder calls.

Rank ``r`` of ``k`` holds heads ``[r*h/k, (r+1)*h/k)`` of every attention layer (q/k/v rows, the
matching o_proj columns and KV-cache heads), rows ``[r*I/k, (r+1)*I/k)`` of gate/up and the matching
down_proj columns, and vocabulary rows ``[r*V'/k, (r+1)*V'/k)`` of the embedding and the LM head,
where ``V'`` is the vocabulary padded with zero rows to a multiple of ``k``. Everything else (norms,
Qwen3's per-head q/k norms, o_proj / down_proj biases, a PRM head) is whole on every rank that needs
it. Each rank reads only its part of the checkpoint (:meth:`Shard.take` on safetensors slices). One
all-reduce per attention and one per MLP make the hidden state whole again, so every rank computes
the same residual stream; the embedding adds one all-reduce per forward and the LM head gathers its
logit columns on rank 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import gcd

import torch
import torch.distributed as dist

from pfengine.kernels import cdiv
from pfengine.model.checkpoint import ModelConfig

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
"""Projections whose output features (weight rows, bias) are split."""
ROW_PARALLEL = ("o_proj", "down_proj")
"""Projections whose input features (weight columns) are split; their bias is added once, after the sum."""


@dataclass(frozen=True)
class Shard:
    """This process's place in a tensor-parallel group; ``size == 1`` (no group) is the whole model."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's ``x`` (in place)."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def take(self, cfg: ModelConfig, name: str, t) -> torch.Tensor:
        """This rank's part of checkpoint tensor ``name`` (whole shape as ``cfg`` implies). ``t`` is a
        tensor or a safetensors slice, from which only the part is read."""
        kind = name.rsplit(".", 2)[-2]
        q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
        if kind in ("embed_tokens", "lm_head"):
            return self._vocab_rows(t, cfg.vocab_size, cdiv(cfg.vocab_size, self.size))
        if kind == "qkv_proj":
            return torch.cat([self._rows(t, start, n) for start, n in ((0, q), (q, kv), (q + kv, kv))])
        if kind == "gate_up_proj":
            return torch.cat([self._rows(t, start, inter) for start in (0, inter)])
        if kind in COLUMN_PARALLEL:
            return self._rows(t, 0, {"q_proj": q, "k_proj": kv, "v_proj": kv}.get(kind, inter))
        if kind in ROW_PARALLEL and name.endswith(".weight"):
            step = (q if kind == "o_proj" else inter) // self.size
            return t[:, self.rank * step:(self.rank + 1) * step]
        return t[:]

    def _rows(self, t, start: int, n: int) -> torch.Tensor:
        """This rank's ``1/size`` of rows ``[start, start + n)``."""
        step = n // self.size
        return t[start + self.rank * step:start + (self.rank + 1) * step]

    def _vocab_rows(self, t, vocab: int, rows: int) -> torch.Tensor:
        """This rank's ``rows`` vocabulary rows; those past the vocabulary are zeros."""
        lo = min(self.rank * rows, vocab)
        part = t[lo:min(lo + rows, vocab)]
        return torch.cat([part, part.new_zeros(rows - part.shape[0], *part.shape[1:])])

    def gather_columns(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's ``x`` side by side on rank 0 (``[n, k * cols]``); None on the other ranks."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=dist.get_global_rank(self.group, 0), group=self.group)
        return torch.cat(parts, dim=-1) if parts is not None else None


def refusal(cfg: ModelConfig, size: int) -> str | None:
    """Why ``cfg`` cannot be split ``size`` ways, and which sizes work; None when it can."""
    counts = {"num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
              "intermediate_size": cfg.intermediate_size}
    bad = [f"{name}={n}" for name, n in counts.items() if n % size]
    if not bad:
        return None
    common = gcd(*counts.values())
    ok = [d for d in range(1, common + 1) if common % d == 0]
    return (f"{size} does not divide the model's {', '.join(bad)} (attention heads {cfg.num_heads}, KV heads "
            f"{cfg.num_kv_heads}, intermediate size {cfg.intermediate_size}); sizes that work: {ok}")
