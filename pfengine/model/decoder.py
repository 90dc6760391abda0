"""Our decoder (Llama / Mistral / Qwen2 / Qwen3 / Granite / Phi-3) over one paged KV tensor ``[2, layers, blocks, B, Hkv, D]``."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pfengine.kernels.copy_blocks import copy_blocks
from pfengine.kernels.kv_store import store_kv
from pfengine.kernels.linear import Weight, linear, prepare, vocab_projection
from pfengine.kernels.paged_attention import ExtendPlan, paged_decode_attention, paged_extend_attention, plan_extend
from pfengine.kernels.prm_score import PRMHead
from pfengine.model.checkpoint import ModelConfig, load_checkpoint
from pfengine.model.rope import apply_rope, rope_table
from pfengine.model.shard import Shard

log = logging.getLogger("pfengine")


def flash_varlen_attention():
    """flash-attn's variable-length attention on CUDA when the ``gpu`` extra is installed, else None."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@dataclass
class ForwardBatch:
    """A packed batch: sequence ``i`` owns tokens ``[cu_q[i], cu_q[i+1])`` and, after this forward,
    attends to ``context_lens[i]`` cached tokens through block table row ``rows[i]``."""

    tokens: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    rows: torch.Tensor
    cu_q: list[int]
    context_lens: torch.Tensor

    @property
    def is_decode(self) -> bool:
        return len(self.cu_q) - 1 == self.tokens.numel()


@dataclass
class Layer:
    """One decoder layer's weights; q/k/v and gate/up are fused for one GEMM each. Optional parts
    (biases, Qwen3's per-head q/k norms) are None when the checkpoint has none."""

    qkv_w: Weight
    qkv_b: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_w: Weight
    o_b: torch.Tensor | None
    gate_up_w: Weight
    gate_up_b: torch.Tensor | None
    down_w: Weight
    down_b: torch.Tensor | None
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor


