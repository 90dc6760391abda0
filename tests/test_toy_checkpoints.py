"""The bundled, trained toy checkpoints load through the public loader and run particle filtering."""
import json

import pytest

from pfengine import Engine, EngineConfig
from pfengine.toy.pf import POLICY, PRM, VALUE_HEAD, pf_request
from pfengine.toy.task import check_steps, heldout_set

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
    engine = Engine(EngineConfig(model=str(POLICY), prm=str(prm), num_blocks=512))
    problem = heldout_set(1)[0]
    result = engine.generate([pf_request(problem, n_particles=4, seed=0)])[0]
    assert all(p.finished for p in result.particles)
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


@pytest.mark.slow
def test_demo_traces_one_run_and_writes_the_table(tmp_path, capsys):
    """`pfengine demo` on the bundled model, shrunk: the traced run (and its genealogy), every method at
    one budget, and the Markdown / JSON / PNG report."""
    from pfengine.cli import main
    from pfengine.toy.evaluate import LABELS

    assert main(["demo", "--problems", "3", "--budgets", "2", "--particles", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Round 1" in out and "Chosen particle" in out
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {(r["method"], r["budget"]) for r in rows} == {("greedy", 1)} | {(m, 2) for m in LABELS if m != "greedy"}
    assert all(r["total"] == 3 and 0 <= r["correct"] <= 3 for r in rows)
    table = (tmp_path / "results.md").read_text()
    assert all(label in table for label in LABELS.values())
    assert (tmp_path / "accuracy_vs_budget.png").stat().st_size > 0
    assert "pf-data" in (tmp_path / "trace.html").read_text() and (tmp_path / "trace.png").stat().st_size > 0
