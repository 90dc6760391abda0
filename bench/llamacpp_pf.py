"""System 4 (optional): particle filtering on llama.cpp through ``llama-cpp-python``'s low-level API.

Setup (``make bench-llamacpp-env``, ~10 min of both cores): llama-cpp-python built from source into
``.venv``, and its sdist unpacked into ``.cache/llama-cpp-src``, whose ``convert_hf_to_gguf.py``
turns the checkpoints into fp32 GGUF files (cached next to the benchmark model). The PRM's backbone
is converted as a plain Qwen2 model; llama.cpp returns its last hidden states (``embeddings=True``,
no pooling) and the PRM head is applied here.

The loop: every particle is a sequence of one unified KV cache per model (``kv_unified=True``).
Resampling copies an ancestor's cells to its children with ``llama_memory_seq_cp`` (cells are shared,
not copied) into a second bank of sequence ids, then frees the old bank: nothing is recomputed
except that children of one ancestor each feed the step's first token again. Policy: the cache holds
every token but the last, and each ``llama_decode`` feeds one token for all particles. PRM: each
step end feeds the step's new tokens plus a step tag for all particles in one batch, reads the
hidden state at the tag, and drops the tag from the cache."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.common import peak_rss_mb, run_pf
from bench.workload import Checkpoints, Workload

LLAMA_SRC = Path(os.environ.get("LLAMA_CPP_SRC", ".cache/llama-cpp-src"))
"""An unpacked llama-cpp-python sdist (or a llama.cpp checkout): where convert_hf_to_gguf.py is."""
MAX_SEQ = 256
"""llama.cpp's LLAMA_MAX_SEQ: two banks of sequence ids must fit."""


class Unavailable(RuntimeError):
    """A peer that cannot run on this machine; the harness reports the message and goes on."""


def check() -> Path:
    """The converter script; raises :class:`Unavailable` with what to do when something is missing."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise Unavailable("llama.cpp skipped: llama-cpp-python is not installed (`make bench-llamacpp-env` builds it "
                          "from source, ~10 min of both cores)") from None
    found = sorted(LLAMA_SRC.glob("**/convert_hf_to_gguf.py"))
    if not found:
        raise Unavailable(f"llama.cpp skipped: no convert_hf_to_gguf.py under {LLAMA_SRC} (`make bench-llamacpp-env` "
                          "unpacks llama-cpp-python's sdist there; or set LLAMA_CPP_SRC)")
    return found[0]


# ---------------------------------------------------------------------------------------------
# HF -> GGUF
# ---------------------------------------------------------------------------------------------

CONVERT = """
import runpy, sys
sys.path[:0] = [{root!r}, {root!r} + "/gguf-py"]
from conversion import base
# Our BPE is trained here, so its pre-tokenizer hash is unknown to the converter; it is Qwen2's split.
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
def no_sentencepiece(self):  # Qwen2 tries a SentencePiece tokenizer.model first; there is none
    raise FileNotFoundError("no tokenizer.model")
