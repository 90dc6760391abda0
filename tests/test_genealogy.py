"""The genealogy view (pfengine/genealogy): the tree it draws against the trace it came from, for every
search method on the bundled toy model; the HTML page's escaping of model text; the saved-result
reader's errors; the PNG; the `pfengine trace` / `--trace-html` commands."""
import json
import math
import re
import shutil
import subprocess
from dataclasses import asdict, replace
from html import escape
from pathlib import Path

import pytest

from pfengine import genealogy
from pfengine.config import EngineConfig, SearchParams
from pfengine.genealogy import html
from pfengine.genealogy.tree import build
from pfengine.state import StepTrace
from pfengine.toy.pf import POLICY, VALUE_HEAD, is_bundled, pf_request
from pfengine.toy.task import heldout_set

pytestmark = pytest.mark.skipif(not is_bundled(), reason="the bundled toy checkpoints are missing")

METHODS = {"particle_filter": dict(n_particles=9), "particle_gibbs": dict(n_particles=9, iterations=3),
           "parallel_tempering": dict(n_particles=9, temperatures=(1.0, 2.0, 4.0)),
           "beam_search": dict(n_particles=9, beam_width=3), "dvts": dict(n_particles=9, beam_width=3),
           "best_of_n": dict(n_particles=4), "weighted_best_of_n": dict(n_particles=4),
           "self_consistency": dict(n_particles=4), "greedy": dict(n_particles=1)}
XSS = ('</script><script>document.body.append("PWNED-SCRIPT")</script>'
       '<img src=x onerror="document.body.append(\'PWNED-IMG\')">&amp;')


def ids_text(ids: list[int]) -> str:
    """A detokenizer that keeps the ids readable back: each step as "<id id ...>"."""
    return "<" + " ".join(map(str, ids)) + ">"


