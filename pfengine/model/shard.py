"""Tensor-parallel shards of a checkpoint (Megatron layout) and the collectives the decoder calls.

Rank ``r`` of ``k`` holds heads ``[r*h/k, (r+1)*h/k)`` of every attention layer (q/k/v rows, the
matching o_proj columns and KV-cache heads), rows ``[r*I/k, (r+1)*I/k)`` of gate/up and the matching
down_proj columns, and vocabulary rows ``[r*V'/k, (r+1)*V'/k)`` of the embedding and the LM head,
where ``V'`` is the vocabulary padded with zero rows to a multiple of ``k``. Everything else (norms,
Qwen3's per-head q/k norms, o_proj / down_proj biases, a PRM head) is whole on every rank that needs
it. One all-reduce per attention and one per MLP make the hidden state whole again, so every rank
computes the same residual stream; the embedding adds one all-reduce per forward and the LM head
gathers its logit columns on rank 0.
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


def padded_vocab(cfg: ModelConfig, size: int) -> int:
    return cdiv(cfg.vocab_size, size) * size


def shard_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor], shard: Shard) -> dict[str, torch.Tensor]:
    """``tensors`` (Hugging Face names, the whole model) cut down to ``shard``'s part, same names."""
    if shard.size == 1:
        return tensors
    assert refusal(cfg, shard.size) is None, refusal(cfg, shard.size)
    out = {}
    for name, t in tensors.items():
        kind = name.rsplit(".", 2)[-2]
        if kind in ("embed_tokens", "lm_head"):
            out[name] = _slice(_pad_rows(t, padded_vocab(cfg, shard.size)), 0, shard)
        elif kind == "qkv_proj":
            q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            out[name] = torch.cat([_slice(part, 0, shard) for part in t.split([q, kv, kv])])
        elif kind == "gate_up_proj":
            out[name] = torch.cat([_slice(part, 0, shard) for part in t.chunk(2)])
        elif kind in COLUMN_PARALLEL:
            out[name] = _slice(t, 0, shard)
        elif kind in ROW_PARALLEL and name.endswith(".weight"):
            out[name] = _slice(t, 1, shard)
        else:
            out[name] = t
    return out


def _slice(t: torch.Tensor, dim: int, shard: Shard) -> torch.Tensor:
    return t.chunk(shard.size, dim)[shard.rank].contiguous()


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > t.shape[0] else t
