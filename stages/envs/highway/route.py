"""`LaneRoute`: the road sequence the ego follows on highway-env's road network, and its progress.

A route is a list of roads (``(from, to)`` node pairs of the network) — to a destination (an
intersection or roundabout exit, the main road after a merge) or open-ended (an open road, a loop),
grown as the ego drives. From it come the reference lane, the lateral offset, the heading error,
the progress (route completion) and the lanes the route wants (lane changes before a lane ends).

(The CARLA bridge's `RouteTracker` is another thing: progress along a polyline of waypoints.)
"""
from __future__ import annotations

from typing import Any

import numpy as np
from highway_env.road.lane import AbstractLane

from stages.envs.geometry import wrap_angle

LaneIndex = tuple[str, str, int]


class LaneRoute:
    """Follows the ego along a sequence of roads (``(from, to)`` node pairs of the road network).

    The reference lane is the lane of the current road nearest to the ego (it moves with lane
    changes); ``desired`` holds, per road, the lane the route wants (None = stay in lane): on a road
    whose lane ends (the merge lane, a roundabout ring before the exit) it is a lane that continues.
    ``extendable`` routes (open roads, loops) grow as the ego drives.
    """

    def __init__(self, network: Any, roads: list[tuple[str, str]], start_lane: LaneIndex,
                 position: np.ndarray, extendable: bool) -> None:
        self.net = network
        self.roads = list(roads)
        self.extendable = extendable
        self.i = 0
        self.lane_id = start_lane[2]
        self.desired: list[int | None] = [None] * len(self.roads)
        self._plan_desired(0, start_lane[2])
        self.base = 0.0                      # length of the roads already completed
        s, _ = self.lane.local_coordinates(position)
        self.s0 = float(s)
        self.s, self.lat = float(s), 0.0
        self.progress = 0.0

    # -- geometry ----------------------------------------------------------------------------
    @property
    def road(self) -> tuple[str, str]:
        return self.roads[self.i]

    @property
    def lane_index(self) -> LaneIndex:
        return (*self.road, self.lane_id)

    @property
    def lane(self) -> AbstractLane:
        return self.net.get_lane(self.lane_index)

    def lanes_count(self, k: int | None = None) -> int:
        _from, _to = self.roads[self.i if k is None else k]
        return len(self.net.graph[_from][_to])

    def desired_lane_id(self, k: int | None = None) -> int:
        k = self.i if k is None else k
        d = self.desired[k]
        return self.lane_id if d is None else d

    def _plan_desired(self, start: int, current_id: int) -> None:
        """Lane ids per road from ``start``: keep the lane if it continues into the next road."""
        prev = current_id
        for k in range(start, len(self.roads)):
            count = self.lanes_count(k)
            if k > start:
                prev = self._continuation(k, prev)
            if k + 1 < len(self.roads):
                nxt_from, nxt_to = self.roads[k + 1]
                starts = [lane.position(0.0, 0.0) for lane in self.net.graph[nxt_from][nxt_to]]
                gaps = []
                for lane_id in range(count):
                    lane = self.net.get_lane((*self.roads[k], lane_id))
                    end = lane.position(lane.length, 0.0)
                    gaps.append(min(float(np.linalg.norm(end - p)) for p in starts))
                best = min(gaps)
                ok = [j for j, g in enumerate(gaps) if g <= best + 1.0]
                # None = any lane will do here (all continue): the ego keeps its lane.
                self.desired[k] = None if len(ok) == count else min(ok, key=lambda j: abs(j - prev))
                prev = prev if self.desired[k] is None else self.desired[k]
            else:
                self.desired[k] = None

    def _continuation(self, k: int, lane_id: int) -> int:
        """The lane of road ``k`` that the lane ``lane_id`` of road ``k - 1`` runs into."""
        (_from, _to), (_, nxt) = self.roads[k - 1], self.roads[k]
        lane = self.net.get_lane((_from, _to, lane_id))
        end = lane.position(lane.length, 0.0)
        # highway-env's rule: same lane id if the lane counts match, else the nearest lane.
        return self.net.next_lane_given_next_road(_from, _to, lane_id, nxt, None, end)[0]

    def path_lanes(self, count: int = 3, desired: bool = True) -> list[tuple[AbstractLane, float]]:
        """(lane, offset of its start from the current lane's start) for the next ``count`` roads.

        On the current road: the lane the route wants (``desired``) or the ego's lane; on the next
        roads: the lanes that one runs into (lane changes happen on the road where they are due).
        """
        while self.extendable and self.i + count > len(self.roads):
            self._extend_from(len(self.roads) - 1)
        out, offset = [], 0.0
        lane_id = self.desired_lane_id() if desired else self.lane_id
        for k in range(self.i, min(self.i + count, len(self.roads))):
            if k > self.i:
                lane_id = self._continuation(k, lane_id)
            lane = self.net.get_lane((*self.roads[k], lane_id))
            out.append((lane, offset))
            offset += lane.length
        return out

    def _extend_from(self, k: int) -> None:
        _from, _to = self.roads[k]
        lane = self.net.get_lane((_from, _to, 0))
        nxt = self.net.next_lane((_from, _to, 0), position=lane.position(lane.length, 0.0))
        if nxt[:2] == (_from, _to):
            self.extendable = False
            return
        self.roads.append(nxt[:2])
        self.desired.append(None)

    def point_ahead(self, distance: float, lateral: float = 0.0, desired: bool = True) -> tuple[np.ndarray, float]:
        """World position and heading ``distance`` metres ahead of the ego along the route."""
        s = self.s + distance
        lanes = self.path_lanes(4, desired)
        for k, (lane, offset) in enumerate(lanes):
            if s - offset <= lane.length or k == len(lanes) - 1:
                ls = s - offset
                return lane.position(ls, lateral), lane.heading_at(min(ls, lane.length))
        raise AssertionError("path_lanes returned no lane")

    # -- update ------------------------------------------------------------------------------
    def update(self, position: np.ndarray) -> None:
        lane = self.lane
        s, lat = lane.local_coordinates(position)
        # A circular lane's coordinate wraps past its end (angle modulo 2 pi): a jump back from
        # the end of the lane means the ego went past it.
        wrapped = s < self.s - 10.0 and self.s > lane.length - 10.0
        while s > lane.length or wrapped:
            wrapped = False
            if self.i + 1 >= len(self.roads):
                if not self.extendable:
                    break
                self._extend_from(self.i)
                if self.i + 1 >= len(self.roads):
                    break
            end = lane.position(lane.length, lat)
            self.base += lane.length
            self.i += 1
            self.lane_id = min(range(self.lanes_count()),
                               key=lambda j: self.net.get_lane((*self.road, j)).distance(end))
            lane = self.lane
            s, lat = lane.local_coordinates(position)
        if self.lanes_count() > 1:
            # Follow lane changes: the reference lane is the nearest lane of the current road.
            best = (abs(lat), self.lane_id, s, lat)
            for j in range(self.lanes_count()):
                if j != self.lane_id:
                    sj, lj = self.net.get_lane((*self.road, j)).local_coordinates(position)
                    if abs(lj) < best[0]:
                        best = (abs(lj), j, sj, lj)
            _, self.lane_id, s, lat = best
        self.s, self.lat = float(s), float(lat)
        self.progress = max(self.progress, self.base + self.s - self.s0)

    def heading_error(self, heading: float) -> float:
        return wrap_angle(heading - self.lane.heading_at(self.s))

    def remaining_length(self, end_extra: float) -> float:
        """Route length from the ego's start to ``end_extra`` metres into the last road."""
        total, lane_id = self.lane.length - self.s0, self.desired_lane_id()
        for k in range(self.i + 1, len(self.roads)):
            lane_id = self._continuation(k, lane_id)
            length = self.net.get_lane((*self.roads[k], lane_id)).length
            total += min(length, end_extra) if k == len(self.roads) - 1 else length
            lane_id = self.desired[k] if self.desired[k] is not None else lane_id
        return total
