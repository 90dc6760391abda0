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
    p.add_argument("--cpu-isa", default=None, metavar="ISAS",
                   help="comma-separated instruction sets for pfengine's C++ kernels (PFENGINE_CPU_ISA: avx512, avx2, "
                        "portable; e.g. avx2,avx512): pfengine and pfengine-head run the first, and each further one "
                        "adds the systems pfengine-<isa> and pfengine-head-<isa> to the same run (default: the best "
                        "this CPU runs)")
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


def parse_cpu_isas(arg: str | None) -> list[str | None]:
    """``--cpu-isa``: instruction sets this CPU runs, in the given order; [None] when not given."""
    if not arg:
        return [None]
    from bench.roofline import cpu_isas
    from pfengine.kernels import CPU_ISAS

    isas = [x.strip() for x in arg.split(",") if x.strip()]
    for isa in isas:
        if isa not in CPU_ISAS:
            raise ValueError(f"--cpu-isa: {isa!r} is not one of {', '.join(CPU_ISAS)}")
        if isa not in cpu_isas():
            raise ValueError(f"--cpu-isa: this CPU cannot run the {isa} code (it runs {', '.join(cpu_isas())})")
    if not isas or len(set(isas)) != len(isas):
        raise ValueError(f"--cpu-isa: give distinct instruction sets, got {arg!r}")
    return isas


def with_isa_systems(names: list[str], isas: list[str | None]) -> list[str]:
    """``names`` plus ``pfengine[-head]-<isa>`` for every instruction set after the first."""
    extra = [f"{n}-{isa}" for isa in isas[1:] for n in names if n in ("pfengine", "pfengine-head")]
    return names + extra


def pfengine_kind(name: str) -> tuple[str, str | None] | None:
    """("model" | "head", the forced instruction set or None) for a pfengine system name, else None."""
    from pfengine.kernels import CPU_ISAS

    for isa in (None, *CPU_ISAS):
        for kind, base in (("model", "pfengine"), ("head", "pfengine-head")):
            if name == (base if isa is None else f"{base}-{isa}"):
                return kind, isa
    return None


def make_system(name: str, ck, log_dir: Path, max_wl: Workload, isa: str | None = None):
    """An object with ``system``, ``variant``, ``warmup(wl, ids)``, ``run(wl, ids, seed)`` (and maybe ``close``).
    ``isa``: the instruction set of the plain pfengine systems (``--cpu-isa``'s first)."""
    if pfengine_kind(name):
        from bench.pfengine_pf import PfenginePF

        kind, own = pfengine_kind(name)
        return PfenginePF(ck, kind, isa=own or isa)
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


def _start_all(names: list[str], ck, log_dir: Path, max_wl: Workload, log, isa: str | None) -> tuple[dict, dict]:
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
            systems[n] = make_system(n, ck, log_dir, max_wl, isa)
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
    for key in ("decode_step_s", "decode_step_cpu_s"):  # pfengine's unprofiled decode steps
        if all(key in r for r in runs):
            out[key] = statistics.median(r[key] for r in runs)
    return out


def decode_steps(records: dict, ck, base: Workload, ids, machine: dict) -> dict:
    """The median unprofiled decode step of each pfengine system at each N against the roofline
    (:func:`bench.roofline.place`; the mean context of the run, as in the profile pass). With one
    thread the machine was measured in process CPU time, and so is the step."""
    from bench.roofline import model_shape, place, step_cost

    shape = model_shape(ck.policy)
    ctx = statistics.mean(len(i) for i in ids) + base.steps * base.step_tokens / 2
    key = "decode_step_cpu_s" if machine.get("clock") == "process_time" else "decode_step_s"
    return {name: {str(n): place(step_cost(shape, r["decode_batch"], ctx, lm_head=True), r[key], machine,
                                 r["code_isa"]) | {"batch": r["decode_batch"], "context": ctx}
                   for n, r in per_n.items()}
            for name, per_n in records.items() if pfengine_kind(name) and per_n}


def run(args: argparse.Namespace) -> dict:
    """The benchmark; with ``--cpu-isa``, every pfengine engine of the run (its_hub's in-process ones
    too) runs the first instruction set's code unless its system names another."""
    from bench.pfengine_pf import cpu_isa_forced

    isas = parse_cpu_isas(args.cpu_isa)
    with cpu_isa_forced(isas[0]):
        return _run(args, isas)


