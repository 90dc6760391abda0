"""The ``pfengine`` command: ``demo``, ``generate``, ``trace``, ``serve``, ``bench`` and ``profile``.

Heavy imports (the engine, transformers, uvicorn, the profiler) happen inside the subcommands, so
``pfengine --help`` is quick."""
from __future__ import annotations

import argparse
import codecs
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pfengine.config import AGGREGATIONS, KV_DTYPES, METHODS, RESAMPLING, SELECTIONS, EngineConfig, InvalidArgument
from pfengine.toy.pf import DEMO_TEMPERATURE

if TYPE_CHECKING:
    from pfengine.config import Request
    from pfengine.engine import Engine
    from pfengine.state import PFResult

DEMO_DIR = Path(".cache/demo-model")
FIXED_STEP_DELIMITER = "\x00\x00pfbench:no-step-delimiter\x00\x00"
"""With ``--fixed-steps``: a delimiter no model emits, so every step is exactly --max-step-tokens long."""
DEMO_PROMPT = "Step 1: add 17 and 25."

FLAGS = {"n_particles": "--particles"}
LIMITS = ("max_request_particles", "max_iterations", "max_request_tokens", "max_prompt_chars", "max_overtakes")
"""API option -> flag where the flag is not the option's name with dashes."""

PROFILE_SORTS = {"self_cpu_time_total": lambda e: e.self_cpu_time_total,
                 "cpu_time_total": lambda e: e.cpu_time_total, "count": lambda e: e.count}

DESCRIPTION = """\
Particle filtering at inference time: N partial solutions grow one reasoning step at a time, a
process reward model (PRM) scores each step, and the particles are resampled by weight -- all of
them in one paged, copy-on-write KV cache.

Run `pfengine COMMAND --help` for the options of a command."""


