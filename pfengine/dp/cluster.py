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
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}
"""A local cluster (``address="local"``: a new one, even where ``ray start`` left one running here)
runs its engines at this command's own CPU priority; by default Ray adds 15 to their niceness, which
puts them behind every other process of the machine."""


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

    @property
    def option(self) -> str:
        """The option that put the engines on Ray (what an error about Ray itself names)."""
        return self.flag if self.engines > 1 else ADDRESS_FLAG


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
    ray = require_ray(placement.option)
    address = placement.address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        check_reachable(address)
    try:
        if address is None:
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     _system_config=LOCAL_SYSTEM_CONFIG)
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
    """A ``host:port`` address with no Ray cluster behind it fails here, in at most about
    ``timeout_s`` + 10 s (``ray.init`` itself retries for minutes): nothing listening, something
    that is not Ray's GCS, or a cluster that wants an authentication token this process lacks.
    Other forms (``auto``, ``ray://...``) are left to Ray."""
    host, _, port = address.rpartition(":")
    if not (host and port.isdigit()) or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ValueError(f"{ADDRESS_FLAG} {address}: no Ray cluster answers there ({e.strerror or e}); start one "
                         "with `ray start --head`") from None
    _ask_gcs(address, timeout_s)


def _ask_gcs(address: str, timeout_s: float) -> None:
    """One request to the cluster's GCS (its head's control service), bounded: Ray's own client for
    it, as pinned by the ``ray`` extra."""
    from ray._raylet import InnerGcsClient
    from ray.exceptions import AuthenticationError, RpcError

    try:
        InnerGcsClient.standalone(address, None, int(timeout_s * 1000))
    except AuthenticationError:
        raise ValueError(f"{ADDRESS_FLAG} {address}: the Ray cluster there requires its authentication token: set "
                         "RAY_AUTH_MODE=token here, with the head's token in ~/.ray/auth_token or RAY_AUTH_TOKEN"
                         ) from None
    except RpcError as e:
        raise ValueError(f"{ADDRESS_FLAG} {address}: something answers there, but not a Ray cluster's head ({e}); "
                         "give the address `ray start --head` printed") from None


def check_room(placement: Placement, resources: dict[str, float]) -> None:
    """Enough CPUs and GPUs in the cluster, in total, for every engine at once."""
    for flag, each, kind in ((CPUS_FLAG, placement.cpus, "CPU"), (GPUS_FLAG, placement.gpus, "GPU")):
        need, have = placement.engines * each, resources.get(kind, 0.0)
        if need > have:
            raise ValueError(f"{placement.flag} {placement.engines} x {flag} {each} needs {need} {kind}s; the Ray "
                             f"cluster has {have:g}")
