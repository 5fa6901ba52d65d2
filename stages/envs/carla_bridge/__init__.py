"""The CARLA backend: `CARLABridge(SimulatorConfig)`, the only code of drivevla that imports `carla`.

Importing this package does not import `carla`: the client module is loaded when a bridge is built
(`load_carla`), so the rest of drivevla — and these modules' tests, which hand in a fake client —
work without the ``carla`` extra (``pip install -e .[carla]``).

- `SimulatorConfig`: the seed's settings (host, port, town, render, headless, fps, physics_dt,
  control_dt, image size) plus traffic manager port, time-outs, scenario, traffic, episode, reward.
- `CARLABridge`: a gymnasium env with the embedded backend's observation / action / info; the seed's
  ``initialize()``; ``reconnect()`` for a server supervisor.
- `CarlaConnectionError`: the one recoverable error (time-out, lost connection); `Lifecycle`: where a
  bridge is (`CARLABridge.lifecycle`).
- `server_version(host, port, timeout)`: the readiness probe.
- `make_carla_env(env_config, seed, slot=0)`: what `stages.envs.make_env` calls for ``backend='carla'``;
  env slot k connects to server k of the CARLA resource's endpoint list.
- `slot_endpoint(slot)`, `check_server_slots(needed)`: that list, read (`endpoints`).
- `RoutePlanner`, `RoadOption`, `command_text`: routes over the town and their text commands.
- `CARLARewardWrapper`: the seed's reward wrapper (shared with every backend, re-exported).
"""
from __future__ import annotations

from stages.envs.carla_bridge.config import SimulatorConfig
from stages.envs.carla_bridge.endpoints import check_server_slots, slot_endpoint
from stages.envs.carla_bridge.env import CARLABridge, make_carla_env
from stages.envs.carla_bridge.errors import INSTALL_HINT, CarlaConnectionError, is_connection_error, load_carla
from stages.envs.carla_bridge.routing import RoadOption, Route, RoutePlanner, RouteTracker, command_text
from stages.envs.carla_bridge.sensors import image_to_rgb
from stages.envs.carla_bridge.session import server_version
from stages.envs.carla_bridge.state import Lifecycle
from stages.envs.rewards import CARLARewardWrapper

__all__ = [
    "CARLABridge", "CARLARewardWrapper", "CarlaConnectionError", "INSTALL_HINT", "Lifecycle", "RoadOption", "Route",
    "RoutePlanner", "RouteTracker", "SimulatorConfig", "command_text", "image_to_rgb", "is_connection_error",
    "check_server_slots", "load_carla", "make_carla_env", "server_version", "slot_endpoint",
]
