"""Routes over a CARLA map, their `RoadOption`s, and the text commands they become.

The `carla` wheel ships only the `carla` package: CARLA's ``agents.navigation.global_route_planner``
(and its ``RoadOption``) live in the simulator's PythonAPI folder, not on PyPI. `RoutePlanner` is a
small version of it over the same map queries — ``Map.get_topology()`` (lane segments between
junction boundaries), ``Waypoint.next`` (dense paths along them), ``Map.get_waypoint`` (locating a
point on a segment) — with the same node keys (segment end points rounded to 1 m), the same edge
kinds (lane follow, and lane change where the map allows one) and the same turn decision at a
junction (deviation under 35 degrees: straight; else the sign of the cross product). Shortest routes
are Dijkstra over segment lengths; a random route of a given length walks random successors.

Frames: everything here is in CARLA's own left-handed frame (x forward, y right, yaw in degrees
turning clockwise seen from above); only the bridge's ``info`` converts to the right-handed frame.
A left turn therefore has a negative cross product z (``cross((1, 0), (0, -1)) = -1``).
"""
from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Sequence

import numpy as np

from stages.envs import captions
from stages.envs.geometry import wrap_angle

Node = tuple[float, float, float]
LaneKey = tuple[int, int, int]        # (road_id, section_id, lane_id)

TURN_THRESHOLD = math.radians(35.0)
LANE_CHANGE_COST = 5.0                # m: a lane change is cheap but not free, so routes do not zigzag


class RoadOption(IntEnum):
    """CARLA's ``agents.navigation.local_planner.RoadOption`` (same names and values)."""

    VOID = -1
    LEFT = 1
    RIGHT = 2
    STRAIGHT = 3
    LANEFOLLOW = 4
    CHANGELANELEFT = 5
    CHANGELANERIGHT = 6


def command_text(option: RoadOption | str) -> str:
    """The instruction for a road option, in the vocabulary of every backend (`stages.envs.captions`)."""
    name = option.name if isinstance(option, RoadOption) else str(option)
    return captions.road_option_to_command(name)


def _xy(waypoint: Any) -> np.ndarray:
    loc = waypoint.transform.location
    return np.array([loc.x, loc.y], dtype=np.float64)


def _heading(waypoint: Any) -> np.ndarray:
    yaw = math.radians(waypoint.transform.rotation.yaw)
    return np.array([math.cos(yaw), math.sin(yaw)])


def _node(waypoint: Any) -> Node:
    loc = waypoint.transform.location
    # Segment ends shared by consecutive segments coincide to well under a metre; CARLA's planner
    # rounds to whole metres for the same reason.
    return (float(np.round(loc.x)), float(np.round(loc.y)), float(np.round(loc.z)))


def _lane_key(waypoint: Any) -> LaneKey:
    return (int(waypoint.road_id), int(waypoint.section_id), int(waypoint.lane_id))


def _cross(a: np.ndarray, b: np.ndarray) -> float:
    return float(a[0] * b[1] - a[1] * b[0])


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-9 else v


@dataclass
class Edge:
    """A lane segment (or a lane change) of the route graph."""

    start: Node
    end: Node
    entry: Any                          # carla.Waypoint
    exit: Any                           # carla.Waypoint
    path: list[Any]                     # waypoints strictly between entry and exit
    length: float
    intersection: bool
    option: RoadOption = RoadOption.LANEFOLLOW
    entry_vector: np.ndarray = field(default_factory=lambda: np.zeros(2))
    exit_vector: np.ndarray = field(default_factory=lambda: np.zeros(2))
    net_vector: np.ndarray = field(default_factory=lambda: np.zeros(2))

    @property
    def waypoints(self) -> list[Any]:
        return [self.entry, *self.path, self.exit]


