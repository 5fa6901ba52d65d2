"""The embedded backend's old module path, kept for imports written against it: see `stages.envs.highway`."""
from __future__ import annotations

from stages.envs.highway.env import OFF_ROAD_MARGIN, DrivingEnv
from stages.envs.highway.sims import MAX_ACCELERATION, MAX_BRAKING, MAX_STEERING

__all__ = ["DrivingEnv", "MAX_ACCELERATION", "MAX_BRAKING", "MAX_STEERING", "OFF_ROAD_MARGIN"]