def ids_back(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


@pytest.fixture(scope="module")
def engine():
    from pfengine.engine import Engine

    return Engine(EngineConfig(model=str(POLICY), prm=str(VALUE_HEAD), num_blocks=4096, max_particles=512))


@pytest.fixture(scope="module")
def runs(engine):
    """One request per method on a held-out problem, all batched in one engine run."""
    problem = heldout_set(8)[5]
    requests = [pf_request(problem, seed=3, temperature=0.0 if m == "greedy" else 1.0, method=m, **kw)
                for m, kw in METHODS.items()]
    results = engine.generate(requests)
    grade = genealogy.grader(str(problem.answer))
    return {m: (request, result, genealogy.from_result(result, request.search, request.prompt, grade))
            for m, request, result in zip(METHODS, requests, results)}


def expected_nodes(run: genealogy.Run, band_size: int) -> int:
    """Independent count from the trace: per sweep one prompt node, per round one node per distinct
    particle history -- its tokens and, round by round back to the sweep's start, the band it was in
    and its length (copies of one history are one node; a copy that came through another chain is not)."""
    roots = len({t.sweep for t in run.trace})
    histories = set()
    for k, t in enumerate(run.trace):
        for i, toks in enumerate(t.tokens):
            path, slot, j = [], i, k
            while True:
                path.append((slot // band_size, len(run.trace[j].tokens[slot])))
                if j == 0 or run.trace[j - 1].sweep != run.trace[j].sweep:
                    break
                slot = run.trace[j - 1].ancestors[slot] if run.trace[j - 1].ancestors is not None else slot
                j -= 1
            histories.add((k, tuple(toks), tuple(path)))
    return roots + len(histories)


def slot_lineage(run: genealogy.Run, last_round: int, slot: int) -> list[list[int]]:
    """Token sequences of a slot's ancestors, round by round back to its sweep's start, from the trace."""
    seqs = []
    k = last_round
    while True:
        seqs.append(run.trace[k].tokens[slot])
        if k == 0 or run.trace[k - 1].sweep != run.trace[k].sweep:
            return seqs[::-1]
        slot = run.trace[k - 1].ancestors[slot] if run.trace[k - 1].ancestors is not None else slot
        k -= 1


@pytest.mark.parametrize("method", list(METHODS))
def test_tree_matches_the_trace(runs, method):
    request, result, run = runs[method]
    tree = build(run, ids_text)
    n = run.n_particles
    assert len(tree.nodes) == expected_nodes(run, tree.band_size)
    assert len(tree.edges) == len(tree.nodes) - len({t.sweep for t in run.trace})
    for c, column in enumerate(tree.columns):
        members = [node for node in tree.nodes if node.column == c]
        if column.round > 0:  # every particle of a round is in exactly one node; weights sum to 1
            assert sorted(s for node in members for s in node.slots) == list(range(n))
            assert math.isclose(sum(node.weight for node in members), 1.0, rel_tol=1e-6)
        for node in members:
            if not node.is_root:
                assert tree.nodes[node.parent].column == c - 1
    # the chosen path spells the chosen candidate's tokens, step by step, and follows the trace's ancestry
    path = tree.chosen
    assert tree.nodes[path[0]].is_root and len(path) >= 2
    assert spell(tree, path[-1]) == result.particles[result.best].token_ids
    end = tree.nodes[path[-1]]
    assert end.candidate == result.best
    k = sum(1 for c in tree.columns[:end.column] if c.round > 0)  # the trace round of the end's column
    assert slot_lineage(run, k, end.slots[0]) == [spell(tree, i) for i in path[1:]]
    # every final candidate is a node spelling its tokens
    marked = [i for i, node in enumerate(tree.nodes) if node.candidate >= 0]
    assert all(spell(tree, i) == run.candidates[tree.nodes[i].candidate] for i in marked)
    assert {tuple(spell(tree, i)) for i in marked} == {tuple(c) for c in run.candidates}


def spell(tree, i: int) -> list[int]:
    """The tokens of node ``i``: its steps' ids from the prompt down."""
    steps = []
    while not tree.nodes[i].is_root:
        steps.append(ids_back(tree.nodes[i].step))
        i = tree.nodes[i].parent
    return [t for step in reversed(steps) for t in step]


def test_methods_show_their_structure(runs):
    pg = build(runs["particle_gibbs"][2], ids_text)
    assert len({c.sweep for c in pg.columns}) == 3
    refs = [node for node in pg.nodes if node.reference]
    assert refs and all(pg.columns[node.column].sweep > 0 and pg.run.n_particles - 1 in node.slots for node in refs)
    assert all(any(node.reference for node in pg.nodes if node.column == c)
               for c, col in enumerate(pg.columns) if col.sweep > 0 and col.round > 0)
    pt = build(runs["parallel_tempering"][2], ids_text)
    assert pt.bands == ["chain T=1", "chain T=2", "chain T=4"] and pt.band_size == 3
    assert all(all(s // 3 == node.band for s in node.slots) for node in pt.nodes if not node.is_root)
    dvts = build(runs["dvts"][2], ids_text)
    assert dvts.bands == ["subtree 1", "subtree 2", "subtree 3"]
    pf = build(runs["particle_filter"][2], ids_text)
    assert any(node.forked for node in pf.nodes) and any(node.count > 1 for node in pf.nodes)
    for method in ("best_of_n", "self_consistency", "greedy"):  # independent samples: never forked
        tree = build(runs[method][2], ids_text)
        assert not any(node.forked for node in tree.nodes)
        assert tree.scored_any == (method == "best_of_n")
    assert "Independent samples" in genealogy.html.render(genealogy.picture(runs["best_of_n"][2], ids_text))


def test_html_page_is_self_contained_and_consistent(runs, engine):
    request, result, run = runs["particle_filter"]
    page = html.render(genealogy.picture(run, engine.detokenize))
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "@import" not in page
    svg_nodes = re.search(r'<g id="pf-nodes">(.*?)</g>', page, re.S).group(1).count("<circle")
    svg_edges = re.search(r'<g id="pf-edges">(.*?)</g>', page, re.S).group(1).count("<path")
    data = json.loads(re.search(r'<script type="application/json" id="pf-data">(.*?)</script>', page, re.S).group(1))
    tree = build(run, engine.detokenize)
    assert svg_nodes == len(data["nodes"]) == len(tree.nodes) and svg_edges == len(tree.edges)
    assert data["candidates"][run.best][1] is run.correct[run.best]
    assert (" ✓" if run.correct[run.best] else " ✗") in page


def test_model_text_cannot_inject_markup(runs):
    """A step text full of markup reaches the page escaped: no tag of it opens, the data block stays
    closed, and the JSON gives the text back unchanged."""
    request, result, run = runs["particle_filter"]
    evil = lambda ids: XSS + ids_text(ids)  # noqa: E731
    hostile = replace(run, prompt=XSS, answers=[XSS] * len(run.answers))
    page = html.render(genealogy.picture(hostile, evil))
    for fragment in ("<script>document", "<img src=x", '</script><script>doc'):
        assert fragment not in page
    blocks = re.findall(r"<script[^>]*>(.*?)</script>", page, re.S)
    assert len(blocks) == 3  # the error handler, the data, the page script: nothing else opened or closed one
    data = json.loads(blocks[1])
    assert data["prompt"] == XSS and all(s.startswith(XSS) for s in data["steps"][1:])
    assert data["candidates"][0][0] == XSS


def test_saved_result_round_trip(runs, engine, tmp_path):
    request, result, run = runs["parallel_tempering"]
    saved = json.loads(json.dumps(asdict(result) | {"prompt": request.prompt, "search": asdict(request.search)}))
    again = genealogy.from_json(saved, "saved.json")
    assert build(again, engine.detokenize).bands == build(run, engine.detokenize).bands
    assert len(build(again, engine.detokenize).nodes) == len(build(run, engine.detokenize).nodes)
    no_search = {k: v for k, v in saved.items() if k != "search"}
    assert build(genealogy.from_json(no_search), engine.detokenize).bands == [""]


def _broken(saved: dict, change) -> dict:
    data = json.loads(json.dumps(saved))
    change(data)
    return data


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("trace"), "trace: expected a non-empty list"),
    (lambda d: d["trace"][1].update(ancestors=[99] * len(d["trace"][1]["tokens"])), "trace[1].ancestors: expected"),
    (lambda d: d["trace"][0].update(scores=["high"] * len(d["trace"][0]["tokens"])), "trace[0].scores: expected"),
    (lambda d: d["trace"][0].update(scores=[2.0] * len(d["trace"][0]["tokens"])), "trace[0].scores: expected"),
    (lambda d: d["trace"][2].update(log_weights=[float("nan")] * len(d["trace"][2]["tokens"])),
     "trace[2].log_weights: expected"),
    (lambda d: d["trace"][1]["tokens"].pop(), "trace[1].tokens: expected 9 particles"),
    (lambda d: d.update(best=len(d["particles"])), "best: expected an index"),
    (lambda d: d.update(method="magic"), "method: expected one of"),
    (lambda d: d.update(search={"particles": 3}), "search: expected only SearchParams fields"),
    (lambda d: d.update(search={"method": "particle_filter", "n_particles": -1}), "search: n_particles: must be >= 1"),
    (lambda d: d["particles"][0].update(token_ids="12 13"), "particles[0].token_ids: expected"),
    (lambda d: d.update(prompt=["user", "hi"]), "prompt: expected a string or chat messages"),
])
def test_saved_result_errors_name_the_field(runs, change, message):
    request, result, _ = runs["particle_filter"]
    saved = json.loads(json.dumps(asdict(result)))
    with pytest.raises(ValueError, match=re.escape(message)):
        genealogy.from_json(_broken(saved, change), "r.json")


def test_a_trace_that_contradicts_its_ancestry_is_refused(runs):
    request, result, run = runs["particle_filter"]
    k = next(k for k, t in enumerate(run.trace[:-1]) if t.ancestors is not None)
    bad = [replace(t) for t in run.trace]
    tokens = [list(x) for x in bad[k + 1].tokens]
    tokens[0] = [t + 1 for t in tokens[0]]
    bad[k + 1] = replace(bad[k + 1], tokens=tokens)
    with pytest.raises(ValueError, match=rf"trace\[{k + 1}\]: particle 0 does not extend particle"):
        build(replace(run, trace=bad), ids_text)


def test_png_is_drawn(runs, engine, tmp_path):
    from PIL import Image

    request, result, run = runs["particle_gibbs"]
    paths = genealogy.write(run, engine.detokenize, tmp_path, "pg")
    assert [p.name for p in paths] == ["pg.html", "pg.png"]
    image = Image.open(paths[1]).convert("RGB")
    layout = genealogy.picture(run, engine.detokenize)
    assert image.width >= layout.width and image.height > layout.height
    assert len(image.getcolors(1 << 16)) > 20  # drawn, not blank


def synthetic(n: int, rounds: int) -> genealogy.Run:
    """Every step new: n nodes per round, the largest tree a run of this size can give."""
    trace, tokens = [], [[] for _ in range(n)]
    for k in range(rounds):
        tokens = [tokens[(i * 7 + k) % n] + [1000 * k + i, 5, 6, 7] for i in range(n)]
        scores = [((i * 37 + k) % 100 + 0.5) / 101 for i in range(n)]
        trace.append(StepTrace(tokens=tokens, scored=[True] * n, scores=scores,
                               log_weights=[math.log(s / (1 - s)) - 3 for s in scores], ess=n / 2,
                               ancestors=[(i * 7 + k + 1) % n for i in range(n)] if k < rounds - 1 else None))
    return genealogy.Run("particle_filter", trace, [list(t) for t in tokens], ["1"] * n, 0,
                         SearchParams(n_particles=n), "synthetic")


def test_a_256_particle_40_round_page_stays_small(tmp_path):
    run = synthetic(256, 40)
    paths = genealogy.write(run, lambda ids: f"step {ids[0]} text", tmp_path, "big")
    tree = build(run, str)
    assert len(tree.nodes) == 256 * 40 + 1
    assert paths[0].stat().st_size < 3e6 and paths[1].stat().st_size < 3e6


@pytest.mark.slow
def test_cli_trace_runs_and_redraws(tmp_path, capsys):
    from pfengine.cli import main

    problem = heldout_set(3)[1]
    args = ["--particles", "4", "--max-steps", "8", "--max-step-tokens", "24", "--num-blocks", "512", "--no-progress",
            "--temperature", "0.8", "--chat"]
    assert main(["trace", "--prompt", problem.text, "--reference", str(problem.answer), "--out", str(tmp_path),
                 *args]) == 0
    out = capsys.readouterr().out
    assert "Chosen candidate" in out and ("correct" in out or "wrong" in out)
    assert {p.name for p in tmp_path.iterdir()} == {"trace.html", "trace.png", "trace.json"}
    first = (tmp_path / "trace.html").read_text()
    assert main(["trace", "--result", str(tmp_path / "trace.json"), "--out", str(tmp_path / "again"), "--no-png"]) == 0
    assert (tmp_path / "again" / "trace.html").read_text().count("<circle") == first.count("<circle")
    assert main(["generate", "--prompt", problem.text, "--trace-html", str(tmp_path / "gen"), "--method",
                 "beam_search", "--beam-width", "2", *args]) == 0
    assert {p.name for p in (tmp_path / "gen").iterdir()} == {"trace.html", "trace.png"}
    assert "Genealogy:" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["trace"], "give --prompt (run a request) or --result FILE"),
    (["trace", "--prompt", "x", "--result", "r.json"], "give --prompt (run a request) or --result FILE"),
    (["trace", "--result", "/nonexistent/r.json"], "--result /nonexistent/r.json: cannot read it"),
    (["trace", "--result", "r.json", "--particles", "4", "--seed", "2"],
     "--result draws a saved run; --particles, --seed would not be used"),
])
def test_cli_trace_errors(capsys, argv, message):
    from pfengine.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_trace_refuses_a_file_that_is_not_a_result(tmp_path, capsys):
    from pfengine.cli import main

    (tmp_path / "r.json").write_text('{"trace": []}')
    assert main(["trace", "--result", str(tmp_path / "r.json"), "--no-png"]) == 2
    assert "trace: expected a non-empty list of rounds" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# In a real browser: Debian's Chromium, headless (make test installs it as root when missing)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed: `make test` installs "
                                   "Debian's chromium when run as root (apt-get install -y chromium)")
