"""Tensor parallelism over torch.distributed: the group, rank 0's commands and the workers' loop.

Rank 0, the driver, is the whole engine: scheduler, block manager, sampling, PRM head, resampling
and forks run there once. The other ranks (workers) hold their shard of each model
(:mod:`pfengine.model.shard`) and do only what the driver sends them, in the driver's order: load a
model, forward a batch (with the block-table rows it reads and the copy-on-write block copies made
since that model's last command), project hidden states to logits. Each command is one pickled
object broadcast over a gloo group; the tensors of the forward itself meet in the collectives of
the model group (gloo on CPU, NCCL on CUDA).

Ranks start either here (:func:`connect` spawns ``k - 1`` worker processes and meets them on a
loopback port) or under ``torchrun --nproc-per-node k``, where every process builds the engine and
the ranks above 0 turn into workers inside :class:`~pfengine.Engine` and exit when the driver closes.
A spawned worker exits when its driver process dies; under torchrun, torchrun ends the others when
one rank fails.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pfengine.config import require
from pfengine.model.decoder import ForwardBatch, PagedDecoder, load_decoder
from pfengine.model.shard import Shard

log = logging.getLogger("pfengine")
T = TypeVar("T")

RENDEZVOUS_TIMEOUT = timedelta(minutes=2)
"""How long the ranks wait for each other to start."""
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
"""The longest one all-reduce / gather may wait (a rank that hangs fails the others after this)."""
IDLE_TIMEOUT = timedelta(days=365)
"""A worker waits for the driver's next command as long as the driver lives (an idle server)."""
STOP_GRACE_S = 10.0
"""How long :meth:`Group.close` waits for a worker to exit before terminating it."""


@dataclass(frozen=True)
class DecoderSpec:
    """What every rank needs to load its shard of one model."""

    path: str
    num_blocks: int
    block_size: int
    kv_dtype: str
    max_len: int

    def load(self, shard: Shard, device: str) -> PagedDecoder:
        return load_decoder(self.path, self.num_blocks, self.block_size, getattr(torch, self.kv_dtype),
                            self.max_len, device, shard)


@dataclass
class Command:
    """One instruction from the driver: ``op`` on model ``model`` (its load order), after applying
    ``copies`` (``[2, P]`` block pairs each) to that model's cache."""

    op: str
    """``load`` (args: the spec), ``forward`` (the batch, its block-table rows), ``logits`` (hidden
    states) or ``stop``."""
    model: int = -1
    args: tuple = ()
    copies: tuple[torch.Tensor, ...] = ()


class Group:
    """Rank 0's end of a tensor-parallel group of ``shard.size`` processes."""

    def __init__(self, shard: Shard, control: dist.ProcessGroup, workers: list, device: str) -> None:
        self.shard, self.control, self.workers, self.device = shard, control, workers, device
        self.models = 0
        self.broken: BaseException | None = None
        """The error that left the ranks out of step (they then refuse every further command)."""
        self.closed = False
        atexit.register(self.close)

    def load(self, spec: DecoderSpec) -> DrivenDecoder:
        """Every rank loads its shard of ``spec``'s model (the workers while this rank loads its own)."""
        self.send(Command("load", self.models, (spec,)))
        self.models += 1
        return DrivenDecoder(spec.load(self.shard, self.device), self, self.models - 1)

    def send(self, command: Command) -> None:
        if self.closed:
            raise RuntimeError("the engine's tensor-parallel group is closed")
        if self.broken is not None:
            raise RuntimeError(f"the tensor-parallel group is out of step after an earlier error ({self.broken!r}); "
                               f"close this engine and build a new one") from self.broken
        dead = [f"rank {r} (pid {p.pid}, exit code {p.exitcode})" for r, p in enumerate(self.workers, 1)
                if not p.is_alive()]
        if dead:
            self.broken = RuntimeError(f"tensor-parallel worker {', '.join(dead)} exited")
            raise self.broken
        self.run(lambda: dist.broadcast_object_list([command], src=0, group=self.control))

    def run(self, work: Callable[[], T]) -> T:
        """``work()``; if it raises, the ranks may be out of step (a rank died, or this one stopped
        between a command and its collectives), so the group refuses all further work."""
        try:
            return work()
        except BaseException as error:
            self.broken = error
            raise

    def close(self) -> None:
        """Stop the workers (terminating any that do not exit in time) and leave the group."""
        if self.closed:
            return
        atexit.unregister(self.close)
        if self.broken is None and all(p.is_alive() for p in self.workers):
            try:
                self.send(Command("stop"))
            except RuntimeError as error:  # a rank went away meanwhile; terminated below
                log.warning("tensor-parallel stop not delivered: %s", error)
        self.closed = True
        for p in self.workers:
            p.join(STOP_GRACE_S)
            if p.is_alive():
                log.warning("tensor-parallel worker pid %d did not stop; terminating it", p.pid)
                p.terminate()
                p.join()
        dist.destroy_process_group()


