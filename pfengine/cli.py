"""The ``pfengine`` command: ``demo``, ``eval``, ``distill``, ``generate``, ``trace``, ``serve``, ``bench`` and
``profile``.

Heavy imports (torch, the engine, transformers, uvicorn, the profiler, math-verify) happen inside
the subcommands, so ``pfengine --help`` and argument errors are quick. Without ``--model`` every
command runs the bundled toy policy with its separate PRM (:func:`default_checkpoint`)."""
from __future__ import annotations

import argparse
import codecs
import json
import os
import re
import shlex
import statistics
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from pfengine.config import (AGGREGATIONS, KV_DTYPES, LIKELIHOOD_REDUCTIONS, METHODS, RESAMPLING, SELECTIONS,
                             EngineConfig, InvalidArgument, PRMConfig, SamplingParams, SearchParams)
from pfengine.prompting import NO_DELIMITER
from pfengine.toy.pf import DEMO_TEMPERATURE, PRM_CONFIG, SCALING_RESULTS

if TYPE_CHECKING:
    from pfengine.config import Request
    from pfengine.dp.cluster import Placement
    from pfengine.dp.pool import EnginePool
    from pfengine.engine import Engine
    from pfengine.eval.dataset import Problem
    from pfengine.eval.runner import RequestBuilder, ResultHook, Run
    from pfengine.server import EngineFront
    from pfengine.state import PFResult

TRACE_PROBLEMS = 10
"""``eval --trace-html`` draws this many problems of each run by default."""
TOY_PROMPT = "Start with 47. Add 38. Subtract 29. Add 16. Subtract 45. Add 21. Subtract 30. What is the result?"
"""The default prompt of ``bench`` and ``profile``: a problem of the bundled toy task."""
BENCH_STEPS, BENCH_STEP_TOKENS = 4, 32
"""``bench`` / ``profile`` workload: steps of exactly this many tokens (``--fixed-steps``)."""

FLAGS = {"n_particles": "--particles"}
"""API option -> flag where the flag is not the option's name with dashes."""
EVAL_FLAGS = FLAGS | {"n_particles": "--budgets"}
"""``eval`` runs each budget in --budgets as the requests' ``n_particles``."""
LIMITS = ("max_request_particles", "max_iterations", "max_request_tokens", "max_prompt_chars", "max_overtakes")

PROFILE_SORTS = {"self_cpu_time_total": lambda e: e.self_cpu_time_total,
                 "cpu_time_total": lambda e: e.cpu_time_total, "count": lambda e: e.count}

DESCRIPTION = """\
Particle filtering at inference time: N partial solutions grow one reasoning step at a time, a
process reward model (PRM) scores each step, and the particles are resampled by weight -- all of
them in one paged, copy-on-write KV cache.

Without --model, every command runs the bundled toy model (pfengine/toy/checkpoints): a small
policy for multi-step arithmetic and its separate PRM.
Run `pfengine COMMAND --help` for the options of a command."""


def _default(cls: type, name: str) -> Any:
    """The default of a config dataclass field: the command line and the Python API share them."""
    return next(f.default for f in fields(cls) if f.name == name)


def _escapes(text: str) -> str:
    """Command-line text with backslash escapes (``\\n``) interpreted."""
    return codecs.decode(text, "unicode_escape")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _budgets(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"budgets must be positive, got {text!r}")
    return sorted(set(values))


