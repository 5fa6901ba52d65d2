"""CARLA servers in Docker: configuration, free ports, the container manager and its supervisor.

    from infra.carla import CarlaServerConfig, carla_servers

    with carla_servers(CarlaServerConfig(num_servers=2), version_probe=probe) as servers:
        for ep in servers:            # CarlaEndpoint: host, port, tm_port, gpu, ...
            ...
        servers.episode_done(0)       # restarts a server when due; returns its endpoint if it did

Modules, one concern each: `config` (settings), `ports` (free port blocks), `errors`, `endpoints` (where
clients reach the servers and the list published to child processes — no Docker), `engine` (the docker SDK,
the container spec, removal), `labels` (owner labels, orphans, reaping), `manager` (start / probe / restart /
remove), `logs` (the log follower), `supervisor` (health, restarts and the `carla_servers` lifecycle).

The names below load their module on first use (PEP 562), so a reader of the endpoint list (the CARLA
bridge: `from infra.carla.endpoints import ...`) loads neither the manager nor Docker. The docker SDK loads
when a manager first talks to the engine (`pip install -e .[docker]`); `carla` is never imported here — the
version probe is injected by the caller (the CARLA bridge owns the client).
"""
from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "config": ["PORTS_PER_SERVER", "CarlaServerConfig"],
    "endpoints": ["ENV_VAR", "FILE_ENV_VAR", "CarlaEndpoint", "current_endpoints", "endpoints_from_env",
                  "endpoints_from_file", "endpoints_to_env", "write_endpoints_file"],
    "engine": ["connect_docker", "container_spec"],
    "errors": ["CarlaServerError", "CarlaServerNotReady", "DockerUnavailable", "ImageUnavailable"],
    "labels": ["managed_containers", "reap_orphans"],
    "logs": ["LogFollower"],
    "manager": ["CarlaServerManager", "ServerEvent", "VersionProbe"],
    "ports": ["NoFreePorts", "ServerPorts", "allocate_ports", "port_is_free", "release_ports"],
    "supervisor": ["ServerSupervisor", "carla_servers"],
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'infra.carla' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"infra.carla.{module}"), name)
    globals()[name] = value   # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
