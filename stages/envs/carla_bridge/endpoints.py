"""Which CARLA server an env slot talks to (slots: `stages.envs.slots`).

The CARLA resource (`tasks.carla_resource.carla_resource`) publishes its servers two ways:
``DRIVEVLA_CARLA_SERVERS``, the endpoint list as it was when this process started, and
``DRIVEVLA_CARLA_SERVERS_FILE``, a JSON file it rewrites whenever the supervisor restarts a server.
Env slot k uses entry k. The file is read first (it follows restarts; `reconnect` reads it again),
the variable is the fallback. Without either, ``CARLA_HOST`` / ``CARLA_PORT`` name one server, which
only one env (slot 0) may use.
"""
from __future__ import annotations

from collections.abc import Mapping

from infra.carla.endpoints import ENV_VAR, FILE_ENV_VAR, CarlaEndpoint, current_endpoints
from infra.carla.errors import CarlaServerError
from stages.envs.slots import EnvSlotError

__all__ = ["CarlaEndpoint", "CarlaServerError", "EnvSlotError", "check_server_slots", "listed_endpoints",
           "slot_endpoint"]

_PROVISION = ("Start them with the pipeline flow (`drivevla pipeline --preset carla`: tasks/carla_resource.py "
              "starts carla.num_servers servers, and sizes num_servers to what the online stage needs unless it "
              "is set explicitly), or with `drivevla carla up --servers {n} --format env` (source its output; "
              "scripts/run_carla_online_rl.sh does both).")


def listed_endpoints(environ: Mapping[str, str] | None = None) -> list[CarlaEndpoint] | None:
    """The newest published endpoint list (file, else variable); None when none is published."""
    return current_endpoints(environ)


def slot_endpoint(slot: int, environ: Mapping[str, str] | None = None) -> CarlaEndpoint | None:
    """Server ``slot`` of the published list; None when no list is published (then ``CARLA_HOST`` /
    ``CARLA_PORT`` name the one server, and only slot 0 may use it). Raises `EnvSlotError` when the
    slot has no server of its own."""
    if slot < 0:
        raise ValueError(f"env slot {slot} must be >= 0")
    endpoints = listed_endpoints(environ)
    if endpoints is None:
        if slot > 0:
            raise EnvSlotError(
                f"env slot {slot} needs a CARLA server of its own, but {ENV_VAR} is not set: CARLA_HOST / "
                f"CARLA_PORT name one server, which one env alone may tick. {_PROVISION.format(n=slot + 1)}")
        return None
    if slot >= len(endpoints):
        raise EnvSlotError(f"env slot {slot} has no CARLA server: {ENV_VAR} lists {len(endpoints)} "
                           f"(slots 0..{len(endpoints) - 1}). {_PROVISION.format(n=slot + 1)}")
    return endpoints[slot]


def check_server_slots(needed: int, layout: str = "", environ: Mapping[str, str] | None = None) -> None:
    """Fail before any env is built unless ``needed`` slots can each have a server of their own.

    ``layout`` says where the number comes from (e.g. `OnlineEnvSlots.describe`)."""
    why = f" ({layout})" if layout else ""
    endpoints = listed_endpoints(environ)
    if endpoints is None:
        if needed > 1:
            raise EnvSlotError(
                f"{needed} CARLA servers are needed, one per env{why}, but {ENV_VAR} is not set, so every env "
                f"would tick the one server at CARLA_HOST / CARLA_PORT (a synchronous server takes one client). "
                f"{_PROVISION.format(n=needed)}")
        return
    if len(endpoints) < needed:
        source = f"{FILE_ENV_VAR} / {ENV_VAR}"
        raise EnvSlotError(
            f"{needed} CARLA servers are needed, one per env{why}, but {source} lists {len(endpoints)}. "
            f"Set carla.num_servers={needed} or more. {_PROVISION.format(n=needed)}")
