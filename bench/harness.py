"""The benchmark: every system on the same workload, interleaved in one run, medians of repeats.

    python -m bench --quick                 # or: pfengine bench --suite --quick
    python -m bench --particles 4,16,64 --prompts 2 --steps 8 --step-tokens 32 --repeats 3

Per system and N: wall time, generated tokens/s, PRM-scored steps/s, policy and PRM tokens processed
and the recompute ratio = tokens processed / tokens in the union of all particles' distinct prefixes
(pfengine: 1.00), peak RSS; ratios vs pfengine; a roofline line for pfengine's decode step and its
phase table. Writes ``results.json``, ``results.md``, PNG plots and a Perfetto trace to ``--out``."""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

from bench.workload import Workload, build_checkpoints, external_checkpoints, prompt_ids

ALL_SYSTEMS = ["pfengine", "pfengine-head", "its_hub", "transformers", "llama.cpp", "vllm-offline", "vllm-serve"]
DEFAULT_SYSTEMS = ["pfengine", "pfengine-head", "its_hub", "transformers", "llama.cpp", "vllm-offline", "vllm-serve"]
QUICK = dict(prompts=1, steps=4, step_tokens=16, particles=[16, 64], repeats=3)
FULL = dict(prompts=2, steps=8, step_tokens=32, particles=[4, 16, 64], repeats=3)


def load_average() -> list[float]:
    try:
        return list(os.getloadavg())
    except OSError:
        return []


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"small configuration: {QUICK['prompts']} prompt, {QUICK['steps']} steps of "
                        f"{QUICK['step_tokens']} tokens, N in {QUICK['particles']}, {QUICK['repeats']} repeats")
    p.add_argument("--particles", default=None, help="comma-separated N values (default 4,16,64; quick 16,64)")
    p.add_argument("--prompts", type=int, default=None, help="P prompts per run (default 2; quick 1)")
    p.add_argument("--steps", type=int, default=None, help="S steps per particle (default 8; quick 4)")
    p.add_argument("--step-tokens", type=int, default=None, help="L tokens per step (default 32; quick 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per system and N (default 3)")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help=f"comma-separated subset of {ALL_SYSTEMS} (also its_hub-head, transformers-head)")
    p.add_argument("--model", help="a real policy checkpoint dir instead of the generated benchmark model")
    p.add_argument("--prm", help="with --model: a PRM dir (Qwen2.5-Math-PRM layout) or a value-head file")
    p.add_argument("--model-cache", default=".cache/bench-model", help="where the benchmark model is generated")
    p.add_argument("--out", default="bench/results", help="output directory (JSON, Markdown, PNG, trace)")
    p.add_argument("--tag", default=None, help="file name stem of the outputs (default: quick / full)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the in-process systems (default 2)")
    p.add_argument("--no-profile", action="store_true", help="skip the pfengine profile / roofline pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--render", metavar="JSON", help="only rebuild the Markdown table and plots of a saved result")
    return p


def resolve(args: argparse.Namespace) -> dict:
    base = QUICK if args.quick else FULL
    cfg = {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in base.items()
           if k != "particles"}
    cfg["particles"] = [int(x) for x in args.particles.split(",")] if args.particles else base["particles"]
    return cfg


def make_system(name: str, ck, log_dir: Path, max_wl: Workload):
    """An object with ``system``, ``variant``, ``warmup(wl, ids)``, ``run(wl, ids, seed)`` (and maybe ``close``)."""
    if name == "pfengine":
        from bench.pfengine_pf import PfenginePF
        return PfenginePF(ck, "model")
    if name == "pfengine-head":
        from bench.pfengine_pf import PfenginePF
        return PfenginePF(ck, "head")
    if name in ("its_hub", "its_hub-head"):
        from bench.its_hub_pf import ItsHubPF
        return ItsHubPF(ck, "head" if name.endswith("head") else "model")
    if name in ("transformers", "transformers-head"):
        from bench.transformers_pf import TransformersPF
        return TransformersPF(ck, "head" if name.endswith("head") else "model")
    if name == "llama.cpp":
        from bench.llamacpp_pf import LlamaCppPF
        return LlamaCppPF(ck)
    if name in ("vllm-offline", "vllm-serve"):
        from bench.vllm_http import VllmHttpPF, VllmOfflinePF, vllm_available
        from bench.llamacpp_pf import Unavailable

        why = vllm_available()
        if why:
            raise Unavailable(f"{name} skipped: {why}")
        max_len = max_wl.steps * (max_wl.step_tokens + 1) + 256
        max_len = 1 << (max_len - 1).bit_length()
        cls = VllmOfflinePF if name == "vllm-offline" else VllmHttpPF
        return cls(ck, log_dir, max_model_len=max_len)
    raise ValueError(f"unknown system {name!r}; choose from {ALL_SYSTEMS}")