def _methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",")]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return names


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    num_blocks = _default(EngineConfig, "num_blocks")
    g = p.add_argument_group("engine")
    g.add_argument("--model", metavar="DIR",
                   help="local Hugging Face checkpoint directory of the policy (config.json, safetensors, "
                        "tokenizer.json); default: the bundled toy policy (pfengine/toy/checkpoints) with its "
                        "separate PRM (a teacher read as a likelihood PRM, min)")
    g.add_argument("--prm", metavar="PATH",
                   help="process reward model: a PRM directory (Qwen2.5-Math-PRM layout; a causal LM with "
                        "--prm-likelihood) or a value-head .safetensors file for the policy; needed by every method "
                        "but greedy and self_consistency (default with the bundled policy: its separate PRM, "
                        "pfengine/toy/checkpoints/prm, read with --prm-likelihood min)")
    g.add_argument("--prm-likelihood", choices=LIKELIHOOD_REDUCTIONS, metavar="{min,mean}",
                   help="--prm is a causal LM (the policy's tokenizer) that scores each step by the probability it "
                        "gives the step's least likely token (min) or the geometric mean of its tokens' (mean)")
    g.add_argument("--num-blocks", type=int, default=num_blocks,
                   help="KV-cache blocks per model (policy and PRM each); memory = blocks x block size x layers "
                        f"x KV heads x head dim x 2 (default {num_blocks}, as EngineConfig)")
    g.add_argument("--block-size", type=int, default=_default(EngineConfig, "block_size"),
                   help="tokens per KV block, a power of two (default 16)")
    g.add_argument("--kv-dtype", default=_default(EngineConfig, "kv_dtype"), choices=KV_DTYPES,
                   help="storage type of the KV cache (compute is fp32 on CPU; default float32)")
    g.add_argument("--max-particles", type=int, default=_default(EngineConfig, "max_particles"),
                   help="cache rows: the most particles of all requests alive at once (default 1024)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="cap on prompt + generated tokens (default: the model's max_position_embeddings)")
    g.add_argument("--tensor-parallel-size", type=int, default=_default(EngineConfig, "tensor_parallel_size"),
                   help="split each model across this many processes (spawned here, or the ranks of "
                        "torchrun --nproc-per-node with the same number; default 1)")
    lim = p.add_argument_group("per-request limits (a request over one is refused, naming the limit)")
    lim.add_argument("--max-request-particles", type=int, default=_default(EngineConfig, "max_request_particles"),
                     help="largest budget (particles, all particle Gibbs sweeps together) one request may ask "
                          "for (default %(default)s)")
    lim.add_argument("--max-iterations", type=int, default=_default(EngineConfig, "max_iterations"),
                     help="most particle Gibbs sweeps one request may ask for (default %(default)s)")
    lim.add_argument("--max-request-tokens", type=int, default=_default(EngineConfig, "max_request_tokens"),
                     help="most tokens one request may generate: particles x the per-particle cap "
                          "(default %(default)s)")
    lim.add_argument("--max-prompt-chars", type=int, default=_default(EngineConfig, "max_prompt_chars"),
                     help="longest prompt in characters, checked before tokenising (default %(default)s)")
    lim.add_argument("--max-overtakes", type=int, default=_default(EngineConfig, "max_overtakes"),
                     help="admission: later requests that fit may start before a waiting one that does not fit "
                          "yet at most this many times, then it goes first (default %(default)s)")


def _add_ray_options(p: argparse.ArgumentParser, count: str, what: str) -> None:
    """``count`` (``--workers`` / ``--replicas``): engines on Ray, each in its own process."""
    g = p.add_argument_group("data parallelism on Ray (pip install 'pfengine[ray]')")
    g.add_argument(count, type=_positive, default=1, metavar="K",
                   help=f"{what}; more than 1 (or --ray-address) runs each engine in a Ray actor, on a local cluster "
                        "of this machine unless --ray-address is given (default 1: one engine in this process)")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="run the engines on the Ray cluster there (the address `ray start --head` printed, e.g. "
                        "10.0.0.1:6379; default: $RAY_ADDRESS, else a local cluster started for this command)")
    g.add_argument("--worker-cpus", type=_positive, default=None, metavar="N",
                   help="CPUs each engine reserves, and its torch threads (default 1)")
    g.add_argument("--worker-gpus", type=int, default=None, metavar="G",
                   help="GPUs each engine reserves; with any, the engines run on CUDA (default 0)")


def placement(args: argparse.Namespace, count: str) -> Placement | None:
    """Where the engines of ``eval`` / ``serve`` run: None for one engine in this process."""
    from pfengine.dp.cluster import CPUS_FLAG, GPUS_FLAG, Placement

    engines = getattr(args, count.lstrip("-"))
    if engines == 1 and args.ray_address is None:
        for flag, value in ((CPUS_FLAG, args.worker_cpus), (GPUS_FLAG, args.worker_gpus)):
            if value is not None:
                raise ValueError(f"{flag}: applies to engines on Ray ({count} > 1 or --ray-address)")
        return None
    where = Placement(engines, 1 if args.worker_cpus is None else args.worker_cpus,
                      0 if args.worker_gpus is None else args.worker_gpus, args.ray_address, count)
    if 0 < where.gpus < args.tensor_parallel_size:
        raise ValueError(f"--worker-gpus {where.gpus}: each engine is split over --tensor-parallel-size "
                         f"{args.tensor_parallel_size} GPUs; give each worker that many")
    return where


def _add_request_options(p: argparse.ArgumentParser, sampling: SamplingParams = SamplingParams(),
                         budget: bool = True) -> None:
    """Search and sampling options; their defaults are the API's (``SearchParams()``,
    ``SamplingParams()``) unless ``sampling`` says otherwise. ``budget``: also ``--method`` and
    ``--particles`` (``eval`` has lists of both instead)."""
    search = SearchParams()
    s = p.add_argument_group("search")
    if budget:
        s.add_argument("--method", default=search.method, choices=METHODS,
                       help="search method (default particle_filter); greedy and self_consistency need no PRM")
        s.add_argument("--particles", type=int, default=search.n_particles,
                       help="budget N: particles (PF, PG in total over all sweeps, PT over all chains), samples "
                            f"(best-of-N, self-consistency) or beams (beam search, DVTS) "
                            f"(default {search.n_particles})")
    s.add_argument("--aggregation", default=search.aggregation, choices=AGGREGATIONS,
                   help="how step scores make a particle's weight: model (the PRM reads the whole prefix; "
                        "the paper's best), last, prod or min (default model)")
    s.add_argument("--resampling", default=search.resampling, choices=RESAMPLING,
                   help="resampling scheme (default systematic)")
    s.add_argument("--weight-temperature", type=float, default=search.weight_temperature,
                   help="softmax temperature on the log-weights logit(r) (default 1.0)")
    s.add_argument("--ess-threshold", type=float, default=search.ess_threshold,
                   help="resample only when ESS < threshold x N; 1.0 resamples every round (default 1.0)")
    s.add_argument("--finished", default=search.finished, choices=["freeze", "remove"],
                   help="finished particles keep their weight in resampling (freeze) or leave the pool (remove)")
    s.add_argument("--selection", default=search.selection, choices=SELECTIONS,
                   help="final answer: highest weight, a draw by weight, or the weighted majority vote")
    s.add_argument("--annealing", action="store_true",
                   help="entropic annealing: temper the weights while ESS/N < 0.5 early in the run")
    s.add_argument("--iterations", type=int, default=search.iterations, help="particle Gibbs sweeps (default 1)")
    s.add_argument("--temperatures", type=_floats, default=search.temperatures, metavar="T1,T2,...",
                   help="parallel tempering: one chain per weight temperature (default 1,2)")
    s.add_argument("--beam-width", type=int, default=search.beam_width,
                   help="beam search: keep N/M, expand each M ways; DVTS: N/M subtrees of width M; at most the "
                        f"budget (default {search.beam_width})")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=sampling.temperature,
                   help=f"policy sampling temperature; 0 is greedy (default {sampling.temperature})")
    g.add_argument("--top-p", type=float, default=sampling.top_p, help="nucleus sampling mass (default 1.0: off)")
    g.add_argument("--top-k", type=int, default=sampling.top_k, help="top-k sampling (default 0: off)")
    g.add_argument("--seed", type=int, default=0,
                   help="request seed: the same seed gives the same particles (default 0)")
    g.add_argument("--max-steps", type=int, default=sampling.max_steps,
                   help=f"steps per particle; a particle still going is cut off (default {sampling.max_steps})")
    g.add_argument("--max-step-tokens", type=int, default=sampling.max_step_tokens,
                   help="a step is cut after this many tokens without its delimiter "
                        f"(default {sampling.max_step_tokens})")
    g.add_argument("--max-tokens", type=int, default=sampling.max_tokens,
                   help=f"generated tokens per particle (default {sampling.max_tokens})")
    g.add_argument("--step-delimiter", type=_escapes, default=sampling.step_delimiter,
                   help=r"text that ends a step, backslash escapes allowed (default '\n\n')")


def _add_prompt_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompt")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="send the prompt as a user message through the tokenizer's chat template (default: "
                        "whenever the tokenizer has one, as the bundled model does; --no-chat sends the raw text)")
    g.add_argument("--system-prompt", help="a system message before the prompt (needs the chat template)")


def _add_output_options(p: argparse.ArgumentParser, json_help: str = "print the result as JSON on stdout") -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help=json_help)
    g.add_argument("--no-progress", action="store_true", help="no progress bar (it is drawn on stderr)")


