"""Free ports for CARLA servers: rpc N, streaming N+1, secondary N+2, traffic manager N+3.

Fixed ports collide as soon as two runs share a host (carla #3143, leaderboard #73), so every
server gets a block that is free right now. Three things make a block "taken":

- something on this host listens on one of its ports (checked by binding it),
- this process already handed it out (the allocation is not bound until the server starts),
- another process handed it out: callers pass the ports recorded in the labels of the engine's
  managed containers, under :func:`port_lock` so the check and the container's creation are atomic
  with respect to other drivevla processes on this host.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from infra.carla.config import PORTS_PER_SERVER


class NoFreePorts(RuntimeError):
    """No block of free ports was left in the configured range."""


@dataclass(frozen=True)
class ServerPorts:
    """The ports of one server; all four are reserved together."""

    rpc: int
    streaming: int
    secondary: int
    traffic_manager: int

    @classmethod
    def block(cls, rpc: int) -> ServerPorts:
        return cls(rpc, rpc + 1, rpc + 2, rpc + 3)

    def all(self) -> tuple[int, int, int, int]:
        return (self.rpc, self.streaming, self.secondary, self.traffic_manager)

    def label(self) -> str:
        return ",".join(str(p) for p in self.all())

    @classmethod
    def from_label(cls, text: str) -> ServerPorts:
        rpc, streaming, secondary, tm = (int(p) for p in text.split(","))
        return cls(rpc, streaming, secondary, tm)


def port_is_free(port: int, host: str = "") -> bool:
    """True when nothing listens on ``port``. The default host "" (all interfaces) is the strictest
    check: CARLA in host network mode binds 0.0.0.0, which fails if any address has the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


# Ports handed out by this process and not yet released: the servers may not listen yet.
_reserved: set[int] = set()
_reserved_lock = threading.Lock()


def allocate_ports(count: int, *, base_port: int = 2000, max_port: int = 40000,
                   stride: int = PORTS_PER_SERVER, exclude: Iterable[int] = (),
                   host: str = "") -> list[ServerPorts]:
    """Reserve ``count`` blocks of free ports, scanning from ``base_port`` in steps of ``stride``.

    ``exclude`` lists ports taken elsewhere (e.g. by other runs' containers that are still starting).
    Release them with :func:`release_ports` when the servers are gone.
    """
    if stride < PORTS_PER_SERVER:
        raise ValueError(f"stride {stride} < {PORTS_PER_SERVER}: blocks would overlap")
    excluded = set(exclude)
    found: list[ServerPorts] = []
    with _reserved_lock:
        for rpc in range(base_port, max_port - PORTS_PER_SERVER + 2, stride):
            block = ServerPorts.block(rpc)
            ports = block.all()
            if any(p in _reserved or p in excluded for p in ports):
                continue
            if all(port_is_free(p, host) for p in ports):
                found.append(block)
                if len(found) == count:
                    break
        if len(found) < count:
            raise NoFreePorts(f"found {len(found)} of {count} free blocks of {PORTS_PER_SERVER} ports in "
                              f"{base_port}..{max_port}; stop other servers (`drivevla carla status`) or "
                              "widen carla.base_port/carla.max_port")
        for block in found:
            _reserved.update(block.all())
    return found


def release_ports(blocks: Iterable[ServerPorts]) -> None:
    with _reserved_lock:
        for block in blocks:
            _reserved.difference_update(block.all())


def reserved_ports() -> set[int]:
    with _reserved_lock:
        return set(_reserved)


@contextmanager
def file_lock(name: str) -> Iterator[None]:
    """An exclusive lock shared by the processes of this user on this host (an flock on a file in the
    temp directory; the kernel releases it if the holder dies)."""
    path = Path(tempfile.gettempdir()) / f"drivevla-{os.getuid()}-{name}.lock"
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def port_lock() -> AbstractContextManager[None]:
    """Serialise port allocation and container creation between drivevla processes on this host."""
    return file_lock("carla-ports")
