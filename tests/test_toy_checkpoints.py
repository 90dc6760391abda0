"""The bundled, trained toy checkpoints load through the public loader and run particle filtering."""
import json

import pytest

from pfengine import Engine, EngineConfig, PRMConfig
from pfengine.cli import main
from pfengine.eval.report import label
from pfengine.toy import demo
from pfengine.toy.pf import POLICY, PRM, PRM_CONFIG, VALUE_HEAD, pf_request
from pfengine.toy.task import check_steps, extract_answer, heldout_set

pytestmark = pytest.mark.skipif(not (POLICY / "config.json").is_file(), reason="toy checkpoints not built")


def test_bundled_checkpoints_are_small_and_complete():
    total = 0
    for d in (POLICY, PRM):
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (d / f).is_file(), f"{d / f} missing"
        total += sum(f.stat().st_size for f in d.iterdir())
    assert VALUE_HEAD.is_file()
    assert total <= 20 * 2 ** 20
    assert json.loads((POLICY / "generation_config.json").read_text())["eos_token_id"] == \
        json.loads((POLICY / "config.json").read_text())["eos_token_id"]


@pytest.mark.parametrize("prm", [VALUE_HEAD, PRM], ids=["value_head", "prm_model"])
def test_pf_on_a_heldout_problem(prm):
    engine = Engine(EngineConfig(model=str(POLICY), prm=str(prm), num_blocks=512,
                                 prm_config=PRM_CONFIG if prm == PRM else PRMConfig()))
    problem = heldout_set(1)[0]
    result = engine.generate([pf_request(problem, n_particles=4, seed=0)])[0]
    assert all(p.finish_reason == "eos" for p in result.particles)  # trained: every solution ends itself
    assert all(0.0 <= p.score <= 1.0 for p in result.particles)
    checks = [check_steps(problem, p.steps) for p in result.particles]
    # A trained policy: every particle is a well-formed solution of this problem's length whose
    # first step (copy the start, apply the first operation) is right.
    assert all(len(c.step_ok) == len(problem.ops) + 1 and c.step_ok[0] for c in checks), \
        [p.steps for p in result.particles]
    assert all(c.answer is not None for c in checks)
    # The PRM prefers correct finished particles: the best-scored one is at least as good as any.
    assert sum(checks[result.best].step_ok) == max(sum(c.step_ok) for c in checks)
    assert engine.stats()["policy_blocks_in_use"] == 0


def test_eval_on_the_toy_set_reproduces_direct_engine_runs(tmp_path):
    """The demo is a preset of `pfengine eval`: the toy problems exported as JSON lines, run in
    batches and graded by math-verify, give the particles and verdicts of running each problem on
    the engine alone and checking it with the toy task's own checker (the old demo's evaluation)."""
    problems = heldout_set(6)
    path = demo.export(problems, tmp_path / "problems.jsonl")
    argv = demo.eval_argv(path, [4], 0.5, 0, PRM, PRM_CONFIG.likelihood, tmp_path / "out")
    argv[argv.index("--method") + 1] = "greedy,best_of_n,beam_search,particle_filter"  # a subset keeps it quick
    assert main(argv + ["--no-progress"]) == 0
    records = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 6 * 4
    engine = Engine(EngineConfig(model=str(POLICY), prm=str(PRM), prm_config=PRM_CONFIG))
    for r in records:
        problem = problems[r["index"]]
        alone = engine.generate([pf_request(problem, r["budget"], r["seed"], 0.5, method=r["method"],
                                            beam_width=min(4, r["budget"]))])[0]
        assert r["text"] == alone.text and r["answer"] == alone.answer
        assert r["correct"] == (extract_answer(alone.text) == problem.answer)


@pytest.mark.slow
def test_demo_traces_one_run_and_evaluates_through_eval(tmp_path, capsys):
    """`pfengine demo` on the bundled model, shrunk: the traced run, then every method at one budget
    through `pfengine eval` (the command is printed), with its JSON lines, summary and plot, and the
    traced run's genealogy."""
    assert main(["demo", "--problems", "3", "--budgets", "2", "--particles", "4", "--out", str(tmp_path),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Round 1" in out and "Chosen particle" in out and "pfengine eval " in out
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert {(r["method"], r["budget"]) for r in rows} == {("greedy", 1)} | {(m, 2) for m in demo.METHODS[1:]}
    assert all(r["total"] == 3 and 0 <= r["correct"] <= 3 for r in rows)
    table = (tmp_path / "summary.md").read_text()
    assert all(label(m) in table for m in demo.METHODS)
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3 * len(demo.METHODS)
    assert (tmp_path / "accuracy_vs_budget.png").stat().st_size > 0
    assert "pf-data" in (tmp_path / "trace.html").read_text() and (tmp_path / "trace.png").stat().st_size > 0
