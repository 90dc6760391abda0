"""CUDA graphs of the decode step (pfengine/cuda_graphs.py).

Here (no GPU): the buckets; the padded static batch a graph replays, run eagerly on every CPU kernel
path against the runner's own decode (same hidden states for the real rows, padding rows that repeat
row 0 and write nothing to the cache); DecodeGraphs' own logic with a re-run of the captured function
standing in for a replay (all but ``capture_graph``); and the decode forward at Qwen2.5-Math-1.5B's
shape on the meta device with the Triton dispatch of CUDA, where any host sync (``.item()``,
``.tolist()``, a boolean mask) or a CPU tensor raises, as they would break a capture. On a CUDA machine
(``make gpu-check``) the graphs themselves: replay equals eager decode, and the engine's particles are
the same with and without graphs."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import pfengine.cuda_graphs as cuda_graphs
import pfengine.kernels as K
from pfengine.cache.block_manager import BlockManager
from pfengine.cuda_graphs import LARGEST_BUCKET, DecodeGraphs, StaticDecodeInputs, bucket_for, bucket_sizes
from pfengine.model.decoder import ForwardBatch, PagedDecoder, load_decoder
from pfengine.runner import ModelRunner

from kernel_device import cpu_only
from kernel_paths import assert_same_run, meta_batch, meta_decoder, run_pf

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check runs it there)")

INTERPRETED = cpu_only("Triton forced on CPU or meta tensors, which needs the interpreter")
ROWS = 16
PROMPTS = {0: 3, 1: 8, 3: 15, 4: 1, 6: 9}
"""Prefilled rows and their lengths: a block (8 tokens) just full, ragged ends, one token."""
DECODE_ROWS = [6, 1, 3, 0, 4]
"""Five rows out of order: bucket 8, three padding rows."""


def test_bucket_sizes_and_selection():
    sizes = bucket_sizes(1024)
    assert sizes[:11] == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert sizes[-3:] == [448, 480, LARGEST_BUCKET]
    assert sizes == sorted(set(sizes))
    assert bucket_sizes(20) == [1, 2, 4, 8, 16, 20], "max_batch is always the last bucket"
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(100, largest=8) == [1, 2, 4, 8]
    assert [bucket_for(n, sizes) for n in (1, 3, 8, 9, 65, 300, 512)] == [1, 4, 8, 16, 80, 320, 512]
    assert bucket_for(513, sizes) is None, "above the largest bucket: eager"


def prefilled_runner(path: str, device: str = "cpu", cuda_graphs: bool = False) -> ModelRunner:
    decoder = load_decoder(path, 64, 8, torch.float32, max_len=256, device=device)
    runner = ModelRunner(decoder, BlockManager(64, 8, ROWS, 32, device), cuda_graphs)
    g = torch.Generator().manual_seed(1)
    runner.extend(list(PROMPTS), [torch.randint(0, 370, (n,), generator=g).tolist() for n in PROMPTS.values()])
    return runner


def changed_slots(before: torch.Tensor, after: torch.Tensor) -> set[int]:
    """Cache slots (``block * B + offset``) where any layer's K or V changed."""
    per_slot = (before != after).flatten(4).any(-1).any(0).any(0).flatten()
    return set(torch.nonzero(per_slot).flatten().tolist())


def eager_decode(runner: ModelRunner, monkeypatch: pytest.MonkeyPatch, tokens: torch.Tensor
                 ) -> tuple[ForwardBatch, torch.Tensor]:
    """The runner's decode of DECODE_ROWS, and the batch it built (seen by a spy on the forward)."""
    seen = []
    forward = runner.decoder.forward
    monkeypatch.setattr(runner.decoder, "forward", lambda batch: seen.append(batch) or forward(batch))
    out = runner.decode(torch.tensor(DECODE_ROWS), tokens)
    monkeypatch.setattr(runner.decoder, "forward", forward)
    return seen[0], out


