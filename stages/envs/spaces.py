"""Observation and action spaces shared by every backend.

Action: ``[throttle, steer, brake]`` in ``ACTION_LOW..ACTION_HIGH``. Steer is positive to the right
(CARLA's `VehicleControl.steer` convention, and highway-env's: a positive steering angle turns the car
clockwise as seen in the rendered image).

Observation (a ``spaces.Dict``):
- ``image``: uint8 ``(S, S, 3)`` RGB;
- ``state``: float32 ``(8,)`` in ``STATE_FIELDS`` order, each clipped to ``STATE_LOW..STATE_HIGH``;
- ``command``: a ``spaces.Text`` instruction over ``COMMAND_CHARSET`` (at most ``MAX_COMMAND_LENGTH``
  characters). gymnasium's default Text charset is alphanumeric only, so the space names its own.
"""
from __future__ import annotations

import string

import numpy as np
from gymnasium import spaces

ACTION_FIELDS: tuple[str, ...] = ("throttle", "steer", "brake")
ACTION_LOW = np.array([0.0, -1.0, 0.0], dtype=np.float32)
ACTION_HIGH = np.array([1.0, 1.0, 1.0], dtype=np.float32)

STATE_FIELDS: tuple[str, ...] = (
    "speed",               # m/s, along the heading
    "lateral_offset",      # m from the lane centre (env.offset_reference: the current or the wanted lane), positive right
    "heading_error",       # rad, ego heading minus that lane's direction, positive to the right
    "last_throttle",
    "last_steer",
    "last_brake",
    "front_distance",      # m, bumper gap to the vehicle ahead on the ego's path, 50 when none
    "route_completion",    # 0..1
)
STATE_DIM = len(STATE_FIELDS)
FRONT_DISTANCE_MAX = 50.0
STATE_LOW = np.array([-40.0, -20.0, -np.pi, 0.0, -1.0, 0.0, 0.0, 0.0], dtype=np.float32)
STATE_HIGH = np.array([40.0, 20.0, np.pi, 1.0, 1.0, 1.0, FRONT_DISTANCE_MAX, 1.0], dtype=np.float32)

MAX_COMMAND_LENGTH = 128
COMMAND_CHARSET = frozenset(string.ascii_letters + string.digits + " .,;:'-/()")


def action_space() -> spaces.Box:
    """``[throttle, steer, brake]``."""
    return spaces.Box(ACTION_LOW, ACTION_HIGH, dtype=np.float32)


def command_space() -> spaces.Text:
    return spaces.Text(max_length=MAX_COMMAND_LENGTH, min_length=1, charset=COMMAND_CHARSET)


def observation_space(image_size: int) -> spaces.Dict:
    return spaces.Dict({
        "image": spaces.Box(0, 255, shape=(image_size, image_size, 3), dtype=np.uint8),
        "state": spaces.Box(STATE_LOW, STATE_HIGH, dtype=np.float32),
        "command": command_space(),
    })


def clip_action(action: np.ndarray) -> np.ndarray:
    """The action as applied: float32, finite, inside the bounds."""
    a = np.nan_to_num(np.asarray(action, dtype=np.float32).reshape(-1)[:3], nan=0.0)
    return np.clip(a, ACTION_LOW, ACTION_HIGH)


def make_state(values: dict[str, float]) -> np.ndarray:
    """Pack named values into the state vector (missing fields are 0), clipped to the space."""
    vec = np.array([values.get(name, 0.0) for name in STATE_FIELDS], dtype=np.float32)
    return np.clip(vec, STATE_LOW, STATE_HIGH)


def sanitize_command(text: str) -> str:
    """Keep a command inside the Text space: known characters only, bounded length, never empty."""
    clean = "".join(ch for ch in text if ch in COMMAND_CHARSET)[:MAX_COMMAND_LENGTH].strip()
    return clean or "follow the lane"
