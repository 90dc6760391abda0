"""The benchmark harness on a tiny configuration: pfengine, its_hub-style PF, transformers PF and (when
llama-cpp-python is installed) llama.cpp do the same work, and pfengine forwards every token once
(recompute ratio 1.00). vLLM is not run here."""
import json
import os

import pytest

pytest.importorskip("its_hub")


def test_bench_harness_same_work_and_pfengine_recompute_is_one(tmp_path):
    from bench.harness import build_parser, run

    args = build_parser().parse_args([
        "--smoke", "--systems", "pfengine,pfengine-head,its_hub,transformers,llama.cpp", "--particles", "4",
        "--prompts", "2", "--steps", "2", "--step-tokens", "4", "--repeats", "1", "--no-profile",
        "--model-cache", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--tag", "smoke"])
    result = run(args)
    recs = result["records"]
    peers = {"pfengine", "pfengine-head", "its_hub", "transformers"}
    if _llama_cpp_ready():  # seq_cp forks: each ancestor's prefix is shared, never fed again
        assert set(recs) == peers | {"llama.cpp"}
        assert recs["llama.cpp"]["4"]["policy_recompute"] < 1.1 and recs["llama.cpp"]["4"]["prm_recompute"] < 1.1
    else:
        assert set(recs) == peers and "llama.cpp" in result["skipped"]
    expected = 2 * 4 * 2 * 4
    for name, per_n in recs.items():
        r = per_n["4"]
        assert r["generated_tokens"] == expected and r["same_work_all_runs"], name
        assert r["union_tokens"] >= sum(result["prompt_tokens"]), name
    for name in ("pfengine", "pfengine-head"):
        assert recs[name]["4"]["policy_recompute"] == 1.0
    assert recs["pfengine"]["4"]["prm_recompute"] == 1.0
    # the peers re-read prefixes: more than the union, on the policy and on the PRM
    for name in ("its_hub", "transformers"):
        assert recs[name]["4"]["policy_recompute"] > 1.0 and recs[name]["4"]["prm_recompute"] > 1.0
    saved = json.loads((tmp_path / "out" / "smoke.json").read_text())
    assert saved["records"]["pfengine"]["4"]["policy_tokens"] == recs["pfengine"]["4"]["policy_tokens"]
    assert "| pfengine" in (tmp_path / "out" / "smoke.md").read_text()


def _llama_cpp_ready() -> bool:
    from bench.llamacpp_pf import Unavailable, check

    try:
        check()
    except Unavailable:
        return False
    return True


@pytest.mark.cpp
def test_bench_runs_pfengine_once_per_forced_instruction_set(tmp_path, monkeypatch):
    from bench.harness import build_parser, parse_cpu_isas, run
    from pfengine.kernels import cpp_ops

    monkeypatch.delenv("PFENGINE_CPU_ISA", raising=False)
    best = cpp_ops().cpu_isas()[0]
    with pytest.raises(ValueError, match="--cpu-isa: 'sse' is not one of avx512, avx2, portable"):
        parse_cpu_isas("avx2,sse")
    with pytest.raises(ValueError, match="distinct"):
        parse_cpu_isas("portable,portable")
    isas = "portable" if best == "portable" else f"portable,{best}"
    args = build_parser().parse_args([
        "--smoke", "--systems", "pfengine", "--particles", "2", "--prompts", "1", "--steps", "1", "--step-tokens", "2",
        "--repeats", "1", "--no-profile", "--cpu-isa", isas, "--model-cache", str(tmp_path / "model"),
        "--out", str(tmp_path / "out"), "--tag", "isa"])
    result = run(args)
    assert "PFENGINE_CPU_ISA" not in os.environ, "the run's instruction set must not outlive it"
    recs = result["records"]
    assert recs["pfengine"]["2"]["variant"] == "separate PRM, portable code"
    assert result["machine"]["cpu"]["code_isa"] == "portable" and result["machine"]["cpu"]["isas"][0] == best
    assert recs["pfengine"]["2"]["decode_steps"] > 0 and recs["pfengine"]["2"]["decode_step_s"] > 0
    assert result["decode_step"]["pfengine"]["2"]["isa"] == "portable"
    md = (tmp_path / "out" / "isa.md").read_text()
    assert "decode step, unprofiled" in md
    assert f"best instruction set {best} (the C++ kernels run portable code, forced by PFENGINE_CPU_ISA)" in md
    if best != "portable":
        assert recs[f"pfengine-{best}"]["2"]["variant"] == f"separate PRM, {best} code"
        assert recs[f"pfengine-{best}"]["2"]["generated_tokens"] == recs["pfengine"]["2"]["generated_tokens"]
        assert set(result["ratios_by_isa"]) == {f"pfengine-{best}"}
