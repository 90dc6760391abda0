"""``pfengine eval``: problem sets, grading with math-verify (checked on the datasets' own reference
answers), Wilson intervals, and batched, resumable runs written as JSON lines."""
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from pfengine.cli import main
from pfengine.eval import report, runner
from pfengine.eval.dataset import Problem, read_problems, write_problems
from pfengine.eval.grading import check_references, grade

DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
"""The full MATH-500 / AIME-2024 / AMC-2023 files, next to the checkout (as in CI); the samples in
``tests/data`` are cut from them."""


def test_reads_the_datasets_formats():
    math = read_problems(DATA / "math500_sample.jsonl")
    assert len(math) == 43 and all(p.solution and p.unique_id.startswith("test/") for p in math)
    assert math[-1].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    amc = read_problems(DATA / "amc2023_sample.jsonl")
    assert amc[0].answer == "27.0" and amc[0].unique_id == "0" and amc[0].solution is None  # a JSON number


@pytest.mark.parametrize("lines, message", [
    (['{"problem": "1+1?", "answer": "2"}', "{oops"], ":2: not JSON"),
    (['["problem", "answer"]'], ":1: expected a JSON object, got list"),
    (['{"answer": "2"}'], ":1: 'problem' must be a non-empty string"),
    (['{"problem": "1+1?", "answer": true}'], ":1: 'answer' must be a non-empty string or a number, got True"),
    (['{"problem": "1+1?"}'], ":1: 'answer' must be a non-empty string or a number, got None"),
    (['{"problem": "a", "answer": "1", "unique_id": "x"}', '', '{"problem": "b", "answer": "2", "unique_id": "x"}'],
     ":3: unique_id 'x' repeats line 1"),
    (['{"problem": "a", "answer": "1", "solution": 5}'], ":1: 'solution' must be a string when present"),
    ([""], "no problems in the file"),
])
def test_bad_problem_files_name_the_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl" + ".*" + message.replace("(", r"\(").replace(")", r"\)")):
        read_problems(path)


def test_written_problems_read_back_with_default_ids(tmp_path):
    problems = [Problem("What is 1/2 + 1/4?", "\\frac{3}{4}", "a"), Problem("2+2?", "4", "b", "2+2=\\boxed{4}")]
    assert read_problems(write_problems(problems, tmp_path / "p.jsonl")) == problems
    (tmp_path / "q.jsonl").write_text('{"problem": "x", "answer": 1}\n\n{"problem": "y", "answer": 2}\n')
    assert [p.unique_id for p in read_problems(tmp_path / "q.jsonl")] == ["0", "1"]


@pytest.mark.parametrize("reference, response", [
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "The polar coordinates are $\\boxed{(3, \\frac{\\pi}{2})}$."),
    ("\\frac{14}{3}", "so $x = \\boxed{14/3}$"),
    ("\\frac{14}{3}", "\\boxed{\\dfrac{14}{3}}"),
    ("27.0", "The answer is \\boxed{27}."),
    ("10\\%", "The answer is \\boxed{10\\%}."),
    ("10\\%", "The answer is \\boxed{10}."),
    ("073", "\\boxed{73}"),
    ("\\text{Evelyn}", "\\boxed{\\text{Evelyn}}"),
    ("\\$32,\\!348", "\\boxed{32348}"),
    ("2, -2", "\\boxed{-2, 2}"),
    ("5", "Therefore the final answer is $5$."),
])
def test_equal_answers_grade_equal(reference, response):
    assert grade(reference, response).correct


@pytest.mark.parametrize("reference, response", [
    ("\\frac{14}{3}", "\\boxed{4.6667}"),
    ("27", "The answer is \\boxed{28}."),
    ("(3, 4)", "\\boxed{(4, 3)}"),
    ("72", "47 + 38 = 85\n\n85 - 13 = 72\n\n72 +"),  # cut off mid-step: no answer stated, however its numbers look
    ("3", "no number here"),
])
def test_different_or_missing_answers_grade_wrong(reference, response):
    g = grade(reference, response)
    assert not g.correct
    assert (g.extracted is None) == ("\\boxed" not in response)