class RoutePlanner:
    """Global routes over a `carla.Map` (see the module docstring)."""

    def __init__(self, world_map: Any, sampling_resolution: float = 2.0, carla_module: Any = None) -> None:
        self.map = world_map
        self.resolution = float(sampling_resolution)
        self._carla = carla_module
        self._graph: dict[Node, dict[Node, Edge]] = {}
        self._by_lane: dict[LaneKey, Edge] = {}
        self._build()
        self._link_lane_changes()

    # -- graph ---------------------------------------------------------------------------------
    def _build(self) -> None:
        for entry, exit_ in self.map.get_topology():
            start, end = _node(entry), _node(exit_)
            end_loc = exit_.transform.location
            path: list[Any] = []
            if entry.transform.location.distance(end_loc) > self.resolution:
                nxt = entry.next(self.resolution)
                w = nxt[0] if nxt else None
                while w is not None and w.transform.location.distance(end_loc) > self.resolution:
                    path.append(w)
                    nxt = w.next(self.resolution)
                    w = nxt[0] if nxt else None
            points = [_xy(entry), *(_xy(w) for w in path), _xy(exit_)]
            length = float(sum(np.linalg.norm(b - a) for a, b in zip(points[:-1], points[1:])))
            edge = Edge(start, end, entry, exit_, path, max(length, 1e-3), bool(entry.is_junction),
                        entry_vector=_heading(entry), exit_vector=_heading(exit_),
                        net_vector=_unit(points[-1] - points[0]))
            self._graph.setdefault(start, {})[end] = edge
            self._graph.setdefault(end, {})
            self._by_lane[_lane_key(entry)] = edge

    def _is_driving(self, waypoint: Any) -> bool:
        lane_type = waypoint.lane_type
        if self._carla is not None:
            return lane_type == self._carla.LaneType.Driving
        return getattr(lane_type, "name", str(lane_type)) == "Driving"

    def _link_lane_changes(self) -> None:
        """Lane-change edges from a segment's start to a neighbouring segment's start (as CARLA's planner)."""
        for edge in list(itertools.chain.from_iterable(d.values() for d in self._graph.values())):
            if edge.intersection or edge.option != RoadOption.LANEFOLLOW:
                continue
            found = {RoadOption.CHANGELANELEFT: False, RoadOption.CHANGELANERIGHT: False}
            for wp in edge.waypoints[:-1]:
                allowed = int(wp.lane_change)   # carla.LaneChange: NONE 0, Right 1, Left 2, Both 3
                for option, bit, neighbour in ((RoadOption.CHANGELANERIGHT, 1, wp.get_right_lane),
                                               (RoadOption.CHANGELANELEFT, 2, wp.get_left_lane)):
                    if found[option] or not allowed & bit:
                        continue
                    other = neighbour()
                    if other is None or not self._is_driving(other) or other.road_id != wp.road_id:
                        continue
                    target = self._by_lane.get(_lane_key(other))
                    if target is None or target.start == edge.start:
                        continue
                    self._graph[edge.start].setdefault(target.start, Edge(
                        edge.start, target.start, wp, other, [], LANE_CHANGE_COST, False, option,
                        entry_vector=_heading(wp), exit_vector=_heading(other),
                        net_vector=_unit(_xy(other) - _xy(wp))))
                    found[option] = True

    def localize(self, location: Any) -> Edge | None:
        """The lane segment a location lies on (its nearest driving lane)."""
        wp = self.map.get_waypoint(location)
        return None if wp is None else self._by_lane.get(_lane_key(wp))

    def successors(self, node: Node) -> list[Edge]:
        return list(self._graph.get(node, {}).values())

    # -- routes --------------------------------------------------------------------------------
    def trace_route(self, origin: Any, destination: Any) -> list[tuple[Any, RoadOption]]:
        """Waypoints and road options from ``origin`` to ``destination`` (`carla.Location`s)."""
        first, last = self.localize(origin), self.localize(destination)
        if first is None or last is None:
            raise ValueError("origin or destination is not on a driving lane")
        nodes = self._shortest_path(first.start, last.start)
        if nodes is None:
            raise ValueError("destination is not reachable from the origin")
        nodes.append(last.end)
        return self._trace(nodes, self.map.get_waypoint(origin), self.map.get_waypoint(destination))

    def random_route(self, origin: Any, length: float, rng: np.random.Generator) -> list[tuple[Any, RoadOption]]:
        """A route of about ``length`` metres from ``origin``, turning at random at junctions.

        Walks lane-follow successors only (no lane changes), so every route is drivable without
        asking for a manoeuvre the traffic may not allow; it ends early at a dead end.
        """
        first = self.localize(origin)
        if first is None:
            raise ValueError("origin is not on a driving lane")
        start_wp = self.map.get_waypoint(origin)
        nodes = [first.start, first.end]
        points = np.array([_xy(w) for w in first.waypoints])
        k = _closest(start_wp, first.waypoints)
        total = float(np.sum(np.linalg.norm(np.diff(points[k:], axis=0), axis=1)))
        while total < length:
            options = [e for e in self.successors(nodes[-1]) if e.option == RoadOption.LANEFOLLOW]
            if not options:
                break
            edge = options[int(rng.integers(len(options)))]
            nodes.append(edge.end)
            total += edge.length
        return self._trace(nodes, start_wp, None)

    def _shortest_path(self, source: Node, target: Node) -> list[Node] | None:
        dist: dict[Node, float] = {source: 0.0}
        prev: dict[Node, Node] = {}
        heap: list[tuple[float, int, Node]] = [(0.0, 0, source)]
        counter = itertools.count(1)
        while heap:
            d, _, node = heapq.heappop(heap)
            if node == target:
                path = [node]
                while node in prev:
                    node = prev[node]
                    path.append(node)
                return path[::-1]
            if d > dist.get(node, math.inf):
                continue
            for nxt, edge in self._graph.get(node, {}).items():
                nd = d + edge.length
                if nd < dist.get(nxt, math.inf):
                    dist[nxt], prev[nxt] = nd, node
                    heapq.heappush(heap, (nd, next(counter), nxt))
        return None

    def _turn_decision(self, nodes: Sequence[Node], i: int, previous: RoadOption) -> RoadOption:
        edge = self._graph[nodes[i]][nodes[i + 1]]
        if edge.option != RoadOption.LANEFOLLOW:
            return edge.option
        if not edge.intersection:
            return RoadOption.LANEFOLLOW
        before = self._graph[nodes[i - 1]][nodes[i]] if i > 0 else None
        if before is not None and before.intersection and previous in (
                RoadOption.LEFT, RoadOption.RIGHT, RoadOption.STRAIGHT):
            return previous                 # still the same junction
        cv = before.exit_vector if before is not None else edge.entry_vector
        nv = edge.exit_vector
        # The other ways out of this junction entry: a turn is "left" when it bends more to the left
        # than every alternative (CARLA's planner's rule, which copes with Y-shaped junctions).
        others = [_cross(cv, e.net_vector) for n, e in self._graph[nodes[i]].items()
                  if n != nodes[i + 1] and e.option == RoadOption.LANEFOLLOW]
        here = _cross(cv, nv)
        deviation = math.acos(float(np.clip(np.dot(_unit(cv), _unit(nv)), -1.0, 1.0)))
        if deviation < TURN_THRESHOLD:
            return RoadOption.STRAIGHT
        if others and here < min(others):
            return RoadOption.LEFT
        if others and here > max(others):
            return RoadOption.RIGHT
        return RoadOption.LEFT if here < 0 else RoadOption.RIGHT

    def _trace(self, nodes: Sequence[Node], origin_wp: Any, destination_wp: Any | None
               ) -> list[tuple[Any, RoadOption]]:
        trace: list[tuple[Any, RoadOption]] = []
        current = origin_wp
        option = RoadOption.VOID
        for i in range(len(nodes) - 1):
            option = self._turn_decision(nodes, i, option)
            edge = self._graph[nodes[i]][nodes[i + 1]]
            if edge.option in (RoadOption.CHANGELANELEFT, RoadOption.CHANGELANERIGHT):
                trace.append((current, option))
                target = self._by_lane.get(_lane_key(edge.exit))
                path = target.waypoints if target is not None else [edge.exit]
                # Land a few waypoints down the new lane, as CARLA's planner does.
                k = min(len(path) - 1, _closest(current, path) + 5)
                current = path[k]
                trace.append((current, option))
                continue
            path = edge.waypoints
            start = _closest(current, path)
            last_edge = i == len(nodes) - 2
            dest_index = _closest(destination_wp, path) if (last_edge and destination_wp is not None) else None
            for k in range(start, len(path)):
                wp = path[k]
                if trace and _same_point(trace[-1][0], wp):
                    continue
                trace.append((wp, option))
                current = wp
                if dest_index is not None and k >= dest_index:
                    break
        return trace


