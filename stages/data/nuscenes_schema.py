"""What the nuScenes writer and reader agree on: table names, fields, references, tokens, rotations.

The table list, the fields and the foreign keys follow nuscenes-devkit 1.2.0 (``NuScenes.table_names``
and ``docs/schema_nuscenes.md``); the validator checks exactly what the devkit dereferences while it
loads (and what our reader uses afterwards), so a folder that passes it loads in the devkit.
"""
from __future__ import annotations

import hashlib
import math
import re

import numpy as np

from stages.data.errors import DatasetError
# The project's one angle wrap, re-exported: the nuScenes reader and writer import it from here.
from stages.envs.geometry import wrap_angle as wrap_angle

# The 13 tables the devkit loads, in its own order (``NuScenes.__init__``).
TABLES: tuple[str, ...] = ("category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor",
                           "ego_pose", "log", "scene", "sample", "sample_data", "sample_annotation", "map")

# Fields a record must carry: what the devkit or our reader reads from it.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "category": ("token", "name"),
    "attribute": ("token", "name"),
    "visibility": ("token", "level"),
    "instance": ("token", "category_token", "nbr_annotations", "first_annotation_token", "last_annotation_token"),
    "sensor": ("token", "channel", "modality"),
    "calibrated_sensor": ("token", "sensor_token", "translation", "rotation", "camera_intrinsic"),
    "ego_pose": ("token", "translation", "rotation", "timestamp"),
    "log": ("token", "logfile", "location"),
    "scene": ("token", "name", "log_token", "nbr_samples", "first_sample_token", "last_sample_token"),
    "sample": ("token", "timestamp", "scene_token", "next", "prev"),
    "sample_data": ("token", "sample_token", "ego_pose_token", "calibrated_sensor_token", "filename",
                    "is_key_frame", "timestamp", "next", "prev"),
    "sample_annotation": ("token", "sample_token", "instance_token", "attribute_tokens", "visibility_token",
                          "translation", "size", "rotation", "next", "prev"),
    "map": ("token", "log_tokens", "filename"),
}

# Foreign keys: (table, field, target table, may be empty, is a list of tokens).
REFERENCES: tuple[tuple[str, str, str, bool, bool], ...] = (
    ("instance", "category_token", "category", False, False),
    ("instance", "first_annotation_token", "sample_annotation", False, False),
    ("instance", "last_annotation_token", "sample_annotation", False, False),
    ("calibrated_sensor", "sensor_token", "sensor", False, False),
    ("scene", "log_token", "log", False, False),
    ("scene", "first_sample_token", "sample", False, False),
    ("scene", "last_sample_token", "sample", False, False),
    ("sample", "scene_token", "scene", False, False),
    ("sample", "next", "sample", True, False),
    ("sample", "prev", "sample", True, False),
    ("sample_data", "sample_token", "sample", False, False),
    ("sample_data", "ego_pose_token", "ego_pose", False, False),
    ("sample_data", "calibrated_sensor_token", "calibrated_sensor", False, False),
    ("sample_data", "next", "sample_data", True, False),
    ("sample_data", "prev", "sample_data", True, False),
    ("sample_annotation", "sample_token", "sample", False, False),
    ("sample_annotation", "instance_token", "instance", False, False),
    ("sample_annotation", "attribute_tokens", "attribute", False, True),
    # The schema allows an empty visibility token ("no visibility annotated").
    ("sample_annotation", "visibility_token", "visibility", True, False),
    ("sample_annotation", "next", "sample_annotation", True, False),
    ("sample_annotation", "prev", "sample_annotation", True, False),
    ("map", "log_tokens", "log", False, True),
)

# Camera order used when more than one camera is asked for: the front camera first, then the ones
# that see most of the road ahead.
CAMERA_CHANNELS: tuple[str, ...] = ("CAM_FRONT", "CAM_FRONT_LEFT", "CAM_FRONT_RIGHT",
                                    "CAM_BACK_LEFT", "CAM_BACK_RIGHT", "CAM_BACK")
LIDAR_CHANNEL = "LIDAR_TOP"

# Scene ids whose CAN bus data `NuScenesCanBus` refuses (its `can_blacklist`) or warns about (419 has no
# vehicle_monitor). Hard-coded here because the devkit only builds the list inside `__init__`.
CAN_BUS_UNUSABLE_SCENES: frozenset[int] = frozenset(
    [161, 162, 163, 164, 165, 166, 167, 168, 170, 171, 172, 173, 174, 175, 176, 309, 310, 311, 312, 313, 314, 419])
SCENE_NAME_RE = re.compile(r"^scene-\d{4}$")  # what NuScenesCanBus.get_messages accepts

# The three high-level commands of the open-loop planning benchmarks (VAD / UniAD).
TURN_LEFT, TURN_RIGHT, GO_STRAIGHT = "turn left", "turn right", "go straight"
COMMAND_THRESHOLD_M = 2.0


class NuScenesFormatError(DatasetError):
    """A nuScenes folder is missing a table or a file, or a record points at nothing.

    ``problems`` holds one line per defect, each naming the table, record/field or file.
    """

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


def make_token(*parts: object) -> str:
    """A deterministic 32-hex token (the devkit's token shape), so rewriting the same drives gives the
    same files and DVC sees no change."""
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()


def yaw_to_quaternion(yaw: float) -> list[float]:
    """Rotation about +z as ``[w, x, y, z]`` (the schema's quaternion order)."""
    return [math.cos(yaw / 2.0), 0.0, 0.0, math.sin(yaw / 2.0)]


def quaternion_yaw(q: list[float] | np.ndarray) -> float:
    """Yaw (rotation about +z) of a ``[w, x, y, z]`` quaternion; the same value as pyquaternion's
    ``yaw_pitch_roll[0]``."""
    w, x, y, z = (float(v) for v in q)
    return math.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))


def command_from_trajectory(trajectory: np.ndarray, threshold: float = COMMAND_THRESHOLD_M) -> str:
    """VAD's converter: the lateral offset of the last future waypoint decides the command.

    ``trajectory`` is ``[T, 2]`` in the ego frame (x forward, y left), so a positive offset is a left turn.
    VAD compares the lidar-frame x (which points right) against ±2 m; the sign flips with the axis.
    """
    lateral = float(trajectory[-1, 1])
    if lateral >= threshold:
        return TURN_LEFT
    if lateral <= -threshold:
        return TURN_RIGHT
    return GO_STRAIGHT
