"""The arithmetic of the README's "Scaling" section: Qwen2.5-32B-Instruct as the policy and
Qwen2.5-Math-PRM-72B as the PRM, both in bf16, tensor-parallel over k H100s (both models sharded over
the same k ranks, as one engine holds them): memory per rank, KV blocks left for particles, decode
throughput from the roofline, and the GPUs an evaluation of MATH-500 at budgets 1-128 needs to finish
in an hour. Every assumption is a named constant below; the shapes are the models' config.json.
"Roofline": every phase at its hardware limit (HBM bandwidth for the policy's decode, tensor-core
peak for the PRM's extends and GEMMs, NVLink for the all-reduces, which are not overlapped);
expected = ``--efficiency`` x roofline.

    python -m bench.scaling [--efficiency 0.5]
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class Shape:
    """A Qwen2 decoder's config.json fields that decide its size."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    lm_head: bool
    """An untied LM head (the policy); the PRM has none."""
    score_head: bool
    """The PRM's head: Linear(H, H) -> ReLU -> Linear(H, 2)."""

    @property
    def params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = h * q + q + 2 * (h * kv + kv) + q * h  # q, k, v with biases; o without
        layer = attention + 3 * h * self.intermediate + 2 * h  # SwiGLU MLP, two RMS norms
        heads = self.vocab * h * self.lm_head + (h * h + h + 2 * h + 2) * self.score_head
        return self.vocab * h + self.layers * layer + h + heads

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer, bf16, all KV heads (a rank holds 1/k of them)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * BF16


BF16 = 2
POLICY = Shape("Qwen2.5-32B-Instruct", layers=64, hidden=5120, heads=40, kv_heads=8, head_dim=128, intermediate=27648,
               vocab=152064, lm_head=True, score_head=False)
PRM = Shape("Qwen2.5-Math-PRM-72B", layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128, intermediate=29568,
            vocab=152064, lm_head=False, score_head=True)

# H100 SXM (80 GB HBM3)
HBM_BYTES = 81_559 * (1 << 20)  # what nvidia-smi reports: 79.6 GiB
MEMORY_FRACTION = 0.9  # for weights + KV; the rest: CUDA context, activations, NCCL buffers (vLLM's default)
HBM_BW = 3.35e12  # bytes/s
BF16_FLOPS = 989e12  # dense tensor-core peak
ALLREDUCE_LATENCY_S = 10e-6  # one NCCL all-reduce within an NVLink node, small message
ALLREDUCE_BUS_BW = 360e9  # bytes/s, NCCL bus bandwidth on NVLink (large messages)

# The workload: MATH-500 with a Qwen2.5 instruct model
PROBLEMS = 500
BUDGETS = (1, 2, 4, 8, 16, 32, 64, 128)
PROMPT_TOKENS = 150  # problem + system prompt + chat template
STEPS = 10  # reasoning steps ("\n\n"-separated) per solution, on average
STEP_TOKENS = 60  # tokens per step
BLOCK_SIZE = 16


def particle_tokens() -> int:
    """A finished particle's context: prompt, steps, and one PRM step tag per step."""
    return PROMPT_TOKENS + STEPS * STEP_TOKENS + STEPS


def allreduce_s(k: int, nbytes: float) -> float:
    return 0.0 if k == 1 else ALLREDUCE_LATENCY_S + 2 * (k - 1) / k * nbytes / ALLREDUCE_BUS_BW


