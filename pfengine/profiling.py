"""Where a profiled run's time went: seconds per engine phase, from the ``pfengine::*`` ranges of its
Chrome trace (``pfengine profile`` prints it; the benchmarks in bench/ use it too)."""
from __future__ import annotations

import json
from pathlib import Path

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
