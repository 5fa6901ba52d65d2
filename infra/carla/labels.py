"""The labels on every container the manager starts, and what they are for: finding drivevla's own
containers, recognising the orphans of dead runs and reaping them — and never touching anything else
(nothing without the managed + owner labels is ever removed)."""
from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

from infra.carla.engine import remove_container
from infra.carla.ports import ServerPorts
from infra.processes import alive

__all__ = ["LABEL_DETACHED", "LABEL_FLOW_RUN_ID", "LABEL_FLOW_RUN_NAME", "LABEL_GPU", "LABEL_HOST", "LABEL_INDEX",
           "LABEL_MANAGED", "LABEL_OWNER", "LABEL_PID", "LABEL_PID_START", "LABEL_PORTS", "LABEL_SESSION",
           "MANAGED_VALUE", "is_orphan", "managed_containers", "pid_alive", "ports_claimed", "process_start",
           "reap_orphans"]

log = logging.getLogger(__name__)

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


def process_start(pid: int) -> str | None:
    """The start time of ``pid`` (Linux, clock ticks since boot): a pid plus its start time names one
    process, so a recycled pid is not mistaken for the run that created a container."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def pid_alive(pid: int) -> bool:
    return alive(pid)


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
    if not pid_alive(pid):
        return True
    started = labels.get(LABEL_PID_START)
    return bool(started) and process_start(pid) not in (None, started)


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