PWNED = ('<script>document.documentElement.setAttribute("data-pwned-script", "1")</script>'
         '<img src="data:," onerror="document.documentElement.setAttribute(\'data-pwned-img\', \'1\')">')


def browse(page: Path, *flags: str, fragment: str = "") -> str:
    """The page's DOM after its scripts ran (``--dump-dom``)."""
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *flags,
                           "--dump-dom", page.resolve().as_uri() + fragment], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def html_tag(dom: str) -> str:
    return re.search(r"<html[^>]*>", dom).group(0)


def status(dom: str) -> dict[str, str]:
    return dict(re.findall(r'(data-[\w-]+)="([^"]*)"', re.search(r'<p id="pf-status"[^>]*>', dom).group(0)))


@needs_browser
@pytest.mark.slow
@pytest.mark.parametrize("method", ["particle_filter", "particle_gibbs", "parallel_tempering", "beam_search",
                                    "best_of_n"])
def test_page_runs_in_chromium(runs, engine, tmp_path, method):
    """No script error; the drawn node and edge counts are the trace's; a #node=K link opens that
    node's details; a screenshot is kept in the test's tmp dir."""
    request, result, run = runs[method]
    page = genealogy.write(run, engine.detokenize, tmp_path, method, png=False)[0]
    tree = build(run, engine.detokenize)
    chosen = tree.chosen[-1]
    dom = browse(page, fragment=f"#node={chosen}")
    assert "data-errors" not in html_tag(dom)
    shown = status(dom)
    assert shown["data-state"] == "ready" and shown["data-edges"] == str(len(tree.edges))
    assert shown["data-nodes"] == str(expected_nodes(run, tree.band_size))
    info = re.search(r'<aside id="pf-info">(.*?)</aside>', dom, re.S).group(1)
    assert escape(tree.nodes[chosen].step.strip()) in info and "on the chosen path" in info
    shot = tmp_path / f"{method}-screenshot.png"
    layout = genealogy.picture(run, engine.detokenize)
    size = f"{int(layout.width) + 40},{int(layout.height) + 240}"
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--window-size={size}", f"--screenshot={shot}", page.resolve().as_uri()],
                          capture_output=True, timeout=120)
    assert done.returncode == 0 and shot.stat().st_size > 5000
    print(f"screenshot: {shot}")