def _start_all(names: list[str], ck, log_dir: Path, max_wl: Workload, log) -> tuple[dict, dict]:
    """Start every system; the vLLM ones (slow start-up, own processes) concurrently, first."""
    from concurrent.futures import ThreadPoolExecutor

    from bench.llamacpp_pf import Unavailable

    systems, skipped = {}, {}
    slow = [n for n in names if n.startswith("vllm")]
    fast = [n for n in names if n not in slow]
    with ThreadPoolExecutor(max(len(slow), 1)) as pool:
        futures = {n: pool.submit(make_system, n, ck, log_dir, max_wl) for n in slow}
        t0 = time.perf_counter()
        for n, f in futures.items():
            try:
                systems[n] = f.result()
                log(f"  {n}: started in {time.perf_counter() - t0:.0f} s (outside the timed region)")
            except Unavailable as e:
                skipped[n] = str(e)
            except Exception as e:  # noqa: BLE001
                skipped[n] = f"{n} failed to start: {type(e).__name__}: {str(e)[:2000]}"
                log(traceback.format_exc())
    for n in fast:
        try:
            systems[n] = make_system(n, ck, log_dir, max_wl)
        except Unavailable as e:
            skipped[n] = str(e)
        except Exception as e:  # noqa: BLE001
            skipped[n] = f"{n} failed to start: {type(e).__name__}: {e}"
            log(traceback.format_exc())
    for n, why in skipped.items():
        log(f"  SKIP {why}")
    return systems, skipped


def give_machine_to(systems: dict, active: str | None) -> None:
    """Stop (SIGSTOP) the process groups of every peer but ``active`` and continue (SIGCONT) its own
    (``None``: continue all). Idle vLLM servers still wake up and poll; with 2 cores that stalls the
    running system's OpenMP threads, so each system gets the machine to itself while it runs."""
    for name, s in systems.items():
        for pg in getattr(s, "process_groups", lambda: [])():
            try:
                os.killpg(pg, signal.SIGCONT if active is None or name == active else signal.SIGSTOP)
            except ProcessLookupError:
                pass


def derive(rec: dict, wl: Workload) -> dict:
    union = rec["union_tokens"]
    rec["expected_generated_tokens"] = wl.generated_tokens
    rec["same_work"] = rec["generated_tokens"] == wl.generated_tokens
    rec["gen_tok_s"] = rec["generated_tokens"] / rec["wall_s"]
    rec["prm_steps_s"] = wl.prompts * wl.particles * wl.steps / rec["wall_s"]
    rec["policy_recompute"] = rec["policy_tokens"] / union
    rec["prm_recompute"] = rec["prm_tokens"] / union if rec.get("prm_tokens") else None
    rec["policy_tokens_per_kept_token"] = rec["policy_tokens"] / rec["generated_tokens"]
    return rec