class PagedDecoder:
    """Weights plus the KV cache of one model. ``forward`` returns final-normed hidden states.

    Granite's multipliers are folded into the weights at load (the embedding table, the layers'
    output projections, the LM head), so they cost nothing per token; neither do absent options.

    With a ``shard`` of a tensor-parallel group, ``tensors`` are that rank's part
    (:mod:`pfengine.model.shard`): its heads, its slice of the MLP and of the vocabulary; a PRM head
    is kept on rank 0 only, which reads it."""

    def __init__(self, cfg: ModelConfig, tensors: dict[str, torch.Tensor], num_blocks: int, block_size: int,
                 kv_dtype: torch.dtype, max_len: int, device: str | torch.device = "cpu",
                 shard: Shard = Shard()) -> None:
        self.cfg, self.shard = cfg, shard
        self.heads, self.kv_heads = cfg.num_heads // shard.size, cfg.num_kv_heads // shard.size
        t = {k: v.to(device) for k, v in tensors.items()}
        embed = t["model.embed_tokens.weight"]
        self.embed = _scaled(embed, cfg.embedding_multiplier)
        self.vocab_start = shard.rank * embed.shape[0]
        """The first token id of this rank's slice of the (padded) vocabulary."""
        self.norm = t["model.norm.weight"]
        self.lm_head = None if cfg.is_prm else _scaled(t.get("lm_head.weight", embed), 1 / cfg.logits_scaling)
        """``[vocab / shards, H]``, logits scaling folded in: logits are ``hidden @ lm_head.T``."""
        self.unembed = None if self.lm_head is None else prepare(self.lm_head)
        self.prm_head = PRMHead.from_tensors(t) if cfg.is_prm and shard.rank == 0 else None
        self.layers = [self._layer(t, f"model.layers.{i}.") for i in range(cfg.num_layers)]
        self.rope = rope_table(cfg.rope, max_len).to(device)
        self.kv_cache = torch.zeros(2, cfg.num_layers, num_blocks, block_size, self.kv_heads, cfg.head_dim,
                                    dtype=kv_dtype, device=device)
        self.tables: torch.Tensor | None = None
        """Block tables of this model's cache; the engine points this at its block manager's."""
        self.flash = flash_varlen_attention() if torch.device(device).type == "cuda" else None
        log.info("prompt prefill attention: %s", "flash-attn varlen" if self.flash else "torch SDPA")

    def _layer(self, t: dict[str, torch.Tensor], p: str) -> Layer:
        a, m, r = p + "self_attn.", p + "mlp.", self.cfg.residual_multiplier
        return Layer(
            qkv_w=prepare(_joined(t, a, ("q_proj", "k_proj", "v_proj"), "qkv_proj", ".weight")),
            qkv_b=_joined(t, a, ("q_proj", "k_proj", "v_proj"), "qkv_proj", ".bias"),
            q_norm=t.get(a + "q_norm.weight"), k_norm=t.get(a + "k_norm.weight"),
            o_w=prepare(_scaled(t[a + "o_proj.weight"], r)), o_b=_scaled(t.get(a + "o_proj.bias"), r),
            gate_up_w=prepare(_joined(t, m, ("gate_proj", "up_proj"), "gate_up_proj", ".weight")),
            gate_up_b=_joined(t, m, ("gate_proj", "up_proj"), "gate_up_proj", ".bias"),
            down_w=prepare(_scaled(t[m + "down_proj.weight"], r)), down_b=_scaled(t.get(m + "down_proj.bias"), r),
            attn_norm=t[p + "input_layernorm.weight"], mlp_norm=t[p + "post_attention_layernorm.weight"])

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        x = self._embed(batch.tokens)
        cos_sin = self.rope[batch.positions]
        tables = self.tables[batch.rows]
        plan = None if batch.is_decode else plan_extend(tables, batch.cu_q, batch.context_lens)
        for i, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.attn_norm, self.cfg.rms_norm_eps)
            x = x + self._attention(i, layer, h, cos_sin, batch, tables, plan)
            h = _rms_norm(x, layer.mlp_norm, self.cfg.rms_norm_eps)
            gate, up = linear(h, layer.gate_up_w, layer.gate_up_b).chunk(2, dim=-1)
            x = x + self._row_parallel(F.silu(gate) * up, layer.down_w, layer.down_b)
        return _rms_norm(x, self.norm, self.cfg.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """``[n, vocab]``; with shards, on rank 0 only (None elsewhere), each rank's columns gathered."""
        assert self.unembed is not None, "a PRM checkpoint has no language-model head"
        logits = self.shard.gather_columns(vocab_projection(hidden, self.unembed))
        return None if logits is None else logits[:, :self.cfg.vocab_size]

    def copy_blocks(self, pairs: torch.Tensor) -> None:
        """Copy-on-write block copies ``pairs [2, P]`` (src, dst) in this model's cache."""
        copy_blocks(self.kv_cache, pairs)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.shard.size == 1:
            return self.embed[tokens]
        local = tokens - self.vocab_start
        mine = (local >= 0) & (local < self.embed.shape[0])
        return self.shard.all_reduce(self.embed[local.clamp(0, self.embed.shape[0] - 1)] * mine.unsqueeze(-1))

    def _row_parallel(self, x: torch.Tensor, weight: Weight, bias: torch.Tensor | None) -> torch.Tensor:
        """A projection over split input features: partial sums, summed over the ranks, then the bias."""
        if self.shard.size == 1:
            return linear(x, weight, bias)
        out = self.shard.all_reduce(linear(x, weight))
        return out if bias is None else out + bias

    def _attention(self, i: int, layer: Layer, x: torch.Tensor, cos_sin: torch.Tensor, batch: ForwardBatch,
                   tables: torch.Tensor, plan: ExtendPlan | None) -> torch.Tensor:
        """``tables``: the batch's block-table rows; ``plan``: an extend's layout (None for decode)."""
        c, heads, kv_heads = self.cfg, self.heads, self.kv_heads
        qkv = linear(x, layer.qkv_w, layer.qkv_b)
        q, k, v = qkv.split([heads * c.head_dim, kv_heads * c.head_dim, kv_heads * c.head_dim], -1)
        q, k = q.view(-1, heads, c.head_dim), k.view(-1, kv_heads, c.head_dim)
        if layer.q_norm is not None:
            q, k = _rms_norm(q, layer.q_norm, c.rms_norm_eps), _rms_norm(k, layer.k_norm, c.rms_norm_eps)
        q, k = apply_rope(q, cos_sin), apply_rope(k, cos_sin)
        v = v.view(-1, kv_heads, c.head_dim)
        k_cache, v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        store_kv(k, v, k_cache, v_cache, batch.slots)
        scale = c.attention_scale
        if plan is None:
            out = paged_decode_attention(q, k_cache, v_cache, tables, batch.context_lens, scale)
        else:
            out = self._extend_attention(q, k, v, k_cache, v_cache, batch, plan, scale)
        return self._row_parallel(out.reshape(q.shape[0], -1), layer.o_w, layer.o_b)

    def _extend_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, batch: ForwardBatch, plan: ExtendPlan, scale: float) -> torch.Tensor:
        """Several new tokens per sequence on top of (possibly) cached context; one flash-attn varlen
        call when every sequence is a fresh prompt on CUDA."""
        lens = [hi - lo for lo, hi in zip(batch.cu_q[:-1], batch.cu_q[1:])]
        if self.flash is not None and batch.context_lens.tolist() == lens:
            cu = torch.tensor(batch.cu_q, dtype=torch.int32, device=q.device)
            half = torch.bfloat16
            out = self.flash(q.to(half), k.to(half), v.to(half), cu, cu, max(lens), max(lens),
                             softmax_scale=scale, causal=True)
            return out.to(q.dtype)
        return paged_extend_attention(q, k_cache, v_cache, plan, scale)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _joined(t: dict[str, torch.Tensor], prefix: str, parts: tuple[str, ...], fused: str,
            suffix: str) -> torch.Tensor | None:
    """The checkpoint's fused projection (Phi-3), or its separate ones concatenated; None if absent."""
    if prefix + fused + suffix in t:
        return t[prefix + fused + suffix]
    if prefix + parts[0] + suffix not in t:
        return None
    return torch.cat([t[prefix + part + suffix] for part in parts])


def _scaled(x: torch.Tensor | None, factor: float) -> torch.Tensor | None:
    return x * factor if x is not None and factor != 1 else x


def load_decoder(path: str | Path, num_blocks: int, block_size: int, kv_dtype: torch.dtype,
                 max_len: int | None = None, device: str | torch.device = "cpu", shard: Shard = Shard()) -> PagedDecoder:
    """Load a checkpoint directory (``shard``'s part of it); compute in fp32 (bf16 GEMMs are ~400x
    slower on CPU)."""
    cfg, tensors = load_checkpoint(path, shard.take if shard.size > 1 else None)
    if cfg.context_limit and shard.rank == 0:
        log.warning("%s: positions limited to %d by %s", path, cfg.max_position_embeddings, cfg.context_limit)
    return PagedDecoder(cfg, tensors, num_blocks, block_size, kv_dtype,
                        min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings), device, shard)