@needs_browser
@pytest.mark.slow
def test_model_text_stays_text_in_chromium(runs, tmp_path):
    """Markup in the prompt, the steps and the answers shows as text: none of it runs, and the
    details panel shows it escaped. A control page with the same markup unescaped does run it."""
    request, result, run = runs["particle_filter"]
    hostile = replace(run, prompt=PWNED, answers=[PWNED] * len(run.answers))
    page = genealogy.write(hostile, lambda ids: PWNED + ids_text(ids), tmp_path, "hostile", png=False)[0]
    chosen = build(hostile, ids_text).chosen[-1]
    dom = browse(page, fragment=f"#node={chosen}")
    assert "data-pwned" not in html_tag(dom) and "data-errors" not in html_tag(dom)
    assert status(dom)["data-state"] == "ready"
    info = re.search(r'<aside id="pf-info">(.*?)</aside>', dom, re.S).group(1)
    assert escape(PWNED, quote=False) in info
    control = tmp_path / "control.html"
    control.write_text(page.read_text().replace("<header>", "<header>" + PWNED, 1))
    assert 'data-pwned-script="1"' in html_tag(browse(control))


@needs_browser
@pytest.mark.slow
def test_a_script_error_is_caught(runs, tmp_path):
    """The error check can fail: a page whose script throws reports it in the DOM."""
    request, result, run = runs["best_of_n"]
    page = genealogy.write(run, ids_text, tmp_path, "broken", png=False)[0]
    page.write_text(page.read_text().replace('JSON.parse(document', 'JSON.parse(missingName + document', 1))
    dom = browse(page)
    assert 'data-errors="1"' in html_tag(dom) and "missingName" in dom
    assert status(dom)["data-state"] == "static"
