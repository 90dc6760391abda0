"""Tensor parallelism (pfengine.distributed): two gloo ranks on this machine's two cores against the
whole model in one process, on checkpoints saved to disk and loaded through the normal loader."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pfengine import Engine, EngineConfig, Request, SearchParams
from pfengine.cache.block_manager import BlockManager
from pfengine.cli import main
from pfengine.config import InvalidArgument, PRMConfig
from pfengine.distributed import DecoderSpec, connect
from pfengine.model.shard import Shard
from pfengine.random_model import save_random_model
from pfengine.runner import ModelRunner
from pfengine.toy.pf import POLICY, PRM, PRM_CONFIG, pf_request
from pfengine.toy.task import heldout_set
from test_engine_pf import distinct_prefixes

FAMILIES = ["qwen2-gqa", "qwen2-tied", "llama3-gqa", "mistral-gqa", "llama-bias", "qwen3-qknorm", "granite-mult",
            "phi3-fused", "phi3-longrope"]
"""Every family and option set of tests/conftest.py's CHECKPOINTS that has an even number of KV heads."""
ROOT = Path(__file__).resolve().parents[1]


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie nobody reaped has exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_a_size_that_does_not_divide_the_model_is_refused(checkpoint_dir, capsys):
    with pytest.raises(InvalidArgument, match=r"tensor_parallel_size: .*3 does not divide the model's "
                                              r"num_attention_heads=4, num_key_value_heads=2, intermediate_size=512 "
                                              r".*sizes that work: \[1, 2\]"):
        Engine(EngineConfig(model=str(POLICY), tensor_parallel_size=3))
    with pytest.raises(InvalidArgument, match=r"num_key_value_heads=1 .*sizes that work: \[1\]"):
        Engine(EngineConfig(model=checkpoint_dir("llama-tied"), tensor_parallel_size=2))
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(InvalidArgument, match="tensor_parallel_size: "):
            EngineConfig(model=str(POLICY), tensor_parallel_size=bad)
    assert main(["generate", "--prompt", "1 + 1", "--tensor-parallel-size", "3"]) == 2
    assert re.search(r"error: --tensor-parallel-size: \S+/policy: 3 does not divide", capsys.readouterr().err)
    assert not dist.is_initialized()


@pytest.mark.slow
def test_two_ranks_compute_the_logits_of_one(checkpoint_dir, tmp_path, one_thread):
    """Every family, and a vocabulary that two ranks split only after padding: the same logits
    (atol 1e-5) through a prefill, 30 decode steps, a resampling fork that copies a shared partial
    block (COW) on every rank, and 5 decode steps of the diverging children."""
    paths = [checkpoint_dir(f) for f in FAMILIES]
    paths.append(str(save_random_model(tmp_path / "odd-vocab", arch="qwen2", vocab_size=383)))
    group = connect(2, "cpu")
    try:
        for path in paths:
            spec = DecoderSpec(path, num_blocks=64, block_size=4, kv_dtype="float32", max_len=128)
            whole, split = (ModelRunner(d, BlockManager(64, 4, 4, 32, "cpu"))
                            for d in (spec.load(Shard(), "cpu"), group.load(spec)))
            vocab = whole.decoder.cfg.vocab_size
            prompt = torch.randint(0, vocab, (11,), generator=torch.Generator().manual_seed(0)).tolist()
            logits = compare(path, "prefill", *(r.decoder.logits(r.extend([0], [prompt])) for r in (whole, split)))
            row = torch.tensor([0])
            for step in range(30):
                token = logits.argmax(-1)
                logits = compare(path, f"decode {step}", *(r.decoder.logits(r.decode(row, token)) for r in (whole, split)))
            rows = torch.tensor([0, 1, 2])
            for r in (whole, split):
                r.fork(rows, torch.tensor([0, 0, 0]), torch.tensor([True, True, True]))
            assert whole.cow_copies == split.cow_copies == 2
            tokens = torch.tensor([1, 2, 3]) + logits.argmax(-1)
            for step in range(5):
                logits = compare(path, f"child decode {step}", *(r.decoder.logits(r.decode(rows, tokens % vocab))
                                                                 for r in (whole, split)))
                tokens = logits.argmax(-1)
    finally:
        group.close()
    assert not dist.is_initialized()


def compare(path: str, what: str, whole: torch.Tensor, split: torch.Tensor) -> torch.Tensor:
    assert split.shape == whole.shape, (path, what)
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=0, msg=lambda m: f"{path}, {what}: {m}")
    return whole


def pf_requests() -> list[Request]:
    """Two toy problems at a temperature where the particles differ and resampling forks them."""
    return [pf_request(problem, n_particles=4, seed=seed, temperature=1.5)
            for seed, problem in enumerate(heldout_set(3)) if seed > 0]


GREEDY = Request("What is 1 + 1?", search=SearchParams(method="greedy", n_particles=1))


