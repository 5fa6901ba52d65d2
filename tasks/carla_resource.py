"""The CARLA servers as a Prefect resource around the online stage.

Prefect has no resource manager, so this is a context manager with ``finally`` (it removes the servers
on success, exception, Ctrl-C and cancellation — Prefect raises TerminationSignal / CancelledError in
the run), a Prefect global concurrency limit per GPU (``carla-gpu-<id>``) so two runs never render on
one GPU, and `reap_flow_run_servers` for the flow's ``on_cancellation`` / ``on_crashed`` hooks, for the
cases where the process dies before its ``finally`` runs. Server events and the servers' own output go
to the run's logger.

    @flow(on_cancellation=[reap_flow_run_servers], on_crashed=[reap_flow_run_servers])
    def pipeline(...):
        ...
        run_stage_in_carla("online", workdir=..., use_dvc=..., overrides=...)   # when env.backend == "carla"
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from prefect import get_client, get_run_logger, task
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import flow_run

from infra.carla import (
    ENV_VAR, FILE_ENV_VAR, CarlaEndpoint, CarlaServerConfig, LogFollower, ServerEvent, ServerSupervisor,
    VersionProbe, carla_servers, connect_docker, endpoints_to_env, reap_orphans, write_endpoints_file)
from infra.carla.labels import LABEL_FLOW_RUN_ID, LABEL_FLOW_RUN_NAME
from stages.config import load_config
from stages.envs.carla_bridge import load_carla, server_version
from stages.envs.slots import EnvSlotError, OnlineEnvSlots
from tasks.stage_tasks import run_stage

log = logging.getLogger(__name__)


def bridge_version_probe() -> VersionProbe | None:
    """The CARLA bridge's probe, ``stages.envs.carla_bridge.server_version(host, port, timeout)``; the
    bridge owns the `carla` client. None (readiness = port open) when the `carla` client is not installed."""
    try:
        load_carla()
    except ImportError as exc:
        log.warning("carla: no version probe (%s); a server counts as ready once its rpc port opens", exc)
        return None
    return server_version


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run's logger inside a flow or task run, this module's logger elsewhere."""
    try:
        return get_run_logger()
    except Exception:  # MissingContextError outside a run
        return log


def flow_run_labels() -> dict[str, str]:
    """Container labels naming the current flow run (none outside a run)."""
    run_id = flow_run.get_id()
    if not run_id:
        return {}
    return {LABEL_FLOW_RUN_ID: str(run_id), LABEL_FLOW_RUN_NAME: str(flow_run.get_name() or "")}


def _in_prefect_run() -> bool:
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _ensure_limits(names: Sequence[str], limit: int) -> None:
    """Create the GPU limits that do not exist yet (an existing limit keeps what the operator set)."""
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                try:
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
                    log.info("carla: created Prefect global concurrency limit %s (limit %d)", name, limit)
                except ObjectAlreadyExists:
                    pass  # another run created it meanwhile


@contextmanager
def gpu_slots(gpus: Sequence[str], limit: int = 1, timeout_s: float | None = None) -> Iterator[list[str]]:
    """Hold one slot of the Prefect global concurrency limit ``carla-gpu-<id>`` of each GPU (all at once,
    so two runs cannot deadlock on two GPUs). Nothing to hold without GPUs, or outside a Prefect run."""
    if not gpus or not _in_prefect_run():
        yield []
        return
    names = [f"carla-gpu-{gpu}" for gpu in gpus]
    _ensure_limits(names, limit)
    run_logger().info("carla: waiting for GPU slot(s) %s", ", ".join(names))
    with concurrency(names, occupy=1, timeout_seconds=timeout_s, strict=True):
        run_logger().info("carla: holding GPU slot(s) %s", ", ".join(names))
        yield names


class EndpointPublisher:
    """Publishes a supervisor's endpoints to processes started inside the resource: the
    ``DRIVEVLA_CARLA_SERVERS`` variable (a snapshot a child takes when it starts) and the JSON file named
    by ``DRIVEVLA_CARLA_SERVERS_FILE``, rewritten atomically at every change so a running child can
    follow a server that moved (`stages.envs.carla_bridge.endpoints`). `close` removes the file and
    restores both variables as they were."""

    def __init__(self, endpoints: Callable[[], Sequence[CarlaEndpoint]], path: str | Path) -> None:
        self.endpoints = endpoints
        self.path = Path(path)
        self._lock = threading.Lock()
        self._closed = False
        self._previous = {name: os.environ.get(name) for name in (ENV_VAR, FILE_ENV_VAR)}

    def publish(self, _changed: CarlaEndpoint | None = None) -> None:
        """Write the current endpoints (also a supervisor listener: restarts call it from their thread)."""
        # Under the lock the list is read and written together, so of two restarts finishing at
        # once the later write holds both; after close a late restart must not bring the file back.
        with self._lock:
            if self._closed:
                return
            endpoints = list(self.endpoints())
            write_endpoints_file(self.path, endpoints)
            os.environ[ENV_VAR] = endpoints_to_env(endpoints)
            os.environ[FILE_ENV_VAR] = str(self.path)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.path.unlink(missing_ok=True)
            for name, value in self._previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def default_endpoints_file(session: str) -> Path:
    """Where the resource of manager session ``session`` publishes its endpoint list."""
    return Path(tempfile.gettempdir()) / f"drivevla-carla-{session}.json"