def test_an_unreadable_reference_is_an_error():
    with pytest.raises(ValueError, match="math-verify reads no answer"):
        grade("\\text{ }", "\\boxed{1}")


def test_shipped_samples_grade_their_reference_answers_equal():
    math = read_problems(DATA / "math500_sample.jsonl")
    assert check_references(math, "solution") == [] and check_references(math, "boxed") == []
    for name in ("amc2023", "aime2024"):
        assert check_references(read_problems(DATA / f"{name}_sample.jsonl"), "boxed") == []


@pytest.mark.skipif(not (SHARED / "math500.jsonl").is_file(), reason=f"{SHARED} is not next to this checkout")
def test_every_math500_solution_grades_equal_to_its_answer():
    """The issue's bar: >= 99 % of MATH-500's reference answers grade equal to the answer in their
    solution; AMC-2023 / AIME-2024 answers grade equal to themselves written as \\boxed{answer}."""
    math = read_problems(SHARED / "math500.jsonl")
    assert len(math) == 500 and check_references(math, "solution") == []
    for name, n in (("amc2023", 40), ("aime2024", 30)):
        problems = read_problems(SHARED / f"{name}.jsonl")
        assert len(problems) == n and check_references(problems, "boxed") == []


@pytest.mark.parametrize("correct, total", [(0, 10), (3, 10), (141, 200), (200, 200), (1, 1)])
def test_wilson_interval_is_the_score_tests_acceptance_region(correct, total):
    """Oracle: the Wilson interval holds the p where (p_hat - p)^2 = z^2 p (1 - p) / n (numpy's roots)."""
    z, p_hat = 1.96, correct / total
    roots = np.roots([1 + z * z / total, -(2 * p_hat + z * z / total), p_hat * p_hat])
    assert report.wilson(correct, total) == pytest.approx(tuple(sorted(roots.real)), abs=1e-9)


def test_runs_greedy_once_then_by_budget():
    assert runner.plan_runs(["particle_filter", "greedy", "best_of_n"], [4, 16]) == [
        runner.Run("greedy", 1), runner.Run("particle_filter", 4), runner.Run("best_of_n", 4),
        runner.Run("particle_filter", 16), runner.Run("best_of_n", 16)]


def test_summary_counts_each_batch_once_and_failures_as_wrong(tmp_path):
    rec = dict(method="best_of_n", budget=4, generated_tokens=100)
    records = [rec | dict(correct=True, batch="a", elapsed_s=2.0), rec | dict(correct=False, batch="a", elapsed_s=3.0),
               rec | dict(correct=True, batch="b", elapsed_s=1.5), rec | dict(correct=False, batch="b", elapsed_s=0.5,
                                                                              error="OutOfBlocks: ...")]
    (row,) = report.summarise(records, [("best_of_n", 4)])
    assert (row.correct, row.total, row.errors, row.tokens) == (2, 4, 1, 400)
    assert row.seconds == pytest.approx(4.5) and row.tokens_per_second == pytest.approx(400 / 4.5)
    table = report.markdown([row])
    assert "| BoN | 4 | 50.0% (2/4) | 15.0–85.0% |" in table and "errors" in table
    paths = report.write([row], tmp_path, "t")
    assert json.loads(paths[1].read_text())[0]["accuracy"] == 0.5 and paths[2].stat().st_size > 0


def test_pf_rows_carry_the_mean_expected_accuracy_next_to_the_argmax_accuracy(tmp_path):
    pf = dict(method="particle_filter", budget=8, generated_tokens=10, batch="a", elapsed_s=1.0)
    records = [pf | dict(correct=True, expected_accuracy=0.75), pf | dict(correct=False, expected_accuracy=0.25),
               pf | dict(correct=False, error="OutOfBlocks: ..."),  # no estimate: counts as 0
               dict(method="best_of_n", budget=8, generated_tokens=10, batch="b", elapsed_s=1.0, correct=True)]
    rows = report.summarise(records, [("particle_filter", 8), ("best_of_n", 8)])
    assert rows[0].expected == pytest.approx(1.0 / 3) and rows[1].expected is None
    table = report.markdown(rows).splitlines()
    assert "PF expected accuracy" in table[0]
    assert table[2].startswith("| Particle filtering | 8 | 33.3% (1/3) |") and "| 33.3% |" in table[2]
    assert table[3].startswith("| BoN | 8 | 100.0% (1/1) | 20.7–100.0% | |")
    assert json.loads(report.write(rows, tmp_path, "t")[1].read_text())[0]["expected"] == pytest.approx(1.0 / 3)