def _run(args: argparse.Namespace, isas: list[str | None]) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    # SIGTERM unwinds like an exception, so the vLLM peers are shut down instead of orphaned
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # vLLM's worker: both cores with 2 threads (its default binds one and reserves the other)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1" if args.threads >= 2 else "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = resolve(args)
    names = with_isa_systems([s.strip() for s in args.systems.split(",") if s.strip()], isas)
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
    from bench.roofline import describe_machine, measure_machine

    # one thread: CPU time, the cost of the work whatever else runs on the machine (decode steps too)
    cpu = measure_machine(args.threads, clock=time.process_time if args.threads == 1 else time.perf_counter)
    log(describe_machine(cpu))
    systems, skipped = _start_all(names, ck, log_dir, base, log, isas[0])
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
        profile = profile_pass(ck, base, cfg["particles"], ids, out_dir, tag, cpu, isas)
    result = {"tag": tag, "workload": asdict(base) | {"particles": cfg["particles"]}, "repeats": cfg["repeats"],
              "checkpoints": ck.to_json(), "prompt_tokens": [len(i) for i in ids],
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "torch_threads": args.threads, "load_at_start": load_before, "load_at_end": load_average(),
                          "cpu": cpu, "cpu_isas_run": isas},
              "records": {n: {str(k): v for k, v in r.items()} for n, r in records.items() if r},
              "skipped": skipped, "runs": raw, "profile": profile,
              "total_seconds": time.perf_counter() - started}
    result["decode_step"] = decode_steps(records, ck, base, ids, cpu)
    result["ratios"] = ratios(result)
    result["ratios_by_isa"] = {name: ratios(result, name) for name in result["records"]
                               if pfengine_kind(name) and pfengine_kind(name)[0] == "model" and pfengine_kind(name)[1]}
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


def profile_pass(ck, base: Workload, particles: list[int], ids, out_dir: Path, tag: str, machine: dict,
                 isas: list[str | None]) -> dict:
    """pfengine under torch.profiler at each N and instruction set: phase table + roofline of its decode step."""
    from bench.pfengine_pf import PfenginePF, cpu_isa_forced
    from bench.phases import profile_engine
    from bench.roofline import code_isa, decode_roofline

    out = {"machine": machine, "per_n": {}}
    for n in particles:
        wl = replace(base, particles=n)
        for isa in isas:
            for kind in (["model"] if ck.prm_dir else []) + (["head"] if ck.value_head else []):
                key = f"{kind}-{isa}-{n}" if isa and isa != isas[0] else f"{kind}-{n}"
                s = PfenginePF(ck, kind, isa=isa)
                s.warmup(wl, ids)
                trace = out_dir / f"{tag}-trace-pfengine-{key.rsplit('-', 1)[0]}-N{n}.json"
                with cpu_isa_forced(isa):
                    table = profile_engine(s._engine(wl, ids), s.requests(wl, seed=0), trace)
                    ran = code_isa()
                table.pop("key_averages")
                mean_ctx = statistics.mean(len(i) for i in ids) + wl.steps * wl.step_tokens / 2
                table["roofline"] = decode_roofline(ck.policy, ck.prm_dir if kind == "model" else None, table,
                                                    batch=wl.prompts * n, context=mean_ctx, machine=machine,
                                                    prm_tokens=wl.prompts * n * (wl.step_tokens + 1), isa=ran)
                out["per_n"][key] = table
                del s
    return out


def ratios(result: dict, ref_name: str = "pfengine") -> dict:
    """The speed-up (wall-time ratio) of ``ref_name`` over each peer at every N (the other pfengine
    systems are not peers of the ISA variants)."""
    rec = result["records"]
    ref = rec.get(ref_name, {})
    out: dict[str, dict[str, float]] = {}
    for name, per_n in rec.items():
        if name == ref_name or (ref_name != "pfengine" and name.startswith("pfengine")):
            continue
        out[name] = {n: per_n[n]["wall_s"] / ref[n]["wall_s"] for n in per_n if n in ref}
    return out


def _ordered(d: dict) -> dict:
    """Systems in the canonical order (pfengine first, each pfengine system's instruction-set variants
    after it)."""
    rank = {n: k for k, n in enumerate(ALL_SYSTEMS + ["its_hub-head", "transformers-head"])}

    def key(name: str) -> tuple[int, str]:
        kind = pfengine_kind(name)
        base = name[:-len(kind[1]) - 1] if kind and kind[1] else name
        return rank.get(base, len(rank)), name

    return dict(sorted(d.items(), key=lambda kv: key(kv[0])))


