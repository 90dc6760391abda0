"""System 3: particle filtering as a researcher writes it with transformers (search-and-learn style):
each step, ``model.generate`` on the full prefix of every particle (batched over the particles of
equal length, so no padding), then the PRM over every full prefix (+ one step tag) in one batch."""
from __future__ import annotations

import time
from collections import defaultdict

from bench.common import peak_rss_mb, run_pf
from bench.workload import Checkpoints, Workload


def load_prm_head(path: str):
    """``score.0`` (H x H) -> ReLU -> ``score.2`` (2 x H) from a value-head file or a PRM checkpoint."""
    import torch
    from safetensors import safe_open

    names = ["score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"]
    from pathlib import Path

    files = [Path(path)] if Path(path).is_file() else sorted(Path(path).glob("*.safetensors"))
    found = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for n in names:
                if n in sf.keys():
                    found[n] = sf.get_tensor(n).float()
    assert set(found) == set(names), f"{path}: missing PRM head tensors {set(names) - set(found)}"

    def head(h: torch.Tensor) -> torch.Tensor:
        z = torch.relu(h @ found["score.0.weight"].T + found["score.0.bias"])
        logits = z @ found["score.2.weight"].T + found["score.2.bias"]
        return logits.softmax(-1)[:, 1]

    return head


class TransformersPF:
    system = "transformers"

    def __init__(self, ck: Checkpoints, prm_kind: str = "model") -> None:
        import torch
        from transformers import AutoModelForCausalLM, Qwen2Model
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        self.ck, self.prm_kind = ck, prm_kind
        self.variant = "separate PRM" if prm_kind == "model" else "value head"
        self.model = AutoModelForCausalLM.from_pretrained(ck.policy, dtype=torch.float32).eval()
        if prm_kind == "model":
            assert ck.prm_dir and ck.step_tag_id is not None, "transformers: a PRM dir with a step tag is needed"
            self.prm_model = Qwen2Model.from_pretrained(ck.prm_dir, dtype=torch.float32).eval()
            _check_loaded(self.prm_model, ck.prm_dir)
            self.head = load_prm_head(ck.prm_dir)
        else:
            self.prm_model = self.model.model
            self.head = load_prm_head(ck.value_head)
        self.counts: dict[str, int] = defaultdict(int)

    def _groups(self, seqs: list[list[int]]) -> dict[int, list[int]]:
        by_len: dict[int, list[int]] = defaultdict(list)
        for k, s in enumerate(seqs):
            by_len[len(s)].append(k)
        return by_len

    def extend(self, seqs: list[list[int]], step_tokens: int, temperature: float) -> list[list[int]]:
        import torch

        out: list[list[int]] = [[] for _ in seqs]
        for length, idx in self._groups(seqs).items():
            ids = torch.tensor([seqs[k] for k in idx])
            with torch.inference_mode():
                gen = self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                    top_k=0, top_p=1.0, max_new_tokens=step_tokens, min_new_tokens=0, eos_token_id=None,
                    pad_token_id=0, use_cache=True)
            new = gen[:, length:]
            assert new.shape[1] == step_tokens, f"generate stopped early ({new.shape[1]} of {step_tokens} tokens)"
            for row, k in enumerate(idx):
                out[k] = new[row].tolist()
            # prefill of the whole prefix, then one forward per sampled token but the last
            self.counts["policy_tokens"] += len(idx) * (length + step_tokens - 1)
        return out

    def score(self, seqs: list[list[int]]) -> list[float]:
        import torch

        probs = [0.0] * len(seqs)
        tag = [self.ck.step_tag_id] if self.prm_kind == "model" else []
        for length, idx in self._groups(seqs).items():
            ids = torch.tensor([seqs[k] + tag for k in idx])
            with torch.inference_mode():
                hidden = self.prm_model(input_ids=ids).last_hidden_state[:, -1]
                p = self.head(hidden)
            for row, k in enumerate(idx):
                probs[k] = float(p[row])
            self.counts["prm_tokens"] += len(idx) * length
            self.counts["prm_tags"] += len(idx) * len(tag)
        return probs

    def warmup(self, wl: Workload, prompt_ids: list[list[int]]) -> None:
        from dataclasses import replace

        self.run(replace(wl, steps=1, particles=min(wl.particles, 4)), prompt_ids, seed=10_000)

    def run(self, wl: Workload, prompt_ids: list[list[int]], seed: int) -> dict:
        import torch

        torch.manual_seed(seed)
        self.counts.clear()
        phases: dict[str, float] = {}
        t0 = time.perf_counter()
        trace = run_pf(prompt_ids, wl.particles, wl.steps, wl.step_tokens, seed,
                       lambda s: self.extend(s, wl.step_tokens, wl.temperature), self.score, phases)
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "generated_tokens": trace.generated(), "policy_tokens": self.counts["policy_tokens"],
                "prm_tokens": self.counts["prm_tokens"], "prm_tags": self.counts["prm_tags"],
                "union_tokens": trace.union(), "phases": phases, "peak_rss_mb": peak_rss_mb()}


def _check_loaded(model, path: str) -> None:
    """Qwen2Model.from_pretrained on a ``model.*`` checkpoint: every backbone weight must come from the file."""
    import torch
    from safetensors import safe_open
    from pathlib import Path

    f = sorted(Path(path).glob("*.safetensors"))[0]
    with safe_open(str(f), framework="pt") as sf:
        ref = sf.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert torch.equal(model.layers[0].self_attn.q_proj.weight, ref), f"{path}: PRM backbone did not load"
