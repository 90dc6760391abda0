"""Connecting to Ray, and what each engine reserves on it.

Without an address, a local cluster of this machine's CPUs (and the GPUs Ray finds) is started for
the duration of the command and stopped after it. With ``--ray-address`` (or ``RAY_ADDRESS``) the
engines run on an existing cluster, started with ``ray start --head`` and joined by other machines
with ``ray start --address``; every machine needs pfengine installed and the checkpoints at the same
path."""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Iterator

CPUS_FLAG, GPUS_FLAG, ADDRESS_FLAG = "--worker-cpus", "--worker-gpus", "--ray-address"


@dataclass(frozen=True)
class Placement:
    """K engines on Ray, each in its own actor process."""

    engines: int
    cpus: int = 1
    """CPUs each engine reserves; also its torch threads."""
    gpus: int = 0
    """GPUs each engine reserves; with any, the engines run on CUDA."""
    address: str | None = None
    """An existing cluster's address; None: a local cluster of this machine."""
    flag: str = "--workers"
    """How the command line names ``engines`` (errors name it)."""

    def __post_init__(self) -> None:
        for flag, value, low in ((self.flag, self.engines, 1), (CPUS_FLAG, self.cpus, 1), (GPUS_FLAG, self.gpus, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{flag}: must be an integer >= {low}, got {value!r}")
        if self.address is not None and not self.address.strip():
            raise ValueError(f"{ADDRESS_FLAG}: must not be empty")


def require_ray(flag: str) -> ModuleType:
    """The ``ray`` module, or an error naming the option that needs it."""
    try:
        import ray
    except ImportError:
        raise ValueError(f"{flag}: runs engines on Ray, which is not installed: pip install 'pfengine[ray]'") from None
    return ray


@contextmanager
def connected(placement: Placement) -> Iterator[None]:
    """Ray connected while the block runs, with room for every engine (else an error naming the
    flags); a local cluster started here is stopped afterwards."""
    ray = require_ray(placement.flag)
    address = placement.address or os.environ.get("RAY_ADDRESS")
    if address is not None:
        check_reachable(address)
    try:
        if address is None:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except ConnectionError as e:
        raise ValueError(f"{ADDRESS_FLAG} {address}: cannot connect to a Ray cluster there ({e}); a cluster with "
                         "token authentication (Ray 2.60 turns it on when ~/.ray/auth_token exists) also needs "
                         "RAY_AUTH_MODE=token here and its token in ~/.ray/auth_token or RAY_AUTH_TOKEN") from None
    try:
        check_room(placement, ray.cluster_resources())
        yield
    finally:
        ray.shutdown()


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``host:port`` address that nothing answers on fails here, at once (Ray itself retries for
    minutes); other forms (``auto``, ``ray://...``) are left to Ray."""
    host, _, port = address.rpartition(":")
    if not (host and port.isdigit()) or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ValueError(f"{ADDRESS_FLAG} {address}: no Ray cluster answers there ({e.strerror or e}); start one "
                         "with `ray start --head`") from None


def check_room(placement: Placement, resources: dict[str, float]) -> None:
    """Enough CPUs and GPUs in the cluster, in total, for every engine at once."""
    for flag, each, kind in ((CPUS_FLAG, placement.cpus, "CPU"), (GPUS_FLAG, placement.gpus, "GPU")):
        need, have = placement.engines * each, resources.get(kind, 0.0)
        if need > have:
            raise ValueError(f"{placement.flag} {placement.engines} x {flag} {each} needs {need} {kind}s; the Ray "
                             f"cluster has {have:g}")
