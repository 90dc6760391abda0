"""The GPU check (``make gpu-check``): pfengine on one CUDA GPU in one script, inside 8 minutes, every
result in one folder.

1. kernels: the Triton kernel tests against their torch references and numpy oracles with the
   kernels on the device (``PFENGINE_TEST_DEVICE=cuda pytest tests/test_kernel_*.py``), and the CUDA
   tests of the decode graphs (tests/test_cuda_graphs.py).
2. agreement: a random model of Qwen2.5-Math-1.5B's shape (weights drawn on the GPU, never shipped)
   with a random value head. Teacher-forced logits and PRM scores of the engine with a bf16 and an
   fp32 KV cache, each with and without CUDA graphs, against each other and against transformers in
   fp32; then particle filtering end to end (fixed 32-token steps, seeded) in the same four
   configurations: tokens and scores against the fp32 run without graphs.
3. throughput: the decode step alone (policy forward + LM head) at several batch sizes with and
   without graphs, placed on this GPU's roofline (its measured fp32 GEMM rate and memory bandwidth);
   particle filtering at a few particle counts, tokens per second with and without graphs.

Weights and activations are fp32 on every device (the loader upcasts checkpoints); "bf16" is the KV
cache. Writes ``OUT/summary.md``, ``results.json``, ``gpu_check.log``, ``kernel_tests.log`` and
``kernel_tests.xml``; exits 0 when every check passed, 1 when one failed, 2 when a prerequisite is
missing. ``--device cpu --shape tiny`` runs the same code on a small model without a GPU (a test).

    PYTHONPATH=. python3 bench/gpu_check.py [--out out/gpu-check]
"""
from __future__ import annotations

import argparse
import faulthandler
import importlib.util
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parents[1]
GRACE_S = 50.0
"""Past the budget by this much, the watchdog stops the check (the default budget + this < 8 minutes)."""
REQUIRED = ("torch", "numpy", "transformers", "safetensors", "tokenizers", "pytest", "tqdm")
KERNEL_TESTS = ["tests/test_kernel_copy_blocks.py", "tests/test_kernel_kv_store.py",
                "tests/test_kernel_paged_attention.py", "tests/test_kernel_fork.py", "tests/test_kernel_resample.py",
                "tests/test_kernel_prm_score.py", "tests/test_cuda_graphs.py"]
TINY = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 384,
        "max_position_embeddings": 1024, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
LOGIT_STD = 4.0
"""Standard deviation of the random model's logits (its tied embedding's scale): next-token
distributions peaked enough that seeded sampling agrees across precisions for a while."""
FORCED_PROMPTS = [37, 64, 100, 129, 1, 16, 250]
"""Prompt lengths of the teacher-forced rows: 7 rows, so the graph of 8 runs with a padding row."""
FORCED_STEPS = 16
PF_REQUESTS, PF_STEPS, STEP_TOKENS = 4, 3, 32
TOLERANCES = {
    "transformers": {"rel_l2": 1e-3, "top1": 0.99},
    "graphs": {"rel_l2": 1e-4, "top1": 0.99, "score": 1e-4, "pf_prefix": 0.9},
    "bf16": {"rel_l2": 3e-2, "top1": 0.9, "score": 0.05},
}
"""Limits of the agreement checks: fp32 engine vs transformers fp32; with vs without graphs (same KV
dtype: only the padded batch size changes the GEMMs' rounding); bf16 vs fp32 KV cache. A broken
kernel or a stale graph input misses them by orders of magnitude."""

log = logging.getLogger("gpu_check")


class Prerequisite(Exception):
    """Something this check needs is missing: reported at once, before any work."""


@dataclass
class Section:
    name: str
    status: str = "PASS"
    seconds: float = 0.0
    checks: list[dict] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    error: str | None = None

    def check(self, what: str, value: float, limit: float, at_least: bool = False) -> None:
        ok = value >= limit if at_least else value <= limit
        self._record(what, value, f"{'>=' if at_least else '<='} {limit:g}", ok)

    def require(self, what: str, ok: bool) -> None:
        self._record(what, ok, "true", ok)

    def _record(self, what: str, value: Any, limit: str, ok: bool) -> None:
        self.checks.append({"what": what, "value": value, "limit": limit, "ok": ok})
        if not ok and self.status == "PASS":
            self.status = "FAIL"