def median_record(runs: list[dict]) -> dict:
    """Median wall time; counters from the median run (they differ only by sampling)."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    mid = ordered[len(ordered) // 2]
    out = dict(mid)
    out["wall_s_runs"] = [r["wall_s"] for r in runs]
    out["wall_s"] = statistics.median(out["wall_s_runs"])
    out["gen_tok_s"] = mid["generated_tokens"] / out["wall_s"]
    out["same_work_all_runs"] = all(r["same_work"] for r in runs)
    return out


def run(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    # SIGTERM unwinds like an exception, so the vLLM peers are shut down instead of orphaned
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # vLLM's worker: both cores with 2 threads (its default binds one and reserves the other)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1" if args.threads >= 2 else "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = resolve(args)
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = args.tag or ("quick" if args.quick else "full")
    log_dir = out_dir / f"{tag}-logs"
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", file=sys.stderr, flush=True)

    if args.model:
        ck = external_checkpoints(args.model, args.prm)
    else:
        from bench.workload import MODEL_SHAPE, TINY_SHAPE

        ck = build_checkpoints(args.model_cache, seed=args.seed, shape=TINY_SHAPE if args.smoke else MODEL_SHAPE,
                               max_len=512 if args.smoke else 2048)
    base = Workload(prompts=cfg["prompts"], particles=max(cfg["particles"]), steps=cfg["steps"],
                    step_tokens=cfg["step_tokens"], seed=args.seed)
    ids = prompt_ids(ck.policy, base.prompt_texts())
    log(f"workload: P={base.prompts} S={base.steps} L={base.step_tokens} N={cfg['particles']} "
        f"repeats={cfg['repeats']}; prompt tokens {[len(i) for i in ids]}; load {load_average()}")
    systems, skipped = _start_all(names, ck, log_dir, base, log)
    load_before = load_average()
    records: dict[str, dict[int, dict]] = {n: {} for n in systems}
    raw: list[dict] = []
    try:
        for n_particles in cfg["particles"]:
            wl = replace(base, particles=n_particles)
            for name, s in list(systems.items()):
                t = time.perf_counter()
                give_machine_to(systems, name)
                try:
                    s.warmup(wl, ids)
                except Exception as e:  # noqa: BLE001
                    skipped[name] = f"{name} failed during warm-up at N={n_particles}: {type(e).__name__}: {str(e)[:2000]}"
                    log(traceback.format_exc())
                    systems.pop(name)
                    continue
                log(f"  warm-up {name} N={n_particles}: {time.perf_counter() - t:.1f} s")
            runs: dict[str, list[dict]] = {n: [] for n in systems}
            order = list(systems)
            for rep in range(cfg["repeats"]):
                rot = order[rep % len(order):] + order[:rep % len(order)]  # interleaved, rotated
                for name in rot:
                    s = systems[name]
                    give_machine_to(systems, name)
                    load = load_average()
                    try:
                        rec = s.run(wl, ids, seed=args.seed + rep)
                    except Exception as e:  # noqa: BLE001
                        log(traceback.format_exc())
                        skipped[f"{name}@N={n_particles}#{rep}"] = (f"{name} failed in repeat {rep} at N={n_particles} (run dropped): "
                                                            f"{type(e).__name__}: {str(e)[:2000]}")
                        continue
                    rec = derive(rec, wl) | {"system": name, "variant": s.variant, "particles": n_particles,
                                             "repeat": rep, "load_before": load}
                    runs[name].append(rec)
                    raw.append(rec)
                    log(f"  N={n_particles} rep {rep} {name:14s} {rec['wall_s']:7.2f} s {rec['gen_tok_s']:7.1f} tok/s "
                        f"policy x{rec['policy_recompute']:.2f} prm "
                        f"{'-' if rec['prm_recompute'] is None else format(rec['prm_recompute'], '.2f')}"
                        f"{'' if rec['same_work'] else '  WORK DIFFERS'}")
            for name, rs in runs.items():
                if rs:
                    records[name][n_particles] = median_record(rs)
    finally:
        give_machine_to(systems, None)
        for s in systems.values():
            if hasattr(s, "close"):
                try:
                    s.close()
                except Exception:  # noqa: BLE001
                    pass
    profile = None
    if not args.no_profile and any(n.startswith("pfengine") for n in names):
        log("profiling pfengine (trace + phase table + roofline)")
        profile = profile_pass(ck, base, cfg["particles"], ids, out_dir, tag, args.threads)
    result = {"tag": tag, "workload": asdict(base) | {"particles": cfg["particles"]}, "repeats": cfg["repeats"],
              "checkpoints": ck.to_json(), "prompt_tokens": [len(i) for i in ids],
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "torch_threads": args.threads, "load_at_start": load_before, "load_at_end": load_average()},
              "records": {n: {str(k): v for k, v in r.items()} for n, r in records.items() if r},
              "skipped": skipped, "runs": raw, "profile": profile,
              "total_seconds": time.perf_counter() - started}
    result["ratios"] = ratios(result)
    (out_dir / f"{tag}.json").write_text(json.dumps(result, indent=1, default=str))
    md = markdown(result)
    (out_dir / f"{tag}.md").write_text(md)
    try:
        plots(result, out_dir, tag)
    except Exception as e:  # noqa: BLE001
        log(f"plots skipped: {e}")
    print(md)
    log(f"wrote {out_dir / (tag + '.json')}, {out_dir / (tag + '.md')}")
    return result


def profile_pass(ck, base: Workload, particles: list[int], ids, out_dir: Path, tag: str, threads: int) -> dict:
    """pfengine (separate PRM) under torch.profiler at each N: phase table + roofline of its decode step."""
    from bench.pfengine_pf import PfenginePF
    from bench.phases import profile_engine
    from bench.roofline import decode_roofline, measure_machine

    machine = measure_machine(threads)
    out = {"machine": machine, "per_n": {}}
    for n in particles:
        wl = replace(base, particles=n)
        for kind in (["model"] if ck.prm_dir else []) + (["head"] if ck.value_head else []):
            s = PfenginePF(ck, kind)
            s.warmup(wl, ids)
            trace = out_dir / f"{tag}-trace-pfengine-{kind}-N{n}.json"
            table = profile_engine(s._engine(wl, ids), s.requests(wl, seed=0), trace)
            table.pop("key_averages")
            mean_ctx = statistics.mean(len(i) for i in ids) + wl.steps * wl.step_tokens / 2
            table["roofline"] = decode_roofline(ck.policy, ck.prm_dir if kind == "model" else None, table,
                                                batch=wl.prompts * n, context=mean_ctx, machine=machine,
                                                prm_tokens=wl.prompts * n * (wl.step_tokens + 1))
            out["per_n"][f"{kind}-{n}"] = table
            del s
    return out


def ratios(result: dict) -> dict:
    """pfengine's speed-up (wall-time ratio) over each peer at every N."""
    rec = result["records"]
    ref = rec.get("pfengine", {})
    out: dict[str, dict[str, float]] = {}
    for name, per_n in rec.items():
        if name == "pfengine":
            continue
        out[name] = {n: per_n[n]["wall_s"] / ref[n]["wall_s"] for n in per_n if n in ref}
    return out