def test_cpu_time_is_summed_over_batches_and_only_where_every_record_has_it():
    rec = dict(method="best_of_n", budget=4, generated_tokens=1, correct=True)
    timed = [rec | dict(batch="a", elapsed_s=2.0, cpu_s=1.0), rec | dict(batch="a", elapsed_s=3.0, cpu_s=2.5),
             rec | dict(batch="b", elapsed_s=1.0, cpu_s=0.5)]
    (row,) = report.summarise(timed, [("best_of_n", 4)])
    assert row.cpu_seconds == pytest.approx(3.0)
    assert report.markdown([row]).splitlines()[0].endswith("| wall (s) | CPU (s) |")
    (old,) = report.summarise(timed + [rec | dict(batch="c", elapsed_s=1.0)], [("best_of_n", 4)])
    assert old.cpu_seconds is None and "CPU" not in report.markdown([old])


def test_without_matplotlib_the_summary_is_written_without_the_plot(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "matplotlib" else find_spec(name, *args))
    record = dict(method="greedy", budget=1, generated_tokens=5, correct=True, batch="a", elapsed_s=1.0)
    rows = report.summarise([record], [("greedy", 1)])
    assert [p.name for p in report.write(rows, tmp_path, "t")] == ["summary.md", "summary.json"]
    assert not (tmp_path / "accuracy_vs_budget.png").exists()


def test_a_results_file_cut_mid_line_resumes(tmp_path):
    line = json.dumps({"unique_id": "1", "method": "greedy", "budget": 1})
    path = tmp_path / "results.jsonl"
    path.write_text(line + "\n" + line[:10])
    assert list(runner.read_records(path)) == [("1", "greedy", 1)]
    path.write_text(line[:10] + "\n" + line + "\n")
    with pytest.raises(ValueError, match="results.jsonl:1: not a JSON line"):
        runner.read_records(path)


TINY = ["--max-steps", "2", "--max-step-tokens", "4", "--num-blocks", "256", "--block-size", "8", "--no-progress"]


def lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def test_eval_writes_one_line_per_run_resumes_and_guards_its_settings(tmp_path, capsys, policy_dir, value_head_file):
    data = write_problems([Problem(f"Step {k}: add {k} and 25.", str(k + 25), f"p{k}") for k in range(3)],
                          tmp_path / "toy.jsonl")
    out = tmp_path / "out"
    argv = ["eval", str(data), "--model", policy_dir, "--prm", value_head_file, "--method", "greedy,best_of_n",
            "--budgets", "1,2", "--out", str(out), *TINY]
    assert main(argv) == 0
    first = lines(out)
    assert sorted((r["unique_id"], r["method"], r["budget"]) for r in first) == sorted(
        (f"p{k}", m, b) for k in range(3) for m, b in (("greedy", 1), ("best_of_n", 1), ("best_of_n", 2)))
    for (method, budget) in (("greedy", 1), ("best_of_n", 1), ("best_of_n", 2)):  # one engine batch per run
        assert len({r["batch"] for r in first if (r["method"], r["budget"]) == (method, budget)}) == 1
    assert all(r["seed"] == int(r["unique_id"][1:]) and r["finish_reason"] for r in first)  # seed + k
    assert all(0 < r["cpu_s"] for r in first)
    assert "| Greedy | 1 |" in capsys.readouterr().out and (out / "accuracy_vs_budget.png").is_file()

    assert main(argv) == 0 and lines(out) == first  # nothing left to run
    assert main(argv[:-len(TINY)] + ["--budgets", "1,2,4", *TINY]) == 0
    added = lines(out)[len(first):]
    assert [(r["method"], r["budget"]) for r in added] == [("best_of_n", 4)] * 3
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["method"], r["budget"], r["total"]) for r in summary] == [
        ("greedy", 1, 3), ("best_of_n", 1, 3), ("best_of_n", 2, 3), ("best_of_n", 4, 3)]

    capsys.readouterr()
    assert main(argv + ["--temperature", "0.3"]) == 2
    assert "holds results of other settings (sampling.temperature: 0.8 -> 0.3)" in capsys.readouterr().err
    assert main(argv + ["--temperature", "0.3", "--fresh"]) == 0 and len(lines(out)) == 9


