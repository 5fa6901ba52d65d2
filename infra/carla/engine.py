"""The Docker engine as the CARLA manager uses it: the SDK, a checked connection, the container spec of
one server, removal, logs and what the engine's errors mean.

The docker SDK is imported on first use, through `infra.packages.require_package` (``pip install -e .[docker]``).
"""
from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

from infra.carla.config import CarlaServerConfig
from infra.carla.errors import DockerUnavailable
from infra.carla.ports import ServerPorts
from infra.packages import require_package

__all__ = ["DEFAULT_DOCKER_URL", "LOG_TAIL", "connect_docker", "container_spec", "docker_sdk", "explain_api_error",
           "indent", "logs_of", "port_open", "remove_container"]

DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"
LOG_TAIL = 60


def docker_sdk() -> Any:
    """The docker package, or `MissingPackage` (an ImportError) naming the extra that installs it."""
    return require_package("docker", "docker", "running CARLA servers")


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


def explain_api_error(exc: Any, config: CarlaServerConfig) -> str:
    """A Docker API error, with what to do about the usual ones."""
    text = str(getattr(exc, "explanation", None) or exc)
    if "could not select device driver" in text or ("nvidia" in text.lower() and "runtime" in text.lower()):
        return (f"{text}. A GPU was requested (carla.gpus={config.gpus}) but the engine cannot hand one out: "
                "install the NVIDIA Container Toolkit (`nvidia-ctk runtime configure --runtime=docker`, then "
                "restart Docker), or set carla.gpus=[] to run without a GPU request")
    if "port is already allocated" in text or "address already in use" in text:
        return f"{text}. Another process took the port after it was found free; start again"
    return text


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


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def logs_of(container: Any, tail: int = LOG_TAIL) -> str:
    try:
        return container.logs(tail=tail).decode("utf-8", "replace").rstrip()
    except Exception as exc:  # the container may be gone already
        return f"(logs unavailable: {exc})"


def indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in (text or "(no output)").splitlines())