def _ordered(d: dict) -> dict:
    """Systems in the canonical order (pfengine first)."""
    rank = {n: k for k, n in enumerate(ALL_SYSTEMS + ["its_hub-head", "transformers-head"])}
    return dict(sorted(d.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def _fmt(x, spec=".2f", none="—"):
    return none if x is None else format(x, spec)


def markdown(result: dict) -> str:
    w = result["workload"]
    m = result["machine"]
    lines = [f"## pfengine benchmark ({result['tag']})", "",
             f"Workload: P={w['prompts']} prompts × N particles × S={w['steps']} steps × L={w['step_tokens']} tokens "
             f"(prompt tokens {result['prompt_tokens']}), temperature {w['temperature']}, PRM `model` aggregation "
             f"(one step tag after the last step), fp32, {m['torch_threads']} threads; median of {result['repeats']} "
             f"interleaved repeats. Load average at start {[round(x, 2) for x in m['load_at_start']]}, "
             f"at end {[round(x, 2) for x in m['load_at_end']]} (2 cores, shared).", "",
             "| system | N | wall s (median) | gen tok/s | PRM steps/s | policy tokens | PRM tokens (+tags) | union | "
             "policy recompute | PRM recompute | peer wall ÷ pfengine wall | same work | runs | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    recs = _ordered(result["records"])
    ref = recs.get("pfengine", {})
    ns = sorted({int(n) for r in recs.values() for n in r})
    for n in ns:
        for name, per_n in recs.items():
            r = per_n.get(str(n))
            if r is None:
                continue
            speed = ref[str(n)]["wall_s"] and r["wall_s"] / ref[str(n)]["wall_s"] if str(n) in ref else None
            lines.append(
                f"| {name} ({r['variant']}) | {n} | {r['wall_s']:.2f} | {r['gen_tok_s']:.0f} | {r['prm_steps_s']:.1f} | "
                f"{r['policy_tokens']} | {r['prm_tokens']} (+{r['prm_tags']}) | {r['union_tokens']} | "
                f"{r['policy_recompute']:.2f} | {_fmt(r['prm_recompute'])} | "
                f"{'1.00 (ref)' if name == 'pfengine' else _fmt(speed)}× | "
                f"{'yes' if r['same_work_all_runs'] else 'NO'} ({r['generated_tokens']}) | {len(r['wall_s_runs'])} | "
                f"{r['peak_rss_mb']:.0f} |")
    lines += ["", "Runs (wall s): " + "; ".join(
        f"{name} N={n}: {', '.join(format(x, '.2f') for x in r['wall_s_runs'])}"
        for name, per_n in recs.items() for n, r in per_n.items())]
    if result["skipped"]:
        lines += ["", "Skipped / failed:"] + [f"- {why}" for why in result["skipped"].values()]
    lines += ["", "pfengine's speed-up over each peer = peer wall time ÷ pfengine (separate PRM) wall time "
                  "(> 1: pfengine faster; < 1: pfengine slower):", "",
              "| peer | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---:|" * len(ns)]
    for name, per_n in _ordered(result["ratios"]).items():
        lines.append(f"| {name} | " + " | ".join(_fmt(per_n.get(str(n)), ".2f") + "×" if per_n.get(str(n)) else "—"
                                                 for n in ns) + " |")
    prof = result.get("profile")
    if prof:
        from bench.phases import format_phase_table

        mc = prof["machine"]
        lines += ["", f"Machine (measured now, {mc['threads']} threads): fp32 GEMM {mc['gemm_gflops']:.0f} GFLOP/s, "
                      f"memory copy {mc['mem_gbs']:.1f} GB/s (reference: {mc['reference']['gemm_gflops']:.0f} GFLOP/s, "
                      f"{mc['reference']['mem_gbs']:.0f} GB/s).", "",
                  "Roofline of pfengine's decode step (policy: one forward of B = P×N tokens at the mean context; "
                  "PRM: one extend of B = P×N×(L+1) tokens, a step and its tag per particle; against the limits "
                  "measured now, above):", "",
                  "| run | model | B | FLOP/step | bytes/step | FLOP/byte | bound | measured ms | roofline ms | "
                  "fraction of roofline | achieved GFLOP/s |", "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
        for key, table in prof["per_n"].items():
            rl = table["roofline"]
            for which in ("policy", "prm"):
                p = rl.get(which)
                if not p:
                    continue
                rows = rl["batch"] if which == "policy" else rl.get("prm_tokens", rl["batch"])
                lines.append(f"| {key} | {which} | {rows} | {p['flops'] / 1e9:.2f} G | {p['bytes'] / 1e6:.1f} M | "
                             f"{p['intensity_flop_per_byte']:.1f} | {p['bound']} | {1e3 * p['measured_s']:.1f} | "
                             f"{1e3 * p['roofline_s']:.1f} | {100 * p['fraction_of_roofline']:.0f} % | "
                             f"{p['achieved_gflops']:.1f} |")
        for key, table in prof["per_n"].items():
            lines += ["", f"Phase table, pfengine {key} (trace `{Path(table['trace']).name}`, "
                          f"{table['generated_tokens']} tokens):", "", format_phase_table(table)]
    return "\n".join(lines) + "\n"


def plots(result: dict, out_dir: Path, tag: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, per_n in _ordered(result["records"]).items():
        ns = sorted(int(n) for n in per_n)
        ax.plot(ns, [per_n[str(n)]["gen_tok_s"] for n in ns], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("particles N")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"PF throughput ({tag}; median of {result['repeats']})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"{tag}-tokens-per-s.png", dpi=120)
    plt.close(fig)
    prof = result.get("profile")
    if prof:
        from bench.phases import PHASES

        keys = list(prof["per_n"])
        fig, ax = plt.subplots(figsize=(7, 4.5))
        bottom = [0.0] * len(keys)
        for phase, label in PHASES:
            vals = [prof["per_n"][k]["phases"].get(phase, 0.0) for k in keys]
            ax.bar(keys, vals, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_ylabel("seconds (profiled run)")
        ax.set_title("pfengine time per phase")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"{tag}-phases.png", dpi=120)
        plt.close(fig)


def render(json_file: str | Path) -> str:
    """Rebuild the Markdown table and the plots of a saved result."""
    path = Path(json_file)
    result = json.loads(path.read_text())
    md = markdown(result)
    path.with_suffix(".md").write_text(md)
    plots(result, path.parent, result["tag"])
    return md


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        print(render(args.render))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