NAN_OF_EMPTY_CONTEXT = pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
"""The interpreter's warning for padding rows with no context (their output is 0/0, never read)."""


@pytest.mark.parametrize("path", ["reference", pytest.param("cpp", marks=pytest.mark.cpp),
                                  pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.slow,
                                                                NAN_OF_EMPTY_CONTEXT, INTERPRETED])])
def test_padded_static_batch_equals_the_runners_decode(policy_dir, monkeypatch, path):
    if path == "reference":
        monkeypatch.setenv("PFENGINE_TRITON", "0")
        monkeypatch.setenv("PFENGINE_CPP", "0")
    runner = prefilled_runner(policy_dir)
    kv = runner.decoder.kv_cache
    before = kv.clone()
    batch, eager = eager_decode(runner, monkeypatch, torch.tensor([5, 77, 301, 2, 140]))
    after_eager = kv.clone()
    assert changed_slots(before, after_eager) == set(batch.slots.tolist())

    kv.copy_(before)
    inputs = StaticDecodeInputs(16, kv.device)
    inputs.load(batch, 8)
    static = inputs.batch(8)
    assert static.is_decode and static.slots[5:].tolist() == [-1] * 3
    padded = runner.decoder.forward(static)
    torch.testing.assert_close(padded[:5], eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[5:], padded[:1].expand(3, -1), rtol=0, atol=0)
    torch.testing.assert_close(kv, after_eager, rtol=1e-6, atol=1e-6)
    assert changed_slots(before, kv) == set(batch.slots.tolist()), "a padding row wrote to the cache"

    inputs.clear(8)
    before = kv.clone()
    runner.decoder.forward(inputs.batch(8))
    assert torch.equal(kv, before), "the capture's padding-only batch wrote to the cache"