def _fmt(x, spec=".2f", none="—"):
    return none if x is None else format(x, spec)


def markdown(result: dict) -> str:
    from bench.roofline import describe_machine

    w = result["workload"]
    m = result["machine"]
    lines = [f"## pfengine benchmark ({result['tag']})", "",
             f"Workload: P={w['prompts']} prompts × N particles × S={w['steps']} steps × L={w['step_tokens']} tokens "
             f"(prompt tokens {result['prompt_tokens']}), temperature {w['temperature']}, PRM `model` aggregation "
             f"(one step tag after the last step), fp32, {m['torch_threads']} threads; median of {result['repeats']} "
             f"interleaved repeats. Load average at start {[round(x, 2) for x in m['load_at_start']]}, "
             f"at end {[round(x, 2) for x in m['load_at_end']]} (2 cores, shared).", "",
             describe_machine(m["cpu"]) if m.get("cpu") else "CPU not measured.", "",
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
    for ref, table in result.get("ratios_by_isa", {}).items():
        lines += ["", f"{ref}'s speed-up over each peer (the same run, its wall time as the reference):", "",
                  "| peer | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---:|" * len(ns)]
        for name, per_n in _ordered(table).items():
            lines.append(f"| {name} | " + " | ".join(_fmt(per_n.get(str(n)), ".2f") + "×" if per_n.get(str(n))
                                                     else "—" for n in ns) + " |")
    if result.get("decode_step"):
        cpu_time = result["machine"]["cpu"].get("clock") == "process_time"
        lines += ["", "pfengine's decode step, unprofiled: the policy forward of B tokens and the LM head, median of "
                      "the timed runs' median steps" + (" in process CPU time (one thread)" if cpu_time else "") +
                      ", against the roofline (the machine above; 'that code': the compute roof lowered to pfengine's "
                      "linear-kernel GEMM rate on the instruction set the run used):",
                  "", "| system | N | B | decode step ms | roofline ms | fraction of roofline | code | roofline ms of "
                      "that code | fraction | achieved GFLOP/s |", "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        for n in ns:
            for name, per_n in _ordered(result["decode_step"]).items():
                p = per_n.get(str(n))
                if p:
                    lines.append(f"| {name} | {n} | {p['batch']:.0f} | {1e3 * p['measured_s']:.2f} | "
                                 f"{1e3 * p['roofline_s']:.2f} | {100 * p['fraction_of_roofline']:.0f} % | "
                                 f"{p.get('isa', '—')} | {_fmt(p.get('isa_roofline_s') and 1e3 * p['isa_roofline_s'])} | "
                                 f"{_fmt(p.get('fraction_of_isa_roofline') and 100 * p['fraction_of_isa_roofline'], '.0f')} % | "
                                 f"{p['achieved_gflops']:.1f} |")
    prof = result.get("profile")
    if prof:
        from pfengine.profiling import format_phase_table

        mc = prof["machine"]
        lines += ["", describe_machine(mc) + f" Reference: {mc['reference']['gemm_gflops']:.0f} GFLOP/s, "
                      f"{mc['reference']['mem_gbs']:.0f} GB/s.", "",
                  "Roofline of pfengine's decode step (policy: one forward of B = P×N tokens at the mean context; "
                  "PRM: one extend of B = P×N×(L+1) tokens, a step and its tag per particle; against the limits "
                  "measured now, above: torch's GEMM rate and the copy rate; the last columns use the GEMM rate of "
                  "pfengine's linear kernel on the instruction set the run used where that is lower, e.g. AVX2 code "
                  "on an AVX-512 machine):", "",
                  "| run | model | B | FLOP/step | bytes/step | FLOP/byte | bound | measured ms | roofline ms | "
                  "fraction of roofline | achieved GFLOP/s | code | roofline ms of that code | fraction |",
                  "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|---:|"]
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
                             f"{p['achieved_gflops']:.1f} | {p.get('isa', '—')} | "
                             f"{_fmt(p.get('isa_roofline_s') and 1e3 * p['isa_roofline_s'], '.1f')} | "
                             f"{_fmt(p.get('fraction_of_isa_roofline') and 100 * p['fraction_of_isa_roofline'], '.0f')} % |")
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
        from pfengine.profiling import PHASES

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
