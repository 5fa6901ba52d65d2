"""CARLA servers as Docker containers, run through the Docker Engine API (the docker Python SDK).

`CarlaServerManager` starts `carlasim/carla:<tag>` containers on free ports, waits until each answers
`get_server_version()` (through a probe the caller injects: only the CARLA bridge imports `carla`),
restarts them on request and removes them (`infra.carla.supervisor.carla_servers` wraps it in the
context manager that removes them on every exit path). Containers carry labels naming their owner, session,
creating process and flow run, so `reap_orphans` can remove what a crashed run left behind — and only
that: nothing without the managed + owner labels is ever touched.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from infra.carla.config import CarlaServerConfig
from infra.carla.ports import ServerPorts, allocate_ports, file_lock, port_lock, release_ports

log = logging.getLogger(__name__)

# (host, rpc port, timeout seconds) -> the server's version string; raises when it does not answer.
VersionProbe = Callable[[str, int, float], str]

DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"
MANAGED_VALUE = "carla-server"
LABEL_MANAGED = "drivevla.managed"
LABEL_OWNER = "drivevla.owner"
LABEL_SESSION = "drivevla.session"
LABEL_HOST = "drivevla.host"
LABEL_PID = "drivevla.pid"
LABEL_PID_START = "drivevla.pid_start"
LABEL_DETACHED = "drivevla.detached"
LABEL_INDEX = "drivevla.index"
LABEL_PORTS = "drivevla.ports"
LABEL_GPU = "drivevla.gpu"
LABEL_FLOW_RUN_ID = "drivevla.flow_run_id"
LABEL_FLOW_RUN_NAME = "drivevla.flow_run_name"
LOG_TAIL = 60
# How a process started inside the resource (e.g. `dvc repro` → `python -m stages.online`) finds the servers:
# ENV_VAR holds the endpoints as they were when the process started; FILE_ENV_VAR names a JSON file the
# resource rewrites whenever a server restarts, so a process can follow a server that moved.
ENV_VAR = "DRIVEVLA_CARLA_SERVERS"
FILE_ENV_VAR = "DRIVEVLA_CARLA_SERVERS_FILE"


class CarlaServerError(RuntimeError):
    """A CARLA server could not be started, kept alive or stopped."""


class DockerUnavailable(CarlaServerError):
    """The Docker engine cannot be reached."""


class ImageUnavailable(CarlaServerError):
    """The server image is not on the engine and could not be pulled."""


class CarlaServerNotReady(CarlaServerError):
    """A server did not answer its version before the deadline (or exited first)."""

    def __init__(self, message: str, name: str = "", logs: str = "") -> None:
        super().__init__(message)
        self.name = name
        self.logs = logs


def docker_sdk() -> Any:
    """The docker package, or an error naming the extra that installs it."""
    try:
        import docker
    except ImportError as exc:
        raise ImportError("the CARLA server manager needs the Docker SDK for Python: "
                          "pip install -e .[docker]") from exc
    return docker


def connect_docker(docker_host: str | None = None, timeout: float = 60.0) -> Any:
    """A `docker.DockerClient` that answered a ping, or `DockerUnavailable` saying how to start one."""
    docker = docker_sdk()
    url = docker_host or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_URL
    try:
        client = docker.DockerClient(base_url=url, timeout=int(timeout))
        client.ping()
    except Exception as exc:  # DockerException, requests' ConnectionError, PermissionError ...
        reason = _why_unreachable(exc)
        raise DockerUnavailable(
            f"Docker engine not reachable at {url}: {reason}. Start it with `sudo systemctl start docker` "
            "(or `sudo bash scripts/docker-engine.sh` on a machine without one), check that this user may use "
            "its socket, or point DOCKER_HOST / carla.docker_host at a running engine.") from None
    return client


def _why_unreachable(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "FileNotFoundError" in text or "No such file" in text:
        return "no socket there (the engine is not running)"
    if "Permission denied" in text or "PermissionError" in text:
        return "permission denied (add this user to the docker group, or use sudo)"
    if "Connection refused" in text or "ConnectionRefusedError" in text:
        return "connection refused (the engine is not running)"
    return text.splitlines()[0]


@dataclass(frozen=True)
class CarlaEndpoint:
    """Where a client reaches one server. ``generation`` grows by one at every restart."""

    index: int
    host: str
    port: int
    streaming_port: int
    secondary_port: int
    tm_port: int
    gpu: str | None
    name: str
    container_id: str
    version: str | None = None
    generation: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CarlaEndpoint:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def endpoints_to_env(endpoints: Sequence[CarlaEndpoint]) -> str:
    """The value of ``DRIVEVLA_CARLA_SERVERS`` for ``endpoints`` (JSON)."""
    return json.dumps([e.to_dict() for e in endpoints])


def _parse_endpoints(text: str, source: str) -> list[CarlaEndpoint]:
    try:
        items = json.loads(text)
        if not isinstance(items, list):
            raise TypeError(f"a JSON {type(items).__name__}, not a list")
        return [CarlaEndpoint.from_dict(item) for item in items]
    except (ValueError, TypeError, KeyError) as exc:
        raise CarlaServerError(f"{source} is not a JSON list of endpoints ({exc}): {text[:200]!r}") from None


def endpoints_from_env(environ: Mapping[str, str] | None = None) -> list[CarlaEndpoint]:
    """The endpoints a parent process published in ``DRIVEVLA_CARLA_SERVERS`` ([] when unset)."""
    text = (os.environ if environ is None else environ).get(ENV_VAR, "")
    if not text.strip():
        return []
    return _parse_endpoints(text, ENV_VAR)


def write_endpoints_file(path: str | Path, endpoints: Sequence[CarlaEndpoint]) -> Path:
    """Write ``endpoints`` to ``path`` as JSON (what ``DRIVEVLA_CARLA_SERVERS_FILE`` names).

    Atomic: the text goes to a temporary file in the same directory, which then replaces ``path``
    (`os.replace`), so a reader sees the old list or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(endpoints_to_env(endpoints))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def endpoints_from_file(path: str | Path) -> list[CarlaEndpoint]:
    """The endpoints `write_endpoints_file` wrote to ``path`` (`FileNotFoundError` when it is gone)."""
    return _parse_endpoints(Path(path).read_text(), str(path))