def _add_workload_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--prompt", default=TOY_PROMPT,
                   help="prompt of every request, each with its own seed (default: a problem of the bundled toy task)")
    g.add_argument("--fixed-steps", action=argparse.BooleanOptionalAction, default=True,
                   help="every step exactly --max-step-tokens tokens and every particle exactly --max-steps steps "
                        "(no delimiter, EOS does not stop): a fixed amount of work, the benchmark's (default on; "
                        "--no-fixed-steps lets the model end steps and solutions)")
    g.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfengine", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="PF on the bundled toy model: one traced run, then every method compared",
                          description="On the bundled trained toy model (multi-step arithmetic, pfengine/toy) with "
                                      "its separate PRM: print one problem's particle-filtering run round by round, "
                                      "then export held-out problems as JSON lines (OUT/problems.jsonl) and run "
                                      "`pfengine eval` on them with every method -- greedy, best-of-N, weighted "
                                      "best-of-N, self-consistency, beam search, DVTS and PF -- at several budgets "
                                      "(the eval command is printed; accuracy with 95% intervals, tokens/s, wall time "
                                      "as Markdown, JSON and a PNG plot).")
    demo.add_argument("--problems", type=_positive, default=200,
                      help="held-out problems to evaluate (default 200, the README's table)")
    demo.add_argument("--budgets", type=_budgets, default=[1, 2, 4, 8, 16], metavar="B1,B2,...",
                      help="budgets (particles / samples / beams) to compare (default 1,2,4,8,16; budgets 1-64 on "
                           f"500 problems: {SCALING_RESULTS})")
    demo.add_argument("--prm-kind", choices=["value_head", "model"], default="model",
                      help="the toy PRM to use: the separate PRM model (default: a teacher that solves the task, "
                           "read as a likelihood PRM; the better judge on held-out steps) or the value head on the "
                           "policy")
    demo.add_argument("--particles", type=_positive, default=SearchParams().n_particles,
                      help="particles of the traced run (default 8)")
    demo.add_argument("--temperature", type=float, default=DEMO_TEMPERATURE,
                      help=f"policy sampling temperature of the sampled methods (default {DEMO_TEMPERATURE})")
    demo.add_argument("--seed", type=int, default=0, help="problem k is sampled with seed + k (default 0)")
    demo.add_argument("--out", default="out/demo", help="where problems.jsonl, the results and the summary go")
    demo.add_argument("--no-eval", action="store_true", help="only the traced run, no evaluation")
    demo.add_argument("--trace-html", metavar="DIR",
                      help="where the traced run's genealogy goes (trace.html, and trace.png with matplotlib; "
                           "default: --out)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar (it is drawn on stderr)")

    ev = sub.add_parser("eval", help="evaluate search methods on a problem set at several budgets",
                        description="Solve every problem of DATA (JSON lines with 'problem' and 'answer', and "
                                    "'solution' / 'unique_id' when present: the format of MATH-500, AIME-2024 and "
                                    "AMC-2023) with each --method at each budget, and grade each answer with "
                                    "math-verify. Every (method, budget) runs its problems as one engine batch; "
                                    "problem k is sampled with seed --seed + k. Writes OUT/results.jsonl (one line "
                                    "per problem x method x budget, written as it is graded: a rerun skips what is "
                                    "done), OUT/summary.md and .json (accuracy with Wilson 95% intervals, tokens/s, "
                                    "wall time) and OUT/accuracy_vs_budget.png.")
    ev.add_argument("data", metavar="DATA.jsonl", help="the problem set")
    g = ev.add_argument_group("evaluation")
    g.add_argument("--method", type=_methods, action="extend", metavar="M1,M2,...",
                   help="search method(s), comma-separated or repeated (default particle_filter); greedy runs once, "
                        "at budget 1")
    g.add_argument("--budgets", type=_budgets, default=[1, 4, 16, 64], metavar="B1,B2,...",
                   help="budgets N (particles / samples / beams) (default 1,4,16,64)")
    g.add_argument("--limit", type=_positive, help="only the first LIMIT problems of DATA")
    g.add_argument("--out", help="output directory (default out/eval/<DATA's name>)")
    g.add_argument("--fresh", action="store_true", help="discard earlier results in --out instead of resuming")
    g.add_argument("--trace-html", metavar="DIR",
                   help="also draw the genealogy of each run's first --trace-problems problems: "
                        "DIR/<method>-<budget>/<index>-<id>.html, marking which candidates' answers are right")
    g.add_argument("--trace-problems", type=_positive, default=TRACE_PROBLEMS, metavar="K",
                   help=f"with --trace-html: how many problems of each run to draw (default {TRACE_PROBLEMS})")
    _add_engine_options(ev)
    _add_ray_options(ev, "--workers", "engines the problems are spread over (each runs whole requests; the results "
                                      "equal one engine's)")
    _add_prompt_options(ev)
    _add_request_options(ev, budget=False)
    _add_output_options(ev, json_help="print the summary as JSON on stdout (instead of Markdown)")

    dis = sub.add_parser("distill", help="train the policy's value head from a separate PRM's scores on PF traces",
                         description="Run particle filtering with the separate PRM (--prm, a PRM directory) on "
                                     "training prompts, record every state the filter scored with the PRM's "
                                     "probability for it, and fit a value head on the policy's hidden states to "
                                     "those probabilities: PF then runs with --prm OUT and no PRM model. Prompts: "
                                     "the 'problem' of each line of DATA (the format of `pfengine eval`), or "
                                     "without DATA --limit training problems of the bundled toy task.")
    dis.add_argument("data", metavar="DATA.jsonl", nargs="?", help="training prompts (default: toy training problems)")
    dis.add_argument("--out", required=True, metavar="HEAD.safetensors", help="where the value head is written")
    dis.add_argument("--limit", type=_positive, default=256,
                     help="prompts to trace: the first LIMIT of DATA, or this many toy problems (default 256)")
    dis.add_argument("--epochs", type=_positive, default=20, help="passes over the recorded states (default 20)")
    dis.add_argument("--threads", type=_positive, help="torch CPU threads (default: torch's)")
    _add_engine_options(dis)
    _add_prompt_options(dis)
    _add_request_options(dis)
    _add_output_options(dis, json_help="print the report as JSON on stdout")

    gen = sub.add_parser("generate", help="solve one prompt with a local checkpoint",
                         description="Run one request to completion and print the extracted answer with a table "
                                     "of the particles (weight, PRM score, steps, how each ended, answer, text), or "
                                     "everything as JSON.")
    _add_engine_options(gen)
    gen.add_argument("--prompt", required=True, help="the problem text ('-' reads it from stdin)")
    gen.add_argument("--trace-html", metavar="DIR",
                     help="also write the run's genealogy to DIR (trace.html: open it in a browser; trace.png "
                          "with matplotlib)")
    _add_prompt_options(gen)
    _add_request_options(gen)
    _add_output_options(gen)

    tr = sub.add_parser("trace", help="draw a run's genealogy: a self-contained HTML page and a PNG",
                        description="Run one request as `generate` does (or read a saved result with --result) and "
                                    "draw its genealogy: rounds left to right, one node per distinct particle per "
                                    "round (identical copies are one node with a count), sized by weight and "
                                    "coloured by PRM score, edges from ancestor to child, the ESS of every round, "
                                    "the chosen particle's path; hover or click a node for its step and text. "
                                    "Writes NAME.html (no network needed: open it from disk), NAME.png (needs "
                                    "matplotlib: pip install 'pfengine[viz]') and NAME.json (the result, to "
                                    "draw again with --result).")
    _add_engine_options(tr)
    g = tr.add_argument_group("trace")
    g.add_argument("--prompt", help="the problem text ('-' reads it from stdin)")
    g.add_argument("--result", metavar="FILE",
                   help="draw a saved result instead of running one: the JSON of `pfengine generate --json` or the "
                        "NAME.json this command writes (its tokens are decoded with --model's tokenizer)")
    g.add_argument("--reference", metavar="ANSWER",
                   help="the right final answer: marks each candidate and the chosen one correct or wrong")
    g.add_argument("--out", default="out/trace", help="output directory (default out/trace)")
    g.add_argument("--name", default="trace", help="file name stem (default trace)")
    g.add_argument("--no-png", action="store_true", help="only the HTML page")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (it is drawn on stderr)")
    _add_prompt_options(tr)
    _add_request_options(tr)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                         description="Serve one engine over HTTP: GET /v1/models, POST /v1/completions, POST "
                                     "/v1/chat/completions (stream: true for SSE), GET /health. Plain requests are "
                                     "ordinary completions (n samples); the extension object "
                                     "\"search\": {\"method\": \"particle_filter\", \"particles\": 16, ...} selects a "
                                     "search method. See pfengine/server.py for the schema.")
    _add_engine_options(srv)
    g = srv.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    g.add_argument("--served-model-name",
                   help="model id clients send and /v1/models lists (default: the checkpoint directory's name)")
    g.add_argument("--api-key", default=os.environ.get("PFENGINE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every /v1/* route (default: $PFENGINE_API_KEY; "
                        "none: no authentication, fine on loopback only)")
    g.add_argument("--allowed-hosts", type=lambda t: tuple(h.strip().lower() for h in t.split(",") if h.strip()),
                   default=(), metavar="HOST,HOST",
                   help="Host header values to accept, e.g. localhost,127.0.0.1 (against DNS rebinding; default: any)")
    g.add_argument("--max-body-bytes", type=int, default=4 << 20,
                   help="largest request body; larger ones get 413 before parsing (default %(default)s)")
    g.add_argument("--max-completions", type=int, default=128,
                   help="most completions (prompts x n) one HTTP request may ask for (default %(default)s)")
    g.add_argument("--enable-docs", action="store_true", help="serve /docs and /openapi.json (off by default)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default info)")
    _add_ray_options(srv, "--replicas", "engine replicas behind the one endpoint (a request runs on the least loaded; "
                                        "Ray restarts a replica that dies)")

    bench = sub.add_parser("bench", help="time N requests of one shape and report tokens/s",
                           description="Submit --requests requests of the same shape (up to --concurrency in flight; "
                                       "they batch together), run them to completion and report generated tokens/s, "
                                       "tokens forwarded/s and request latencies. By default every particle "
                                       f"generates exactly {BENCH_STEPS} steps of {BENCH_STEP_TOKENS} tokens "
                                       "(--fixed-steps), so the work is known whatever the model; the report says "
                                       "what was measured. A warm-up request runs first.")
    _add_engine_options(bench)
    g = bench.add_argument_group("workload")
    g.add_argument("--requests", type=_positive, default=8, help="number of requests (default 8)")
    g.add_argument("--concurrency", type=int, default=0, help="requests in flight at once (default 0: all)")
    _add_workload_options(g)
    g.add_argument("--suite", action="store_true",
                   help="run the comparison benchmark instead (pfengine vs its_hub-style PF, transformers PF, "
                        "llama.cpp, vLLM; bench/harness.py in a source checkout): every option after --suite goes "
                        "to it, e.g. `pfengine bench --suite --quick`; `pfengine bench --suite --help` lists them")
    _add_prompt_options(bench)
    _add_request_options(bench, SamplingParams(max_steps=BENCH_STEPS, max_step_tokens=BENCH_STEP_TOKENS))
    _add_output_options(bench)

    prof = sub.add_parser("profile", help="profile requests with torch.profiler",
                          description="Run one request (or --prompts of them) under torch.profiler (after an "
                                      "unprofiled warm-up), write a Chrome trace JSON (open it in Perfetto, "
                                      "https://ui.perfetto.dev, or chrome://tracing), print the top operators and a "
                                      "phase table (prefill / decode forward / PRM decode / sampling / PRM scoring / "
                                      "resample+fork / other) computed from the trace's pfengine::* ranges. Kernel "
                                      "launches are labelled pfengine::<kernel>. The workload is bench's: by default "
                                      f"{BENCH_STEPS} steps of exactly {BENCH_STEP_TOKENS} tokens per particle.")
    _add_engine_options(prof)
    g = prof.add_argument_group("profile")
    g.add_argument("--out", default="pfengine-trace.json",
                   help="Chrome trace file to write, for Perfetto or chrome://tracing (default pfengine-trace.json)")
    g.add_argument("--row-limit", type=int, default=20, help="rows of the top-operators table (default 20)")
    g.add_argument("--sort", default="self_cpu_time_total", choices=sorted(PROFILE_SORTS),
                   help="column the table is sorted by (default self_cpu_time_total)")
    g.add_argument("--record-shapes", action="store_true", help="record input shapes (larger trace)")
    g.add_argument("--prompts", type=_positive, default=1,
                   help="requests run together, one seed each (default 1); the phase table covers all of them")
    _add_workload_options(g)
    _add_prompt_options(prof)
    _add_request_options(prof, SamplingParams(max_steps=BENCH_STEPS, max_step_tokens=BENCH_STEP_TOKENS))
    _add_output_options(prof)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"] and "--suite" in argv:
        return run_suite([a for a in argv[1:] if a != "--suite"])
    parser = build_parser()
    args = parser.parse_args(argv)
    from pfengine.model.checkpoint import CheckpointError

    try:
        return {"demo": cmd_demo, "eval": cmd_eval, "distill": cmd_distill, "generate": cmd_generate, "trace": cmd_trace, "serve": cmd_serve,
                "bench": cmd_bench, "profile": cmd_profile}[args.command](args)
    except InvalidArgument as e:
        flags = EVAL_FLAGS if args.command == "eval" else FLAGS
        print(f"pfengine {args.command}: error: {e.render(lambda field: flag_of(field, flags))}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, CheckpointError) as e:
        print(f"pfengine {args.command}: error: {e}", file=sys.stderr)
        return 2


def flag_of(field: str, flags: dict[str, str] = FLAGS) -> str:
    """The command-line flag of an API option named in an error (``n_particles`` -> ``--particles``)."""
    return flags.get(field, "--" + field.replace("_", "-")) if field.isidentifier() else field


# ------------------------------------------------------------------------------------------------
# Building engines, prompts and requests from options


def make_engine(args: argparse.Namespace) -> Engine:
    from pfengine.engine import Engine

    return Engine(engine_config(args))


def engine_config(args: argparse.Namespace) -> EngineConfig:
    model, prm, likelihood = args.model, args.prm, args.prm_likelihood
    if model is None:
        model, default_prm = default_checkpoint()
        if prm is None:
            prm, likelihood = default_prm, likelihood or PRM_CONFIG.likelihood
    print(f"Model: {model}" + (f" + PRM {prm}" if prm else " (no PRM)"),
          file=sys.stderr if getattr(args, "json", False) else sys.stdout)
    limits = {name: getattr(args, name) for name in LIMITS}
    return EngineConfig(model=model, prm=prm, prm_config=PRMConfig(likelihood=likelihood),
                        num_blocks=args.num_blocks, block_size=args.block_size,
                        kv_dtype=args.kv_dtype, max_particles=args.max_particles, max_model_len=args.max_model_len,
                        tensor_parallel_size=args.tensor_parallel_size, **limits)


@contextmanager
def engine_pool(args: argparse.Namespace, where: Placement) -> Iterator[EnginePool]:
    """The engines of ``where``, started, while Ray is connected."""
    from pfengine.dp.cluster import connected, require_ray

    require_ray(where.option)  # before importing the pool, which imports ray
    from pfengine.dp.pool import EnginePool

    with connected(where):
        pool = EnginePool(engine_config(args), where)
        pool.start()
        for r in pool.replicas:
            print(f"engine {r.index}: pid {r.pid} on {r.host}, {r.threads} torch thread(s)"
                  f"{f', {where.gpus} GPU(s)' if where.gpus else ''}", file=sys.stderr)
        yield pool


def default_checkpoint() -> tuple[str, str]:
    """(policy, PRM) used when no --model is given: the bundled toy policy and its separate PRM, a
    teacher read as a likelihood PRM (README, "The bundled toy model")."""
    from pfengine.toy.pf import POLICY, PRM, is_bundled

    if not is_bundled():
        raise ValueError("--model: not given, and the bundled toy checkpoints (pfengine/toy/checkpoints) are missing "
                         "from this installation")
    return str(POLICY), str(PRM)


def use_chat(engine: EngineFront, chat: bool | None) -> bool:
    """``--chat`` / ``--no-chat``, or (neither given) whether the tokenizer has a chat template."""
    has_template = bool(getattr(engine.tokenizer, "chat_template", None))
    if chat and not has_template:
        raise ValueError("--chat: the model's tokenizer has no chat template")
    return has_template if chat is None else chat


def make_prompt(engine: EngineFront, args: argparse.Namespace, text: str) -> str | list[dict]:
    """``text`` as chat messages (with the system prompt) when the chat template is used, else as is."""
    if not use_chat(engine, args.chat):
        if args.system_prompt:
            raise ValueError("--system-prompt: needs the chat template (the prompt is sent as raw text)")
        return text
    system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    return system + [{"role": "user", "content": text}]


def make_request(args: argparse.Namespace, prompt: str | list[dict], seed: int | None = None,
                 method: str | None = None, budget: int | None = None) -> Request:
    """A request from the search / sampling options; ``method`` and ``budget`` default to
    ``--method`` and ``--particles``."""
    from pfengine.config import Request

    return Request(prompt=prompt, sampling=make_sampling(args, args.seed if seed is None else seed),
                   search=make_search(args, method or args.method, args.particles if budget is None else budget))


def make_sampling(args: argparse.Namespace, seed: int) -> SamplingParams:
    fixed = getattr(args, "fixed_steps", False)
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=seed,
                          max_steps=args.max_steps, max_step_tokens=args.max_step_tokens, max_tokens=args.max_tokens,
                          step_delimiter=NO_DELIMITER if fixed else args.step_delimiter, stop_on_eos=not fixed)


def make_search(args: argparse.Namespace, method: str, budget: int) -> SearchParams:
    return SearchParams(method=method, n_particles=budget, aggregation=args.aggregation, resampling=args.resampling,
                        weight_temperature=args.weight_temperature, ess_threshold=args.ess_threshold,
                        finished=args.finished, selection=args.selection, annealing=args.annealing,
                        iterations=args.iterations, temperatures=tuple(args.temperatures),
                        beam_width=min(args.beam_width, budget))


def _progress(total: int | None, desc: str, unit: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, leave=False, dynamic_ncols=True,
                delay=0.5)


def run_with_progress(engine: Engine, request: Request, disable: bool = False) -> PFResult:
    """Run one request, a progress bar advancing per finished round."""
    rounds = request.sampling.max_steps * request.search.iterations
    with _progress(rounds, f"{request.search.method} x{request.search.n_particles}", "round", disable) as bar:
        for event in engine.stream(request):
            if event.trace is not None:
                bar.update(1)
                bar.set_postfix(ess=f"{event.trace.ess:.2f}", tokens=sum(len(t) for t in event.trace.tokens))
            if event.result is not None:
                return event.result
    raise RuntimeError("request ended without a result")


# ------------------------------------------------------------------------------------------------
# Commands


def cmd_demo(args: argparse.Namespace) -> int:
    """A preset of ``eval`` on the bundled toy task, after one traced PF run."""
    from pfengine.eval.dataset import read_problems
    from pfengine.toy import demo
    from pfengine.toy.pf import PRM, VALUE_HEAD, pf_request
    from pfengine.toy.task import extract_answer, heldout_set

    out = Path(args.out)
    problems = heldout_set(args.problems)
    prm, likelihood = (VALUE_HEAD, None) if args.prm_kind == "value_head" else (PRM, PRM_CONFIG.likelihood)
    argv = demo.eval_argv(out / "problems.jsonl", args.budgets, args.temperature, args.seed, prm, likelihood, out)
    eval_args = build_parser().parse_args(argv + (["--no-progress"] if args.no_progress else []))
    engine = make_engine(eval_args)
    print(f"Sampling temperature {args.temperature}\n")
    traced = demo.hard_problem(engine, problems[:50], args.particles, args.seed, args.temperature)
    request = pf_request(traced, args.particles, args.seed, args.temperature)
    result = demo.trace_one(engine, request, traced)
    _write_genealogy(args.trace_html or args.out, result, request, engine,
                     grade=lambda text: extract_answer(text) == traced.answer)
    if args.no_eval:
        return 0
    path = demo.export(problems, Path(eval_args.data))
    print(f"Every method on {len(problems)} held-out problems: pfengine {shlex.join(argv)}\n")
    code = run_eval(eval_args, engine, read_problems(path))
    print(f"\nBudgets 1-64 on 500 held-out problems, and PF with a value head distilled from the PRM "
          f"(pfengine distill): {SCALING_RESULTS} and the README")
    return code


def cmd_eval(args: argparse.Namespace) -> int:
    from pfengine.eval.dataset import read_problems

    where = placement(args, "--workers")  # bad options and bad data fail before the model loads
    if args.trace_problems != TRACE_PROBLEMS and not args.trace_html:
        raise ValueError("--trace-problems: only with --trace-html DIR (it says how many problems to draw)")
    if args.trace_html:
        try:
            Path(args.trace_html).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--trace-html {args.trace_html}: cannot create it ({e.strerror})") from None
    problems = read_problems(args.data)[:args.limit]
    if where is None:
        return run_eval(args, make_engine(args), problems)
    with engine_pool(args, where) as pool:
        return run_eval(args, pool.front, problems, pool)


def run_eval(args: argparse.Namespace, engine: EngineFront, problems: list[Problem], pool: EnginePool | None = None
             ) -> int:
    """Evaluate on ``engine``, or on ``pool`` (whose front ``engine`` is)."""
    from pfengine.eval import report, runner

    methods = args.method or [SearchParams().method]
    runs = runner.plan_runs(methods, args.budgets)
    out = Path(args.out or Path("out/eval") / Path(args.data).stem)
    chat = use_chat(engine, args.chat)
    runner.prepare_out(out, eval_settings(args, engine, chat), args.fresh)
    build = eval_requests(args, engine)
    trace = _eval_tracer(args.trace_html, args.trace_problems, engine) if args.trace_html else None
    if pool is None:
        records = runner.evaluate(engine, problems, runs, build, args.seed, out, progress=not args.no_progress,
                                  on_result=trace)
    else:
        from pfengine.dp.eval import evaluate_on_pool

        records = evaluate_on_pool(pool, problems, runs, build, args.seed, out, progress=not args.no_progress,
                                   on_result=trace)
    rows = report.summarise(records, [(r.method, r.budget) for r in runs])
    paths = report.write(rows, out, title=f"pfengine on {Path(args.data).name} ({len(problems)} problems)")
    if args.json:
        print(paths[1].read_text())
    else:
        print(report.markdown(rows))
        note = "" if len(paths) > 2 else " (no plot: it needs matplotlib, pip install 'pfengine[viz]')"
        print(f"\nWrote {out / runner.RESULTS}, " + ", ".join(str(p) for p in paths) + note)
    return 0


def eval_requests(args: argparse.Namespace, engine: EngineFront) -> RequestBuilder:
    """How ``eval`` turns a problem of a run into a request: the prompt options, the run's method and
    budget, the sampling and search options, the given seed; the problem's reference answer, for PF's
    expected accuracy."""
    def build(problem: Problem, run: Run, seed: int) -> Request:
        request = make_request(args, make_prompt(engine, args, problem.problem), seed, run.method, run.budget)
        return replace(request, reference_answer=problem.answer)

    return build


def _eval_tracer(out_dir: str, limit: int, engine: EngineFront) -> ResultHook:
    """Draw the genealogy (HTML only: a PNG per problem would cost more than the run) of each
    finished request among the first ``limit`` problems, graded against the problem's reference."""
    from pfengine import genealogy
    from pfengine.eval.grading import grade

    def trace(index: int, problem: Problem, run: Run, request: Request, result: PFResult) -> None:
        if index < limit:
            name = f"{index:04d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', problem.unique_id)[:80]}"
            genealogy.write_result(result, request, engine.detokenize, Path(out_dir) / f"{run.method}-{run.budget}",
                                   name, grade=lambda text: grade(problem.answer, text).correct, png=False)

    return trace


def eval_settings(args: argparse.Namespace, engine: EngineFront, chat: bool) -> dict:
    """Everything that decides an evaluation's results but its methods, budgets and problem count:
    a rerun resumes only under the same settings."""
    search = asdict(make_search(args, SearchParams().method, 1))
    for varying in ("method", "n_particles", "beam_width"):
        del search[varying]
    return {"data": str(Path(args.data).resolve()), "model": engine.config.model, "prm": engine.config.prm,
            "chat": chat, "system_prompt": args.system_prompt, "beam_width": args.beam_width,
            "sampling": asdict(make_sampling(args, args.seed)), "search": search}


def cmd_distill(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from pfengine import distill
    from pfengine.eval.dataset import read_problems

    if not str(args.out).endswith(".safetensors"):
        raise ValueError(f"--out {args.out!r}: expected a .safetensors file name")
    texts = ([p.problem for p in read_problems(args.data)[:args.limit]] if args.data
             else distill.toy_problems(args.limit, args.seed))
    if args.threads:
        torch.set_num_threads(args.threads)
    prm = args.prm or (None if args.model else default_checkpoint()[1])
    if prm is None or not Path(prm).is_dir():
        raise ValueError(f"--prm {prm!r}: expected a PRM checkpoint directory (distill learns from a separate PRM)")
    engine = make_engine(args)
    requests = [make_request(args, make_prompt(engine, args, text), args.seed + k) for k, text in enumerate(texts)]
    start = time.perf_counter()
    with _progress(len(requests), "distill: PF traces", "prompt", args.no_progress) as bar:
        trajs = distill.collect(engine, requests, progress=bar.update)
    seconds_trace = time.perf_counter() - start
    policy = AutoModelForCausalLM.from_pretrained(engine.config.model, dtype=torch.float32)
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    head, report = distill.distill(policy, engine.tokenizer.pad_token_id or 0, trajs,
                                   distill.FitConfig(epochs=args.epochs, seed=args.seed), log)
    distill.save_head(head, args.out)
    report |= {"prompts": len(requests), "particles": args.particles, "aggregation": args.aggregation,
               "seconds_trace": seconds_trace, "seconds_total": time.perf_counter() - start}
    print(json.dumps(report, indent=1))
    if not args.json:
        print(f"Wrote {args.out}: PF without the PRM model runs with --model {engine.config.model} --prm {args.out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    engine = make_engine(args)
    request = make_request(args, make_prompt(engine, args, text))
    start = time.perf_counter()
    result = run_with_progress(engine, request, disable=args.no_progress)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps(asdict(result) | {"seconds": seconds, "engine": engine.stats(), "prompt": request.prompt,
                                           "search": asdict(request.search)}, indent=1))
    else:
        print_result(result, engine.stats(), seconds)
    if args.trace_html:
        _write_genealogy(args.trace_html, result, request, engine)
    return 0


def _write_genealogy(out_dir: str, result: PFResult, request: Request, engine: Engine,
                     grade: Callable[[str], bool] | None = None) -> None:
    from pfengine import genealogy

    paths = genealogy.write_result(result, request, engine.detokenize, out_dir, grade=grade)
    note = "" if len(paths) > 1 else " (no PNG: it needs matplotlib, pip install 'pfengine[viz]')"
    print(f"Genealogy: {', '.join(map(str, paths))}{note}", file=sys.stderr)


def cmd_trace(args: argparse.Namespace) -> int:
    from pfengine import genealogy

    if (args.prompt is None) == (args.result is None):
        raise ValueError("give --prompt (run a request) or --result FILE (draw a saved one), not both")
    if not args.no_png and not genealogy.can_draw_png():
        raise ValueError("the PNG needs matplotlib: pip install 'pfengine[viz]', or pass --no-png")
    grade = genealogy.grader(args.reference) if args.reference is not None else None
    if args.result is not None:
        unused = _options_set(args, "trace", keep={"result", "model", "reference", "out", "name", "no_png"})
        if unused:
            raise ValueError(f"--result draws a saved run; {', '.join(unused)} would not be used")
        run = genealogy.from_json(_read_json(args.result), args.result, grade)
        detokenize = _tokenizer_decode(args.model)
    else:
        engine = make_engine(args)
        text = sys.stdin.read() if args.prompt == "-" else args.prompt
        request = make_request(args, make_prompt(engine, args, text))
        result = run_with_progress(engine, request, disable=args.no_progress)
        run = genealogy.from_result(result, request.search, request.prompt, grade)
        detokenize = engine.detokenize
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        saved = asdict(result) | {"prompt": request.prompt, "search": asdict(request.search)}
        (out / f"{args.name}.json").write_text(json.dumps(saved))
    paths = genealogy.write(run, detokenize, args.out, args.name, png=not args.no_png)
    print(f"{run.verdict}\nWrote {', '.join(map(str, paths))}")
    return 0


def _options_set(args: argparse.Namespace, command: str, keep: set[str]) -> list[str]:
    """The options outside ``keep`` given a value other than their default, as --flags."""
    defaults = vars(build_parser().parse_args([command]))
    return [f"--{name.replace('_', '-')}" for name, value in vars(args).items()
            if name not in keep and value != defaults.get(name)]


def _read_json(path: str) -> object:
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"--result {path}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--result {path}: not JSON ({e})") from None


def _tokenizer_decode(model: str | None) -> Callable[[list[int]], str]:
    from pfengine.model.tokenizer import load_tokenizer
    from pfengine.toy.pf import POLICY

    tokenizer = load_tokenizer(model or str(POLICY))
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def ending(finish_reason: str) -> str:
    return finish_reason if finish_reason == "eos" else f"cut: {finish_reason}"


def print_result(result: PFResult, stats: dict[str, int], seconds: float) -> None:
    if result.trace:
        print("\nRounds (score -> weights -> resample):")
        print(f"{'round':>5} {'sweep':>5} {'ESS':>6}  ancestors")
        for k, tr in enumerate(result.trace):
            anc = tr.ancestors if tr.ancestors is not None else "(not resampled)"
            print(f"{k + 1:>5} {tr.sweep:>5} {tr.ess:>6.2f}  {anc}")
    print(f"\nParticles ({result.method}; * = chosen; end: eos = the model ended it, cut = a limit did):")
    print(f"{'#':>3}  {'weight':>7} {'score':>6} {'steps':>5} {'tokens':>6} {'end':>16} {'answer':>8}  text")
    for i, p in enumerate(result.particles):
        mark = "*" if i == result.best else " "
        answer = "-" if p.answer is None else p.answer[:8]
        print(f"{i:>2}{mark}  {p.weight:>7.3f} {p.score:>6.3f} {len(p.steps):>5} {len(p.token_ids):>6} "
              f"{ending(p.finish_reason):>16} {answer:>8}  {p.text[:60]!r}")
    s, best = result.stats, result.particles[result.best]
    print(f"\nAnswer: {result.answer if result.answer is not None else '(none found)'}   "
          f"(particle {result.best}, {ending(best.finish_reason)})")
    if best.cut_off:
        print(f"  (a limit cut it off before the model ended it: raise --{best.finish_reason.replace('_', '-')})")
    print(f"Text: {result.text!r}")
    print(f"{s.prompt_tokens} prompt + {s.generated_tokens} generated tokens in {seconds:.2f} s "
          f"({s.generated_tokens / max(seconds, 1e-9):.0f} tok/s), {s.steps} rounds, {s.resamples} resamples")
    print("engine: " + ", ".join(f"{k}={v}" for k, v in stats.items()))


def cmd_serve(args: argparse.Namespace) -> int:
    for flag in ("max_body_bytes", "max_completions"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key must not be empty")
    where = placement(args, "--replicas")
    if where is None:
        return _serve(args, make_engine(args))
    with engine_pool(args, where) as pool:
        return _serve(args, pool.front, pool)


def _serve(args: argparse.Namespace, engine: EngineFront, pool: EnginePool | None = None) -> int:
    from pfengine.http_gate import GateConfig
    from pfengine.server import ServerConfig, serve

    config = ServerConfig(served_model_name=args.served_model_name,
                          gate=GateConfig(api_key=args.api_key, allowed_hosts=args.allowed_hosts,
                                          max_body_bytes=args.max_body_bytes),
                          max_completions=args.max_completions, enable_docs=args.enable_docs)
    name = args.served_model_name or Path(engine.config.model).name
    replicas = f" from {len(pool.replicas)} engine replicas" if pool is not None else ""
    print(f"pfengine: serving {name}{replicas} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if args.api_key else ''}", file=sys.stderr)
    serve(engine, host=args.host, port=args.port, config=config, log_level=args.log_level, aengine=pool)
    return 0


def workload(args: argparse.Namespace, requests: int) -> dict:
    """What ``bench`` / ``profile`` measure, in numbers and in words."""
    shape = {"requests": requests, "method": args.method, "particles": args.particles, "fixed_steps": args.fixed_steps,
             "max_steps": args.max_steps, "max_step_tokens": args.max_step_tokens}
    if args.fixed_steps:
        steps = (f"every particle {args.max_steps} steps of exactly {args.max_step_tokens} tokens (EOS and the step "
                 "delimiter ignored)")
    else:
        steps = (f"steps ended by the model, at most {args.max_steps} of at most {args.max_step_tokens} tokens "
                 "(--no-fixed-steps)")
    return shape | {"text": f"{requests} request(s) x {args.particles} particles ({args.method}), {steps}"}


def ended_by(results: list[PFResult]) -> dict[str, int]:
    return dict(Counter(p.finish_reason for r in results for p in r.particles))


def cmd_bench(args: argparse.Namespace) -> int:
    engine = make_engine(args)
    prompt = make_prompt(engine, args, args.prompt)
    for k in range(args.warmup):
        engine.generate([make_request(args, prompt, seed=10_000 + k)])
    before = engine.stats()
    requests = [make_request(args, prompt, seed=args.seed + k) for k in range(args.requests)]
    limit = args.concurrency if args.concurrency > 0 else len(requests)
    submitted: dict[int, float] = {}
    latencies: list[float] = []
    results: list[PFResult] = []
    queue = list(requests)
    start = time.perf_counter()
    with _progress(len(requests), "bench", "req", args.no_progress) as bar:
        while queue or submitted:
            while queue and len(submitted) < limit:
                submitted[engine.add_request(queue.pop(0))] = time.perf_counter()
            for event in engine.step():
                if event.error is not None:
                    raise event.error
                if event.result is not None and event.request_id in submitted:
                    latencies.append(time.perf_counter() - submitted.pop(event.request_id))
                    results.append(event.result)
                    bar.update(1)
    seconds = time.perf_counter() - start
    after = engine.stats()
    generated = sum(r.stats.generated_tokens for r in results)
    forwarded = after["policy_tokens_forwarded"] - before["policy_tokens_forwarded"]
    report = {"workload": workload(args, len(requests)), "concurrency": limit, "seconds": seconds,
              "generated_tokens": generated, "generated_tokens_per_s": generated / seconds,
              "particles_ended_by": ended_by(results),
              "policy_tokens_forwarded": forwarded, "policy_tokens_forwarded_per_s": forwarded / seconds,
              "requests_per_s": len(requests) / seconds,
              "latency_p50_s": statistics.median(latencies),
              "latency_p90_s": sorted(latencies)[min(len(latencies) - 1, int(0.9 * len(latencies)))],
              "preemptions": after["preemptions"] - before["preemptions"]}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"Workload: {report['workload']['text']}; {limit} in flight")
    print(f"  {seconds:.2f} s, {report['requests_per_s']:.2f} req/s, latency p50 {report['latency_p50_s']:.2f} s "
          f"p90 {report['latency_p90_s']:.2f} s")
    print(f"  generated {generated} tokens: {report['generated_tokens_per_s']:.0f} tok/s; particles ended by "
          + ", ".join(f"{k} {v}" for k, v in sorted(report["particles_ended_by"].items())))
    print(f"  policy forwarded {forwarded} tokens: {report['policy_tokens_forwarded_per_s']:.0f} tok/s "
          f"(shared prefixes are forwarded once), preemptions {report['preemptions']}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pfengine.profiling import format_phase_table, phase_table

    engine = make_engine(args)
    prompt = make_prompt(engine, args, args.prompt)
    requests = [make_request(args, prompt, seed=args.seed + k) for k in range(args.prompts)]
    for k in range(args.warmup):
        engine.generate([make_request(args, prompt, seed=10_000 + k) for _ in range(args.prompts)])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=args.record_shapes) as prof:
        start = time.perf_counter()
        if args.prompts == 1:
            results = [run_with_progress(engine, requests[0], disable=args.no_progress)]
        else:
            results = engine.generate(requests)
        seconds = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out))
    table = phase_table(out, seconds)
    generated = sum(r.stats.generated_tokens for r in results)
    averages = prof.key_averages()
    sort = args.sort
    shape = workload(args, args.prompts)
    if args.json:
        rows = sorted(averages, key=PROFILE_SORTS[sort], reverse=True)
        top = [{"name": e.key, "count": e.count, "self_cpu_us": e.self_cpu_time_total, "cpu_total_us": e.cpu_time_total}
               for e in rows[:args.row_limit]]
        print(json.dumps({"workload": shape, "trace": str(out), "seconds": seconds, "generated_tokens": generated,
                          "particles_ended_by": ended_by(results), "phases": table["phases"],
                          "ranges": table["ranges"], "engine": engine.stats(), "top_ops": top}, indent=1))
        return 0
    print(averages.table(sort_by=sort, row_limit=args.row_limit))
    print(format_phase_table(table))
    print(f"\nWorkload: {shape['text']}")
    print(f"{generated} tokens in {seconds:.2f} s (profiled, {generated / max(seconds, 1e-9):.0f} tok/s); particles "
          "ended by " + ", ".join(f"{k} {v}" for k, v in sorted(ended_by(results).items())))
    print(f"Chrome trace: {out} (open in https://ui.perfetto.dev or chrome://tracing)")
    return 0


def run_suite(argv: list[str]) -> int:
    """``pfengine bench --suite ...``: the comparison harness of a source checkout (``python -m bench``
    there, in its own process: the installed package never imports the repository's bench/)."""
    repo = Path(__file__).resolve().parent.parent
    if not (repo / "bench" / "harness.py").is_file():
        print("pfengine bench --suite: needs a source checkout (bench/harness.py next to the pfengine package)",
              file=sys.stderr)
        return 2
    import subprocess

    return subprocess.call([sys.executable, "-m", "bench", *argv], cwd=repo)

if __name__ == "__main__":
    sys.exit(main())
