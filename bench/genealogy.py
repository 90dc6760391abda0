"""Rendering time and file size of the genealogy view (pfengine/genealogy) for particle-filtering
runs of 16 x 10, 64 x 20 and 256 x 40 (particles x rounds).

The traces are synthetic PF runs: every round each particle appends a step of ``--step-tokens`` token
ids, a score in (0, 1) gives its weight softmax(logit r), and systematic resampling picks the next
round's ancestors. ``distinct``: every step is new (no two particles of a round are identical copies:
N nodes per round, the most a run can have); ``copies``: after a resampling, copies of one parent
take the same step with probability 1/2 (identical copies, aggregated into one node). Steps are
detokenized with the bundled toy tokenizer, as a real run's are.

Timed: aggregation + layout (detokenizing every step included), the HTML page, the PNG (matplotlib),
and -- where Chromium is installed -- the browser: the page's own clock (``performance.now()`` from
navigation) when its script has run and when style and layout are done (ready to paint), and the wall
time of ``chromium --headless --screenshot`` of the page less that of a blank page (start-up).

    python -m bench.genealogy                 # writes bench/results/genealogy.{md,json}
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pfengine.config import SearchParams
from pfengine.genealogy import Run, html, picture
from pfengine.state import StepTrace

SIZES = ((16, 10), (64, 20), (256, 40))
VOCAB = range(40, 300)
"""Token ids the synthetic steps draw from (ordinary text pieces of the toy tokenizer)."""


def synthetic_run(n: int, rounds: int, step_tokens: int, copies: bool, seed: int = 0) -> Run:
    rng = random.Random(seed)
    tokens: list[list[int]] = [[] for _ in range(n)]
    parents = list(range(n))
    trace = []
    for k in range(rounds):
        shared: dict[int, list[int]] = {}
        for i in range(n):
            step = [rng.choice(VOCAB) for _ in range(step_tokens)]
            if copies and rng.random() < 0.5:
                step = shared.setdefault(parents[i], step)
            tokens[i] = tokens[i] + step
        scores = [rng.betavariate(2, 2) for _ in range(n)]
        logits = [math.log(s / (1 - s)) for s in scores]
        top = max(logits)
        total = sum(math.exp(x - top) for x in logits)
        log_w = [x - top - math.log(total) for x in logits]
        weights = [math.exp(x) for x in log_w]
        ess = 1 / sum(w * w for w in weights)
        ancestors = _systematic(weights, rng.random()) if k < rounds - 1 else None
        trace.append(StepTrace(tokens=[list(t) for t in tokens], scored=[True] * n, scores=scores,
                               log_weights=log_w, ess=ess, ancestors=ancestors))
        if ancestors is not None:
            tokens, parents = [tokens[a] for a in ancestors], ancestors
    best = max(range(n), key=lambda i: trace[-1].log_weights[i])
    return Run(method="particle_filter", trace=trace, candidates=tokens, answers=[str(i % 7) for i in range(n)],
               best=best, search=SearchParams(n_particles=n), prompt="A synthetic particle-filtering run.",
               correct=[i % 7 == 3 for i in range(n)])


def _systematic(weights: list[float], u: float) -> list[int]:
    n, cum, out, j = len(weights), 0.0, [], 0
    bounds = []
    for w in weights:
        cum += w
        bounds.append(cum)
    for i in range(n):
        x = (i + u) / n
        while j < n - 1 and bounds[j] <= x:
            j += 1
        out.append(j)
    return out


def measure(run: Run, detokenize, out: Path, name: str, repeats: int, chromium: str | None) -> dict:
    from pfengine.genealogy.png import render as render_png

    layout_s, html_s, png_s = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        layout = picture(run, detokenize)
        t1 = time.perf_counter()
        page = html.render(layout)
        t2 = time.perf_counter()
        render_png(layout, out / f"{name}.png")
        t3 = time.perf_counter()
        layout_s.append(t1 - t0)
        html_s.append(t2 - t1)
        png_s.append(t3 - t2)
    (out / f"{name}.html").write_text(page, encoding="utf-8")
    row = {"name": name, "particles": run.n_particles, "rounds": len(run.trace), "nodes": len(layout.tree.nodes),
           "edges": len(layout.tree.edges), "layout_s": statistics.median(layout_s),
           "html_s": statistics.median(html_s), "png_s": statistics.median(png_s),
           "html_bytes": (out / f"{name}.html").stat().st_size, "png_bytes": (out / f"{name}.png").stat().st_size}
    if chromium:
        row |= _browser(chromium, out / f"{name}.html", layout, repeats)
    return row


def _browser(chromium: str, page: Path, layout, repeats: int) -> dict:
    """The page's own clock (from navigation) when its script has run and when style and layout are
    done, and the wall time of a headless screenshot less that of a blank page's (browser start-up)."""
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    size = f"--window-size={int(layout.width) + 40},{int(layout.height) + 200}"
    blank = page.with_name("blank.html")
    blank.write_text("<!DOCTYPE html><title>blank</title>")
    script_ms, layout_ms, shot_s = [], [], []
    for _ in range(repeats):
        dom = subprocess.run(flags + ["--dump-dom", page.resolve().as_uri()], capture_output=True, text=True,
                             timeout=120).stdout
        status = re.search(r'<p id="pf-status"[^>]*>', dom)
        assert status and 'data-state="ready"' in status.group(0), "the page's script did not finish"
        script_ms.append(float(re.search(r'data-ms="(\d+)"', status.group(0)).group(1)))
        layout_ms.append(float(re.search(r'data-layout-ms="(\d+)"', status.group(0)).group(1)))
        walls = []
        for target in (blank, page):
            t = time.perf_counter()
            subprocess.run(flags + [size, f"--screenshot={page.with_suffix('.shot.png')}", target.resolve().as_uri()],
                           capture_output=True, timeout=120, check=True)
            walls.append(time.perf_counter() - t)
        shot_s.append(walls[1] - walls[0])
    return {"browser_script_ms": statistics.median(script_ms), "browser_layout_ms": statistics.median(layout_ms),
            "browser_screenshot_extra_s": statistics.median(shot_s)}


