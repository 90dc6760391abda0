"""See the particles: a search run's genealogy as a self-contained HTML page and a PNG.

One call per request: :func:`write_result` (a result in memory, e.g. from an evaluation loop), or
:func:`write` with a :class:`Run` from :func:`from_result` / :func:`from_json` (a saved result)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

from pfengine.config import Request
from pfengine.genealogy import html
from pfengine.genealogy.layout import Layout, place
from pfengine.genealogy.record import Run, from_json, from_result, grader
from pfengine.genealogy.tree import build
from pfengine.state import PFResult

__all__ = ["Run", "can_draw_png", "from_json", "from_result", "grader", "picture", "write", "write_result"]


def picture(run: Run, detokenize: Callable[[list[int]], str]) -> Layout:
    """The run's genealogy, aggregated and laid out (``detokenize`` turns each step's ids into text)."""
    return place(build(run, detokenize))


def can_draw_png() -> bool:
    """The PNG needs matplotlib (``pip install 'pfengine[viz]'``); the HTML page needs nothing."""
    return importlib.util.find_spec("matplotlib") is not None


def write(run: Run, detokenize: Callable[[list[int]], str], out_dir: str | Path, name: str = "trace",
          png: bool = True) -> list[Path]:
    """Write ``out_dir/name.html`` and, with ``png``, ``out_dir/name.png``; returns the paths written."""
    assert not png or can_draw_png(), "write: the PNG needs matplotlib (pip install 'pfengine[viz]')"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layout = picture(run, detokenize)
    paths = [out / f"{name}.html"]
    paths[0].write_text(html.render(layout), encoding="utf-8")
    if png:
        from pfengine.genealogy.png import render

        paths.append(out / f"{name}.png")
        render(layout, paths[1])
    return paths


def write_result(result: PFResult, request: Request, detokenize: Callable[[list[int]], str], out_dir: str | Path,
                 name: str = "trace", grade: Callable[[str], bool] | None = None,
                 png: bool | None = None) -> list[Path]:
    """The genealogy of one finished request (``detokenize``: ``Engine.detokenize``). ``grade(text)``
    says whether a candidate's text is right (evaluation runs); ``png`` defaults to whether
    matplotlib is installed."""
    run = from_result(result, request.search, request.prompt, grade)
    return write(run, detokenize, out_dir, name, png=can_draw_png() if png is None else png)