class OnlyMeta(TorchDispatchMode):
    """Refuses any op with a non-meta tensor argument (beyond 0-d scalars): on CUDA that would be a
    host tensor copied in, which a capture cannot hold."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.dim() > 0:
                raise AssertionError(f"{func}: a {t.device} tensor of shape {tuple(t.shape)} in the decode step")
        return func(*args, **(kwargs or {}))


@pytest.mark.triton
@INTERPRETED
def test_decode_step_is_capture_safe_at_qwen_1_5b_shape(monkeypatch):
    """The bucketed decode forward as CUDA runs it (Triton dispatch), on meta tensors: no host sync,
    no host tensor, and launch grids that follow from the bucket alone. The torch reference path
    fails the same check (its boolean masks and ``.max()`` read data), so the check can fail."""
    launches = []
    monkeypatch.setattr(K.lazy_jit, "__getitem__",
                        lambda self, grid: lambda *args, **kw: launches.append((self.__name__, grid)))
    decoder = meta_decoder(torch.bfloat16)
    inputs = StaticDecodeInputs(LARGEST_BUCKET, torch.device("meta"))
    for n, size in ((1, 1), (5, 8), (64, 64), (300, 320), (512, 512)):
        launches.clear()
        inputs.load(meta_batch(n), size)
        with OnlyMeta():
            out = decoder.forward(inputs.batch(size))
        assert out.shape == (size, 1536) and out.device.type == "meta"
        names = [name for name, _ in launches]
        assert names.count("_store_kv_kernel") == 28 and names.count("_paged_attention_kernel") == 28
        grids = {grid for name, grid in launches if name == "_paged_attention_kernel"}
        assert len(grids) == 1 and next(iter(grids))[:2] == (size, 2)
        assert names.count("_merge_splits_kernel") == (28 if next(iter(grids))[2] > 1 else 0)

    monkeypatch.setenv("PFENGINE_TRITON", "0")
    with pytest.raises((RuntimeError, NotImplementedError)), OnlyMeta():
        decoder.forward(inputs.batch(8))


def check_graphs_against_eager(policy_dir: str, device: str, tol: float) -> DecodeGraphs:
    """Same hidden states and caches as eager decode for batches in, between and above the buckets
    (largest 8 here: 13 rows run eagerly); a bucket is captured once and replayed after."""
    graphed, eager = prefilled_runner(policy_dir, device), prefilled_runner(policy_dir, device)
    graphs = graphed.graphs = DecodeGraphs(graphed.decoder, ROWS, largest=8)
    g = torch.Generator().manual_seed(3)
    for rows in ([6], [6, 1, 3], [6, 1, 3, 0, 4], list(range(8)), list(range(13)), [6, 1, 3]):
        tokens = torch.randint(0, 370, (len(rows),), generator=g)
        out_g = graphed.decode(torch.tensor(rows), tokens)
        out_e = eager.decode(torch.tensor(rows), tokens)
        torch.testing.assert_close(out_g, out_e, rtol=tol, atol=tol)
        torch.testing.assert_close(graphed.decoder.kv_cache, eager.decoder.kv_cache, rtol=tol, atol=tol)
        assert torch.equal(graphed.blocks.lens, eager.blocks.lens)
    assert sorted(graphs.graphs) == [1, 4, 8] and graphs.replays == 5
    return graphs


class EagerGraph:
    """Stands in for a CUDA graph on the CPU: a replay runs the captured function again into the same
    output buffer (a real replay relaunches its kernels on the same buffers)."""

    def __init__(self, fn, out: torch.Tensor) -> None:
        self.fn, self.out = fn, out

    def replay(self) -> None:
        with torch.inference_mode():  # the decoder's output is an inference tensor
            self.out.copy_(self.fn())


def test_decode_graphs_load_replay_and_fall_back_as_eager_decode(policy_dir, monkeypatch):
    """DecodeGraphs' own logic on the CPU, a graph replay standing in as a re-run of the captured
    function: each bucket is captured once from padding rows only, the batch is loaded after the
    capture, outputs and caches equal eager decode, 13 rows (above the largest bucket) run eagerly,
    and reallocated tables are refused."""
    forwarded, captured = [], []
    forward = PagedDecoder.forward
    monkeypatch.setattr(PagedDecoder, "forward", lambda self, batch: forwarded.append(batch) or forward(self, batch))

    def capture(fn, pool, stream):
        forwarded.clear()
        out = fn()
        (static,) = forwarded
        captured.append((static.slots.tolist(), static.context_lens.tolist()))
        return EagerGraph(fn, out), out

    monkeypatch.setattr(cuda_graphs, "capture_graph", capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)
    graphs = check_graphs_against_eager(policy_dir, "cpu", 1e-6)
    assert [len(slots) for slots, _ in captured] == [1, 4, 8]
    assert all(set(slots) == {-1} and set(lens) == {0} for slots, lens in captured), "captured from real rows"
    graphs.decoder.tables = graphs.decoder.tables.clone()
    one = torch.tensor([1])
    with pytest.raises(AssertionError, match="reallocated"):
        graphs.forward(ForwardBatch(one, one, one, one, [0, 1], one))


@cuda
def test_graph_replay_equals_eager_decode_on_cuda(policy_dir):
    check_graphs_against_eager(policy_dir, "cuda", 1e-4)


@cuda
def test_engine_particles_are_the_same_with_and_without_graphs_on_cuda(policy_dir, value_head_file, monkeypatch):
    replays = []
    forward = DecodeGraphs.forward
    monkeypatch.setattr(DecodeGraphs, "forward", lambda self, batch: replays.append(1) or forward(self, batch))
    run = dict(particles=6, steps=3, step_tokens=6, num_blocks=128, device="cuda")
    eager = run_pf(policy_dir, value_head_file, **run, cuda_graphs=False)
    assert not replays
    assert_same_run(run_pf(policy_dir, value_head_file, **run, cuda_graphs=True), eager)
    assert replays