class DrivenDecoder:
    """Rank 0's shard of one model, driving the workers' shards: each call is sent, then run here."""

    def __init__(self, local: PagedDecoder, group: Group, index: int) -> None:
        self.local, self.group, self.index = local, group, index
        self.cfg, self.prm_head = local.cfg, local.prm_head
        self.copies: list[torch.Tensor] = []
        """Block copies made here since this model's last command; the workers make them before it."""

    @property
    def tables(self) -> torch.Tensor | None:
        return self.local.tables

    @tables.setter
    def tables(self, tables: torch.Tensor) -> None:
        self.local.tables = tables

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        rows = self.local.tables[batch.rows].cpu()
        return self._run("forward", (_moved(batch, "cpu"), rows), lambda: self.local.forward(batch))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._run("logits", (hidden.cpu(),), lambda: self.local.logits(hidden))

    def copy_blocks(self, pairs: torch.Tensor) -> None:
        if pairs.shape[1]:
            self.local.copy_blocks(pairs)
            self.copies.append(pairs.cpu())

    def _run(self, op: str, args: tuple, here: Callable[[], T]) -> T:
        self.group.send(Command(op, self.index, args, tuple(self.copies)))
        self.copies.clear()
        return self.group.run(here)


def serve(shard: Shard, control: dist.ProcessGroup, device: str) -> None:
    """A worker's loop: run the driver's commands until it says stop."""
    decoders: list[PagedDecoder] = []
    while True:
        received: list = [None]
        dist.broadcast_object_list(received, src=0, group=control)
        command: Command = received[0]
        if command.op == "stop":
            return
        if command.op == "load":
            decoders.append(command.args[0].load(shard, device))
            continue
        decoder = decoders[command.model]
        for pairs in command.copies:
            decoder.copy_blocks(pairs.to(device))
        if command.op == "forward":
            batch, rows = command.args
            decoder.tables = rows.to(device)
            decoder.forward(replace(_moved(batch, device), rows=torch.arange(rows.shape[0], device=device)))
        else:
            assert command.op == "logits", command.op
            decoder.logits(command.args[0].to(device))


def connect(size: int, device: str) -> Group:
    """Rank 0's group of ``size`` ranks. Under torchrun (``RANK`` / ``WORLD_SIZE`` set) the ranks
    are torchrun's processes, and on ranks above 0 this call serves as a worker and then exits the
    process; otherwise ``size - 1`` worker processes are spawned here (``if __name__ ==
    "__main__":`` guards a script's engine, as with any spawned process)."""
    if dist.is_initialized():
        raise RuntimeError("tensor_parallel_size > 1: this process already has a torch.distributed default group "
                           "(another tensor-parallel engine not yet closed, or one made by the caller); pfengine "
                           "makes its own, so close the other engine (Engine.close()) first")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _join_torchrun(size, device)
    device = _rank_device(device, 0)
    store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=RENDEZVOUS_TIMEOUT, wait_for_workers=False)
    context = mp.get_context("spawn")
    workers = [context.Process(target=_spawned_worker, name=f"pfengine-tp-rank{rank}", daemon=True,
                               args=(rank, size, store.port, device, torch.get_num_threads()))
               for rank in range(1, size)]
    for p in workers:
        p.start()
    try:
        shard, control = _join(0, size, device, store)
    except BaseException:
        for p in workers:
            p.terminate()
        raise
    log.info("tensor parallel: %d ranks on %s (workers spawned, pids %s)", size, device, [p.pid for p in workers])
    return Group(shard, control, workers, device)


def _join_torchrun(size: int, device: str) -> Group:
    world, rank, local = (int(os.environ[k]) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    require(world == size, "tensor_parallel_size",
            f"{size}, but torchrun started {world} processes (give --nproc-per-node {size})")
    device = _rank_device(device, local)
    shard, control = _join(rank, size, device, None)
    if rank == 0:
        log.info("tensor parallel: %d ranks on %s (torchrun)", size, device)
        return Group(shard, control, [], device)
    try:
        serve(shard, control, device)
    finally:
        dist.destroy_process_group()
    raise SystemExit(0)


def _spawned_worker(rank: int, size: int, port: int, device: str, threads: int) -> None:
    torch.set_num_threads(threads)
    _exit_with_parent()
    device = _rank_device(device, rank)
    store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=RENDEZVOUS_TIMEOUT)
    shard, control = _join(rank, size, device, store)
    try:
        serve(shard, control, device)
    finally:
        dist.destroy_process_group()


def _join(rank: int, size: int, device: str, store: dist.Store | None) -> tuple[Shard, dist.ProcessGroup]:
    """Join the default group (through ``store``, or torchrun's environment), then make the model
    group (NCCL on CUDA, gloo on CPU) and the gloo group commands travel on."""
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=RENDEZVOUS_TIMEOUT)
    model = dist.new_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return Shard(rank, size, model), control


def _rank_device(device: str, local_rank: int) -> str:
    """CUDA ranks use one GPU each, ``cuda:<local rank>``; CPU ranks share the CPU."""
    return f"cuda:{local_rank}" if torch.device(device).type == "cuda" else device


def _exit_with_parent() -> None:
    """End this process as soon as its parent (the driver) is gone, whatever it is doing then."""
    parent = mp.parent_process()

    def watch() -> None:
        parent.join()
        os._exit(1)

    threading.Thread(target=watch, name="pfengine-tp-parent-watch", daemon=True).start()


def _moved(batch: ForwardBatch, device: str) -> ForwardBatch:
    return replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in fields(batch)
                             if isinstance(getattr(batch, f.name), torch.Tensor)})