def markdown(rows: list[dict]) -> str:
    browser = all("browser_script_ms" in r for r in rows)
    head = ("| trace | particles × rounds | nodes | edges | layout (s) | HTML (s) | PNG (s) | HTML size | PNG size |"
            + (" browser: script done (ms) | laid out (ms) | screenshot − blank page's (s) |" if browser else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (f"| {r['name']} | {r['particles']} × {r['rounds']} | {r['nodes']} | {r['edges']} | "
                f"{r['layout_s']:.3f} | {r['html_s']:.3f} | {r['png_s']:.3f} | {r['html_bytes'] / 1e6:.2f} MB | "
                f"{r['png_bytes'] / 1e6:.2f} MB |")
        if browser:
            line += (f" {r['browser_script_ms']:.0f} | {r['browser_layout_ms']:.0f} | "
                     f"{r['browser_screenshot_extra_s']:.2f} |")
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from pfengine.model.tokenizer import load_tokenizer
    from pfengine.toy.pf import POLICY

    p = argparse.ArgumentParser(prog="python -m bench.genealogy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per size; medians are reported (default 3)")
    p.add_argument("--step-tokens", type=int, default=8, help="tokens per synthetic step (default 8)")
    p.add_argument("--out", default="bench/results", help="where genealogy.{md,json} go (default bench/results)")
    p.add_argument("--no-browser", action="store_true", help="skip the Chromium timings")
    args = p.parse_args(argv)
    tokenizer = load_tokenizer(str(POLICY))
    detokenize = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    chromium = None if args.no_browser else shutil.which("chromium")
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, rounds in SIZES:
            for copies in (False, True):
                run = synthetic_run(n, rounds, args.step_tokens, copies)
                name = f"{n}x{rounds}-{'copies' if copies else 'distinct'}"
                rows.append(measure(run, detokenize, Path(tmp), name, args.repeats, chromium))
                print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load = (load_before, os.getloadavg()[0])
    table = markdown(rows)
    note = (f"Medians of {args.repeats}; {os.cpu_count()} CPUs, 1-minute load average {load[0]:.1f} before and "
            f"{load[1]:.1f} after (timings on a loaded machine are noisy).")
    (out / "genealogy.md").write_text(f"{table}\n\n{note}\n")
    (out / "genealogy.json").write_text(json.dumps({"rows": rows, "machine": platform.processor() or platform.machine(),
                                                    "cpus": os.cpu_count(), "load_average": load,
                                                    "repeats": args.repeats, "chromium": chromium is not None},
                                                   indent=1))
    print(f"{table}\n\n{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
