"""pfengine under torch.profiler: the Chrome/Perfetto trace and its phase table (the table itself is
``pfengine.profiling.phase_table``, the same one ``pfengine profile`` prints)."""
from __future__ import annotations

import time
from pathlib import Path

from pfengine.profiling import phase_table


def profile_engine(engine, requests: list, out: str | Path, record_shapes: bool = False) -> dict:
    """Run ``requests`` on ``engine`` under torch.profiler; write the Chrome trace; the phase table."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    before = engine.stats()
    with profile(activities=activities, record_shapes=record_shapes) as prof:
        t0 = time.perf_counter()
        results = engine.generate(requests)
        wall = time.perf_counter() - t0
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out))
    table = phase_table(out, wall)
    after = engine.stats()
    table["generated_tokens"] = sum(r.stats.generated_tokens for r in results)
    table["engine"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    table["trace"] = str(out)
    table["key_averages"] = prof.key_averages()
    return table
