"""A privileged route follower for data collection and baselines (not the policy's input): pure pursuit
towards the route point a speed-dependent distance ahead, and a proportional speed controller capped by the
speed limit, slowed for junctions ahead and for the gap to whatever is ahead on the route.

The highway backend's `ExpertDriver` reads highway-env internals and does not drive this env.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from stages.envs.carla_bridge.routing import RouteTracker
from stages.envs.spaces import FRONT_DISTANCE_MAX

# CARLA's sedans steer their front wheels up to about 70 degrees at steer = 1 (e.g. the Lincoln MKZ's
# physics control); wheelbase ~2.9 m.
EXPERT_WHEELBASE_M = 2.9
EXPERT_MAX_WHEEL_ANGLE = math.radians(70.0)
EXPERT_MIN_LOOKAHEAD_M = 5.0
EXPERT_LOOKAHEAD_S = 0.8
EXPERT_SPEED_GAIN = 0.5
EXPERT_JUNCTION_SPEED = 6.0        # m/s through junctions
EXPERT_JUNCTION_SLOWDOWN_M = 15.0
EXPERT_STANDSTILL_GAP_M = 5.0
EXPERT_TIME_GAP_S = 1.5


def expert_action(tracker: RouteTracker, ego: Any, target_speed: float, front_gap: float) -> np.ndarray:
    """``[throttle, steer, brake]`` that follows ``tracker``'s route at up to ``target_speed`` (m/s), for the
    ``ego`` vehicle (a `carla.Vehicle`) with ``front_gap`` metres free ahead."""
    r = tracker.route
    t = ego.get_transform()
    v = ego.get_velocity()
    yaw = math.radians(t.rotation.yaw)
    speed = float(v.x * math.cos(yaw) + v.y * math.sin(yaw))
    lookahead = max(EXPERT_MIN_LOOKAHEAD_M, EXPERT_LOOKAHEAD_S * speed)
    k = min(int(np.searchsorted(r.s, tracker.progress + lookahead)), len(r) - 1)
    d = r.xy[k] - np.array([t.location.x, t.location.y])
    fwd = d[0] * math.cos(yaw) + d[1] * math.sin(yaw)
    right = -d[0] * math.sin(yaw) + d[1] * math.cos(yaw)
    alpha = math.atan2(right, max(fwd, 1e-3))
    wheel_angle = math.atan2(2.0 * EXPERT_WHEELBASE_M * math.sin(alpha), max(math.hypot(fwd, right), 1.0))
    steer = float(np.clip(wheel_angle / EXPERT_MAX_WHEEL_ANGLE, -1.0, 1.0))

    target = float(target_speed)
    limit = float(ego.get_speed_limit()) / 3.6
    if limit > 0:
        target = min(target, limit)
    ahead = slice(tracker.index, int(np.searchsorted(r.s, tracker.progress + EXPERT_JUNCTION_SLOWDOWN_M)))
    if r.junction[ahead].any():
        target = min(target, EXPERT_JUNCTION_SPEED)
    if front_gap < FRONT_DISTANCE_MAX:
        target = min(target, max(0.0, (front_gap - EXPERT_STANDSTILL_GAP_M) / EXPERT_TIME_GAP_S))
    error = target - speed
    throttle = float(np.clip(EXPERT_SPEED_GAIN * error, 0.0, 0.75))
    brake = float(np.clip(-EXPERT_SPEED_GAIN * error, 0.0, 1.0)) if error < -0.5 or target == 0.0 else 0.0
    if brake > 0:
        throttle = 0.0
    return np.array([throttle, steer, brake], dtype=np.float32)
