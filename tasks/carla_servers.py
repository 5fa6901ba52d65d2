"""What flows may use of the CARLA server manager, without Prefect.

Flows reach ``infra`` through ``tasks`` (the layering rule). ``drivevla carla …`` starts, lists and
reaps servers but needs none of Prefect, which ``tasks.carla_resource`` loads, so the manager's names
are handed on from here.
"""
from __future__ import annotations

from infra.carla import (ENV_VAR, CarlaServerConfig, CarlaServerError, CarlaServerManager, ServerEvent,
                         connect_docker, endpoints_to_env, managed_containers, reap_orphans)
from infra.carla.labels import LABEL_DETACHED, LABEL_FLOW_RUN_NAME, LABEL_GPU, LABEL_PORTS, LABEL_SESSION

__all__ = ["ENV_VAR", "CarlaServerConfig", "CarlaServerError", "CarlaServerManager", "ServerEvent",
           "connect_docker", "endpoints_to_env", "managed_containers", "reap_orphans", "LABEL_DETACHED",
           "LABEL_FLOW_RUN_NAME", "LABEL_GPU", "LABEL_PORTS", "LABEL_SESSION"]
