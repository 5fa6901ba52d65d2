"""The scene caption of a step: what the camera can show (neighbours with their lanes and headings), the
place (town), the weather's appearance — as text through `stages.envs.captions`, like every backend.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.envs import captions
from stages.envs.carla_bridge.state import BridgeState
from stages.envs.geometry import wrap_angle
from stages.envs.scenarios import CARLA_TOWNS

CAPTION_RANGE_M = 50.0             # neighbours further away are not in the caption


def place(town: str) -> str:
    """The town as a place in a caption ("a road in Town01, a small town ...")."""
    base = town.split("_")[0].replace("HD", "")
    for row in CARLA_TOWNS:
        if row["town"] == base:
            return f"a road in {town}, a {row['description'][0].lower()}{row['description'][1:]}"
    return f"a road in {town}"


def appearance(weather: str) -> str:
    """A weather preset's look: night, rain or day."""
    if "Night" in weather:
        return "night"
    if "Rain" in weather or "Wet" in weather:
        return "rain"
    return "day"


class CaptionMixin(BridgeState):
    """Captions of `CARLABridge` (the state it uses is set in `CARLABridge.__init__`)."""

    if TYPE_CHECKING:
        def _others(self) -> list[tuple[Any, str]]: ...   # MeasureMixin

    def _caption(self, speed: float, lateral: float, lane_number: int | None, lanes_count: int | None,
                 yaw: float, xy: np.ndarray, lane_wp: Any, collided: bool) -> str:
        half_fov = math.radians(self.config.camera_fov) / 2
        c, s = math.cos(yaw), math.sin(yaw)
        neighbours = []
        for actor, kind in self._others():
            t = actor.get_transform()
            d = np.array([t.location.x, t.location.y]) - xy
            fwd, right = float(d[0] * c + d[1] * s), float(-d[0] * s + d[1] * c)
            if fwd <= 0 or fwd * fwd + right * right > CAPTION_RANGE_M ** 2 or abs(math.atan2(right, fwd)) > half_fov:
                continue   # only what the camera can show
            offset = None
            if kind != "pedestrian" and lane_wp is not None:
                other = self._map.get_waypoint(t.location)
                if other is not None and other.road_id == lane_wp.road_id and \
                        (other.lane_id > 0) == (lane_wp.lane_id > 0):
                    offset = abs(int(other.lane_id)) - abs(int(lane_wp.lane_id))
            neighbours.append(captions.Neighbour(
                forward=fwd, right=right, lane_offset=offset,
                relative_heading=wrap_angle(math.radians(t.rotation.yaw) - yaw), kind=kind))
        return captions.describe_scene(captions.SceneSnapshot(
            place=place(self.config.town), speed=max(speed, 0.0), command=self._command, lane_number=lane_number,
            lanes_count=lanes_count, lateral_offset=lateral, neighbours=tuple(neighbours),
            appearance=appearance(self.config.weather), collided=collided, off_road=not self._on_road))