def current_endpoints(environ: Mapping[str, str] | None = None) -> list[CarlaEndpoint] | None:
    """The newest endpoint list a parent process published: the file named by
    ``DRIVEVLA_CARLA_SERVERS_FILE`` when it is readable, else the ``DRIVEVLA_CARLA_SERVERS`` snapshot;
    None when neither is set (no resource around this process)."""
    environ = os.environ if environ is None else environ
    path = environ.get(FILE_ENV_VAR, "").strip()
    if path:
        try:
            return endpoints_from_file(path)
        except FileNotFoundError:
            # The resource removes the file as it exits; the snapshot is all that is left.
            log.warning("carla: %s=%s does not exist; using the %s snapshot", FILE_ENV_VAR, path, ENV_VAR)
    if not environ.get(ENV_VAR, "").strip():
        return None
    return endpoints_from_env(environ)


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


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` (Linux, clock ticks since boot): a pid plus its start time names one
    process, so a recycled pid is not mistaken for the run that created a container."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def container_spec(config: CarlaServerConfig, *, name: str, ports: ServerPorts, gpu: str | None,
                   labels: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments of `client.containers.create` for one server (pure: no engine needed)."""
    environment = dict(config.environment)
    spec: dict[str, Any] = {
        "image": config.image_ref,
        "command": [*config.launcher, *config.server_args(ports.rpc)],
        "name": name,
        "labels": dict(labels),
        "detach": True,
        # docker-init as PID 1 forwards SIGTERM to the launcher script (a shell ignores it as PID 1).
        "init": True,
        "privileged": config.privileged,
    }
    if config.network_mode == "host":
        spec["network_mode"] = "host"
    else:
        # The traffic manager runs inside the client, not the server: only the server's three ports.
        spec["ports"] = {f"{p}/tcp": (config.bind_address, p) for p in (ports.rpc, ports.streaming, ports.secondary)}
    if gpu is not None:
        docker = docker_sdk()
        spec["device_requests"] = [docker.types.DeviceRequest(device_ids=[gpu], capabilities=[["gpu"]])]
        # CARLA renders through Vulkan: the container needs the driver's graphics libraries too.
        environment.setdefault("NVIDIA_DRIVER_CAPABILITIES", "all")
    if config.runtime:
        spec["runtime"] = config.runtime
    if environment:
        spec["environment"] = environment
    return spec


def _explain(exc: Any, config: CarlaServerConfig) -> str:
    """A Docker API error, with what to do about the usual ones."""
    text = str(getattr(exc, "explanation", None) or exc)
    if "could not select device driver" in text or ("nvidia" in text.lower() and "runtime" in text.lower()):
        return (f"{text}. A GPU was requested (carla.gpus={config.gpus}) but the engine cannot hand one out: "
                "install the NVIDIA Container Toolkit (`nvidia-ctk runtime configure --runtime=docker`, then "
                "restart Docker), or set carla.gpus=[] to run without a GPU request")
    if "port is already allocated" in text or "address already in use" in text:
        return f"{text}. Another process took the port after it was found free; start again"
    return text


def _port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _logs_of(container: Any, tail: int = LOG_TAIL) -> str:
    try:
        return container.logs(tail=tail).decode("utf-8", "replace").rstrip()
    except Exception as exc:  # the container may be gone already
        return f"(logs unavailable: {exc})"


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in (text or "(no output)").splitlines())


def managed_containers(client: Any, owner: str | None = None, **labels: str) -> list[Any]:
    """Containers (running or not) with the managed label, the owner and every given label."""
    wanted = {LABEL_MANAGED: MANAGED_VALUE, **({LABEL_OWNER: owner} if owner else {}), **labels}
    found = client.containers.list(all=True, filters={"label": [f"{k}={v}" for k, v in wanted.items()]})
    # Check again here: whatever the engine's filter does, nothing without our labels is ever touched.
    return [c for c in found if all(c.labels.get(k) == v for k, v in wanted.items())]


def is_orphan(container: Any, hostname: str | None = None) -> bool:
    """True when the process that created ``container`` is gone (same host only; detached servers,
    started by `drivevla carla up`, belong to no process and are never orphans)."""
    labels = container.labels
    if labels.get(LABEL_DETACHED) == "true":
        return False
    if labels.get(LABEL_HOST) != (hostname or socket.gethostname()):
        return False  # its creator may live on another host sharing this engine: leave it
    try:
        pid = int(labels.get(LABEL_PID, ""))
    except ValueError:
        return False
    if not _pid_alive(pid):
        return True
    started = labels.get(LABEL_PID_START)
    return bool(started) and _process_start(pid) not in (None, started)


def remove_container(container: Any) -> bool:
    """Kill and remove; True if it was there. CARLA keeps no state worth a graceful shutdown, and
    a forced remove is what keeps cleanup quick and reliable under Ctrl-C."""
    docker = docker_sdk()
    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        return False
    except docker.errors.APIError as exc:
        if exc.status_code == 409 and "already in progress" in str(exc):
            return True  # another cleanup path is removing it right now
        raise
    return True


def reap_orphans(client: Any, owner: str | None, *, flow_run_id: str | None = None,
                 hostname: str | None = None) -> list[str]:
    """Remove the owner's containers left behind by dead runs; return their names.

    With ``flow_run_id``, remove that flow run's containers whatever the state of its process (used by
    Prefect's on_crashed / on_cancellation hooks). Containers without the managed and owner labels —
    anything not started by this manager — are never touched.
    """
    if owner is None and flow_run_id is None:
        raise ValueError("reap_orphans needs an owner or a flow run id")
    extra = {LABEL_FLOW_RUN_ID: flow_run_id} if flow_run_id else {}
    reaped = []
    for container in managed_containers(client, owner, **extra):
        if flow_run_id or is_orphan(container, hostname):
            if remove_container(container):
                reaped.append(container.name)
                log.info("carla: reaped %s (left by %s)", container.name,
                         f"flow run {flow_run_id}" if flow_run_id else
                         f"dead process {container.labels.get(LABEL_PID)} on {container.labels.get(LABEL_HOST)}")
    return reaped


def ports_claimed(client: Any) -> set[int]:
    """Ports recorded in the labels of every managed container on the engine (any owner)."""
    claimed: set[int] = set()
    for container in managed_containers(client):
        text = container.labels.get(LABEL_PORTS)
        if text:
            try:
                claimed.update(ServerPorts.from_label(text).all())
            except ValueError:
                pass
    return claimed


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
            LABEL_HOST: socket.gethostname(), LABEL_PID: str(pid), LABEL_PID_START: _process_start(pid) or "",
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
            raise CarlaServerError(f"could not start {server.name}: {_explain(exc, self.config)}") from None

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
            if _port_open(host, port):
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
        logs = _logs_of(server.container) if server.container is not None else ""
        message = (f"CARLA server {server.name} ({self.config.image_ref}, rpc port {server.ports.rpc}) {what}. "
                   f"Its last {LOG_TAIL} log lines:\n{_indent(logs)}\n"
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
            if not _port_open(self.host, s.ports.rpc, timeout or self.config.probe_timeout_s):
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
        return _logs_of(self._server(index).container, tail)

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


class LogFollower:
    """Copies the output of a manager's containers, line by line, to ``sink`` (e.g. a Prefect run
    logger) until `stop()`; re-attaches after a restart without repeating earlier lines."""

    def __init__(self, manager: CarlaServerManager, sink: Callable[[str, str], None], poll_s: float = 0.5) -> None:
        self.manager = manager
        self.sink = sink
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> LogFollower:
        for index in range(len(self.manager)):
            thread = threading.Thread(target=self._follow, args=(index,), name=f"carla-logs-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop copying. A thread blocked on a quiet container ends when the container goes: remove
        the containers, then `join`."""
        self._stop.set()

    def join(self, timeout: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _follow(self, index: int) -> None:
        since: float | None = None
        while not self._stop.is_set():
            try:
                server = self.manager._server(index)
            except IndexError:
                return  # the manager stopped
            if server.removed:
                return
            try:
                kwargs = {"stream": True, "follow": True, "timestamps": True}
                if since:
                    kwargs["since"] = since
                for raw in server.container.logs(**kwargs):
                    for line in raw.decode("utf-8", "replace").splitlines():
                        stamp, _, text = line.partition(" ")
                        since = parse_docker_time(stamp) or since
                        self.sink(server.name, text)
                    if self._stop.is_set():
                        return
            except Exception as exc:
                log.debug("carla: log stream of %s ended: %s", server.name, exc)
            # The stream ends when the container stops; a restarted one is followed again.
            self._stop.wait(self.poll_s)


def parse_docker_time(stamp: str) -> float | None:
    """Docker's RFC 3339 nano timestamp → epoch seconds (+1 µs so the same line is not read twice)."""
    try:
        head, _, frac = stamp.rstrip("Z").partition(".")
        base = datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
        return base.timestamp() + float(f"0.{frac or '0'}") + 1e-6
    except ValueError:
        return None
