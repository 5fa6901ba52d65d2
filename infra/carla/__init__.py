"""CARLA servers in Docker: configuration, free ports, the container manager and its supervisor.

    from infra.carla import CarlaServerConfig, carla_servers

    with carla_servers(CarlaServerConfig(num_servers=2), version_probe=probe) as servers:
        for ep in servers:            # CarlaEndpoint: host, port, tm_port, gpu, ...
            ...
        servers.episode_done(0)       # restarts a server when due; returns its endpoint if it did

The docker SDK loads on first use (`pip install -e .[docker]`); `carla` is never imported here —
the version probe is injected by the caller (the CARLA bridge owns the client).
"""
from infra.carla.config import PORTS_PER_SERVER, CarlaServerConfig
from infra.carla.manager import (
    ENV_VAR, FILE_ENV_VAR, CarlaEndpoint, CarlaServerError, CarlaServerManager, CarlaServerNotReady,
    DockerUnavailable, ImageUnavailable, LogFollower, ServerEvent, VersionProbe, connect_docker, container_spec,
    current_endpoints, endpoints_from_env, endpoints_from_file, endpoints_to_env, managed_containers, reap_orphans,
    write_endpoints_file)
from infra.carla.ports import NoFreePorts, ServerPorts, allocate_ports, port_is_free, release_ports
from infra.carla.supervisor import ServerSupervisor, carla_servers

__all__ = [
    "ENV_VAR", "FILE_ENV_VAR", "PORTS_PER_SERVER", "CarlaEndpoint", "CarlaServerConfig", "CarlaServerError",
    "CarlaServerManager", "CarlaServerNotReady", "DockerUnavailable", "ImageUnavailable", "LogFollower",
    "NoFreePorts", "ServerEvent", "ServerPorts", "ServerSupervisor", "VersionProbe", "allocate_ports",
    "carla_servers", "connect_docker", "container_spec", "current_endpoints", "endpoints_from_env",
    "endpoints_from_file", "endpoints_to_env", "managed_containers", "port_is_free", "reap_orphans",
    "release_ports", "write_endpoints_file",
]
