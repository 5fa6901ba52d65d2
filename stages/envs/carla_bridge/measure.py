"""What a step measures on the server: speed, lane offset and heading error, whether the ego is on the road,
the infractions (counted by `DrivingEnvBase._count_infractions`), the command of the route, the gap to
whatever is ahead — the step's ``info``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.envs import captions
from stages.envs.carla_bridge.state import BridgeState
from stages.envs.geometry import wrap_angle
from stages.envs.spaces import FRONT_DISTANCE_MAX


class MeasureMixin(BridgeState):
    """Measurement of `CARLABridge` (the state it uses is set in `CARLABridge.__init__`)."""

    if TYPE_CHECKING:
        def _caption(self, speed: float, lateral: float, lane_number: int | None, lanes_count: int | None,
                     yaw: float, xy: np.ndarray, lane_wp: Any, collided: bool) -> str: ...   # CaptionMixin

        def _count_infractions(self, *, collisions: int, lane_invasions: int, off_road: bool,
                               heading_error: float, speed: float,
                               speed_limit: float | None) -> None: ...   # DrivingEnvBase

    def _lane_reference(self, location: Any, xy: np.ndarray) -> tuple[float, float, Any]:
        """(lateral offset m, positive right; lane heading rad; lane waypoint or None)."""
        wp = self._map.get_waypoint(location, project_to_road=True, lane_type=self.carla.LaneType.Driving)
        if wp is None or wp.is_junction:
            # Junction lanes overlap: the nearest one may be any of them, so the route says which.
            assert self._tracker is not None
            lateral, heading = self._tracker.reference(xy)
            return lateral, heading, wp
        w = wp.transform
        heading = math.radians(w.rotation.yaw)
        right = np.array([-math.sin(heading), math.cos(heading)])
        lateral = float(np.dot(xy - np.array([w.location.x, w.location.y]), right))
        return lateral, heading, wp

    def _lanes_around(self, wp: Any) -> tuple[int | None, int | None]:
        """(lane number from the left, 1-based; lanes in the ego's direction) of a waypoint."""
        if wp is None or wp.is_junction:
            return None, None
        driving = self.carla.LaneType.Driving

        def count(step: str) -> int:
            n, cur = 0, wp
            for _ in range(8):
                cur = getattr(cur, step)()
                if cur is None or cur.lane_type != driving or (cur.lane_id > 0) != (wp.lane_id > 0):
                    break
                n += 1
            return n

        left, right = count("get_left_lane"), count("get_right_lane")
        return left + 1, left + right + 1

    def _measure_events(self, collisions: list[tuple[int, str]], invasions: list[tuple[int, tuple[str, ...]]]
                        ) -> dict[str, Any]:
        """The info after a tick whose sensors reported ``collisions`` and ``invasions`` (no ``done_reason``:
        the base adds it)."""
        ego, tracker, carla = self._spawned.ego, self._tracker, self.carla
        assert ego is not None and tracker is not None
        t = ego.get_transform()
        v = ego.get_velocity()
        loc = t.location
        yaw = math.radians(t.rotation.yaw)
        xy = np.array([loc.x, loc.y], dtype=np.float64)
        speed = float(v.x * math.cos(yaw) + v.y * math.sin(yaw))   # along the heading
        tracker.update(xy)
        lateral, lane_heading, lane_wp = self._lane_reference(loc, xy)
        heading_error = wrap_angle(yaw - lane_heading)
        self._on_road = self._map.get_waypoint(loc, project_to_road=False,
                                               lane_type=carla.LaneType.Driving) is not None

        self._count_infractions(collisions=len(collisions), lane_invasions=len(invasions), off_road=not self._on_road,
                                heading_error=heading_error, speed=speed,
                                speed_limit=float(ego.get_speed_limit()) / 3.6)    # km/h -> m/s

        self._command = tracker.command(self.config.command_lookahead_m) if not tracker.finished \
            else captions.FOLLOW_LANE
        lane_number, lanes_count = self._lanes_around(lane_wp)
        collided = bool(collisions)
        self._gap_ahead = self._front_distance(xy)
        return {
            "velocity": np.array([v.x, -v.y, v.z], dtype=np.float32),
            "speed": speed,
            "lane_deviation": float(lateral),
            "heading_error": float(heading_error),
            "collision": collided,
            "route_completion": tracker.completion,
            "infractions": dict(self._infractions),
            "ego_pose": np.array([loc.x, -loc.y, wrap_angle(-yaw)], dtype=np.float32),
            "command": self._command,
            "caption": self._caption(speed, lateral, lane_number, lanes_count, yaw, xy, lane_wp, collided),
            "scenario": self.scenario,
            "lane_index": int(lane_number - 1) if lane_number is not None else 0,
            "town": self.config.town,
            "frame": int(self._frame_id),
        }

    def _others(self) -> list[tuple[Any, str]]:
        out: list[tuple[Any, str]] = []
        for actor in self._spawned.vehicles:
            kind = "car"
            attrs = getattr(actor, "attributes", {}) or {}
            if attrs.get("base_type") in ("truck", "van", "motorcycle", "bicycle", "bus"):
                kind = str(attrs["base_type"])
            out.append((actor, kind))
        out.extend((actor, "pedestrian") for actor in self._spawned.walkers)
        return out

    def _front_distance(self, xy: np.ndarray) -> float:
        """Bumper gap to the nearest vehicle or walker on the route ahead, capped at FRONT_DISTANCE_MAX."""
        tracker, ego = self._tracker, self._spawned.ego
        assert tracker is not None
        r = tracker.route
        i = tracker.index
        end = int(np.searchsorted(r.s, tracker.progress + FRONT_DISTANCE_MAX + 10.0, side="right"))
        pts, s, width = r.xy[i:max(end, i + 1)], r.s[i:max(end, i + 1)], r.width[i:max(end, i + 1)]
        ego_half = float(ego.bounding_box.extent.x)
        best = FRONT_DISTANCE_MAX
        for actor, _ in self._others():
            loc = actor.get_location()
            p = np.array([loc.x, loc.y])
            if float(np.sum((p - xy) ** 2)) > (FRONT_DISTANCE_MAX + 15.0) ** 2:
                continue
            d2 = np.sum((pts - p) ** 2, axis=1)
            k = int(np.argmin(d2))
            if math.sqrt(float(d2[k])) > width[k] / 2 + 0.5:
                continue
            ahead = float(s[k] - tracker.progress)
            if ahead <= 0:
                continue
            gap = ahead - ego_half - float(actor.bounding_box.extent.x)
            best = min(best, max(gap, 0.0))
        return best

    def _copy_obs(self) -> dict[str, Any]:
        assert self._obs is not None
        return {"image": self._obs["image"].copy(), "state": self._obs["state"].copy(),
                "command": self._obs["command"]}