@dataclass
class Model:
    """A random checkpoint directory, its value head and its config.json."""

    path: Path
    head: Path
    config: dict


@dataclass
class Context:
    args: argparse.Namespace
    out: Path
    deadline: float
    model: Model | None = None

    @property
    def device(self) -> str:
        return self.args.device

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run_section(name: str, ctx: Context, need_s: float, body: Callable[[Section, Context], None]) -> Section:
    """``body`` fills the section; an exception is recorded (ERROR) and the next section runs."""
    s = Section(name)
    if ctx.left() < need_s:
        s.status, s.error = "SKIP", f"{ctx.left():.0f} s left of the budget, the section needs about {need_s:.0f} s"
        log.warning("%s: skipped (%s)", name, s.error)
        return s
    log.info("== %s (%.0f s left)", name, ctx.left())
    start = time.monotonic()
    try:
        body(s, ctx)
    except Exception:
        s.status, s.error = "ERROR", traceback.format_exc()
        log.error("%s failed:\n%s", name, s.error)
    s.seconds = round(time.monotonic() - start, 1)
    log.info("%s: %s in %.1f s", name, s.status, s.seconds)
    return s


# ------------------------------------------------------------------------------------------------
# Prerequisites

def preflight(device: str) -> dict:
    missing = [m for m in REQUIRED + (("triton",) if device == "cuda" else ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise Prerequisite(f"missing Python package(s) {missing} for {sys.executable}; install them "
                           f"(pip install {' '.join(missing)}) or run with the Python that has them")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise Prerequisite(f"no CUDA device visible to torch {torch.__version__} (built for CUDA "
                           f"{torch.version.cuda}); this check runs on a CUDA machine (or --device cpu --shape tiny)")
    import transformers

    triton = importlib.import_module("triton") if importlib.util.find_spec("triton") else None
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": getattr(triton, "__version__", None), "transformers": transformers.__version__,
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "commit": _git_commit()}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env |= {"gpu": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                "memory_gib": round(p.total_memory / 2 ** 30, 1), "driver": _nvidia_smi("driver_version")}
    else:
        env |= {"cpu_threads": torch.get_num_threads()}
    return env


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _nvidia_smi(query: str) -> str:
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


# ------------------------------------------------------------------------------------------------
# 1. Kernel tests on the device

def kernel_tests(s: Section, ctx: Context) -> None:
    xml = ctx.out / "kernel_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *ctx.args.kernel_tests]
    if ctx.args.kernel_filter:
        cmd += ["-k", ctx.args.kernel_filter]
    if importlib.util.find_spec("xdist") is not None and ctx.device == "cuda":
        cmd += ["-n", "4", "--dist", "loadfile"]  # the files compile their Triton variants in parallel
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PFENGINE_TRITON", "PFENGINE_CPP")}
    env |= {"PFENGINE_TEST_DEVICE": ctx.device, "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])}
    timeout = max(30.0, min(ctx.args.kernel_timeout, ctx.left() - ctx.args.reserve))
    s.data["command"] = shlex.join(cmd)
    log.info("%s (timeout %.0f s)", s.data["command"], timeout)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output, rc = _text(e.stdout) + _text(e.stderr) + f"\nTIMEOUT after {timeout:.0f} s", None
    (ctx.out / "kernel_tests.log").write_text(output)
    counts = junit_counts(xml) if xml.is_file() else {}
    s.data |= {"returncode": rc, **counts, "tail": output.strip().splitlines()[-1:]}
    s.require("pytest finished (no timeout) with exit code 0", rc == 0)
    s.check("tests that failed or errored", counts.get("failures", 0) + counts.get("errors", 0), 0)
    s.check("tests that ran", counts.get("tests", 0) - counts.get("skipped", 0), 1, at_least=True)


def _text(x: bytes | str | None) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else x or ""


def junit_counts(path: Path) -> dict:
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    return {k: sum(int(suite.get(k, 0)) for suite in suites) for k in ("tests", "failures", "errors", "skipped")}


# ------------------------------------------------------------------------------------------------
# The random model

def make_model(root: Path, config: dict, device: str, seed: int = 0) -> Model:
    """config.json, a small BPE tokenizer, random weights drawn on ``device`` and saved in bf16, and a
    random value head: a checkpoint directory the engine and transformers load as any other."""
    import torch
    from safetensors.torch import save_file

    from pfengine.model.checkpoint import expected_shapes, parse_config
    from pfengine.random_model import save_tokenizer, save_value_head

    cfg = parse_config(config)
    path = root / "policy"
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_tokenizer(path, min(384, cfg.vocab_size))
    g = torch.Generator(device=device).manual_seed(seed)
    tensors = {name: random_weight(name, shape, g, device).to(torch.bfloat16).cpu()
               for name, shape in expected_shapes(cfg).items()
               if not (name == "lm_head.weight" and cfg.tie_word_embeddings)}
    save_file(tensors, str(path / "model.safetensors"))
    head = save_value_head(root / "value_head.safetensors", cfg.hidden_size, seed + 1)
    return Model(path, head, config)


def random_weight(name: str, shape: tuple[int, ...], g, device: str):
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device)
    x = torch.randn(shape, generator=g, device=device)
    if name.endswith("bias"):
        return x * 0.1
    return x * (LOGIT_STD if name == "model.embed_tokens.weight" else 1.0) / math.sqrt(shape[-1])


def model_section(s: Section, ctx: Context, root: Path, config: dict) -> None:
    ctx.model = make_model(root, config, ctx.device)
    s.data |= {"checkpoint_gib": (ctx.model.path / "model.safetensors").stat().st_size / 2 ** 30, "device": ctx.device}


def make_engine(model: Model, ctx: Context, kv_dtype: str):
    from pfengine import Engine, EngineConfig

    return Engine(EngineConfig(model=str(model.path), prm=str(model.head), device=ctx.device, kv_dtype=kv_dtype,
                               num_blocks=ctx.args.num_blocks, block_size=16))


class graphs_set:
    """Decode with (the engine's captured graphs, if any) or without CUDA graphs inside the block."""

    def __init__(self, engine, on: bool) -> None:
        self.runner, self.on = engine.policy, on
        self.saved = self.runner.graphs

    def __enter__(self):
        self.runner.graphs = self.saved if self.on else None
        return self.runner.graphs

    def __exit__(self, *exc) -> None:
        self.runner.graphs = self.saved


def release_memory() -> None:
    """Give the memory of deleted engines (weights, caches, graph pools) back before the next one."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def attempt(s: Section, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``; if it raises, None, with the traceback recorded: the section is an ERROR and its
    other parts still run (one broken path must not hide the results of the others)."""
    try:
        return fn(*args)
    except Exception:
        s.status = "ERROR"
        s.data[f"error: {what}"] = traceback.format_exc()
        log.error("%s: %s failed:\n%s", s.name, what, s.data[f"error: {what}"])
        return None


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# 2. Agreement: bf16 vs fp32 KV cache, graphs vs eager, engine vs transformers

def forced_inputs(vocab: int, seed: int = 5):
    """Prompts (ids the tokenizer knows) and teacher-forced continuations (any id of the vocabulary)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 370, (n,), generator=g).tolist() for n in FORCED_PROMPTS]
    return prompts, torch.randint(0, vocab, (len(prompts), FORCED_STEPS), generator=g)


def forced_run(engine, head, prompts: list[list[int]], forced) -> dict:
    """Logits ``[B, S+1, V]`` and value-head probabilities ``[B, S+1]`` of the prompts' last tokens and
    of every forced token after them: one extend, then S decode steps of B rows (CPU copies)."""
    import torch

    from pfengine.kernels.prm_score import head_logit

    runner = engine.policy
    rows = torch.arange(len(prompts))
    hidden = [runner.extend(rows.tolist(), prompts)]
    for s in range(forced.shape[1]):
        hidden.append(runner.decode(rows, forced[:, s]))
    runner.blocks.free(rows)
    h = torch.stack(hidden, 1)
    logits = runner.decoder.logits(h.flatten(0, 1)).view(*h.shape[:2], -1)
    scores = torch.sigmoid(head_logit(h.flatten(0, 1), head)).view(h.shape[:2])
    return {"logits": logits.float().cpu(), "scores": scores.cpu()}


def transformers_logits(model: Model, prompts: list[list[int]], forced, device: str):
    """transformers' fp32 logits at the same positions as :func:`forced_run` (the oracle)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model.path), dtype=torch.float32).to(device).eval()
    out = []
    with torch.no_grad():
        for p, f in zip(prompts, forced.tolist()):
            ids = torch.tensor([p + f], device=device)
            out.append(hf(ids).logits[0, len(p) - 1:].float().cpu())
    del hf
    return torch.stack(out)


def logit_agreement(got, ref, device: str) -> dict:
    """``got`` against ``ref`` (``[..., V]``): max |difference|, relative L2 error, top-1 agreement,
    mean KL(ref || got)."""
    got, ref = got.to(device).double(), ref.to(device).double()
    d = got - ref
    lp_ref, lp_got = ref.log_softmax(-1), got.log_softmax(-1)
    return {"max_abs": float(d.abs().max()), "rel_l2": float(d.norm() / ref.norm()),
            "top1": float((got.argmax(-1) == ref.argmax(-1)).double().mean()),
            "kl": float((lp_ref.exp() * (lp_ref - lp_got)).sum(-1).mean())}


def pf_requests(n_requests: int, particles: int, steps: int, seed: int) -> list:
    from bench.common import NEVER_DELIMITER
    from pfengine import Request, SamplingParams, SearchParams

    sampling = dict(temperature=0.8, max_steps=steps, max_step_tokens=STEP_TOKENS, step_delimiter=NEVER_DELIMITER,
                    stop_on_eos=False)
    return [Request(prompt=f"Problem {k}: add 17 and 25, then multiply by {k + 3}.",
                    sampling=SamplingParams(seed=seed + k, **sampling), search=SearchParams(n_particles=particles))
            for k in range(n_requests)]


def pf_run(engine, particles: int) -> list[list[tuple[list[int], float]]]:
    """Each request's particles: (token ids, final score)."""
    results = engine.generate(pf_requests(PF_REQUESTS, particles, PF_STEPS, seed=11))
    return [[(p.token_ids, p.score) for p in r.particles] for r in results]


def pf_agreement(got: list, ref: list) -> dict:
    """Mean fraction of each particle's tokens before its first difference from the same particle of
    ``ref``; particles identical throughout; max |score difference| among those."""
    prefix, same, score = [], 0, 0.0
    for g_req, r_req in zip(got, ref):
        for (g_ids, g_score), (r_ids, r_score) in zip(g_req, r_req):
            k = next((i for i, (a, b) in enumerate(zip(g_ids, r_ids)) if a != b), min(len(g_ids), len(r_ids)))
            prefix.append(k / max(len(r_ids), 1))
            if g_ids == r_ids:
                same += 1
                score = max(score, abs(g_score - r_score))
    return {"prefix": sum(prefix) / len(prefix), "identical": same, "particles": len(prefix), "max_score_diff": score}


COMPARISONS = {
    "fp32 eager vs transformers": (("float32", False), None, "transformers"),
    "fp32 graphs vs transformers": (("float32", True), None, "transformers"),
    "fp32 graphs vs fp32 eager": (("float32", True), ("float32", False), "graphs"),
    "bf16 graphs vs bf16 eager": (("bfloat16", True), ("bfloat16", False), "graphs"),
    "bf16 eager vs fp32 eager": (("bfloat16", False), ("float32", False), "bf16"),
    "bf16 graphs vs fp32 eager": (("bfloat16", True), ("float32", False), "bf16"),
}
"""(KV dtype, graphs) of a run against another's or against transformers (None), and its tolerances."""


def agreement(s: Section, ctx: Context) -> None:
    from pfengine.prm import load_value_head

    model = ctx.model
    prompts, forced = forced_inputs(model.config["vocab_size"])
    head = load_value_head(model.head, model.config["hidden_size"], ctx.device)
    if ctx.device != "cuda":
        s.data["note"] = f"no CUDA graphs on {ctx.device}: the 'graphs' runs are eager as well"
    forced_runs, pf_runs = {}, {}
    for kv in ("float32", "bfloat16"):
        engine = make_engine(model, ctx, kv)
        for on in (False, True):
            label = f"{kv} {'graphs' if on else 'eager'}"
            with graphs_set(engine, on) as graphs:
                before = graphs.replays if graphs is not None else 0
                forced_runs[kv, on] = attempt(s, f"teacher-forced run, {label}", forced_run, engine, head, prompts,
                                              forced)
                pf_runs[kv, on] = attempt(s, f"PF run, {label}", pf_run, engine, ctx.args.agreement_particles)
                replays = graphs.replays - before if graphs is not None else 0
            s.data[f"{label}: graph replays"] = replays
            if on and ctx.device == "cuda":
                s.require(f"{kv}: decode ran through CUDA graphs ({replays} replays, buckets "
                          f"{sorted(graphs.graphs) if graphs is not None else 'none'})", replays > 0)
        del engine
        release_memory()
    hf = attempt(s, "transformers", transformers_logits, model, prompts, forced, ctx.device)
    for name, (got, ref, kind) in COMPARISONS.items():
        tol = TOLERANCES[kind]
        ref_logits = hf if ref is None else (forced_runs[ref] or {}).get("logits")
        if forced_runs[got] is not None and ref_logits is not None:
            a = logit_agreement(forced_runs[got]["logits"], ref_logits, ctx.device)
            s.data[f"logits: {name}"] = a
            s.check(f"logits {name}: relative L2 error", a["rel_l2"], tol["rel_l2"])
            s.check(f"logits {name}: top-1 agreement", a["top1"], tol["top1"], at_least=True)
        if ref is not None and forced_runs[got] is not None and forced_runs[ref] is not None:
            d = float((forced_runs[got]["scores"] - forced_runs[ref]["scores"]).abs().max())
            s.data[f"scores: {name}"] = d
            s.check(f"value-head scores {name}: max |difference|", d, tol["score"])
        if ref is not None and pf_runs[got] is not None and pf_runs[ref] is not None:
            p = s.data[f"PF: {name}"] = pf_agreement(pf_runs[got], pf_runs[ref])
            if kind == "graphs":
                s.check(f"PF {name}: mean token-prefix agreement", p["prefix"], tol["pf_prefix"], at_least=True)


# ------------------------------------------------------------------------------------------------
# 3. Throughput: the decode step on the roofline, PF tokens per second

def measure_gpu() -> dict:
    """fp32 GEMM rate (TF32 as torch has it: off by default) and device memory bandwidth (a copy,
    bytes read + written), best of a few timed repeats."""
    import torch

    def best(fn, repeats: int = 5) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        return min(times)

    n = 8192
    a, b = torch.randn(n, n, device="cuda"), torch.randn(n, n, device="cuda")
    gemm = 2 * n ** 3 / best(lambda: a @ b) / 1e9
    x = torch.empty(256 * 2 ** 20, device="cuda")
    y = torch.empty_like(x)
    mem = 2 * x.numel() * 4 / best(lambda: y.copy_(x)) / 1e9
    return {"gemm_gflops": gemm, "mem_gbs": mem, "note": "fp32 GEMM 8192^3; copy of 1 GiB (read + write)"}


def prefill_rows(engine, n: int, context: int, chunk_tokens: int = 8192) -> None:
    """Rows 0..n-1 with ``context`` random tokens each, in extends of about ``chunk_tokens`` tokens."""
    import torch

    g = torch.Generator().manual_seed(7)
    per = max(1, chunk_tokens // context)
    for lo in range(0, n, per):
        rows = list(range(lo, min(n, lo + per)))
        engine.policy.extend(rows, [torch.randint(0, 370, (context,), generator=g).tolist() for _ in rows])


def time_decode(engine, batch: int, device: str, steps: int) -> tuple[float, float]:
    """Seconds per decode step (forward + LM head) of rows 0..batch-1 after two warm-up steps, and the
    rows' mean context over the timed steps."""
    import torch

    runner = engine.policy
    rows = torch.arange(batch)
    tokens = torch.randint(0, 370, (batch,), generator=torch.Generator().manual_seed(batch))
    for _ in range(2):
        runner.decoder.logits(runner.decode(rows, tokens))
    sync(device)
    context = float(runner.blocks.lens[:batch].float().mean()) + (steps + 1) / 2
    start = time.perf_counter()
    for _ in range(steps):
        runner.decoder.logits(runner.decode(rows, tokens))
    sync(device)
    return (time.perf_counter() - start) / steps, context


def decode_roofline(engine, ctx: Context, machine: dict) -> list[dict]:
    """The decode step at each batch size, with and without graphs, placed on the roofline."""
    import torch

    from bench.roofline import place, step_cost
    from pfengine.model.checkpoint import parse_config

    c = parse_config(ctx.model.config)
    shape = {"hidden": c.hidden_size, "layers": c.num_layers, "heads": c.num_heads, "kv_heads": c.num_kv_heads,
             "head_dim": c.head_dim, "inter": c.intermediate_size, "vocab": c.vocab_size}
    batches = ctx.args.decode_batches
    prefill_rows(engine, max(batches), ctx.args.context)
    table = []
    for b in batches:
        row = {"batch": b}
        for on in (False, True):
            with graphs_set(engine, on) as graphs:
                if on and graphs is None:
                    continue
                seconds, context = time_decode(engine, b, ctx.device, ctx.args.decode_steps)
            cost = step_cost(shape, b, context, lm_head=True, kv_bytes=2)
            row["graphs" if on else "eager"] = place(cost, seconds, machine) | {"context": context}
        table.append(row)
        log.info("decode B=%d: %s ms", b, {k: round(v["measured_s"] * 1e3, 3) for k, v in row.items() if k != "batch"})
    engine.policy.blocks.free(torch.arange(max(batches)))
    return table


def pf_throughput(engine, particles: int) -> dict:
    """One request of ``particles`` particles, fixed-length steps: iterations, tokens, wall time."""
    engine.add_request(pf_requests(1, particles, 4, seed=particles)[0])
    iterations, tokens = 0, 0
    start = time.perf_counter()
    while engine.has_work:
        for event in engine.step():
            if event.result is not None:
                tokens += event.result.stats.generated_tokens
        iterations += 1
    wall = time.perf_counter() - start
    return {"iterations": iterations, "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "ms_per_iteration": 1e3 * wall / iterations}


def pf_rates(engine, ctx: Context) -> list[dict]:
    """PF at each particle count, with and without graphs, each timed after a warm-up run of the same
    seeds (Triton compiles; the graphs of the batch sizes it meets are captured)."""
    table = []
    for n in ctx.args.pf_particles:
        row = {"particles": n}
        for on in (False, True):
            with graphs_set(engine, on) as graphs:
                if on and graphs is None:
                    continue
                pf_throughput(engine, n)
                row["graphs" if on else "eager"] = pf_throughput(engine, n)
        table.append(row)
        log.info("PF N=%d: %s tokens/s", n, {k: round(v["tokens_per_s"]) for k, v in row.items() if k != "particles"})
    return table


def throughput(s: Section, ctx: Context) -> None:
    import torch

    from bench.roofline import measure_machine

    s.data["machine"] = machine = measure_gpu() if ctx.device == "cuda" else measure_machine(torch.get_num_threads())
    engine = make_engine(ctx.model, ctx, "bfloat16")
    s.data["decode"] = attempt(s, "decode step timing", decode_roofline, engine, ctx, machine) or []
    s.data["pf"] = attempt(s, "PF throughput", pf_rates, engine, ctx) or []
    del engine
    release_memory()


# ------------------------------------------------------------------------------------------------
# Report

def summary(sections: list[Section], env: dict, wall: float) -> str:
    ok = all(x.status == "PASS" for x in sections)
    lines = [f"# pfengine GPU check: {'PASS' if ok else 'NOT PASSED'}", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}, {wall:.0f} s. " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "| section | status | seconds |", "|---|---|---:|"]
    lines += [f"| {x.name} | {x.status} | {x.seconds} |" for x in sections]
    for x in sections:
        lines += ["", f"## {x.name}: {x.status}", ""]
        if x.error:
            lines += ["```", x.error.strip()[-3000:], "```", ""]
        if x.checks:
            lines += ["| check | value | limit | ok |", "|---|---:|---|---|"]
            lines += [f"| {c['what']} | {_fmt(c['value'])} | {c['limit']} | {'yes' if c['ok'] else '**NO**'} |"
                      for c in x.checks]
        lines += _details(x)
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _details(x: Section) -> list[str]:
    d, lines = x.data, []
    if "note" in d:
        lines += ["", f"Note: {d['note']}.", ""]
    for key in (k for k in d if k.startswith("error: ")):
        lines += ["", f"{key}:", "```", d[key].strip()[-3000:], "```"]
    if "checkpoint_gib" in d:
        lines += [f"Random checkpoint: {d['checkpoint_gib']:.2f} GiB of bf16 weights, drawn on {d['device']}."]
    if x.name == "kernels" and "tests" in d:
        lines += ["", f"{d['tests']} tests, {d['failures']} failed, {d['errors']} errors, {d['skipped']} skipped "
                  f"(kernel_tests.log, kernel_tests.xml): `{d['command']}`"]
    for key, v in d.items():
        if key.startswith("PF: "):
            lines.append(f"- {key}: token-prefix agreement {v['prefix']:.3f}, {v['identical']}/{v['particles']} "
                         f"particles identical, max score difference among them {v['max_score_diff']:.2e}")
        elif key.startswith("logits: "):
            lines.append(f"- {key}: rel. L2 {v['rel_l2']:.2e}, max |diff| {v['max_abs']:.2e}, top-1 {v['top1']:.3f}, "
                         f"KL {v['kl']:.2e}")
    if "machine" in d:
        m = d["machine"]
        lines += ["", f"Roofline of this device: {m['gemm_gflops']:.0f} GFLOP/s (fp32 GEMM), {m['mem_gbs']:.0f} GB/s.",
                  "", "| batch | context | eager ms | graphs ms | roofline ms | bound | graphs / roofline |",
                  "|---:|---:|---:|---:|---:|---|---:|"]
        for r in d.get("decode", []):
            e, g = r["eager"], r.get("graphs")
            graphs_ms = "-" if g is None else f"{1e3 * g['measured_s']:.3f}"
            share = "-" if g is None else f"{100 * g['fraction_of_roofline']:.0f} %"
            lines.append(f"| {r['batch']} | {e['context']:.0f} | {1e3 * e['measured_s']:.3f} | {graphs_ms} | "
                         f"{1e3 * e['roofline_s']:.3f} | {e['bound']} | {share} |")
        lines += ["", "| particles | eager tokens/s | graphs tokens/s | eager ms/iteration | graphs ms/iteration |",
                  "|---:|---:|---:|---:|---:|"]
        for r in d.get("pf", []):
            e, g = r["eager"], r.get("graphs")
            rate, ms = ("-", "-") if g is None else (f"{g['tokens_per_s']:.0f}", f"{g['ms_per_iteration']:.2f}")
            lines.append(f"| {r['particles']} | {e['tokens_per_s']:.0f} | {rate} | {e['ms_per_iteration']:.2f} "
                         f"| {ms} |")
    return lines


def write_report(out: Path, sections: list[Section], env: dict, wall: float) -> None:
    (out / "results.json").write_text(json.dumps({"env": env, "wall_s": wall, "sections": [
        {"name": x.name, "status": x.status, "seconds": x.seconds, "checks": x.checks, "data": x.data,
         "error": x.error} for x in sections]}, indent=1, default=str))
    (out / "summary.md").write_text(summary(sections, env, wall))


# ------------------------------------------------------------------------------------------------

def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/gpu-check", help="folder for every result (default %(default)s)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--shape", default="qwen2.5-math-1.5b", choices=("qwen2.5-math-1.5b", "tiny"),
                   help="the random model's shape (tiny: the smoke test's)")
    p.add_argument("--sections", default="kernels,agreement,throughput")
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds for the whole check; no section starts without the time it needs, and a "
                        f"watchdog stops everything {GRACE_S:.0f} s past it (default %(default)s)")
    p.add_argument("--reserve", type=float, default=180.0,
                   help="seconds the kernel tests leave for the sections after them (default %(default)s)")
    p.add_argument("--kernel-timeout", type=float, default=240.0)
    p.add_argument("--kernel-tests", nargs="+", default=KERNEL_TESTS)
    p.add_argument("--kernel-filter", default=None, help="pytest -k expression for the kernel tests")
    p.add_argument("--num-blocks", type=int, default=10240, help="KV blocks of 16 tokens (default %(default)s)")
    p.add_argument("--decode-batches", type=_ints, default=[1, 16, 64, 256])
    p.add_argument("--context", type=int, default=512, help="context of the timed decode rows")
    p.add_argument("--decode-steps", type=int, default=10)
    p.add_argument("--pf-particles", type=_ints, default=[16, 64, 256], help="particle counts of the PF throughput")
    p.add_argument("--agreement-particles", type=int, default=16,
                   help=f"particles of each of the {PF_REQUESTS} PF requests the agreement runs (default %(default)s)")
    p.add_argument("--workdir", default=None, help="where the random checkpoint is written (a temporary folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "gpu_check.log", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    stream = logging.StreamHandler()
    stream.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    root.addHandler(stream)
    # A hang (a stuck kernel, a deadlock) must not outlast the budget: past it plus a grace period the
    # stacks go to the log and the process exits; the report of the sections done is already written.
    faulthandler.dump_traceback_later(args.budget + GRACE_S, exit=True, file=handler.stream)
    try:
        return _run(args, out)
    finally:
        faulthandler.cancel_dump_traceback_later()
        root.removeHandler(handler)
        root.removeHandler(stream)
        handler.close()


def _run(args: argparse.Namespace, out: Path) -> int:
    start = time.monotonic()
    try:
        env = preflight(args.device)
    except Prerequisite as e:
        log.error("prerequisite missing: %s", e)
        (out / "summary.md").write_text(f"# pfengine GPU check: NOT RUN\n\nPrerequisite missing: {e}\n")
        return 2
    log.info("environment: %s", env)
    ctx = Context(args, out, start + args.budget)
    wanted = args.sections.split(",")
    sections: list[Section] = []

    def run(name: str, need_s: float, body: Callable[[Section, Context], None]) -> Section:
        sections.append(run_section(name, ctx, need_s, body))
        write_report(out, sections, env, time.monotonic() - start)  # what is done survives a later hang
        return sections[-1]

    if "kernels" in wanted:
        run("kernels", 60, kernel_tests)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="pfengine-gpu-check-") as tmp:
        from pfengine.random_model import QWEN2_5_MATH_1_5B

        config = QWEN2_5_MATH_1_5B if args.shape == "qwen2.5-math-1.5b" else TINY
        if {"agreement", "throughput"} & set(wanted):
            made = run("model", 30, lambda s, c: model_section(s, c, Path(tmp), config))
            if made.status == "PASS" and "agreement" in wanted:
                run("agreement", 90, agreement)
            if made.status == "PASS" and "throughput" in wanted:
                run("throughput", 60, throughput)
    log.info("wrote %s (%.0f s)", out / "summary.md", time.monotonic() - start)
    return 0 if all(x.status == "PASS" for x in sections) else 1


if __name__ == "__main__":
    sys.exit(main())