def test_eval_records_pf_expected_accuracy_against_the_reference(tmp_path, capsys, policy_dir, value_head_file):
    """Oracle: the estimate recomputed from the particles' answers and weights of the same request."""
    from pfengine import Engine, EngineConfig, Request, SamplingParams, SearchParams

    problems = [Problem(f"Step {k}: add {k} and 25.", str(k + 25), f"p{k}") for k in range(2)]
    data = write_problems(problems, tmp_path / "toy.jsonl")
    out = tmp_path / "out"
    assert main(["eval", str(data), "--model", policy_dir, "--prm", value_head_file, "--method",
                 "particle_filter,best_of_n", "--budgets", "4", "--no-chat", "--out", str(out), *TINY]) == 0
    engine = Engine(EngineConfig(model=policy_dir, prm=value_head_file, num_blocks=256, block_size=8))
    for r in lines(out):
        if r["method"] != "particle_filter":
            assert "expected_accuracy" not in r
            continue
        result = engine.generate([Request(prompt=problems[r["index"]].problem, sampling=SamplingParams(
            seed=r["seed"], max_steps=2, max_step_tokens=4), search=SearchParams(n_particles=4))])[0]
        want = sum(p.weight for p in result.particles if p.answer == r["reference"]) / sum(
            p.weight for p in result.particles)
        assert r["expected_accuracy"] == pytest.approx(want)
    assert "PF expected accuracy" in capsys.readouterr().out


def test_eval_records_a_failed_request_and_retries_it(tmp_path, capsys, policy_dir):
    data = write_problems([Problem("Step 1: add 1 and 2.", "3", "short"), Problem("word " * 200, "1", "long")],
                          tmp_path / "d.jsonl")
    argv = ["eval", str(data), "--model", policy_dir, "--method", "greedy", "--max-model-len", "64",
            "--out", str(tmp_path / "out"), *TINY]
    assert main(argv) == 0
    first = lines(tmp_path / "out")
    failed = [r for r in first if "error" in r]
    assert len(first) == 2 and [r["unique_id"] for r in failed] == ["long"]
    assert "does not fit" in failed[0]["error"] and "max_model_len=64" in failed[0]["error"]
    assert "errors" in capsys.readouterr().out
    assert main(argv) == 0
    assert [r["unique_id"] for r in lines(tmp_path / "out")[2:]] == ["long"]  # only the failure reran


