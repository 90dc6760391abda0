"""The C++ row-invariant linear (csrc/linear.cpp): numpy's float64 product as the oracle, a row's
result bit-identical whatever rows share the batch, clear errors for bad input; the decoder takes it."""
import numpy as np
import pytest
import torch

from pfengine.kernels import cpp_ops
from pfengine.kernels.linear import linear, prepare, vocab_projection

pytestmark = pytest.mark.cpp


@pytest.fixture(autouse=True)
def _needs_avx512():
    if not cpp_ops().has_packed_linear():
        pytest.skip("packed_linear needs AVX-512F")


def _case(m: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5, torch.randn(n, generator=g)


@pytest.mark.parametrize("n,k", [(96, 64), (50, 37), (7, 5), (1024, 512)])
@pytest.mark.parametrize("m", [1, 5, 12, 13, 40])
def test_matches_numpy_float64(m, n, k):
    x, w, b = _case(m, n, k, m * 1000 + n)
    weight = prepare(w)
    assert weight.tensor is None and weight.packed is not None
    want = x.double().numpy() @ w.double().numpy().T
    for bias, extra in ((None, 0), (b, b.double().numpy())):
        got = linear(x, weight, bias)
        assert got.shape == (m, n) and got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), want + extra, rtol=0, atol=2e-5 * k ** 0.5)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_rows_result_does_not_depend_on_the_batch(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w, b = _case(37, 200, 128, 3)
        weight = prepare(w)
        full = linear(x, weight, b)
        for lo, hi in [(0, 1), (5, 6), (11, 13), (12, 24), (3, 37), (36, 37)]:
            assert torch.equal(linear(x[lo:hi].clone(), weight, b), full[lo:hi]), (lo, hi)
        assert torch.equal(vocab_projection(x[:4], weight), linear(x[:4], weight))
    finally:
        torch.set_num_threads(before)


def test_strided_inputs_and_empty_batch():
    x, w, b = _case(10, 40, 32, 4)
    weight = prepare(w)
    want = linear(x, weight, b)
    wide = torch.zeros(10, 64)
    wide[:, 16:48] = x
    assert torch.equal(linear(wide[:, 16:48], weight, b), want)  # row stride 64
    assert torch.equal(linear(x.t().contiguous().t(), weight, b), want)  # column-major
    assert linear(x[:0], weight, b).shape == (0, 40)


def test_bad_input_is_rejected_with_the_argument_named():
    ops = cpp_ops()
    x, w, b = _case(3, 40, 32, 5)
    packed = ops.pack_linear(w)
    with pytest.raises(RuntimeError, match="x has 31 features, the weight 32"):
        ops.packed_linear(x[:, :31], packed, 40)
    with pytest.raises(RuntimeError, match="out_features 70 does not match"):
        ops.packed_linear(x, packed, 70)
    with pytest.raises(RuntimeError, match="x must be a 2-D float32"):
        ops.packed_linear(x.double(), packed, 40)
    with pytest.raises(RuntimeError, match="bias must be float32 with out_features entries"):
        ops.packed_linear(x, packed, 40, b[:39])
    with pytest.raises(RuntimeError, match="packed must come from pack_linear"):
        ops.packed_linear(x, w, 40)
    with pytest.raises(RuntimeError, match="weight must be a 2-D float32 tensor"):
        ops.pack_linear(w.half())


def test_only_float32_cpu_weights_are_packed(monkeypatch):
    w = torch.randn(8, 4)
    assert prepare(w.bfloat16()).packed is None
    monkeypatch.setenv("PFENGINE_CPP", "0")
    kept = prepare(w)
    assert kept.packed is None and kept.tensor is w
