"""Where clients reach the CARLA servers: `CarlaEndpoint`, and the two ways a process publishes the list.

How a process started inside the resource (e.g. `dvc repro` → `python -m stages.online`) finds the servers:
``DRIVEVLA_CARLA_SERVERS`` (`ENV_VAR`) holds the endpoints as they were when the process started;
``DRIVEVLA_CARLA_SERVERS_FILE`` (`FILE_ENV_VAR`) names a JSON file the resource rewrites, atomically, whenever
a server restarts, so a process can follow a server that moved. Readers (the CARLA bridge) import this module
alone: it needs no Docker.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from infra.carla.errors import CarlaServerError
from infra.files import atomic_write_text

__all__ = ["ENV_VAR", "FILE_ENV_VAR", "CarlaEndpoint", "current_endpoints", "endpoints_from_env",
           "endpoints_from_file", "endpoints_to_env", "write_endpoints_file"]

log = logging.getLogger(__name__)

ENV_VAR = "DRIVEVLA_CARLA_SERVERS"
FILE_ENV_VAR = "DRIVEVLA_CARLA_SERVERS_FILE"


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
    """Write ``endpoints`` to ``path`` as JSON (what ``DRIVEVLA_CARLA_SERVERS_FILE`` names), atomically:
    a reader sees the old list or the new one, never half of one."""
    path = Path(path)
    atomic_write_text(path, endpoints_to_env(endpoints))
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