@pytest.mark.parametrize("argv, message", [
    (["eval", "missing.jsonl"], "missing.jsonl: no such file"),
    (["eval", "{data}", "--method", "beam_search", "--budgets", "6", "--beam-width", "4"],
     "--budgets: beam_search needs a multiple of --beam-width (4), got 6"),
    (["eval", "{data}", "--trace-problems", "3"], "--trace-problems: only with --trace-html DIR"),
    (["eval", "{data}", "--trace-html", "{data}/t"], "/t: cannot create it"),
])
def test_eval_errors_are_readable(tmp_path, capsys, policy_dir, value_head_file, argv, message):
    data = write_problems([Problem("Step 1: add 1 and 2.", "3", "a")], tmp_path / "d.jsonl")
    argv = [a.format(data=data) for a in argv] + ["--model", policy_dir, "--prm", value_head_file,
                                                  "--out", str(tmp_path / "out"), *TINY]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_eval_draws_the_genealogy_of_its_first_problems_with_their_grade(tmp_path):
    from pfengine.toy.pf import POLICY, VALUE_HEAD
    from pfengine.toy.task import heldout_set

    toy = [Problem(p.text, str(p.answer), f"toy/{k} #") for k, p in enumerate(heldout_set(6))]
    data, out, traces = write_problems(toy, tmp_path / "toy.jsonl"), tmp_path / "out", tmp_path / "traces"
    assert main(["eval", str(data), "--model", str(POLICY), "--prm", str(VALUE_HEAD), "--method",
                 "greedy,particle_filter", "--budgets", "2", "--max-steps", "8", "--max-step-tokens", "24",
                 "--no-progress", "--out", str(out), "--trace-html", str(traces), "--trace-problems", "5"]) == 0
    assert {p.name for p in traces.iterdir()} == {"greedy-1", "particle_filter-2"}
    verdicts = []
    for r in lines(out):
        page = traces / f"{r['method']}-{r['budget']}" / f"{r['index']:04d}-toy_{r['index']}_.html"
        assert page.is_file() == (r["index"] < 5)
        if page.is_file():
            verdicts.append(re.search(r'<p class="(ok|bad)" id="pf-verdict">', page.read_text()).group(1))
            assert verdicts[-1] == ("ok" if r["correct"] else "bad")
    assert len(verdicts) == 10 and "ok" in verdicts


def test_pareto_puts_each_runs_rows_at_their_seconds_per_problem(tmp_path, capsys):
    from pfengine.eval import pareto

    def summary(name: str, seconds: list[float]) -> Path:
        rows = [report.Row("particle_filter", b, b, 10, *report.wilson(b, 10), 100, s, cpu_seconds=s / 2)
                for b, s in zip((1, 4), seconds)] + [report.Row("best_of_n", 4, 1, 10, 0.0, 0.5, 100, 9.0)]
        report.write(rows, tmp_path / name, name)
        return tmp_path / name

    prm, head = summary("prm", [2.0, 8.0]), summary("head", [1.0, 3.0])
    assert pareto.main([f"separate PRM={prm}", f"head={head}", "--out", str(tmp_path / "p")]) == 0
    table = (tmp_path / "p" / "pareto.md").read_text().splitlines()
    assert table[2:] == ["| separate PRM | 1 | 10.0% (1/10) | 1.8–40.4% | 0.2000 |",
                         "| separate PRM | 4 | 40.0% (4/10) | 16.8–68.7% | 0.8000 |",
                         "| head | 1 | 10.0% (1/10) | 1.8–40.4% | 0.1000 |",
                         "| head | 4 | 40.0% (4/10) | 16.8–68.7% | 0.3000 |"]
    assert (tmp_path / "p" / "pareto.png").stat().st_size > 0
    assert pareto.main([f"head={head}", "--cost", "cpu", "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "pareto.md").read_text().splitlines()[2:] == [
        "| head | 1 | 10.0% (1/10) | 1.8–40.4% | 0.0500 |", "| head | 4 | 40.0% (4/10) | 16.8–68.7% | 0.1500 |"]
    capsys.readouterr()
    assert pareto.main([f"x={tmp_path / 'nowhere'}", "--out", str(tmp_path / "p")]) == 2
    assert "no summary.json there" in capsys.readouterr().err
    assert pareto.main([f"x={prm}", "--method", "dvts", "--out", str(tmp_path / "p")]) == 2
    assert "summary.json has no dvts rows" in capsys.readouterr().err
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text(json.dumps([{"method": "particle_filter", "budget": 4, "correct": 1,
                                                               "total": 2, "low": 0.1, "high": 0.9, "tokens": 9,
                                                               "seconds": 1.0}]))
    assert pareto.main([f"x={tmp_path / 'old'}", "--cost", "cpu", "--out", str(tmp_path / "p")]) == 2
    assert "its results have no CPU times" in capsys.readouterr().err