base.TextModel._set_vocab_sentencepiece = no_sentencepiece
sys.argv = ["convert_hf_to_gguf.py", {src!r}, "--outfile", {out!r}, "--outtype", "f32"]
runpy.run_path({script!r}, run_name="__main__")
"""


def to_gguf(script: Path, hf_dir: str, out: Path) -> Path:
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    code = CONVERT.format(root=str(script.parent), src=hf_dir, out=str(out), script=str(script))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {hf_dir}:\n{done.stderr[-3000:]}")
    return out


def prm_as_causal_lm(prm_dir: str, out: Path) -> str:
    """The PRM's backbone as a tied-embedding Qwen2ForCausalLM directory the converter accepts."""
    from safetensors.torch import load_file, save_file

    if (out / "model.safetensors").exists():
        return str(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((Path(prm_dir) / "config.json").read_text())
    cfg |= {"architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True}
    (out / "config.json").write_text(json.dumps(cfg))
    tensors = {}
    for f in sorted(Path(prm_dir).glob("*.safetensors")):
        tensors |= {k: v for k, v in load_file(str(f)).items() if k.startswith("model.")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(prm_dir) / name).exists():
            shutil.copy(Path(prm_dir) / name, out / name)
    return str(out)


# ---------------------------------------------------------------------------------------------
# One model in one llama.cpp context
# ---------------------------------------------------------------------------------------------

def _quiet_log(level, text, user_data) -> None:
    """llama.cpp logs every load and batch to stderr; the harness log keeps only the results."""


class Context:
    """A GGUF model, a context with a unified KV cache, and which tokens each sequence id holds."""

    def __init__(self, path: Path, n_ctx: int, n_batch: int, embeddings: bool, threads: int) -> None:
        import llama_cpp as L

        self.L = L
        self._log = L.llama_log_callback(_quiet_log)  # referenced while llama.cpp may call it
        L.llama_log_set(self._log, None)
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
        assert self.model, f"llama.cpp could not load {path}"
        p = L.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, n_batch, n_batch, MAX_SEQ
        p.n_threads = p.n_threads_batch = threads
        p.kv_unified = True
        p.embeddings = embeddings
        if embeddings:
            p.pooling_type = L.LLAMA_POOLING_TYPE_NONE
        self.ctx = L.llama_init_from_model(self.model, p)
        assert self.ctx, "llama.cpp could not create a context"
        self.mem = L.llama_get_memory(self.ctx)
        self.n_batch = n_batch
        self.width = (L.llama_model_n_embd(self.model) if embeddings
                      else L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model)))
        self.embeddings = embeddings
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        self.held: dict[int, tuple[int, ...]] = {}
        self.bank = 0
        self.fed = 0

    def close(self) -> None:
        L = self.L
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)

    def reset(self) -> None:
        self.L.llama_memory_clear(self.mem, True)
        self.held.clear()
        self.bank = 0
        self.fed = 0

    def place(self, prefixes: list[tuple[int, ...]]) -> list[int]:
        """Sequence ids (in the other bank) holding exactly ``prefixes[k]`` in the cache: copied from
        the sequence that holds it now, or fed fresh (one feed per distinct prefix) when none does."""
        L, M = self.L, len(prefixes)
        assert 2 * M <= MAX_SEQ, f"llama.cpp: {M} particles need {2 * M} sequence ids (max {MAX_SEQ})"
        base = (1 - self.bank) * (MAX_SEQ // 2)
        old = dict(self.held)
        owner = {toks: s for s, toks in old.items()}
        fresh: dict[tuple[int, ...], int] = {}
        slots, held = [], {}
        for k, toks in enumerate(prefixes):
            s = base + k
            L.llama_memory_seq_rm(self.mem, s, -1, -1)
            src = owner.get(toks, fresh.get(toks))
            if src is None:
                fresh[toks] = s
                self.feed({s: list(toks)}, out=False)
            else:
                L.llama_memory_seq_cp(self.mem, src, s, -1, -1)
            slots.append(s)
            held[s] = toks
        for s in old:
            L.llama_memory_seq_rm(self.mem, s, -1, -1)
        self.held, self.bank = held, 1 - self.bank
        return slots

    def feed(self, new: dict[int, list[int]], out: bool) -> np.ndarray | None:
        """Decode ``new[s]`` after what sequence ``s`` holds, in batches of at most ``n_batch`` tokens;
        with ``out``, return the logits / hidden state at each sequence's last new token."""
        b, L = self.batch, self.L
        jobs = [(s, self._length(s) + i, t, out and i == len(toks) - 1)
                for s, toks in new.items() for i, t in enumerate(toks)]
        rows: dict[int, np.ndarray] = {}
        for a in range(0, len(jobs), self.n_batch):
            chunk = jobs[a:a + self.n_batch]
            for i, (s, pos, tok, want) in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
                b.seq_id[i][0] = s
            b.n_tokens = len(chunk)
            rc = L.llama_decode(self.ctx, b)
            assert rc == 0, f"llama_decode returned {rc}"
            get = L.llama_get_embeddings_ith if self.embeddings else L.llama_get_logits_ith
            for i, (s, _, _, want) in enumerate(chunk):
                if want:
                    rows[s] = np.ctypeslib.as_array(get(self.ctx, i), shape=(self.width,)).copy()
        for s, toks in new.items():
            self.held[s] = self.held.get(s, ()) + tuple(toks)
        self.fed += len(jobs)
        return np.stack([rows[s] for s in new]) if out else None

    def _length(self, s: int) -> int:
        return len(self.held.get(s, ()))

    def drop_last(self, slots: list[int]) -> None:
        """Remove each sequence's last token from the cache (the PRM's step tag)."""
        for s in slots:
            n = self._length(s) - 1
            self.L.llama_memory_seq_rm(self.mem, s, n, -1)
            self.held[s] = self.held[s][:n]


# ---------------------------------------------------------------------------------------------
# The peer
# ---------------------------------------------------------------------------------------------

class LlamaCppPF:
    system = "llama.cpp"
    variant = "separate PRM, seq_cp forks"

    def __init__(self, ck: Checkpoints, threads: int = 2, n_ctx: int = 65536, n_batch: int = 2048) -> None:
        from bench.transformers_pf import load_prm_head

        script = check()
        assert ck.prm_dir and ck.step_tag_id is not None, "llama.cpp: a PRM dir with a step tag is needed"
        gguf = Path(ck.policy).parent / "gguf"
        policy = to_gguf(script, ck.policy, gguf / "policy-f32.gguf")
        prm = to_gguf(script, prm_as_causal_lm(ck.prm_dir, gguf / "prm-as-lm"), gguf / "prm-f32.gguf")
        self.ck, self.head = ck, load_prm_head(ck.prm_dir)
        self.policy = Context(policy, n_ctx, n_batch, embeddings=False, threads=threads)
        self.prm = Context(prm, n_ctx, n_batch, embeddings=True, threads=threads)
        self.counts: dict[str, int] = defaultdict(int)

    def close(self) -> None:
        self.policy.close()
        self.prm.close()

    def extend(self, seqs: list[list[int]], step_tokens: int, temperature: float, rng: np.random.Generator
               ) -> list[list[int]]:
        slots = self.policy.place([tuple(s[:-1]) for s in seqs])
        last = [s[-1] for s in seqs]
        out: list[list[int]] = [[] for _ in seqs]
        for _ in range(step_tokens):
            logits = self.policy.feed({s: [t] for s, t in zip(slots, last)}, out=True)
            z = logits / temperature
            p = np.exp(z - z.max(1, keepdims=True))
            cdf = np.cumsum(p, 1)
            u = rng.uniform(size=(len(seqs), 1)) * cdf[:, -1:]
            last = np.minimum((cdf < u).sum(1), p.shape[1] - 1).tolist()
            for k, t in enumerate(last):
                out[k].append(t)
        return out

    def score(self, seqs: list[list[int]], step_tokens: int) -> list[float]:
        import torch

        slots = self.prm.place([tuple(s[:-step_tokens]) for s in seqs])
        hidden = self.prm.feed({s: q[-step_tokens:] + [self.ck.step_tag_id] for s, q in zip(slots, seqs)}, out=True)
        self.prm.drop_last(slots)
        self.counts["prm_tags"] += len(seqs)
        return self.head(torch.from_numpy(hidden).float()).tolist()

    def warmup(self, wl: Workload, prompt_ids: list[list[int]]) -> None:
        from dataclasses import replace

        self.run(replace(wl, steps=1, particles=min(wl.particles, 4)), prompt_ids, seed=10_000)

    def run(self, wl: Workload, prompt_ids: list[list[int]], seed: int) -> dict:
        for c in (self.policy, self.prm):
            c.reset()
        self.counts.clear()
        rng = np.random.default_rng(seed)
        phases: dict[str, float] = {}
        t0 = time.perf_counter()
        trace = run_pf(prompt_ids, wl.particles, wl.steps, wl.step_tokens, seed,
                       lambda s: self.extend(s, wl.step_tokens, wl.temperature, rng),
                       lambda s: self.score(s, wl.step_tokens), phases)
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "generated_tokens": trace.generated(), "policy_tokens": self.policy.fed,
                "prm_tokens": self.prm.fed - self.counts["prm_tags"], "prm_tags": self.counts["prm_tags"],
                "union_tokens": trace.union(), "phases": phases, "peak_rss_mb": peak_rss_mb()}