@contextmanager
def carla_resource(config: CarlaServerConfig, *, version_probe: VersionProbe | None = None,
                   use_bridge_probe: bool = True, supervise: bool = True, stream_logs: bool = True,
                   export_env: bool = True, gpu_timeout_s: float | None = None,
                   endpoints_file: str | Path | None = None) -> Iterator[ServerSupervisor]:
    """Start the servers for the current run and yield them (see `ServerSupervisor`); always remove them.

    - holds the GPU slots first (a run waits for the GPUs before starting any server);
    - labels the containers with the flow run, so the flow's hooks can reap them;
    - sends start / ready / restart / stop events and every line the servers print to the run logger;
    - exports ``DRIVEVLA_CARLA_SERVERS`` (the endpoints as JSON) for processes started inside, e.g.
      ``dvc repro`` → ``python -m stages.online`` (`infra.carla.endpoints_from_env` reads it), and
      ``DRIVEVLA_CARLA_SERVERS_FILE``, the path of a JSON file holding the same list, rewritten
      atomically whenever a server restarts and removed on exit (``endpoints_file``, default
      `default_endpoints_file`; `EndpointPublisher`). Env slot k of the stage uses server k.
    """
    logger = run_logger()
    probe = version_probe if version_probe is not None else (bridge_version_probe() if use_bridge_probe else None)
    used = sorted({g for g in (config.gpu_for(i) for i in range(config.num_servers)) if g is not None})

    def on_event(event: ServerEvent) -> None:
        level = logging.WARNING if event.kind in ("failed", "restarting") else logging.INFO
        logger.log(level, "carla %s: %s %s", event.name, event.kind, event.message)

    def on_line(name: str, line: str) -> None:
        logger.info("[%s] %s", name, line)

    follower: LogFollower | None = None
    publisher: EndpointPublisher | None = None
    with ExitStack() as stack:
        stack.enter_context(gpu_slots(used, config.gpu_concurrency, gpu_timeout_s))
        try:
            servers = stack.enter_context(carla_servers(config, version_probe=probe, labels=flow_run_labels(),
                                                        on_event=on_event, supervise=supervise))
            if stream_logs:
                follower = LogFollower(servers.manager, on_line).start()
            if export_env:
                publisher = EndpointPublisher(
                    lambda: servers.endpoints, endpoints_file or default_endpoints_file(servers.manager.session))
                publisher.publish()
                servers.add_listener(publisher.publish)
            logger.info("carla: %d server(s) ready: %s", len(servers),
                        ", ".join(f"{e.host}:{e.port} (gpu {e.gpu or '-'})" for e in servers))
            yield servers
        finally:
            if follower is not None:
                follower.stop()
            if publisher is not None:
                publisher.close()
    # Containers are gone here, so the log streams have ended.
    if follower is not None:
        follower.join()


def reap_flow_run_servers(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_cancellation`` / ``on_crashed`` hook: remove the CARLA containers labelled with this flow run.
    Hooks run client-side and are not guaranteed, which is why the resource's ``finally`` and the
    reaper at every start exist too. Never raises."""
    try:
        removed = reap_orphans(connect_docker(), None, flow_run_id=str(flow_run.id))
    except Exception as exc:
        log.warning("carla: could not reap the servers of flow run %s: %s", getattr(flow_run, "id", "?"), exc)
        return
    if removed:
        log.warning("carla: flow run %s ended %s; removed its servers %s", flow_run.id,
                    getattr(state, "name", state), ", ".join(removed))


def carla_config_for(cfg: Any, carla: CarlaServerConfig | dict[str, Any] | None = None,
                     world_size: int = 1) -> CarlaServerConfig:
    """The server config of a pipeline config: ``carla`` if given, else its ``carla`` section; as many
    servers as the online stage has env slots (`OnlineEnvSlots.total`; ``world_size`` is 1 for the
    ``python -m stages.online`` that dvc.yaml runs) unless ``num_servers`` was set explicitly, which
    must then be at least that many."""
    if isinstance(carla, dict):
        carla = CarlaServerConfig.model_validate(carla)
    carla = carla or getattr(cfg, "carla", None) or CarlaServerConfig()
    if getattr(cfg, "online", None) is None:
        return carla
    slots = OnlineEnvSlots.for_config(cfg.online, world_size)
    if "num_servers" not in carla.model_fields_set:
        # Validated, not model_copy(update=...): the port range must hold the servers.
        return CarlaServerConfig.model_validate({**carla.model_dump(exclude_unset=True), "num_servers": slots.total})
    if carla.num_servers < slots.total:
        # Found here, before any container starts, rather than by the stage minutes later.
        raise EnvSlotError(f"carla.num_servers={carla.num_servers} is too few: the online stage needs "
                           f"{slots.total} CARLA servers, one per env ({slots.describe()}). Set "
                           f"carla.num_servers={slots.total}, or leave it unset to get that many.")
    return carla


def uses_carla(cfg: Any) -> bool:
    """True when the config's env runs on CARLA (then the online stage needs servers)."""
    return getattr(getattr(cfg, "env", None), "backend", None) == "carla"


@task(name="run-stage-in-carla", task_run_name="stage-{name}-in-carla")
def run_stage_in_carla(name: str = "online", workdir: str = ".", use_dvc: bool = True,
                       overrides: list[str] | None = None, carla: dict[str, Any] | None = None,
                       timeout_s: float | None = None) -> dict[str, Any]:
    """Run a stage (normally ``online``) inside the CARLA resource and return its metrics.

    ``carla`` overrides the config's ``carla`` section; ``timeout_s`` goes to `run_stage`."""
    cfg = load_config(Path(workdir) / "params.yaml", overrides=overrides or [])
    extra = {"timeout_s": timeout_s} if timeout_s is not None else {}
    with carla_resource(carla_config_for(cfg, carla)):
        return run_stage.fn(name, workdir=workdir, use_dvc=use_dvc, overrides=overrides, **extra)