def _closest(waypoint: Any, path: Sequence[Any]) -> int:
    p = _xy(waypoint)
    return int(np.argmin([float(np.sum((_xy(w) - p) ** 2)) for w in path]))


def _same_point(a: Any, b: Any) -> bool:
    return float(np.sum((_xy(a) - _xy(b)) ** 2)) < 0.01


# --------------------------------------------------------------------------------------------
# Route: the arrays the bridge measures against, and the ego's progress along them
# --------------------------------------------------------------------------------------------

@dataclass
class Route:
    """A traced route as arrays (CARLA frame): positions, headings, arc length, lane widths, options."""

    waypoints: list[Any]
    options: list[RoadOption]
    xy: np.ndarray                  # [N, 2] m
    yaw: np.ndarray                 # [N] rad, CARLA's clockwise yaw
    s: np.ndarray                   # [N] m, arc length from the first point
    width: np.ndarray               # [N] m, lane width
    junction: np.ndarray            # [N] bool

    @classmethod
    def from_trace(cls, trace: Sequence[tuple[Any, RoadOption]]) -> Route:
        if len(trace) < 2:
            raise ValueError(f"a route needs at least two waypoints, got {len(trace)}")
        wps = [w for w, _ in trace]
        xy = np.array([_xy(w) for w in wps], dtype=np.float64)
        seg = np.linalg.norm(np.diff(xy, axis=0), axis=1)
        return cls(
            waypoints=wps, options=[RoadOption(o) for _, o in trace], xy=xy,
            yaw=np.radians([w.transform.rotation.yaw for w in wps]),
            s=np.concatenate([[0.0], np.cumsum(seg)]),
            width=np.array([float(w.lane_width) for w in wps]),
            junction=np.array([bool(w.is_junction) for w in wps]))

    @property
    def length(self) -> float:
        return float(self.s[-1])

    def __len__(self) -> int:
        return len(self.waypoints)