def _escapes(text: str) -> str:
    """Command-line text with backslash escapes (``\\n``) interpreted."""
    return codecs.decode(text, "unicode_escape")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", metavar="DIR",
                   help="local Hugging Face checkpoint directory of the policy (config.json, safetensors, "
                        "tokenizer.json); default: the bundled toy policy (pfengine/toy/checkpoints) with its value "
                        "head as PRM")
    g.add_argument("--prm", metavar="PATH",
                   help="process reward model: a PRM directory (Qwen2.5-Math-PRM layout) or a value-head "
                        ".safetensors file for the policy; needed by every method but greedy and self_consistency")
    g.add_argument("--num-blocks", type=int, default=2048,
                   help="KV-cache blocks per model (policy and PRM each); memory = blocks x block size x layers "
                        "x KV heads x head dim x 2 (default 2048)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block, a power of two (default 16)")
    g.add_argument("--kv-dtype", default="float32", choices=sorted(KV_DTYPES),
                   help="storage type of the KV cache (compute is fp32 on CPU; default float32)")
    g.add_argument("--max-particles", type=int, default=1024,
                   help="cache rows: the most particles of all requests alive at once (default 1024)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="cap on prompt + generated tokens (default: the model's max_position_embeddings)")
    d = EngineConfig.__dataclass_fields__
    lim = p.add_argument_group("per-request limits (a request over one is refused, naming the limit)")
    lim.add_argument("--max-request-particles", type=int, default=d["max_request_particles"].default,
                     help="largest budget (particles, all particle Gibbs sweeps together) one request may ask "
                          "for (default %(default)s)")
    lim.add_argument("--max-iterations", type=int, default=d["max_iterations"].default,
                     help="most particle Gibbs sweeps one request may ask for (default %(default)s)")
    lim.add_argument("--max-request-tokens", type=int, default=d["max_request_tokens"].default,
                     help="most tokens one request may generate: particles x the per-particle cap "
                          "(default %(default)s)")
    lim.add_argument("--max-prompt-chars", type=int, default=d["max_prompt_chars"].default,
                     help="longest prompt in characters, checked before tokenising (default %(default)s)")
    lim.add_argument("--max-overtakes", type=int, default=d["max_overtakes"].default,
                     help="admission: later requests that fit may start before a waiting one that does not fit "
                          "yet at most this many times, then it goes first (default %(default)s)")


def _add_request_options(p: argparse.ArgumentParser, max_steps: int = 6, max_step_tokens: int = 24,
                         temperature: float = 0.8) -> None:
    s = p.add_argument_group("search")
    s.add_argument("--method", default="particle_filter", choices=METHODS,
                   help="search method (default particle_filter); greedy and self_consistency need no PRM")
    s.add_argument("--particles", type=int, default=8,
                   help="budget N: particles (PF, PG in total over all sweeps, PT over all chains), samples "
                        "(best-of-N, self-consistency) or beams (beam search, DVTS) (default 8)")
    s.add_argument("--aggregation", default="model", choices=AGGREGATIONS,
                   help="how step scores make a particle's weight: model (the PRM reads the whole prefix; "
                        "the paper's best), last, prod or min (default model)")
    s.add_argument("--resampling", default="systematic", choices=RESAMPLING,
                   help="resampling scheme (default systematic)")
    s.add_argument("--weight-temperature", type=float, default=1.0,
                   help="softmax temperature on the log-weights logit(r) (default 1.0)")
    s.add_argument("--ess-threshold", type=float, default=1.0,
                   help="resample only when ESS < threshold x N; 1.0 resamples every round (default 1.0)")
    s.add_argument("--finished", default="freeze", choices=["freeze", "remove"],
                   help="finished particles keep their weight in resampling (freeze) or leave the pool (remove)")
    s.add_argument("--selection", default="argmax", choices=SELECTIONS,
                   help="final answer: highest weight, a draw by weight, or the weighted majority vote")
    s.add_argument("--annealing", action="store_true",
                   help="entropic annealing: temper the weights while ESS/N < 0.5 early in the run")
    s.add_argument("--iterations", type=int, default=1, help="particle Gibbs sweeps (default 1)")
    s.add_argument("--temperatures", type=_floats, default=(1.0, 2.0), metavar="T1,T2,...",
                   help="parallel tempering: one chain per weight temperature (default 1,2)")
    s.add_argument("--beam-width", type=int, default=4,
                   help="beam search: keep N/M, expand each M ways; DVTS: N/M subtrees of width M (default 4)")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=temperature,
                   help=f"policy sampling temperature; 0 is greedy (default {temperature})")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling (default 0: off)")
    g.add_argument("--seed", type=int, default=0,
                   help="request seed: the same seed gives the same particles (default 0)")
    g.add_argument("--max-steps", type=int, default=max_steps, help=f"steps per particle (default {max_steps})")
    g.add_argument("--max-step-tokens", type=int, default=max_step_tokens,
                   help=f"a step is cut after this many tokens without its delimiter (default {max_step_tokens})")
    g.add_argument("--max-tokens", type=int, default=2048, help="generated tokens per particle (default 2048)")
    g.add_argument("--step-delimiter", type=_escapes, default="\n\n",
                   help=r"text that ends a step, backslash escapes allowed (default '\n\n')")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (it is drawn on stderr)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfengine", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="PF on the bundled toy model: one traced run, then every method compared",
                          description="On the bundled trained toy model (multi-step arithmetic, pfengine/toy): print "
                                      "one problem's particle-filtering run round by round, then evaluate greedy, "
                                      "best-of-N, weighted best-of-N, self-consistency, beam search, DVTS and PF at "
                                      "several budgets on held-out problems (accuracy with 95% intervals, tokens/s, "
                                      "wall time), written as Markdown, JSON and a PNG plot. Without bundled "
                                      f"checkpoints it falls back to a random-weight model in {DEMO_DIR}.")
    demo.add_argument("--problems", type=int, default=200,
                      help="held-out problems to evaluate (default 200, the README's table)")
    demo.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16],
                      help="budgets (particles / samples / beams) to compare (default 4 8 16)")
    demo.add_argument("--prm-kind", choices=["value_head", "model"], default="model",
                      help="the toy PRM to use: the separate PRM model (default; the better judge on held-out "
                           "steps) or the value head on the policy")
    demo.add_argument("--out", default="out/demo", help="where the table (results.md / .json) and plot go")
    demo.add_argument("--no-eval", action="store_true", help="only the traced run, no evaluation")
    demo.add_argument("--trace-html", metavar="DIR",
                      help="where the traced run's genealogy goes (trace.html, and trace.png with matplotlib; "
                           "default: --out)")
    _add_request_options(demo, temperature=DEMO_TEMPERATURE)
    _add_output_options(demo)

    gen = sub.add_parser("generate", help="solve one prompt with a local checkpoint",
                         description="Run one request to completion and print the answer with a table of the "
                                     "particles (weight, PRM score, steps, text), or everything as JSON.")
    _add_engine_options(gen)
    gen.add_argument("--prompt", required=True, help="the problem text ('-' reads it from stdin)")
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as a user message through the model's chat template")
    gen.add_argument("--trace-html", metavar="DIR",
                     help="also write the run's genealogy to DIR (trace.html: open it in a browser; trace.png "
                          "with matplotlib)")
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
    g.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the model's chat template")
    g.add_argument("--result", metavar="FILE",
                   help="draw a saved result instead of running one: the JSON of `pfengine generate --json` or the "
                        "NAME.json this command writes (its tokens are decoded with --model's tokenizer)")
    g.add_argument("--reference", metavar="ANSWER",
                   help="the right final answer: marks each candidate and the chosen one correct or wrong")
    g.add_argument("--out", default="out/trace", help="output directory (default out/trace)")
    g.add_argument("--name", default="trace", help="file name stem (default trace)")
    g.add_argument("--no-png", action="store_true", help="only the HTML page")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (it is drawn on stderr)")
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

    bench = sub.add_parser("bench", help="time N requests of one shape and report tokens/s",
                           description="Submit --requests requests of the same shape (up to --concurrency in flight; "
                                       "they batch together), run them to completion and report generated tokens/s, "
                                       "tokens forwarded/s and request latencies. A warm-up request runs first.")
    _add_engine_options(bench)
    g = bench.add_argument_group("workload")
    g.add_argument("--requests", type=int, default=8, help="number of requests (default 8)")
    g.add_argument("--concurrency", type=int, default=0, help="requests in flight at once (default 0: all)")
    g.add_argument("--prompt", default=DEMO_PROMPT, help="prompt of every request (each gets its own seed)")
    g.add_argument("--warmup", type=int, default=1, help="untimed requests first (default 1)")
    g.add_argument("--suite", action="store_true",
                   help="run the comparison benchmark instead (pfengine vs its_hub-style PF, transformers PF, "
                        "llama.cpp, vLLM; bench/harness.py in a source checkout): every option after --suite goes "
                        "to it, e.g. `pfengine bench --suite --quick`; `pfengine bench --suite --help` lists them")
    _add_request_options(bench, max_steps=4, max_step_tokens=16)
    _add_output_options(bench)

    prof = sub.add_parser("profile", help="profile one request with torch.profiler",
                          description="Run one request (or --prompts of them) under torch.profiler (after an "
                                      "unprofiled warm-up), write a Chrome trace JSON (open it in Perfetto, "
                                      "https://ui.perfetto.dev, or chrome://tracing), print the top operators and a "
                                      "phase table (prefill / decode forward / PRM decode / sampling / PRM scoring / "
                                      "resample+fork / other) computed from the trace's pfengine::* ranges. Kernel "
                                      "launches are labelled pfengine::<kernel>.")
    _add_engine_options(prof)
    g = prof.add_argument_group("profile")
    g.add_argument("--prompt", default=DEMO_PROMPT, help="the request's prompt")
    g.add_argument("--out", default="pfengine-trace.json",
                   help="Chrome trace file to write, for Perfetto or chrome://tracing (default pfengine-trace.json)")
    g.add_argument("--row-limit", type=int, default=20, help="rows of the top-operators table (default 20)")
    g.add_argument("--sort", default="self_cpu_time_total", choices=sorted(PROFILE_SORTS),
                   help="column the table is sorted by (default self_cpu_time_total)")
    g.add_argument("--record-shapes", action="store_true", help="record input shapes (larger trace)")
    g.add_argument("--warmup", type=int, default=1, help="unprofiled runs first (default 1)")
    g.add_argument("--prompts", type=int, default=1,
                   help="requests run together, one seed each (default 1); the phase table covers all of them")
    g.add_argument("--fixed-steps", action="store_true",
                   help="every step is exactly --max-step-tokens tokens (no delimiter, EOS does not stop): the "
                        "benchmark's workload")
    _add_request_options(prof, max_steps=4, max_step_tokens=16)
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
        return {"demo": cmd_demo, "generate": cmd_generate, "trace": cmd_trace, "serve": cmd_serve,
                "bench": cmd_bench, "profile": cmd_profile}[args.command](args)
    except InvalidArgument as e:
        print(f"pfengine {args.command}: error: {e.render(flag_of)}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, CheckpointError) as e:
        print(f"pfengine {args.command}: error: {e}", file=sys.stderr)
        return 2


def flag_of(field: str) -> str:
    """The command-line flag of an API option named in an error (``n_particles`` -> ``--particles``)."""
    return FLAGS.get(field, "--" + field.replace("_", "-")) if field.isidentifier() else field


# ------------------------------------------------------------------------------------------------
# Building engines and requests from options


def make_engine(args: argparse.Namespace) -> Engine:
    from pfengine.config import EngineConfig
    from pfengine.engine import Engine

    model, prm = getattr(args, "model", None), getattr(args, "prm", None)
    if model is None:
        model, default_prm = default_checkpoint(quiet=getattr(args, "json", False))
        prm = prm or default_prm
    limits = {name: getattr(args, name) for name in LIMITS if hasattr(args, name)}
    return Engine(EngineConfig(model=model, prm=prm, num_blocks=getattr(args, "num_blocks", 2048),
                               block_size=getattr(args, "block_size", 16),
                               kv_dtype=getattr(args, "kv_dtype", "float32"),
                               max_particles=getattr(args, "max_particles", 1024),
                               max_model_len=getattr(args, "max_model_len", None), **limits))


def make_request(args: argparse.Namespace, prompt: str | list[dict], seed: int | None = None) -> Request:
    from pfengine.config import Request, SamplingParams, SearchParams

    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              seed=args.seed if seed is None else seed, max_steps=args.max_steps,
                              max_step_tokens=args.max_step_tokens, max_tokens=args.max_tokens,
                              step_delimiter=FIXED_STEP_DELIMITER if getattr(args, "fixed_steps", False)
                              else args.step_delimiter,
                              stop_on_eos=not getattr(args, "fixed_steps", False))
    search = SearchParams(method=args.method, n_particles=args.particles, aggregation=args.aggregation,
                          resampling=args.resampling, weight_temperature=args.weight_temperature,
                          ess_threshold=args.ess_threshold, finished=args.finished, selection=args.selection,
                          annealing=args.annealing, iterations=args.iterations, temperatures=tuple(args.temperatures),
                          beam_width=args.beam_width)
    return Request(prompt=prompt, sampling=sampling, search=search)


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


