"""bench/gpu_check.py (make gpu-check) where there is no GPU: a missing CUDA device is reported at once;
the whole check on a tiny model on the CPU (no CUDA graphs there: its "graphs" runs are eager) writes
its folder, passes, and its oracle comparisons are meaningful."""
import json

import pytest
import torch

from bench.gpu_check import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_the_check_stops_at_once_and_says_why(tmp_path):
    assert main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device visible to torch" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_the_check_runs_on_the_cpu_with_a_tiny_model(tmp_path, one_thread):
    rc = main(["--device", "cpu", "--shape", "tiny", "--out", str(tmp_path), "--kernel-tests",
               "tests/test_cuda_graphs.py", "--kernel-filter", "bucket", "--agreement-particles", "4",
               "--context", "32", "--decode-batches", "1,4", "--decode-steps", "2", "--pf-particles", "4",
               "--num-blocks", "512"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert rc == 0, (tmp_path / "summary.md").read_text()
    sections = {s["name"]: s for s in results["sections"]}
    assert {name: s["status"] for name, s in sections.items()} == {
        "kernels": "PASS", "model": "PASS", "agreement": "PASS", "throughput": "PASS"}
    assert sections["kernels"]["data"]["tests"] == 1
    data = sections["agreement"]["data"]
    assert data["logits: fp32 eager vs transformers"]["rel_l2"] < 1e-5
    assert 0 < data["logits: bf16 eager vs fp32 eager"]["rel_l2"] < 1e-2, "the bf16 run has a bf16 cache"
    assert data["PF: fp32 graphs vs fp32 eager"]["identical"] == 16
    throughput = sections["throughput"]["data"]
    assert [r["batch"] for r in throughput["decode"]] == [1, 4] and throughput["pf"][0]["eager"]["tokens"] == 4 * 4 * 32
    summary = (tmp_path / "summary.md").read_text()
    assert "# pfengine GPU check: PASS" in summary and "| 4 | 3" in summary
    assert {p.name for p in tmp_path.iterdir()} == {"summary.md", "results.json", "gpu_check.log", "kernel_tests.log",
                                                    "kernel_tests.xml"}
