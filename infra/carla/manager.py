"""CARLA servers as Docker containers, run through the Docker Engine API (the docker Python SDK).

`CarlaServerManager` starts `carlasim/carla:<tag>` containers on free ports, waits until each answers
`get_server_version()` (through a probe the caller injects: only the CARLA bridge imports `carla`),
restarts them on request and removes them (`infra.carla.supervisor.carla_servers` wraps it in the
context manager that removes them on every exit path). Containers carry labels naming their owner, session,
creating process and flow run (`infra.carla.labels`), so `reap_orphans` can remove what a crashed run left
behind — and only that. The engine itself (SDK, container spec, removal): `infra.carla.engine`.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from infra.carla.config import CarlaServerConfig
from infra.carla.endpoints import CarlaEndpoint
from infra.carla.engine import (
    DEFAULT_DOCKER_URL, LOG_TAIL, connect_docker, container_spec, docker_sdk, explain_api_error, indent, logs_of,
    port_open, remove_container)
from infra.carla.errors import CarlaServerError, CarlaServerNotReady, ImageUnavailable
from infra.carla.labels import (
    LABEL_DETACHED, LABEL_FLOW_RUN_ID, LABEL_FLOW_RUN_NAME, LABEL_GPU, LABEL_HOST, LABEL_INDEX, LABEL_MANAGED,
    LABEL_OWNER, LABEL_PID, LABEL_PID_START, LABEL_PORTS, LABEL_SESSION, MANAGED_VALUE, managed_containers,
    ports_claimed, process_start, reap_orphans)
from infra.carla.ports import ServerPorts, allocate_ports, file_lock, port_lock, release_ports

__all__ = ["CarlaServerManager", "ServerEvent", "VersionProbe"]

log = logging.getLogger(__name__)

# (host, rpc port, timeout seconds) -> the server's version string; raises when it does not answer.
VersionProbe = Callable[[str, int, float], str]


@dataclass(frozen=True)
class ServerEvent:
    """Something that happened to a server: starting, ready, failed, restarting, restarted, stopped, reaped."""

    kind: str
    name: str
    message: str
    index: int | None = None
    endpoint: CarlaEndpoint | None = None


@dataclass
class _Server:
    index: int
    name: str
    ports: ServerPorts
    gpu: str | None
    container: Any = None
    version: str | None = None
    restarts: int = 0
    generation: int = 0
    removed: bool = False
    lock: threading.RLock = field(default_factory=threading.RLock)


class CarlaServerManager:
    """Starts, probes, restarts and removes a set of CARLA server containers.

    Use it as a context manager (or call `start` / `stop`); `carla_servers()` adds the supervisor.
    """

    def __init__(self, config: CarlaServerConfig, *, version_probe: VersionProbe | None = None,
                 labels: Mapping[str, str] | None = None, on_event: Callable[[ServerEvent], None] | None = None,
                 client: Any = None, detached: bool = False) -> None:
        self.config = config
        self.version_probe = version_probe
        self.extra_labels = dict(labels or {})
        self.on_event = on_event
        self.detached = detached
        self.session = uuid.uuid4().hex[:10]
        self._client = client
        self._servers: list[_Server] = []
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._attached = False

    @classmethod
    def attach(cls, config: CarlaServerConfig, endpoints: Sequence[CarlaEndpoint], *,
               version_probe: VersionProbe | None = None, client: Any = None) -> CarlaServerManager:
        """A manager over servers another process started (e.g. the stage process under a Prefect task):
        it probes and restarts them, and leaves their removal to the process that owns them."""
        manager = cls(config, version_probe=version_probe, client=client)
        manager._attached = True
        for ep in endpoints:
            container = manager.client.containers.get(ep.container_id or ep.name)
            manager.session = container.labels.get(LABEL_SESSION, manager.session)
            manager.extra_labels = {k: v for k, v in container.labels.items() if k in (LABEL_FLOW_RUN_ID,
                                                                                      LABEL_FLOW_RUN_NAME)}
            manager._servers.append(_Server(ep.index, ep.name, ServerPorts(ep.port, ep.streaming_port,
                                                                           ep.secondary_port, ep.tm_port),
                                            ep.gpu, container=container, version=ep.version))
        return manager

    # -- engine ------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = connect_docker(self.config.docker_host)
        return self._client

    @property
    def host(self) -> str:
        """The address clients connect to."""
        if self.config.connect_host:
            return self.config.connect_host
        url = urlparse(self.config.docker_host or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_URL)
        if url.scheme in ("tcp", "http", "https", "ssh") and url.hostname:
            return url.hostname
        if self.config.network_mode == "bridge" and self.config.bind_address not in ("0.0.0.0", "::"):
            return self.config.bind_address
        return "127.0.0.1"

    def ensure_image(self) -> None:
        docker = docker_sdk()
        ref, pull = self.config.image_ref, self.config.pull
        if pull != "always":
            try:
                self.client.images.get(ref)
                return
            except docker.errors.ImageNotFound:
                if pull == "never":
                    raise ImageUnavailable(f"image {ref} is not on the engine and carla.pull=never: "
                                           f"`docker pull {ref}` (or docker load it) first") from None
        log.info("carla: pulling %s (the CARLA image is several GB; only the first time)", ref)
        try:
            self.client.images.pull(self.config.image, tag=self.config.tag)
        except docker.errors.APIError as exc:
            raise ImageUnavailable(
                f"image {ref} is not on the engine and pulling it failed ({exc.explanation or exc}); pull it "
                f"where a registry is reachable (`docker pull {ref}`, then `docker save` / `docker load`), "
                "or set carla.image / carla.tag to an image the engine has") from None

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> list[CarlaEndpoint]:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> list[CarlaEndpoint]:
        """Start ``config.num_servers`` servers and wait until all are ready; on any failure remove
        every container this call created and raise (a `CarlaServerNotReady` carries the logs)."""
        if self._servers:
            raise CarlaServerError("this manager already runs servers; stop() them first")
        self._closing.clear()
        if self.config.exposed:
            log.warning("carla: network_mode=%s, bind_address=%s: the servers' RPC, which has no authentication, "
                        "is reachable from other hosts; the default (bridge, 127.0.0.1) keeps it on this host",
                        self.config.network_mode, self.config.bind_address)
        try:
            self.ensure_image()
            self.reap()
            with port_lock():
                taken = ports_claimed(self.client)
                blocks = allocate_ports(self.config.num_servers, base_port=self.config.base_port,
                                        max_port=self.config.max_port, stride=self.config.port_stride,
                                        exclude=taken)
                with self._lock:  # recorded before creation, so stop() releases every block
                    self._servers = [_Server(i, f"{self.config.owner}-carla-{self.session}-{i}", block,
                                             self.config.gpu_for(i)) for i, block in enumerate(blocks)]
                for server in self._servers:
                    self._create(server)
            # The lock is released once the containers exist: their labels now claim the ports.
            self._wait_all_ready()
        except BaseException:
            self.stop()
            raise
        return self.endpoints()

    def stop(self) -> None:
        """Remove every container of this manager (idempotent, safe from any exit path)."""
        self._closing.set()
        with self._lock:
            servers = list(self._servers)
            self._servers.clear()
        if self._attached:
            return  # the owning process removes them
        for server in servers:
            try:
                if server.container is not None and remove_container(server.container):
                    self._emit("stopped", server, "removed")
            except Exception as exc:
                log.warning("carla: could not remove %s: %s", server.name, exc)
            server.removed = True
        release_ports(s.ports for s in servers)
        # A container created just before an interrupt may not have been recorded: sweep the session.
        if self._client is not None:
            try:
                for container in managed_containers(self._client, self.config.owner, **{LABEL_SESSION: self.session}):
                    remove_container(container)
                    log.info("carla: removed %s", container.name)
            except Exception as exc:
                log.warning("carla: could not list this session's containers: %s", exc)

    @property
    def closing(self) -> bool:
        """True once `stop` began: no restart should start any more."""
        return self._closing.is_set()

    def reap(self) -> list[str]:
        """Remove containers of this owner left behind by dead runs on this host."""
        return reap_orphans(self.client, self.config.owner)

    # -- servers -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._servers)

    def _server(self, index: int) -> _Server:
        with self._lock:
            if not 0 <= index < len(self._servers):
                raise IndexError(f"no server {index}; this manager runs {len(self._servers)}")
            return self._servers[index]

    def endpoint(self, index: int) -> CarlaEndpoint:
        s = self._server(index)
        return CarlaEndpoint(index=s.index, host=self.host, port=s.ports.rpc, streaming_port=s.ports.streaming,
                             secondary_port=s.ports.secondary, tm_port=s.ports.traffic_manager, gpu=s.gpu,
                             name=s.name, container_id=s.container.id if s.container is not None else "",
                             version=s.version, generation=s.generation)

    def endpoints(self) -> list[CarlaEndpoint]:
        return [self.endpoint(i) for i in range(len(self._servers))]

    def container(self, index: int) -> Any:
        return self._server(index).container

    def labels_for(self, server: _Server) -> dict[str, str]:
        pid = os.getpid()
        labels = {
            **self.extra_labels,
            LABEL_MANAGED: MANAGED_VALUE, LABEL_OWNER: self.config.owner, LABEL_SESSION: self.session,
            LABEL_HOST: socket.gethostname(), LABEL_PID: str(pid), LABEL_PID_START: process_start(pid) or "",
            LABEL_DETACHED: "true" if self.detached else "false", LABEL_INDEX: str(server.index),
            LABEL_PORTS: server.ports.label(), LABEL_GPU: server.gpu or "",
        }
        return labels

    def _create(self, server: _Server) -> None:
        spec = container_spec(self.config, name=server.name, ports=server.ports, gpu=server.gpu,
                              labels=self.labels_for(server))
        self._emit("starting", server, f"{self.config.image_ref} rpc={server.ports.rpc} "
                                       f"gpu={server.gpu or 'none'}: {' '.join(spec['command'])}")
        spec.pop("detach")  # create() always detaches; run() is not used because it pulls implicitly
        docker = docker_sdk()
        try:
            server.container = self.client.containers.create(**spec)
            server.container.start()
        except docker.errors.APIError as exc:
            raise CarlaServerError(f"could not start {server.name}: {explain_api_error(exc, self.config)}") from None

    def _wait_all_ready(self) -> None:
        deadline = time.monotonic() + self.config.ready_timeout_s
        pool = ThreadPoolExecutor(max_workers=len(self._servers), thread_name_prefix="carla-ready")
        try:
            futures = [pool.submit(self._wait_ready, s, deadline) for s in self._servers]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in done:
                future.result()  # re-raises the first failure
            for future in futures:
                future.result()
        finally:
            # On failure or Ctrl-C the other waits stop at their next poll (stop() sets _closing).
            pool.shutdown(wait=False, cancel_futures=True)

    def _wait_ready(self, server: _Server, deadline: float) -> None:
        """Port open, then the version through the probe; `CarlaServerNotReady` with the logs otherwise."""
        docker = docker_sdk()
        host, port = self.host, server.ports.rpc
        t0 = time.monotonic()
        phase, last_error = f"rpc port {port} never opened", ""
        while True:
            if self._closing.is_set():
                raise CarlaServerError(f"{server.name}: start interrupted")
            try:
                server.container.reload()
                status = server.container.status
            except docker.errors.NotFound:
                status = "removed"
            if status in ("exited", "dead", "removed"):
                code = server.container.attrs.get("State", {}).get("ExitCode") if status != "removed" else None
                self._fail(server, f"exited (status {status}, exit code {code}) before it was ready")
            if port_open(host, port):
                if self.version_probe is None:
                    log.warning("carla: no version probe given; %s counts as ready once its port is open",
                                server.name)
                    break
                phase = f"rpc port {port} open but get_server_version() kept failing"
                remaining = deadline - time.monotonic()
                try:
                    server.version = str(self.version_probe(host, port, max(0.5, min(self.config.probe_timeout_s,
                                                                                      remaining))))
                    break
                except Exception as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                detail = f"{phase} (last error: {last_error})" if last_error else phase
                self._fail(server, f"was not ready after {time.monotonic() - t0:.0f} s: {detail}")
            time.sleep(0.25)
        if server.version and server.version != self.config.tag:
            log.warning("carla: %s reports version %s but the image tag is %s; keep client and server equal",
                        server.name, server.version, self.config.tag)
        self._emit("ready", server, f"version {server.version or '?'} on {host}:{port} "
                                    f"after {time.monotonic() - t0:.1f} s")

    def _fail(self, server: _Server, what: str) -> None:
        logs = logs_of(server.container) if server.container is not None else ""
        message = (f"CARLA server {server.name} ({self.config.image_ref}, rpc port {server.ports.rpc}) {what}. "
                   f"Its last {LOG_TAIL} log lines:\n{indent(logs)}\n"
                   "drivevla removes the container. If the server is only slow to start (the first start compiles "
                   "shaders), raise carla.ready_timeout_s; on GPU hosts check the NVIDIA container toolkit.")
        self._emit("failed", server, what)
        raise CarlaServerNotReady(message, name=server.name, logs=logs)

    def _refresh(self, server: _Server) -> Any:
        """Reload the container's state; adopt a container of the same name if another process created
        it again; None if it is gone."""
        docker = docker_sdk()
        try:
            server.container.reload()
            return server.container
        except docker.errors.NotFound:
            pass
        try:
            server.container = self.client.containers.get(server.name)
            return server.container
        except docker.errors.NotFound:
            return None

    def is_running(self, index: int) -> bool:
        container = self._refresh(self._server(index))
        return container is not None and container.status == "running"

    def started_at(self, index: int) -> str | None:
        """When the container last started (Docker's State.StartedAt); changes at every restart."""
        container = self._refresh(self._server(index))
        return container.attrs.get("State", {}).get("StartedAt") if container is not None else None

    def probe(self, index: int, timeout: float | None = None) -> str:
        """The server's version through the injected probe (raises if it does not answer)."""
        s = self._server(index)
        if self.version_probe is None:
            if not port_open(self.host, s.ports.rpc, timeout or self.config.probe_timeout_s):
                raise CarlaServerError(f"{s.name}: rpc port {s.ports.rpc} is closed")
            return s.version or ""
        return str(self.version_probe(self.host, s.ports.rpc, timeout or self.config.probe_timeout_s))

    def memory_mb(self, index: int) -> float | None:
        """The container's memory use without page cache (as `docker stats` shows it), MiB."""
        try:
            stats = self._server(index).container.stats(stream=False, one_shot=True)
        except Exception as exc:  # e.g. an engine older than API 1.41 (no one-shot stats)
            log.warning("carla: no memory figure for server %d (%s); the memory ceiling is not enforced", index, exc)
            return None
        mem = stats.get("memory_stats") or {}
        usage = mem.get("usage")
        if usage is None:
            return None
        inner = mem.get("stats") or {}
        cache = inner.get("inactive_file", inner.get("total_inactive_file", 0))
        return (usage - cache if cache < usage else usage) / 2**20

    def logs(self, index: int, tail: int = LOG_TAIL) -> str:
        return logs_of(self._server(index).container, tail)

    def restart(self, index: int, reason: str, *, seen_started_at: str | None = None) -> CarlaEndpoint:
        """Restart one server on the same ports and wait until it is ready; return its new endpoint.

        ``docker restart`` keeps the container (name, ports, labels); a container that vanished is
        created again from the same spec. With ``seen_started_at`` (the StartedAt the caller saw when it
        decided), a server that someone else restarted meanwhile is only waited for, not restarted
        again. Raises `CarlaServerNotReady` if it does not come back.
        """
        docker = docker_sdk()
        server = self._server(index)
        with server.lock:
            # Deciding and restarting is serialised across threads and across processes attached to the
            # same servers (a small fixed set of lock files: a rare collision only serialises two
            # restart calls, not the waits that follow them).
            with file_lock(f"carla-restart-{zlib.crc32(server.name.encode()) % 64}"):
                container = self._refresh(server)
                started = container.attrs.get("State", {}).get("StartedAt") if container is not None else None
                if (seen_started_at is not None and container is not None and container.status == "running"
                        and started != seen_started_at):
                    self._emit("restarting", server, f"{reason}; already restarted elsewhere, waiting for it")
                else:
                    self._emit("restarting", server, reason)
                    if container is None:
                        self._create(server)
                    else:
                        try:
                            container.restart(timeout=int(self.config.stop_timeout_s))
                        except docker.errors.APIError as exc:
                            log.warning("carla: restart of %s failed (%s); creating it again", server.name, exc)
                            remove_container(container)
                            self._create(server)
                    server.restarts += 1
            server.generation += 1
            server.version = None
            self._wait_ready(server, time.monotonic() + self.config.ready_timeout_s)
            endpoint = self.endpoint(index)
            self._emit("restarted", server, f"restart {server.restarts}: {reason}", endpoint)
            return endpoint

    def restarts(self, index: int) -> int:
        return self._server(index).restarts

    def _emit(self, kind: str, server: _Server, message: str, endpoint: CarlaEndpoint | None = None) -> None:
        level = logging.WARNING if kind in ("failed", "restarting") else logging.INFO
        log.log(level, "carla: %s %s: %s", server.name, kind, message)
        if self.on_event is not None:
            try:
                self.on_event(ServerEvent(kind, server.name, message, server.index, endpoint))
            except Exception:  # a broken listener must not break the servers
                log.exception("carla: event listener failed")