@pytest.mark.slow
@pytest.mark.parametrize("prm", [PRM, POLICY / "value_head.safetensors"], ids=["separate-prm", "value-head"])
def test_a_pf_request_on_two_ranks_is_the_same_request(prm, one_thread):
    """The bundled toy policy with its separate PRM (a likelihood PRM, split across the same two
    ranks) or its value head (on rank 0): two requests in a row on one two-rank engine give the
    particles, answers, weights and resampling ancestry of one process, every distinct prefix
    forwarded once."""
    outcomes = []
    for size in (1, 2):
        engine = Engine(EngineConfig(model=str(POLICY), prm=str(prm), num_blocks=256, max_particles=16,
                                     prm_config=PRM_CONFIG if prm == PRM else PRMConfig(), tensor_parallel_size=size))
        try:
            results = [engine.generate([r])[0] for r in pf_requests()]
            outcomes.append((results, engine.stats()))
        finally:
            engine.close()
    (whole, whole_stats), (split, split_stats) = outcomes
    assert split_stats == whole_stats
    assert whole_stats["recomputed_tokens"] == 0 and whole_stats["cow_copies"] > 0
    union = sum(distinct_prefixes(r.stats.prompt_tokens, [t for tr in r.trace for t in tr.tokens]) for r in whole)
    assert whole_stats["policy_tokens_forwarded"] == union
    assert sum(r.stats.resamples for r in whole) >= 2
    for a, b in zip(whole, split):
        assert [p.token_ids for p in b.particles] == [p.token_ids for p in a.particles]
        assert [p.answer for p in b.particles] == [p.answer for p in a.particles] and b.answer == a.answer
        assert [tr.ancestors for tr in b.trace] == [tr.ancestors for tr in a.trace]
        torch.testing.assert_close(torch.tensor([p.weight for p in b.particles]),
                                   torch.tensor([p.weight for p in a.particles]), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_close_stops_the_workers_and_a_dead_worker_is_an_error(one_thread):
    engine = Engine(EngineConfig(model=str(POLICY), num_blocks=64, max_particles=8, tensor_parallel_size=2))
    (worker,) = engine.group.workers
    with pytest.raises(RuntimeError, match=r"another tensor-parallel engine not yet closed"):
        Engine(EngineConfig(model=str(POLICY), num_blocks=64, max_particles=8, tensor_parallel_size=2))
    engine.close()
    assert worker.exitcode == 0 and not dist.is_initialized()
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate([GREEDY])

    engine = Engine(EngineConfig(model=str(POLICY), num_blocks=64, max_particles=8, tensor_parallel_size=2))
    (worker,) = engine.group.workers
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    with pytest.raises(RuntimeError, match=rf"tensor-parallel worker rank 1 \(pid {worker.pid}, exit code -9\) exited"):
        engine.generate([GREEDY])
    with pytest.raises(RuntimeError, match="out of step"):
        engine.generate([GREEDY])
    engine.close()
    assert not dist.is_initialized()


@pytest.mark.slow
def test_a_worker_killed_mid_run_fails_the_run_without_hanging(one_thread):
    engine = Engine(EngineConfig(model=str(POLICY), prm=str(PRM), prm_config=PRM_CONFIG, num_blocks=1024, max_particles=128,
                                 tensor_parallel_size=2))
    (worker,) = engine.group.workers
    long_run = [pf_request(p, n_particles=16, seed=k, temperature=1.5) for k, p in enumerate(heldout_set(8))]
    killer = threading.Timer(0.5, os.kill, (worker.pid, signal.SIGKILL))
    killer.start()
    start = time.monotonic()
    with pytest.raises(RuntimeError):
        engine.generate(long_run)
    assert time.monotonic() - start < 30
    with pytest.raises(RuntimeError, match="out of step"):
        engine.generate([GREEDY])
    engine.close()
    assert worker.exitcode == -signal.SIGKILL and not dist.is_initialized()


DRIVER = """
import time, torch
from pfengine import Engine, EngineConfig
from pfengine.toy.pf import POLICY
if __name__ == "__main__":
    torch.set_num_threads(1)
    engine = Engine(EngineConfig(model=str(POLICY), num_blocks=64, max_particles=8, tensor_parallel_size=2))
    print(engine.group.workers[0].pid, flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_a_killed_driver_takes_its_workers_along(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=os.environ | {"PYTHONPATH": str(ROOT)})
    try:
        worker = int(driver.stdout.readline())
        assert alive(worker)
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
        assert wait_until(lambda: not alive(worker), 15), f"worker {worker} outlived its driver"
    finally:
        driver.kill()
        driver.wait()


@pytest.mark.slow
def test_torchrun_ranks_run_the_cli(tmp_path):
    """``torchrun --nproc-per-node 2 -m pfengine.cli generate --tensor-parallel-size 2``: rank 0
    prints what one process prints, rank 1 serves and exits with it."""
    args = ["generate", "--prompt", heldout_set(1)[0].text, "--particles", "4", "--seed", "3", "--max-tokens", "32", "--json",
            "--no-progress", "--num-blocks", "128", "--max-particles", "8"]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "pfengine.cli", *args], capture_output=True, text=True, env=env,
                         timeout=120)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "pfengine.cli", *args, "--tensor-parallel-size", "2"],
                         capture_output=True, text=True, env=env, timeout=240)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a, b = (json_of(p.stdout) for p in (one, two))
    assert [p["token_ids"] for p in b["particles"]] == [p["token_ids"] for p in a["particles"]]
    assert b["answer"] == a["answer"] and b["engine"] == a["engine"]


def json_of(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])
