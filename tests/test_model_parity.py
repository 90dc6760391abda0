"""Our paged decoder against transformers (the oracle): prefill, 30 decode steps, and forked children."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from pfengine.cache.block_manager import BlockManager
from pfengine.model.decoder import load_decoder
from pfengine.runner import ModelRunner

from conftest import CHECKPOINTS

ATOL = 1e-4


def make_runner(path: str, block_size: int = 8, num_blocks: int = 128, rows: int = 8) -> ModelRunner:
    decoder = load_decoder(path, num_blocks, block_size, torch.float32, max_len=512)
    return ModelRunner(decoder, BlockManager(num_blocks, block_size, rows, 512 // block_size))


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def pair(request, checkpoint_dir):
    path = checkpoint_dir(request.param)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return make_runner(path), hf


def prefill_and_decode_error(runner: ModelRunner, hf, steps: int = 30) -> float:
    """Max |our logits - transformers'| over a 21-token prefill and ``steps`` greedy decode steps."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 370, (21,), generator=g).tolist()
    ours = [runner.decoder.logits(runner.extend([0], [ids]))[0]]
    for _ in range(steps):
        ids.append(int(ours[-1].argmax()))
        ours.append(runner.decoder.logits(runner.decode(torch.tensor([0]), torch.tensor([ids[-1]])))[0])
    ref = hf_logits(hf, ids)[20:]
    runner.blocks.free(torch.tensor([0]))
    runner.blocks.check_invariants()
    return float((torch.stack(ours) - ref).abs().max())


def forked_children_error(runner: ModelRunner, hf, prompt_len: int) -> float:
    """Children continue from a forked parent (shared blocks, copy-on-write of the partial block);
    max |each child's logits - transformers' on the child's full token sequence|."""
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(0, 370, (prompt_len,), generator=g).tolist()
    runner.extend([0], [prompt])
    runner.blocks.assign(torch.tensor([1, 2, 3]), torch.tensor([0, 0, 0]))
    seqs = {r: list(prompt) for r in range(4)}
    logits = {r: [] for r in range(4)}
    for step in range(12):
        if step == 6:  # a resampling-style reshuffle: rows overlap as both sources and destinations
            runner.blocks.assign(torch.tensor([0, 1, 2, 3]), torch.tensor([2, 2, 0, 3]))
            seqs = {0: list(seqs[2]), 1: list(seqs[2]), 2: list(seqs[0]), 3: seqs[3]}
            logits = {0: list(logits[2]), 1: list(logits[2]), 2: list(logits[0]), 3: logits[3]}
        new = torch.randint(0, 370, (4,), generator=g)
        for r in range(4):
            seqs[r].append(int(new[r]))
        out = runner.decoder.logits(runner.decode(torch.arange(4), new))
        for r in range(4):
            logits[r].append(out[r])
        runner.blocks.check_invariants()
    assert runner.cow_copies > 0 or prompt_len % runner.blocks.block_size == 0
    error = max(float((torch.stack(logits[r]) - hf_logits(hf, seqs[r])[prompt_len:]).abs().max()) for r in range(4))
    runner.blocks.free(torch.arange(4))
    assert runner.blocks.blocks_in_use == 0
    runner.blocks.check_invariants()
    return error


def test_prefill_and_30_decode_steps(pair):
    assert prefill_and_decode_error(*pair) <= ATOL


@pytest.mark.parametrize("prompt_len", [16, 13])  # fork exactly on a block boundary, and mid-block
def test_forked_children_match_full_forward(pair, prompt_len):
    assert forked_children_error(*pair, prompt_len) <= ATOL


def test_batched_prefill_of_different_lengths(pair):
    runner, hf = pair
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 370, (n,), generator=g).tolist() for n in (5, 17, 9)]
    out = runner.decoder.logits(runner.extend([0, 1, 2], prompts))
    for k, p in enumerate(prompts):
        torch.testing.assert_close(out[k], hf_logits(hf, p)[-1], atol=ATOL, rtol=0)
    runner.blocks.free(torch.arange(3))


def test_bf16_kv_storage_stays_close(checkpoint_dir):
    path = checkpoint_dir("qwen2-gqa")
    decoder = load_decoder(path, 64, 16, torch.bfloat16, max_len=256)
    runner = ModelRunner(decoder, BlockManager(64, 16, 2, 16))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = list(range(10, 40))
    ours = runner.decoder.logits(runner.extend([0], [ids[:20]]))
    for t in ids[20:]:
        ours = runner.decoder.logits(runner.decode(torch.tensor([0]), torch.tensor([t])))
    torch.testing.assert_close(ours[0], hf_logits(hf, ids)[-1], atol=0.05, rtol=0)
