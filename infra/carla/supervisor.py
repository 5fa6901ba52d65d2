"""Keeps CARLA servers usable through a long run: restarts a server that exited or stopped answering,
and each server after N episodes or past a memory ceiling (CARLA leaks memory over long runs: carla
#2781, leaderboard #81/#113), then tells the envs to reconnect.

A restart keeps the server's ports, so reconnecting means a new `carla.Client` on the same endpoint.
Envs learn of it three ways: `episode_done` / `ensure_healthy` return the new endpoint, listeners
added with `add_listener` are called, and the endpoint's ``generation`` grows.

`carla_servers()` is the lifecycle: start the servers, yield their supervisor, remove them on every
exit path.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, overload

from infra.carla.config import CarlaServerConfig
from infra.carla.endpoints import CarlaEndpoint
from infra.carla.errors import CarlaServerError
from infra.carla.logs import parse_docker_time
from infra.carla.manager import CarlaServerManager, ServerEvent, VersionProbe

log = logging.getLogger(__name__)

Listener = Callable[[CarlaEndpoint], None]


class ServerSupervisor(Sequence[CarlaEndpoint]):
    """The running servers as a sequence of their current endpoints, plus the hooks that keep them
    healthy. Thread-safe: the watchdog thread and the env's thread may act on the same server."""

    def __init__(self, manager: CarlaServerManager) -> None:
        self.manager = manager
        self.config = manager.config
        n = len(manager)
        self._locks = [threading.Lock() for _ in range(n)]
        self._episodes = [0] * n
        self._probe_failures = [0] * n
        self._started_at = [manager.started_at(i) for i in range(n)]
        self._listeners: list[Listener] = []
        self._failure: BaseException | None = None
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    # -- the sequence of endpoints -----------------------------------------------------------

    def __len__(self) -> int:
        return len(self.manager)

    @overload
    def __getitem__(self, index: int) -> CarlaEndpoint: ...

    @overload
    def __getitem__(self, index: slice) -> list[CarlaEndpoint]: ...

    def __getitem__(self, index: int | slice) -> CarlaEndpoint | list[CarlaEndpoint]:
        if isinstance(index, slice):
            return [self.manager.endpoint(i) for i in range(len(self))[index]]
        if index < 0:
            index += len(self)
        return self.manager.endpoint(index)

    @property
    def endpoints(self) -> list[CarlaEndpoint]:
        return self.manager.endpoints()

    def episodes(self, index: int) -> int:
        """Episodes counted since the server's last (re)start."""
        return self._episodes[index]

    def restarts(self, index: int) -> int:
        return self.manager.restarts(index)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(new_endpoint)`` after any server restarts (from the restarting thread)."""
        self._listeners.append(listener)

    # -- hooks for the env -------------------------------------------------------------------

    def episode_done(self, index: int) -> CarlaEndpoint | None:
        """Count one finished episode on server ``index``; restart the server when it is due (episode
        count, memory ceiling). Returns the new endpoint when it restarted — reconnect
        then — else None. Call it between episodes, when no actor of the env is alive."""
        self.raise_if_failed()
        self._episodes[index] += 1
        every, ceiling = self.config.restart_every_episodes, self.config.memory_limit_mb
        if every is not None and self._episodes[index] >= every:
            return self._restart(index, f"{self._episodes[index]} episodes since its start "
                                        f"(carla.restart_every_episodes={every})")
        if ceiling is not None:
            used = self.manager.memory_mb(index)
            if used is not None and used > ceiling:
                return self._restart(index, f"memory {used:.0f} MiB above carla.memory_limit_mb={ceiling:g}")
        return None

    def ensure_healthy(self, index: int) -> CarlaEndpoint | None:
        """Check server ``index`` now (call it after a client time-out): restart it if it exited or does
        not answer. Returns the new endpoint if it was restarted (by this call, the watchdog or another
        process), else None."""
        self.raise_if_failed()
        return self._check(index, failures_needed=1)

    def check_all(self) -> list[int]:
        """One watchdog pass over every server; returns the indices restarted."""
        restarted = []
        for index in range(len(self)):
            if self._check(index, failures_needed=self.config.health_failures) is not None:
                restarted.append(index)
        return restarted

    def raise_if_failed(self) -> None:
        """Re-raise, in the caller's thread, a failure the watchdog could not repair."""
        if self._failure is not None:
            raise CarlaServerError(f"a CARLA server could not be kept alive: {self._failure}") from self._failure

    # -- watchdog ----------------------------------------------------------------------------

    def start_watchdog(self, interval_s: float | None = None) -> None:
        if self._watchdog is not None:
            return
        interval = interval_s or self.config.health_interval_s
        self._stop.clear()
        self._watchdog = threading.Thread(target=self._watch, args=(interval,), name="carla-watchdog", daemon=True)
        self._watchdog.start()

    def stop_watchdog(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout)
            self._watchdog = None

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.check_all()
            except Exception as exc:  # surfaced to the env's thread by raise_if_failed
                if self._stop.is_set():
                    return
                log.error("carla: watchdog gave up: %s", exc)
                self._failure = exc
                return

    # -- internals ---------------------------------------------------------------------------

    def _check(self, index: int, failures_needed: int) -> CarlaEndpoint | None:
        if self._stop.is_set() and threading.current_thread() is self._watchdog:
            return None
        with self._locks[index]:
            if not self.manager.is_running(index):
                state = self.manager.container(index).attrs.get("State", {})
                return self._restart_locked(index, f"container {state.get('Status', 'gone')} "
                                                   f"(exit code {state.get('ExitCode')})")
            started = self.manager.started_at(index)
            if started != self._started_at[index]:
                # Restarted elsewhere (another thread or process attached to it): just follow it.
                endpoint = self._adopt_restart(index, started)
                if endpoint is not None:
                    return endpoint
                since = parse_docker_time(started or "")
                if since is not None and time.time() - since < self.config.ready_timeout_s:
                    return None  # still starting: it has its start deadline, like any server
            try:
                self.manager.probe(index)
                self._probe_failures[index] = 0
                return None
            except Exception as exc:
                self._probe_failures[index] += 1
                failures = self._probe_failures[index]
                log.warning("carla: server %d did not answer (%d/%d): %s", index, failures, failures_needed, exc)
                if failures < failures_needed:
                    return None
                return self._restart_locked(index, f"no answer to {failures} probe(s): {exc}")

    def _adopt_restart(self, index: int, started: str | None) -> CarlaEndpoint | None:
        try:
            self.manager.probe(index)
        except Exception:
            return None  # still coming up: the normal checks decide
        self._started_at[index] = started
        self._episodes[index] = 0
        endpoint = self.manager.endpoint(index)
        log.info("carla: server %d was restarted elsewhere; reconnect to %s:%d", index, endpoint.host, endpoint.port)
        self._notify(endpoint)
        return endpoint

    def _restart(self, index: int, reason: str) -> CarlaEndpoint:
        with self._locks[index]:
            return self._restart_locked(index, reason)

    def _restart_locked(self, index: int, reason: str) -> CarlaEndpoint:
        last: Exception | None = None
        seen: str | None = self._started_at[index]
        while self.manager.restarts(index) < self.config.max_restarts:
            if self.manager.closing:
                raise CarlaServerError(f"server {index} not restarted: the servers are being stopped")
            try:
                endpoint = self.manager.restart(index, reason, seen_started_at=seen)
                break
            except CarlaServerError as exc:
                last, seen = exc, None
                reason = f"previous restart failed: {str(exc).splitlines()[0]}"
        else:
            raise CarlaServerError(
                f"server {index} reached carla.max_restarts={self.config.max_restarts}"
                + (f"; last failure: {last}" if last else "")
                + ". Look at its logs (`drivevla carla logs`) — a server that keeps dying usually lacks GPU "
                  "memory or a working Vulkan driver.")
        self._episodes[index] = 0
        self._probe_failures[index] = 0
        self._started_at[index] = self.manager.started_at(index)
        self._notify(endpoint)
        return endpoint

    def _notify(self, endpoint: CarlaEndpoint) -> None:
        for listener in list(self._listeners):
            try:
                listener(endpoint)
            except Exception:
                log.exception("carla: restart listener failed")

    def describe(self) -> list[dict[str, Any]]:
        """One row per server for status displays."""
        return [{**ep.to_dict(), "episodes": self._episodes[ep.index], "restarts": self.restarts(ep.index)}
                for ep in self.endpoints]


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into SystemExit for the duration, so `finally` runs (main thread only, and only
    when nobody else — e.g. Prefect's engine, which raises TerminationSignal — handles it)."""
    installed = False
    previous: Any = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)
        if previous in (signal.SIG_DFL, None):
            def _raise(signum: int, _frame: object) -> None:
                raise SystemExit(128 + signum)

            signal.signal(signal.SIGTERM, _raise)
            installed = True
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def carla_servers(config: CarlaServerConfig, *, version_probe: VersionProbe | None = None,
                  labels: Mapping[str, str] | None = None, on_event: Callable[[ServerEvent], None] | None = None,
                  supervise: bool = True, client: Any = None) -> Iterator[ServerSupervisor]:
    """Start ``config.num_servers`` servers, yield them (a sequence of `CarlaEndpoint` with episode and
    health hooks, see `ServerSupervisor`), and remove them on every exit: normal, exception, Ctrl-C,
    SIGTERM, Prefect cancellation. With ``supervise`` a watchdog thread restarts servers that exit
    or hang."""
    manager = CarlaServerManager(config, version_probe=version_probe, labels=labels, on_event=on_event,
                                 client=client)
    with _sigterm_raises():
        try:
            manager.start()
            supervisor = ServerSupervisor(manager)
            if supervise:
                supervisor.start_watchdog()
            try:
                yield supervisor
            finally:
                supervisor.stop_watchdog()
        finally:
            manager.stop()