def default_checkpoint(quiet: bool = False) -> tuple[str, str]:
    """(policy, PRM) used when no --model is given: the bundled trained toy policy with its value head,
    or -- in a copy without the bundled weights -- a random-weight model built in DEMO_DIR."""
    from pfengine.toy.pf import POLICY, VALUE_HEAD, is_bundled

    out = sys.stderr if quiet else sys.stdout
    if is_bundled():
        print(f"Model: {POLICY} (bundled toy policy) + value-head PRM {VALUE_HEAD}", file=out)
        return str(POLICY), str(VALUE_HEAD)
    from pfengine.random_model import save_random_model, save_value_head

    head = DEMO_DIR / "value_head.safetensors"
    if not head.is_file():
        print(f"Building a random-weight Qwen2 checkpoint in {DEMO_DIR} (the bundled toy checkpoints are missing; "
              "its text is noise, but it loads and runs through the same path as any HF checkpoint).", file=out)
        save_random_model(DEMO_DIR, "qwen2", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2)
        save_value_head(head, 128)
    print(f"Model: {DEMO_DIR} (random weights) + value-head PRM {head}", file=out)
    return str(DEMO_DIR), str(head)


# ------------------------------------------------------------------------------------------------
# Commands


def cmd_demo(args: argparse.Namespace) -> int:
    from pfengine.toy.pf import POLICY, PRM, VALUE_HEAD, is_bundled

    if not is_bundled():
        args.model, args.prm = None, None
        return _generate(args, make_engine(args), DEMO_PROMPT)
    from pfengine.config import EngineConfig
    from pfengine.engine import Engine
    from pfengine.toy import evaluate
    from pfengine.toy.task import extract_answer, heldout_set

    prm = VALUE_HEAD if args.prm_kind == "value_head" else PRM
    print(f"Model: {POLICY} (bundled toy policy) + PRM {prm}\n")
    engine = Engine(EngineConfig(model=str(POLICY), prm=str(prm), num_blocks=8192, max_particles=4096))
    problems = heldout_set(max(args.problems, 1))
    t = args.temperature
    print(f"Sampling temperature {t}\n")
    problem = evaluate.hard_problem(engine, problems[:50], args.particles, args.seed, t)
    result = evaluate.trace_one(engine, problem, budget=args.particles, seed=args.seed, temperature=t)
    _write_genealogy(args.trace_html or args.out, result, evaluate.request(problem, "particle_filter", args.particles,
                                                                           args.seed, t), engine,
                     grade=lambda text: extract_answer(text) == problem.answer)
    if args.no_eval:
        return 0
    rows = evaluate.evaluate(engine, problems[:args.problems], tuple(args.budgets), seed=args.seed, temperature=t)
    out = Path(args.out)
    evaluate.write_report(rows, out)
    print(evaluate.markdown(rows))
    print(f"\nWrote {out / 'results.md'}, {out / 'results.json'} and {out / 'accuracy_vs_budget.png'}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    engine = make_engine(args)
    return _generate(args, engine, [{"role": "user", "content": prompt}] if args.chat else prompt)


def _generate(args: argparse.Namespace, engine: Engine, prompt: str | list[dict]) -> int:
    request = make_request(args, prompt)
    start = time.perf_counter()
    result = run_with_progress(engine, request, disable=args.no_progress)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps(asdict(result) | {"seconds": seconds, "engine": engine.stats(), "prompt": prompt,
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
        prompt = [{"role": "user", "content": text}] if args.chat else text
        request = make_request(args, prompt)
        result = run_with_progress(engine, request, disable=args.no_progress)
        run = genealogy.from_result(result, request.search, prompt, grade)
        detokenize = engine.detokenize
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        saved = asdict(result) | {"prompt": prompt, "search": asdict(request.search)}
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


def print_result(result: PFResult, stats: dict[str, int], seconds: float) -> None:
    if result.trace:
        print("\nRounds (score -> weights -> resample):")
        print(f"{'round':>5} {'sweep':>5} {'ESS':>6}  ancestors")
        for k, tr in enumerate(result.trace):
            anc = tr.ancestors if tr.ancestors is not None else "(not resampled)"
            print(f"{k + 1:>5} {tr.sweep:>5} {tr.ess:>6.2f}  {anc}")
    print(f"\nParticles ({result.method}; * = chosen):")
    print(f"{'#':>3}  {'weight':>7} {'score':>6} {'steps':>5} {'tokens':>6} {'done':>4} {'answer':>8}  text")
    for i, p in enumerate(result.particles):
        mark = "*" if i == result.best else " "
        answer = "-" if p.answer is None else p.answer[:8]
        print(f"{i:>2}{mark}  {p.weight:>7.3f} {p.score:>6.3f} {len(p.steps):>5} {len(p.token_ids):>6} "
              f"{'yes' if p.finished else 'no':>4} {answer:>8}  {p.text[:60]!r}")
    s = result.stats
    print(f"\nAnswer (particle {result.best}): {result.answer!r}")
    print(f"{s.prompt_tokens} prompt + {s.generated_tokens} generated tokens in {seconds:.2f} s "
          f"({s.generated_tokens / max(seconds, 1e-9):.0f} tok/s), {s.steps} rounds, {s.resamples} resamples")
    print("engine: " + ", ".join(f"{k}={v}" for k, v in stats.items()))


def cmd_serve(args: argparse.Namespace) -> int:
    from pfengine.http_gate import GateConfig
    from pfengine.server import ServerConfig, serve

    for flag in ("max_body_bytes", "max_completions"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key must not be empty")
    engine = make_engine(args)
    config = ServerConfig(served_model_name=args.served_model_name,
                          gate=GateConfig(api_key=args.api_key, allowed_hosts=args.allowed_hosts,
                                          max_body_bytes=args.max_body_bytes),
                          max_completions=args.max_completions, enable_docs=args.enable_docs)
    name = args.served_model_name or Path(engine.config.model).name
    print(f"pfengine: serving {name} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if args.api_key else ''}", file=sys.stderr)
    serve(engine, host=args.host, port=args.port, config=config, log_level=args.log_level)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.requests < 1:
        raise ValueError(f"--requests must be positive, got {args.requests}")
    engine = make_engine(args)
    for k in range(args.warmup):
        engine.generate([make_request(args, args.prompt, seed=10_000 + k)])
    before = engine.stats()
    requests = [make_request(args, args.prompt, seed=args.seed + k) for k in range(args.requests)]
    limit = args.concurrency if args.concurrency > 0 else len(requests)
    submitted: dict[int, float] = {}
    latencies: list[float] = []
    generated = 0
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
                    generated += event.result.stats.generated_tokens
                    bar.update(1)
    seconds = time.perf_counter() - start
    after = engine.stats()
    forwarded = after["policy_tokens_forwarded"] - before["policy_tokens_forwarded"]
    report = {"requests": len(requests), "concurrency": limit, "method": args.method, "particles": args.particles,
              "seconds": seconds, "generated_tokens": generated, "generated_tokens_per_s": generated / seconds,
              "policy_tokens_forwarded": forwarded, "policy_tokens_forwarded_per_s": forwarded / seconds,
              "requests_per_s": len(requests) / seconds,
              "latency_p50_s": statistics.median(latencies),
              "latency_p90_s": sorted(latencies)[min(len(latencies) - 1, int(0.9 * len(latencies)))],
              "preemptions": after["preemptions"] - before["preemptions"]}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{report['requests']} requests ({args.method}, {args.particles} particles, up to {args.max_steps} steps of "
          f"{args.max_step_tokens} tokens), {limit} in flight:")
    print(f"  {seconds:.2f} s, {report['requests_per_s']:.2f} req/s, latency p50 {report['latency_p50_s']:.2f} s "
          f"p90 {report['latency_p90_s']:.2f} s")
    print(f"  generated {generated} tokens: {report['generated_tokens_per_s']:.0f} tok/s")
    print(f"  policy forwarded {forwarded} tokens: {report['policy_tokens_forwarded_per_s']:.0f} tok/s "
          f"(shared prefixes are forwarded once), preemptions {report['preemptions']}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    if args.prompts < 1:
        raise ValueError(f"--prompts must be positive, got {args.prompts}")
    engine = make_engine(args)
    requests = [make_request(args, args.prompt, seed=args.seed + k) for k in range(args.prompts)]
    for k in range(args.warmup):
        engine.generate([make_request(args, args.prompt, seed=10_000 + k) for _ in range(args.prompts)])
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
    if args.json:
        rows = sorted(averages, key=PROFILE_SORTS[sort], reverse=True)
        top = [{"name": e.key, "count": e.count, "self_cpu_us": e.self_cpu_time_total, "cpu_total_us": e.cpu_time_total}
               for e in rows[:args.row_limit]]
        print(json.dumps({"trace": str(out), "seconds": seconds, "generated_tokens": generated,
                          "phases": table["phases"], "ranges": table["ranges"], "engine": engine.stats(),
                          "top_ops": top}, indent=1))
        return 0
    print(averages.table(sort_by=sort, row_limit=args.row_limit))
    print(format_phase_table(table))
    print(f"\n{args.method} x{args.particles}, {args.prompts} request(s): {generated} tokens in {seconds:.2f} s "
          f"(profiled, {generated / max(seconds, 1e-9):.0f} tok/s)")
    print(f"Chrome trace: {out} (open in https://ui.perfetto.dev or chrome://tracing)")
    return 0


# ------------------------------------------------------------------------------------------------
# Phase table from a trace (also used by bench/)

PHASES = [
    ("prefill", "prompt prefill (+ fork to N)"),
    ("decode", "decode forward (policy, incl. LM head)"),
    ("prm_forward", "PRM model forward of the steps' tokens (one extend per step end)"),
    ("sample", "sampling"),
    ("prm_score", "PRM scoring at step ends (head, weights, ESS)"),
    ("resample_fork", "resample + fork (+ COW copies)"),
    ("other", "engine Python outside the ranges"),
]


def phase_table(trace_file: str | Path, wall_s: float | None = None) -> dict:
    """Seconds per phase of a profiled run, from the ``pfengine::*`` ranges of its Chrome trace.

    Top-level engine ranges (``prefill``, ``decode``, ``sample``, ``round``) do not overlap;
    ``prm_forward`` (the PRM model reading steps' tokens) runs inside ``round`` or, when a sibling forks
    mid-step, on its own. ``round`` (PRM forward -> score -> weights -> resample -> fork) is split into
    the PRM forward, resample + fork (the ``resample``, ``fork`` and ``copy_blocks`` kernel ranges
    inside it) and PRM scoring (the rest)."""
    trace = json.loads(Path(trace_file).read_text())
    events = [e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace)
              if e.get("ph") == "X" and str(e.get("name", "")).startswith("pfengine::")]
    by_name: dict[str, list[dict]] = {}
    for e in events:
        by_name.setdefault(e["name"][len("pfengine::"):], []).append(e)
    rounds = sorted((e["ts"], e["ts"] + e["dur"]) for e in by_name.get("round", []))

    def total(name: str, inside_round: bool = False) -> float:
        evs = by_name.get(name, [])
        if inside_round:
            evs = [e for e in evs if any(lo <= e["ts"] <= hi for lo, hi in rounds)]
        return sum(e["dur"] for e in evs) / 1e6

    resample_fork = total("resample", True) + total("fork", True) + total("copy_blocks", True)
    prm_in_round = total("prm_forward", True)
    phases = {"prefill": total("prefill"), "decode": total("decode"), "prm_forward": total("prm_forward"),
              "sample": total("sample"), "prm_score": max(total("round") - resample_fork - prm_in_round, 0.0),
              "resample_fork": resample_fork}
    span = (max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)) / 1e6 if events else 0.0
    wall = span if wall_s is None else wall_s
    phases["other"] = max(wall - sum(phases.values()), 0.0)
    ranges = {name: {"count": len(evs), "seconds": sum(e["dur"] for e in evs) / 1e6}
              for name, evs in sorted(by_name.items())}
    return {"wall_s": wall, "phases": phases, "ranges": ranges}


def format_phase_table(table: dict) -> str:
    wall = table["wall_s"] or 1e-9
    lines = ["", "| phase | seconds | share |", "|---|---:|---:|"]
    for key, label in PHASES:
        sec = table["phases"].get(key, 0.0)
        lines.append(f"| {label} | {sec:.3f} | {100 * sec / wall:.1f} % |")
    lines += [f"| total (profiled wall) | {wall:.3f} | 100 % |", "",
              "| range (pfengine::*) | calls | seconds | mean ms |", "|---|---:|---:|---:|"]
    for name, r in table["ranges"].items():
        lines.append(f"| {name} | {r['count']} | {r['seconds']:.3f} | {1e3 * r['seconds'] / max(r['count'], 1):.2f} |")
    return "\n".join(lines)


def run_suite(argv: list[str]) -> int:
    """``pfengine bench --suite ...``: the comparison harness of a source checkout (bench/harness.py)."""
    repo = Path(__file__).resolve().parent.parent
    if not (repo / "bench" / "harness.py").is_file():
        print("pfengine bench --suite: needs a source checkout (bench/harness.py next to the pfengine package)",
              file=sys.stderr)
        return 2
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from bench.harness import main as harness_main

    return harness_main(argv)


if __name__ == "__main__":
    sys.exit(main())