class RouteTracker:
    """The ego's progress along a `Route`: a monotone index into it and the distance to it."""

    def __init__(self, route: Route, search_ahead_m: float = 20.0) -> None:
        self.route = route
        self.index = 0
        self.search_ahead_m = search_ahead_m
        self.progress = 0.0              # m along the route
        self.distance = 0.0              # m from the route (nearest point in the search window)
        self.offset = 0.0                # m of the route behind the ego's starting point

    def update(self, xy: np.ndarray) -> None:
        r = self.route
        # Only look a little ahead: routes revisit places (loops, both lanes of a road), and the
        # nearest point overall could be a later pass.
        end = int(np.searchsorted(r.s, r.s[self.index] + self.search_ahead_m, side="right"))
        window = slice(max(0, self.index - 1), max(end, self.index + 2))
        d2 = np.sum((r.xy[window] - xy) ** 2, axis=1)
        nearest = int(window.start + np.argmin(d2))
        self.distance = float(math.sqrt(float(np.min(d2))))
        self.index = max(self.index, min(nearest, len(r) - 1))
        i = min(self.index, len(r) - 2)
        a, b = r.xy[i], r.xy[i + 1]
        seg = b - a
        t = float(np.clip(np.dot(xy - a, seg) / max(float(np.dot(seg, seg)), 1e-9), 0.0, 1.0))
        self.progress = max(self.progress, float(r.s[i] + t * (r.s[i + 1] - r.s[i])))

    def begin(self, xy: np.ndarray) -> None:
        """Locate the ego at the start of the episode: completion counts from here."""
        self.update(xy)
        self.offset = self.progress

    @property
    def completion(self) -> float:
        total = max(self.route.length - self.offset, 1e-6)
        return float(np.clip((self.progress - self.offset) / total, 0.0, 1.0))

    @property
    def finished(self) -> bool:
        return self.route.length - self.progress < 2.0

    def _segment(self, xy: np.ndarray) -> tuple[int, float]:
        """(i, t): the ego projects onto the route segment i..i+1 at fraction t (around the index)."""
        r = self.route
        best = (math.inf, 0, 0.0)
        for i in range(max(0, self.index - 1), min(self.index + 1, len(r) - 2) + 1):
            a, b = r.xy[i], r.xy[i + 1]
            seg = b - a
            t = float(np.clip(np.dot(xy - a, seg) / max(float(np.dot(seg, seg)), 1e-9), 0.0, 1.0))
            d = float(np.sum((a + t * seg - xy) ** 2))
            if d < best[0]:
                best = (d, i, t)
        return best[1], best[2]

    def reference(self, xy: np.ndarray) -> tuple[float, float]:
        """(signed lateral offset m, positive right; lane heading rad) of the ego against the route.

        The nearest segment around the ego's index gives the offset; the heading is interpolated
        between the waypoints' own headings (a chord of a curve would be a few degrees off).
        """
        r = self.route
        i, t = self._segment(xy)
        a, b = r.xy[i], r.xy[i + 1]
        seg = b - a
        n = float(np.linalg.norm(seg))
        ya, yb = float(r.yaw[i]), float(r.yaw[i + 1])
        heading = ya + t * wrap_angle(yb - ya)
        if n < 1e-6:
            return 0.0, heading
        u = seg / n
        right = np.array([-u[1], u[0]])   # CARLA frame: right of (cos, sin) is (-sin, cos)
        return float(np.dot(xy - a, right)), heading

    def next_option(self, lookahead_m: float) -> RoadOption:
        """The first manoeuvre (not lane following) within ``lookahead_m`` ahead, else LANEFOLLOW."""
        r = self.route
        end = int(np.searchsorted(r.s, r.s[self.index] + lookahead_m, side="right"))
        for k in range(self.index, min(end, len(r))):
            if r.options[k] not in (RoadOption.LANEFOLLOW, RoadOption.VOID):
                return r.options[k]
        return RoadOption.LANEFOLLOW

    def command(self, lookahead_m: float) -> str:
        return command_text(self.next_option(lookahead_m))
