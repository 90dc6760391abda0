"""Without the C++ extension (not built, or not importable) every kernel runs its torch reference and
the log says so once. Runs whether or not the extension is built."""
import os
import subprocess
import sys
from pathlib import Path

NO_CPP = """
import logging, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "pfengine._cpp":
            raise ImportError("pfengine._cpp blocked by the test")
sys.meta_path.insert(0, Block())
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
import torch
from pfengine.kernels import cpp_ops, use_cpp
from pfengine.kernels import copy_blocks, fork, kv_store, paged_attention, resample, sampling
assert cpp_ops() is None and not use_cpp(torch.zeros(1))
k = torch.randn(2, 1, 4)
kc = torch.zeros(2, 4, 1, 4)
kv_store.store_kv(k, k, kc, kc.clone(), torch.tensor([0, 5]))
out = paged_attention.paged_decode_attention(torch.randn(1, 1, 4), kc, kc, torch.tensor([[1, 0]], dtype=torch.int32),
                                             torch.tensor([6]), 0.5)
assert out.shape == (1, 1, 4)
anc = resample.resample(torch.tensor([0.5, 0.5]), torch.tensor([0, 2]), torch.tensor([0.1, 0.2]), "systematic")
assert anc.tolist() == [0, 1]
copy_blocks.copy_blocks(torch.zeros(2, 1, 3, 4, 1, 4), torch.tensor([[0], [1]]))
tok = sampling.temperature_sample(torch.randn(2, 10), 0.8, torch.rand(2, 1, dtype=torch.float64))
assert tok.shape == (2,)
assert "pfengine._cpp" not in sys.modules
print("ok")
"""


def test_kernels_fall_back_to_the_torch_references_and_log_it():
    env = {k: v for k, v in os.environ.items() if k not in ("PFENGINE_TRITON", "PFENGINE_CPP")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", NO_CPP], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
    lines = [x for x in proc.stdout.splitlines() if x.startswith("CPU kernels:")]
    assert len(lines) == 1 and "torch reference (C++ extension not importable" in lines[0], proc.stdout