@dataclass(frozen=True)
class Rank:
    """One tensor-parallel group of k GPUs holding both models."""

    k: int

    @property
    def weights(self) -> float:
        """bf16 bytes of both models on one rank (vocab-parallel embeddings and LM head included)."""
        return (POLICY.params + PRM.params) * BF16 / self.k

    @property
    def kv_room(self) -> float:
        return MEMORY_FRACTION * HBM_BYTES - self.weights

    @property
    def kv_per_token(self) -> float:
        """One token in both caches (the PRM's cache holds every particle token too), on one rank."""
        return (POLICY.kv_bytes_per_token + PRM.kv_bytes_per_token) / self.k

    @property
    def blocks(self) -> int:
        """KV blocks of each cache (policy and PRM get as many) that fit on every rank."""
        return max(0, int(self.kv_room // (self.kv_per_token * BLOCK_SIZE)))

    @property
    def particles(self) -> int:
        """Particles of full length, nothing shared (prompts and resampled prefixes are, in fact)."""
        return self.blocks * BLOCK_SIZE // particle_tokens()

    def decode_step_s(self, batch: int) -> float:
        """One policy token for ``batch`` particles: the larger of reading the weights and the
        particles' KV (half-grown on average) and the GEMM time, plus two all-reduces per layer."""
        context = PROMPT_TOKENS + STEPS * STEP_TOKENS / 2
        read = (POLICY.params * BF16 + batch * context * POLICY.kv_bytes_per_token) / self.k / HBM_BW
        compute = 2 * POLICY.params * batch / self.k / BF16_FLOPS
        return max(read, compute) + 2 * POLICY.layers * allreduce_s(self.k, batch * POLICY.hidden * BF16)

    def prm_round_s(self, batch: int) -> float:
        """The PRM reading one step of every particle (``batch`` x STEP_TOKENS tokens, one extend)."""
        tokens = batch * (STEP_TOKENS + 1)
        compute = 2 * PRM.params * tokens / self.k / BF16_FLOPS
        return compute + 2 * PRM.layers * allreduce_s(self.k, tokens * PRM.hidden * BF16)

    def tokens_per_s(self, batch: int) -> float:
        """Generated tokens per second of the group with ``batch`` particles in flight: a round is
        STEP_TOKENS decode steps, then the PRM's extend."""
        return batch * STEP_TOKENS / (STEP_TOKENS * self.decode_step_s(batch) + self.prm_round_s(batch))


def evaluation_tokens(methods: int) -> int:
    """Tokens generated by ``methods`` PRM-guided methods at every budget on MATH-500."""
    return methods * PROBLEMS * sum(BUDGETS) * STEPS * STEP_TOKENS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--efficiency", type=float, default=0.5,
                        help="expected fraction of the roofline throughput (default 0.5)")
    eff = parser.parse_args().efficiency
    print(f"{POLICY.name}: {POLICY.params / 1e9:.2f} B parameters, {POLICY.params * BF16 / GiB:.1f} GiB bf16, "
          f"KV {POLICY.kv_bytes_per_token // 1024} KiB/token; {PRM.name}: {PRM.params / 1e9:.2f} B, "
          f"{PRM.params * BF16 / GiB:.1f} GiB, KV {PRM.kv_bytes_per_token // 1024} KiB/token; a particle: "
          f"{particle_tokens()} tokens\n")
    print("| TP | weights / rank | KV room / rank | KV / token / rank (both caches) | blocks of 16 (each cache) | "
          "particles in KV | decode step at that batch | PRM extend / round | roofline tok/s per group | per GPU |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    groups = {}
    for k in (2, 4, 8):
        rank = Rank(k)
        if rank.kv_room <= 0:
            print(f"| {k} | {rank.weights / GiB:.1f} GiB | {rank.kv_room / GiB:.1f} GiB: does not fit | | | | | | | |")
            continue
        b = rank.particles
        groups[k] = rank.tokens_per_s(b)
        print(f"| {k} | {rank.weights / GiB:.1f} GiB | {rank.kv_room / GiB:.1f} GiB | {rank.kv_per_token / 1024:.0f} KiB | "
              f"{rank.blocks:,} | {b:,} | {1e3 * rank.decode_step_s(b):.1f} ms | {1e3 * rank.prm_round_s(b):.0f} ms | "
              f"{groups[k]:,.0f} | {groups[k] / k:,.0f} |")
    print(f"\nMATH-500, budgets {','.join(map(str, BUDGETS))} ({sum(BUDGETS)} particles per problem per method), "
          f"{STEPS} steps x {STEP_TOKENS} tokens per particle, at {eff:.0%} of the roofline, in one hour:\n")
    print("| methods | generated tokens | TP | group tok/s | groups | GPUs |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, methods in (("PF", 1), ("PF, BoN, weighted BoN, DVTS", 4)):
        tokens = evaluation_tokens(methods)
        for k, rate in groups.items():
            n = math.ceil(tokens / (eff * rate * 3600))
            print(f"| {label} | {tokens / 1e6:.1f} M | {k} | {eff * rate:,.0f} | {n} | {n * k} |")


if __name__ == "__main__":
    main()
