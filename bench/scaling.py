"""The arithmetic of the README's "Scaling" section, on paper: Qwen2.5-32B-Instruct as the policy and
Qwen2.5-Math-PRM-72B as the PRM, both in bf16, tensor-parallel over k H100-80GB (both models sharded
over the same k ranks, as one engine holds them): weights and KV per rank, KV blocks and particles
left, decode throughput from the roofline, and the GPUs an evaluation of MATH-500 at budgets 1-128
needs to finish in an hour.

The shapes are the models' config.json fields, written out below (nothing is downloaded); every
other assumption is a named constant. "Roofline": each phase at its hardware limit -- the policy's
decode step reads its weight shard and the particles' KV from HBM, the PRM's extend (one step of
every particle) runs at the tensor-core peak, and the two all-reduces per layer go over NVLink, not
overlapped with anything. Expected = ``--efficiency`` x roofline.

    python -m bench.scaling [--efficiency 0.5]
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

GiB = 1 << 30
BF16 = 2

# config.json of Qwen/Qwen2.5-32B-Instruct and of Qwen/Qwen2.5-Math-PRM-72B (the Qwen2.5-72B backbone), the
# fields that decide their size; Qwen2 has no head_dim field: hidden_size / num_attention_heads.
POLICY_CONFIG = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 5120, "intermediate_size": 27648,
                 "num_attention_heads": 40, "num_hidden_layers": 64, "num_key_value_heads": 8, "vocab_size": 152064,
                 "tie_word_embeddings": False}
PRM_CONFIG = {"architectures": ["Qwen2ForProcessRewardModel"], "hidden_size": 8192, "intermediate_size": 29568,
              "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8, "vocab_size": 152064,
              "tie_word_embeddings": False}

# H100 SXM (80 GB HBM3)
HBM_BYTES = 81_559 * (1 << 20)  # what nvidia-smi reports: 79.6 GiB
MEMORY_FRACTION = 0.9  # for weights + KV; the rest: CUDA context, activations, NCCL buffers (vLLM's default)
HBM_BW = 3.35e12  # bytes/s
BF16_FLOPS = 989e12  # dense tensor-core peak
ALLREDUCE_LATENCY_S = 10e-6  # one NCCL all-reduce within an NVLink node, small message
ALLREDUCE_BUS_BW = 360e9  # bytes/s, NCCL bus bandwidth on NVLink (large messages)
TP_SIZES = (2, 4, 8)

# The workload: MATH-500 with a Qwen2.5 instruct model
PROBLEMS = 500
BUDGETS = (1, 2, 4, 8, 16, 32, 64, 128)
PROMPT_TOKENS = 150  # problem + system prompt + chat template
STEPS = 10  # reasoning steps ("\n\n"-separated) per solution, on average
STEP_TOKENS = 60  # tokens per step: 600 generated tokens per particle
BLOCK_SIZE = 16


@dataclass(frozen=True)
class Shape:
    """A Qwen2 decoder's size, from its config.json."""

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

    @classmethod
    def of(cls, name: str, config: dict) -> Shape:
        [arch] = config["architectures"]
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        return cls(name, config["num_hidden_layers"], hidden, heads, config["num_key_value_heads"], hidden // heads,
                   config["intermediate_size"], config["vocab_size"],
                   lm_head=arch.endswith("ForCausalLM") and not config["tie_word_embeddings"],
                   score_head=arch == "Qwen2ForProcessRewardModel")

    @property
    def params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = h * q + q + 2 * (h * kv + kv) + q * h  # q, k, v with biases; o without
        layer = attention + 3 * h * self.intermediate + 2 * h  # SwiGLU MLP, two RMS norms
        heads = self.vocab * h * self.lm_head + (h * h + h + 2 * h + 2) * self.score_head
        return self.vocab * h + self.layers * layer + h + heads

    def kv_bytes_per_token(self, k: int) -> int:
        """K and V of one token on one of ``k`` ranks: layers x KV heads / k x head dim x 2 x 2 bytes."""
        assert self.kv_heads % k == 0, f"{self.name}: {self.kv_heads} KV heads over {k} ranks"
        return self.layers * (self.kv_heads // k) * self.head_dim * 2 * BF16


POLICY = Shape.of("Qwen2.5-32B-Instruct", POLICY_CONFIG)
PRM = Shape.of("Qwen2.5-Math-PRM-72B", PRM_CONFIG)


def particle_tokens() -> int:
    """A finished particle's context: prompt, steps, and one PRM step tag per step."""
    return PROMPT_TOKENS + STEPS * STEP_TOKENS + STEPS


def allreduce_s(k: int, nbytes: float) -> float:
    return ALLREDUCE_LATENCY_S + 2 * (k - 1) / k * nbytes / ALLREDUCE_BUS_BW


@dataclass(frozen=True)
class Group:
    """One tensor-parallel group of k GPUs holding both models: one engine."""

    k: int

    def weights(self, shape: Shape) -> float:
        """bf16 bytes of ``shape`` on one rank (vocab-parallel embeddings and LM head)."""
        return shape.params * BF16 / self.k

    @property
    def kv_room(self) -> float:
        return MEMORY_FRACTION * HBM_BYTES - self.weights(POLICY) - self.weights(PRM)

    @property
    def kv_per_token(self) -> int:
        """One particle token in both caches (the PRM's cache holds every particle token too), on one rank."""
        return POLICY.kv_bytes_per_token(self.k) + PRM.kv_bytes_per_token(self.k)

    @property
    def blocks(self) -> int:
        """KV blocks of each cache (policy and PRM get as many) that fit on every rank."""
        return max(0, int(self.kv_room // (self.kv_per_token * BLOCK_SIZE)))

    @property
    def particles(self) -> int:
        """Particles of full length, nothing shared (prompts and resampled prefixes are, in fact)."""
        return self.blocks * BLOCK_SIZE // particle_tokens()

    def decode_step_s(self, batch: int) -> float:
        """One policy token for ``batch`` particles: the larger of reading the weight shard plus the
        particles' KV (half-grown on average) and the GEMM time, plus two all-reduces per layer."""
        context = PROMPT_TOKENS + STEPS * STEP_TOKENS / 2
        read = (self.weights(POLICY) + batch * context * POLICY.kv_bytes_per_token(self.k)) / HBM_BW
        compute = 2 * POLICY.params * batch / self.k / BF16_FLOPS
        return max(read, compute) + 2 * POLICY.layers * allreduce_s(self.k, batch * POLICY.hidden * BF16)

    def prm_round_s(self, batch: int) -> float:
        """The PRM reading one step of every particle (``batch`` x (STEP_TOKENS + tag) tokens, one extend)."""
        tokens = batch * (STEP_TOKENS + 1)
        compute = 2 * PRM.params * tokens / self.k / BF16_FLOPS
        return compute + 2 * PRM.layers * allreduce_s(self.k, tokens * PRM.hidden * BF16)

    def tokens_per_s(self, batch: int) -> float:
        """Generated tokens per second with ``batch`` particles in flight: a round is STEP_TOKENS
        decode steps, then the PRM's extend."""
        return batch * STEP_TOKENS / (STEP_TOKENS * self.decode_step_s(batch) + self.prm_round_s(batch))


def evaluation_tokens(methods: int) -> int:
    """Tokens generated by ``methods`` PRM-guided methods at every budget on MATH-500."""
    return methods * PROBLEMS * sum(BUDGETS) * STEPS * STEP_TOKENS


def report(efficiency: float) -> str:
    """The README's tables, as Markdown."""
    lines = [f"{POLICY.name}: {POLICY.params / 1e9:.2f} B parameters, {POLICY.params * BF16 / GiB:.1f} GiB in bf16; "
             f"{PRM.name}: {PRM.params / 1e9:.2f} B, {PRM.params * BF16 / GiB:.1f} GiB. H100: "
             f"{MEMORY_FRACTION:.0%} of {HBM_BYTES / GiB:.1f} GiB for weights + KV; a particle: {particle_tokens()} "
             "tokens.", "",
             "| TP | policy weights / rank | PRM weights / rank | KV room / rank | KV bytes / token / rank (policy + PRM) "
             "| blocks of 16 (each cache) | particles in KV |", "|---:|---:|---:|---:|---:|---:|---:|"]
    groups = [Group(k) for k in TP_SIZES]
    for g in groups:
        room = f"{g.kv_room / GiB:.1f} GiB" if g.kv_room > 0 else f"does not fit ({g.kv_room / GiB:.1f} GiB)"
        lines.append(f"| {g.k} | {g.weights(POLICY) / GiB:.1f} GiB | {g.weights(PRM) / GiB:.1f} GiB | {room} | "
                     f"{POLICY.kv_bytes_per_token(g.k) // 1024} + {PRM.kv_bytes_per_token(g.k) // 1024} KiB | "
                     f"{g.blocks:,} | {g.particles:,} |")
    fitting = [g for g in groups if g.particles > 0]
    lines += ["", "| TP | particles in flight | decode step | policy decode tok/s | PRM extend / round | "
              "generated tok/s per group (roofline) | per GPU |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for g in fitting:
        b = g.particles
        lines.append(f"| {g.k} | {b:,} | {1e3 * g.decode_step_s(b):.1f} ms | {b / g.decode_step_s(b):,.0f} | "
                     f"{1e3 * g.prm_round_s(b):.0f} ms | {g.tokens_per_s(b):,.0f} | {g.tokens_per_s(b) / g.k:,.0f} |")
    lines += ["", f"MATH-500, budgets {', '.join(map(str, BUDGETS))} ({sum(BUDGETS)} particles per problem per method), "
              f"{STEPS} steps x {STEP_TOKENS} tokens per particle, at {efficiency:.0%} of the roofline, in one hour:",
              "", "| methods | generated tokens | TP | tok/s per group | groups | GPUs |", "|---|---:|---:|---:|---:|---:|"]
    for label, methods in (("PF", 1), ("PF, BoN, weighted BoN, DVTS", 4)):
        tokens = evaluation_tokens(methods)
        for g in fitting:
            rate = efficiency * g.tokens_per_s(g.particles)
            n = math.ceil(tokens / (rate * 3600))
            lines.append(f"| {label} | {tokens / 1e6:.1f} M | {g.k} | {rate:,.0f} | {n} | {n * g.k} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--efficiency", type=float, default=0.5,
                        help="expected fraction of the roofline throughput (default 0.5)")
    print(report(parser.parse_args().efficiency))


if __name__ == "__main__":
    main()
