"""Every Triton kernel compiles for real CUDA GPUs (sm_80 and sm_90, down to a cubin with ptxas),
although this machine has none: the interpreter runs Python semantics, this checks that the same
kernels type-check and lower on the GPU backend (no interpreter-only constructs, tl.dot shapes,
loop-carried types, constexpr use).

The compilation runs in a subprocess without TRITON_INTERPRET (triton fixes the mode at import).
Launch arguments are recorded from the public ``*_triton`` wrappers run on CPU tensors, and from the
decode step a CUDA graph captures (pfengine/cuda_graphs.py) at Qwen2.5-Math-1.5B's shape on the meta
device, so the compiled signatures are the ones the engine uses."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.triton, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def _record_launches():
    import torch

    import pfengine.kernels as K
    from pfengine.kernels import copy_blocks, fork, kv_store, paged_attention, prm_score, resample
    from pfengine.kernels.prm_score import PRMHead

    launches = []

    class Recorder:
        def __init__(self, lj):
            self.lj = lj

        def __call__(self, *args, **kwargs):
            launches.append((self.lj, args, kwargs))

    K.lazy_jit.__getitem__ = lambda self, grid: Recorder(self)

    for dt in (torch.float32, torch.bfloat16):
        for d, b, hq, hkv in ((128, 16, 8, 2), (64, 32, 4, 4)):
            q, kc = torch.randn(2, hq, d).to(dt), torch.randn(8, b, hkv, d).to(dt)
            tab, lens = torch.zeros(2, 4, dtype=torch.int32), torch.tensor([20, 40])
            for s in (1, 2):
                paged_attention.paged_decode_attention_triton(q, kc, kc, tab, lens, 0.1, num_splits=s)
    for dt in (torch.float16, torch.bfloat16):
        kc = torch.zeros(4, 16, 2, 64, dtype=dt)
        kv_store.store_kv_triton(torch.randn(3, 2, 64), torch.randn(3, 2, 64), kc, kc, torch.tensor([0, -1, 5]))
    copy_blocks.copy_blocks_triton(torch.zeros(2, 2, 4, 16, 2, 64, dtype=torch.bfloat16), torch.tensor([[0], [1]]))
    h = 64
    head = PRMHead(torch.randn(h, h), torch.randn(h), torch.randn(2, h), torch.randn(2))
    prm_score.head_logit_triton(torch.randn(5, h), head)
    for agg, temp in (("model", 1.0), ("min", torch.ones(5)), ("prod", 0.7)):
        prm_score.weigh_triton(torch.randn(5), torch.zeros(5), torch.ones(5, dtype=torch.bool),
                               torch.tensor([0, 2, 5]), agg, temp)
    prm_score.weigh_triton(torch.randn(5), torch.zeros(5), torch.ones(5, dtype=torch.bool), torch.tensor([0, 5]),
                           "last", 1.0)
    for method in resample.METHODS:
        resample.resample_triton(torch.rand(6), torch.tensor([0, 2, 6]), torch.rand(6), method)
    resample.resample_triton(torch.rand(6), torch.tensor([0, 2, 6]), torch.rand(6), "systematic",
                             active=torch.ones(2, dtype=torch.bool))
    state = fork.BlockState(torch.zeros(4, 3, dtype=torch.int32), torch.zeros(4, dtype=torch.int64),
                            torch.zeros(10, dtype=torch.int32), torch.zeros(10, dtype=torch.int32), torch.tensor([10]))
    fork.fork_triton(state, torch.arange(3), torch.zeros(3, dtype=torch.int64), torch.ones(3, dtype=torch.bool), 4)
    _record_decode_step()
    return launches


def _record_decode_step():
    """The bucketed decode forward's launches at Qwen2.5-Math-1.5B's shape, bf16 and fp32 caches, with
    and without split-KV (buckets 1 and 64), through the dispatch CUDA tensors take."""
    import torch

    from kernel_paths import meta_batch, meta_decoder
    from pfengine.cuda_graphs import StaticDecodeInputs
    from pfengine.kernels import kv_store, paged_attention

    kv_store.use_triton = paged_attention.use_triton = lambda t: True
    inputs = StaticDecodeInputs(64, torch.device("meta"))
    for kv_dtype in (torch.bfloat16, torch.float32):
        decoder = meta_decoder(kv_dtype)
        for n, size in ((1, 1), (40, 64)):
            inputs.load(meta_batch(n), size)
            decoder.forward(inputs.batch(size))


def _compile(lj, args, kwargs, target):
    import torch
    import triton
    import triton.language
    from triton.compiler import ASTSource

    dtypes = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
              torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8"}
    lj.fn.__globals__["tl"] = triton.language
    fn = triton.jit(lj.fn)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = dict(zip(fn.arg_names, args), **kwargs)
    signature, constexprs = {}, {}
    for p in fn.params:
        v = bound[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + dtypes[v.dtype]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            signature[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{p.name}: {type(v)}")
    return triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=target, options=options)


def main() -> int:
    assert not os.environ.get("TRITON_INTERPRET"), "compile check must run without the interpreter"
    from triton.backends.compiler import GPUTarget

    failures, done, seen = 0, 0, set()
    for lj, args, kwargs in _record_launches():
        for target in (GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)):
            key = (lj.__name__, target.arch, repr(sorted(kwargs.items())),
                   tuple(str(getattr(a, "dtype", type(a).__name__)) for a in args))
            if key in seen:
                continue
            seen.add(key)
            try:
                kernel = _compile(lj, args, dict(kwargs), target)
                assert "cubin" in kernel.asm, "no cubin produced"
                done += 1
            except Exception as e:  # report every failure, not just the first
                failures += 1
                print(f"FAIL {lj.__name__} sm_{target.arch} {kwargs}: {e!r}"[:3000])
    print(f"compiled {done} kernel variants, {failures} failures")
    return 1 if failures else 0


def _nvidia_backend() -> bool:
    import importlib.util

    spec = importlib.util.find_spec("triton")
    return spec is not None and (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _nvidia_backend(), reason="triton with its NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_for_cuda():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PFENGINE_TRITON")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert "0 failures" in proc.stdout


if __name__ == "__main__":
    sys.exit(main())
