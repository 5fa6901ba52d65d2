"""What every part of `CARLABridge` shares: its lifecycle, and the state its mixins read and write.

`CARLABridge` is assembled from one mixin per concern (session, actors, sensors, measure, caption) over
`DrivingEnvBase`. The attributes below are set in `CARLABridge.__init__`; they are declared once here so
that each mixin (and a type checker) knows them without declaring them again.
"""
from __future__ import annotations

import enum
import queue
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from stages.envs.carla_bridge.actors import Spawned
    from stages.envs.carla_bridge.config import SimulatorConfig
    from stages.envs.carla_bridge.routing import RoutePlanner, RouteTracker
    from stages.envs.carla_bridge.sensors import SensorEvents
    from stages.envs.scenarios import ScenarioSpec


class Lifecycle(enum.Enum):
    """Where a bridge is between its server and its episode (one state instead of four flags).

    DISCONNECTED -> (reset) RUNNING; (initialize) FRESH -> (step / reset) RUNNING; any connection error
    -> BROKEN -> (reset / reconnect) RUNNING / CONNECTED; close -> DISCONNECTED (BROKEN stays BROKEN).
    """

    DISCONNECTED = "disconnected"   # no client: before the first reset, or after close
    CONNECTED = "connected"         # a client and a set-up world, but no episode to step
    FRESH = "fresh"                 # initialize() built this episode and nothing stepped it: reset may reuse it
    RUNNING = "running"             # an episode is spawned and may be stepped
    BROKEN = "broken"               # the connection failed: step refuses, the next reset reconnects

    @property
    def in_episode(self) -> bool:
        return self in (Lifecycle.FRESH, Lifecycle.RUNNING)


class BridgeState:
    """The bridge's state, declared once for its mixins (set in `CARLABridge.__init__`)."""

    config: SimulatorConfig
    carla: Any
    scenario: str
    scenario_spec: ScenarioSpec
    _state: Lifecycle
    # the session
    _client: Any
    _world: Any
    _map: Any
    _tm: Any
    _blueprints: Any
    _planner: RoutePlanner | None
    _planner_town: str | None
    _original_settings: Any
    _orphans: tuple[int | None, list[int]] | None
    # the actors and their sensors
    _spawned: Spawned
    _images: queue.Queue[Any]
    _events: SensorEvents
    _frame: np.ndarray | None
    dropped_frames: int
    # what a step measured
    _tracker: RouteTracker | None
    _infractions: dict[str, int]
    _command: str
    _on_road: bool
    _gap_ahead: float
    _frame_id: int
    _obs: dict[str, Any] | None
