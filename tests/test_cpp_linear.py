"""The C++ row-invariant linear (csrc/linear.cpp) on every instruction set this CPU runs (AVX-512F,
AVX2 + FMA, portable; chosen with PFENGINE_CPU_ISA): numpy's float64 product as the oracle, a row's
result bit-identical whatever rows share the batch, clear errors for bad input; the decoder takes it."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import pfengine.kernels as kernels
from pfengine.kernels import CPU_ISAS, cpp_ops, cpu_isa
from pfengine.kernels.linear import linear, prepare, vocab_projection
from test_model_parity import hf_logits, make_runner

pytestmark = pytest.mark.cpp


@pytest.fixture(params=CPU_ISAS)
def isa(request, monkeypatch):
    """Each test on each instruction set's kernel, forced as a user would (PFENGINE_CPU_ISA)."""
    if request.param not in cpp_ops().cpu_isas():
        pytest.skip(f"this CPU cannot run the {request.param} code")
    monkeypatch.setenv("PFENGINE_CPU_ISA", request.param)
    return request.param


def _case(m: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5, torch.randn(n, generator=g)


@pytest.mark.parametrize("n,k", [(96, 64), (50, 37), (7, 5), (1024, 512)])
@pytest.mark.parametrize("m", [1, 5, 8, 13, 40])
def test_matches_numpy_float64(isa, m, n, k):
    x, w, b = _case(m, n, k, m * 1000 + n)
    weight = prepare(w)
    assert weight.tensor is None and weight.packed is not None and weight.isa == isa
    want = x.double().numpy() @ w.double().numpy().T
    for bias, extra in ((None, 0), (b, b.double().numpy())):
        got = linear(x, weight, bias)
        assert got.shape == (m, n) and got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), want + extra, rtol=0, atol=2e-5 * k ** 0.5)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_rows_result_does_not_depend_on_the_batch(isa, threads):
    """Every row alone equals its row in the full batch, and so do slices that start mid-tile; 300
    rows of 256 features span two row blocks and tiles of every height."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w, b = _case(300, 200, 256, 3)
        weight = prepare(w)
        full = linear(x, weight, b)
        for i in range(0, 300, 7):
            assert torch.equal(linear(x[i:i + 1].clone(), weight, b), full[i:i + 1]), i
        for lo, hi in [(0, 8), (5, 6), (11, 13), (12, 24), (3, 37), (36, 37), (1, 129), (100, 300)]:
            assert torch.equal(linear(x[lo:hi].clone(), weight, b), full[lo:hi]), (lo, hi)
        assert torch.equal(vocab_projection(x[:4], weight), linear(x[:4], weight))
    finally:
        torch.set_num_threads(before)


def test_instruction_sets_agree_with_each_other(monkeypatch):
    x, w, b = _case(9, 130, 96, 6)
    outs = {}
    for isa in cpp_ops().cpu_isas():
        monkeypatch.setenv("PFENGINE_CPU_ISA", isa)
        outs[isa] = linear(x, prepare(w), b)
    for isa, y in outs.items():
        torch.testing.assert_close(y, outs["portable"], rtol=0, atol=1e-5, msg=isa)


def test_strided_inputs_and_empty_batch(isa):
    x, w, b = _case(10, 40, 32, 4)
    weight = prepare(w)
    want = linear(x, weight, b)
    wide = torch.zeros(10, 64)
    wide[:, 16:48] = x
    assert torch.equal(linear(wide[:, 16:48], weight, b), want)  # row stride 64
    assert torch.equal(linear(x.t().contiguous().t(), weight, b), want)  # column-major
    assert linear(x[:0], weight, b).shape == (0, 40)


def test_bad_input_is_rejected_with_the_argument_named(isa):
    ops = cpp_ops()
    x, w, b = _case(3, 40, 32, 5)
    packed = ops.pack_linear(w, isa)
    with pytest.raises(RuntimeError, match="x has 31 features, the weight 32"):
        ops.packed_linear(x[:, :31], packed, 40, None, isa)
    with pytest.raises(RuntimeError, match="out_features 70 does not match"):
        ops.packed_linear(x, packed, 70, None, isa)
    with pytest.raises(RuntimeError, match="x must be a 2-D float32"):
        ops.packed_linear(x.double(), packed, 40, None, isa)
    with pytest.raises(RuntimeError, match="bias must be float32 with out_features entries"):
        ops.packed_linear(x, packed, 40, b[:39], isa)
    with pytest.raises(RuntimeError, match="packed must come from pack_linear"):
        ops.packed_linear(x, w, 40, None, isa)
    with pytest.raises(RuntimeError, match="weight must be a 2-D float32 tensor"):
        ops.pack_linear(w.half(), isa)
    with pytest.raises(RuntimeError, match="isa must be 'avx512', 'avx2' or 'portable', got 'sse9'"):
        ops.packed_linear(x, packed, 40, None, "sse9")


def test_weights_packed_for_one_instruction_set_are_refused_by_another():
    ops = cpp_ops()
    if "avx512" not in ops.cpu_isas():
        pytest.skip("needs a CPU that runs the avx512 and avx2 code")
    x, w, _ = _case(3, 40, 32, 7)
    with pytest.raises(RuntimeError, match="panels of 64 columns, the avx2 kernel reads 16"):
        ops.packed_linear(x, ops.pack_linear(w, "avx512"), 40, None, "avx2")


@pytest.mark.parametrize("name", CPU_ISAS)
def test_code_this_cpu_cannot_run_is_refused(name):
    if name in cpp_ops().cpu_isas():
        pytest.skip(f"this CPU runs the {name} code")
    with pytest.raises(RuntimeError, match=f"this CPU cannot run the {name} code"):
        cpp_ops().pack_linear(torch.zeros(2, 2), name)


def test_the_switch_is_checked_against_the_names_and_the_cpu(monkeypatch):
    monkeypatch.setattr(kernels, "_ISA_CHOICE", None)
    monkeypatch.delenv("PFENGINE_CPU_ISA", raising=False)
    assert cpu_isa() == cpp_ops().cpu_isas()[0]
    monkeypatch.setenv("PFENGINE_CPU_ISA", "avx3")
    with pytest.raises(ValueError, match="PFENGINE_CPU_ISA='avx3': expected one of avx512, avx2, portable"):
        cpu_isa()
    monkeypatch.setattr(cpp_ops(), "cpu_isas", lambda: ["avx2", "portable"])  # an AVX2-only CPU
    monkeypatch.setenv("PFENGINE_CPU_ISA", "avx512")
    with pytest.raises(ValueError, match="PFENGINE_CPU_ISA=avx512: this CPU cannot run that code .it runs avx2"):
        cpu_isa()
    monkeypatch.setenv("PFENGINE_CPU_ISA", "portable")
    assert cpu_isa() == "portable"


def test_only_float32_cpu_weights_are_packed(monkeypatch):
    w = torch.randn(8, 4)
    assert prepare(w.bfloat16()).packed is None
    monkeypatch.setenv("PFENGINE_CPP", "0")
    kept = prepare(w)
    assert kept.packed is None and kept.tensor is w and kept.isa is None


def test_the_decoder_runs_the_forced_instruction_set_and_matches_transformers(isa, policy_dir):
    runner = make_runner(policy_dir)
    d = runner.decoder
    assert {w.isa for w in [d.unembed] + [w for l in d.layers for w in (l.qkv_w, l.o_w, l.gate_up_w, l.down_w)]} == {isa}
    ids = torch.randint(0, 370, (21,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = [d.logits(runner.extend([0], [ids]))[0]]
    for _ in range(5):
        ids.append(int(ours[-1].argmax()))
        ours.append(d.logits(runner.decode(torch.tensor([0]), torch.tensor([ids[-1]])))[0])
    hf = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32, attn_implementation="eager").eval()
    torch.testing.assert_close(torch.stack(ours), hf_logits(hf, ids)[20:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_particles_prm_head_score_does_not_depend_on_the_batch(isa, threads):
    """The value head (H x H, ReLU, H x 2) runs on the row-invariant linear: with BLAS a row's
    logit changed with the batch (MKL, H = 512: every batch of 1 to 15 rows rounded differently)."""
    from pfengine.kernels.prm_score import PRMHead, head_logit

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(8)
        h = 512
        head = PRMHead(torch.randn(h, h, generator=g) / h ** 0.5, torch.randn(h, generator=g),
                       torch.randn(2, h, generator=g) / h ** 0.5, torch.randn(2, generator=g))
        assert head.w1_prepared.isa == isa
        hidden = torch.randn(40, h, generator=g)
        full = head_logit(hidden, head)
        for lo, hi in [(0, 1), (3, 4), (5, 12), (7, 22), (39, 40)]:
            assert torch.equal(head_logit(hidden[lo:hi].clone(), head), full[lo:hi]), (lo, hi)
    finally:
        torch.set_num_threads(before)
