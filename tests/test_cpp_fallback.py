"""Without the C++ extension (not built, or not importable) every kernel runs its torch reference and
the log says so once. Runs whether or not the extension is built."""
from kernel_paths import run_without


def test_kernels_fall_back_to_the_torch_references_and_log_it():
    out = run_without("pfengine._cpp", "from pfengine.kernels import cpp_ops, use_cpp\n"
                                       "assert cpp_ops() is None and not use_cpp(torch.zeros(1))")
    lines = [x for x in out.splitlines() if x.startswith("CPU kernels:")]
    assert len(lines) == 1 and "torch reference (C++ extension not importable" in lines[0], out
