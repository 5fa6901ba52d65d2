"""Validated settings of the CARLA servers the manager runs (the `carla:` section of the config)."""
from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Ports one server needs: rpc N, streaming N+1, secondary N+2 and its traffic manager N+3.
PORTS_PER_SERVER = 4


class CarlaServerConfig(BaseModel):
    """How to run `carlasim/carla:<tag>` containers: image, flags, GPUs, network, health and restarts."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    image: str = Field("carlasim/carla", min_length=1, description="image repository")
    # 0.9.16 matches the `carla==0.9.16` pip client; 0.9.15 needs the third-party `carla-0-9-15` client.
    tag: str = Field("0.9.16", min_length=1, description="image tag; keep it equal to the client's version")
    pull: Literal["missing", "always", "never"] = Field(
        "missing", description="pull the image: only when it is not present, always, or never")
    launcher: list[str] = Field(["/bin/bash", "./CarlaUE4.sh"], min_length=1,
                                description="command that starts the server inside the image")
    quality_level: Literal["Low", "Epic"] = "Low"
    fps: int | None = Field(None, ge=1, le=200, description="-fps=N; None leaves CARLA's default")
    extra_args: list[str] = Field([], description="more arguments for the launcher")
    environment: dict[str, str] = Field({}, description="environment variables of the container")

    num_servers: int = Field(1, ge=1, le=64, description="servers started together (one per parallel env)")
    gpus: list[str] = Field([], description="GPU device ids (or UUIDs); server i runs on gpus[i % len]; "
                                            "[] runs without a GPU request")
    gpu_concurrency: int = Field(1, ge=1, description="runs that may hold one GPU at once (Prefect global "
                                                      "concurrency limit carla-gpu-<id>, created when missing)")
    runtime: str | None = Field(None, description="container runtime, e.g. 'nvidia' on hosts without the "
                                                  "NVIDIA container toolkit's device-request support")
    # A CARLA server's RPC has no authentication: whoever reaches its port drives the simulator. With host
    # networking it listens on every interface of the host; bridge networking publishes its ports on
    # bind_address only, loopback by default, so the trainer on this host reaches it and other hosts do not.
    network_mode: Literal["host", "bridge"] = Field(
        "bridge", description="bridge: the server's ports are published on bind_address only (default, "
                              "loopback); host: the server binds the host's ports itself, on every interface")
    bind_address: str = Field("127.0.0.1", description="address published ports bind to (bridge mode); an "
                                                       "address other hosts reach exposes the unauthenticated RPC")
    connect_host: str | None = Field(None, description="address clients use; None = 127.0.0.1, or the "
                                                       "engine's host when DOCKER_HOST is tcp://")
    privileged: bool = Field(False, description="--privileged; the seed used it, CARLA does not need it")
    base_port: int = Field(2000, ge=1024, le=65000, description="first rpc port tried")
    max_port: int = Field(40000, ge=1028, le=65535, description="last port the search may use")
    port_stride: int = Field(PORTS_PER_SERVER, ge=PORTS_PER_SERVER,
                             description="distance between the rpc ports of two servers")

    ready_timeout_s: float = Field(180.0, gt=0, description="deadline for a server to answer its version")
    probe_timeout_s: float = Field(10.0, gt=0, description="client timeout of one version probe")
    stop_timeout_s: float = Field(5.0, ge=0, description="SIGTERM grace before SIGKILL on restart")
    health_interval_s: float = Field(10.0, gt=0, description="period of the watchdog that restarts "
                                                             "servers which exited or hang")
    health_failures: int = Field(3, ge=1, description="failed probes in a row before a running server "
                                                      "counts as hung and is restarted")
    restart_every_episodes: int | None = Field(None, ge=1, description="restart each server after this many "
                                                                      "episodes (CARLA leaks memory)")
    memory_limit_mb: float | None = Field(None, gt=0, description="restart a server whose memory use passes "
                                                                  "this ceiling (checked between episodes)")
    max_restarts: int = Field(10, ge=0, description="restarts of one server before the run fails")

    owner: str = Field("drivevla", pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$",
                       description="owner label; the reaper only ever touches containers carrying it")
    docker_host: str | None = Field(None, description="engine URL; None = DOCKER_HOST or the local socket")

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpu_ids_as_text(cls, value: object) -> object:
        # YAML reads `gpus: [0, 1]` as ints; Docker wants strings ("0" or "GPU-<uuid>").
        if isinstance(value, (int, str)):
            value = [value]
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        return value

    @field_validator("bind_address")
    @classmethod
    def _is_ip(cls, value: str) -> str:
        ipaddress.ip_address(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CarlaServerConfig:
        if len(set(self.gpus)) != len(self.gpus):
            raise ValueError(f"gpus={self.gpus} lists a device twice")
        if self.base_port + self.port_stride * self.num_servers > self.max_port:
            raise ValueError(f"ports {self.base_port}..{self.max_port} cannot hold {self.num_servers} servers "
                             f"spaced {self.port_stride} apart; raise max_port or lower base_port")
        return self

    @property
    def exposed(self) -> bool:
        """True when the servers' RPC is reachable from other hosts (host networking, or a non-loopback bind)."""
        return self.network_mode == "host" or not ipaddress.ip_address(self.bind_address).is_loopback

    @property
    def image_ref(self) -> str:
        return f"{self.image}:{self.tag}"

    def server_args(self, rpc_port: int) -> list[str]:
        """The launcher's arguments for a server on ``rpc_port`` (the seed's flags, ports made explicit)."""
        args = ["-RenderOffScreen", "-nosound", f"-carla-rpc-port={rpc_port}",
                f"-carla-streaming-port={rpc_port + 1}", f"-carla-secondary-port={rpc_port + 2}",
                f"-quality-level={self.quality_level}"]
        if self.fps is not None:
            args.append(f"-fps={self.fps}")
        return [*args, *self.extra_args]

    def gpu_for(self, index: int) -> str | None:
        return self.gpus[index % len(self.gpus)] if self.gpus else None
