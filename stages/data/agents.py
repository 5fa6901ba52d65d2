"""Boxes of the other vehicles around the ego in a highway-env simulation, in the ego pose's world frame.

The boxes are in the frame of the highway backend's ``info["ego_pose"]`` (and so of `Episode.poses`):
highway-env's own world, x right and y down in the rendered image, positive heading turning right (a
left-handed frame, as CARLA's). Keeping boxes and poses in one frame leaves a single conversion point:
`write_nuscenes(left_handed=True)` mirrors both (y -> -y, yaw -> -yaw) into nuScenes' right-handed frame.
If the backend ever reports right-handed poses, flip here too (and write with ``left_handed=False``).
"""
from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from stages.data.nuscenes_schema import wrap_angle

BOX_FIELDS: tuple[str, ...] = ("x", "y", "yaw", "length", "width")

# Track ids are stamped on the vehicle objects themselves: highway-env adds and removes vehicles during an
# episode (intersection, merge), so a row index is no identity, and `id()` can be reused after collection.
_TRACK_ATTR = "_drivevla_track_id"
_track_ids = itertools.count(1)


def _track_id(vehicle: Any) -> int:
    tid = getattr(vehicle, _TRACK_ATTR, None)
    if tid is None:
        tid = next(_track_ids)
        setattr(vehicle, _TRACK_ATTR, tid)
    return tid


def _highway_env(env: Any) -> Any:
    """The highway-env env under ``env``: a highway-env env itself, or our `DrivingEnv`'s ``sim``."""
    base = env.unwrapped
    if hasattr(base, "road") and hasattr(base, "vehicle"):
        return base
    sim = getattr(base, "sim", None)
    if sim is not None and hasattr(sim.unwrapped, "road"):
        return sim.unwrapped
    raise TypeError(f"{type(base).__name__} is not a highway-env env (no road; reset it first?)")


def other_vehicle_boxes(env: Any, with_ids: bool = False) -> np.ndarray:
    """Boxes ``[K, 5]`` (x, y, yaw, length, width) of every vehicle on the road but the ego.

    ``env`` is a highway-env env or our highway `DrivingEnv` (any wrappers around either). With
    ``with_ids`` a sixth column holds a track id, stable for a vehicle over the episode; the nuScenes
    writer links a vehicle's annotations into one instance with it.
    """
    base = _highway_env(env)
    ego = base.vehicle
    rows = []
    for v in base.road.vehicles:
        if v is ego:
            continue
        # Right-handed like info["ego_pose"]: highway-env's y points to the driver's right.
        x, y = float(v.position[0]), -float(v.position[1])
        row = [x, y, float(wrap_angle(-float(v.heading))), float(v.LENGTH), float(v.WIDTH)]
        if with_ids:
            row.append(float(_track_id(v)))
        rows.append(row)
    width = 6 if with_ids else 5
    return np.asarray(rows, dtype=np.float64).reshape(-1, width)
