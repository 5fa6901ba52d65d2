"""`DrivingEnv` on highway-env: the embedded backend (no simulator server, runs on one CPU core).

Our action ``[throttle, steer, brake]`` drives highway-env's ``ContinuousAction`` (longitudinal +
lateral): ``acceleration = throttle * MAX_ACCELERATION - brake * MAX_BRAKING`` m/s², ``steering =
steer * MAX_STEERING`` rad. Braking stops the car; it never reverses.

What highway-env does not give, this module adds:
- a route (`RouteTracker`) per scenario — the road sequence to a destination (intersection exit,
  roundabout exit, merge onto the main road) or a distance along an open road / a loop — from which
  come the lateral offset, heading error, route completion and the text command;
- the observation image around the ego (`Camera`): highway-env's road drawing (cached in tiles, the
  road is static) with the vehicles drawn on top in highway-env's colours, rotated so that the car
  drives up the image (``view="heading_up"``, like a forward camera; ``"world"`` keeps highway-env's
  axes), area-resized to ``image_size``, then the ``night`` / ``rain`` appearance transforms;
- episode ends of its own: terminated on a collision or leaving the road, truncated at
  ``max_episode_steps`` or when the route is completed (``info["done_reason"]`` says which).

highway-env's own rewards, terminations and observations are switched off (its Kinematics
observation alone halves the step rate); the reward is `compute_driving_reward`, as on every backend.

Frame: highway-env's world, x right and y down in the rendered image; positive yaw / steer turn right
(as in CARLA). Drawing uses off-screen pygame surfaces only (``SDL_VIDEODRIVER=dummy`` is set); note
that highway-env's own `EnvViewer` draws nothing under that driver, which is one reason not to use it.
"""
from __future__ import annotations

import logging
import math
import os

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import cv2  # noqa: E402
import gymnasium as gym  # noqa: E402
import highway_env  # noqa: E402,F401  (registers the highway-env ids)
import numpy as np  # noqa: E402
import pygame  # noqa: E402
from highway_env import utils as hutils  # noqa: E402
from highway_env.road.graphics import RoadGraphics, RoadObjectGraphics, WorldSurface  # noqa: E402
from highway_env.road.lane import AbstractLane  # noqa: E402
from highway_env.vehicle.behavior import IDMVehicle  # noqa: E402
from highway_env.vehicle.graphics import VehicleGraphics  # noqa: E402
from highway_env.vehicle.kinematics import Vehicle  # noqa: E402

from stages.envs import captions  # noqa: E402
from stages.envs.config import EnvConfig  # noqa: E402
from stages.envs.rewards import compute_driving_reward  # noqa: E402
from stages.envs.scenarios import ScenarioSpec, get_scenario, highway_env_config, vehicles_count  # noqa: E402
from stages.envs.spaces import (  # noqa: E402
    FRONT_DISTANCE_MAX, action_space, clip_action, make_state, observation_space, sanitize_command)

log = logging.getLogger(__name__)

MAX_ACCELERATION = 5.0            # m/s² at full throttle (highway-env's ContinuousAction range)
MAX_BRAKING = 8.0                 # m/s² at full brake (~0.8 g)
MAX_STEERING = math.pi / 4        # rad at full steer (highway-env's default steering range)
OFF_ROAD_MARGIN = 1.0            # m beyond a lane's edge before the car counts as off the road
LaneIndex = tuple[str, str, int]


# --------------------------------------------------------------------------------------------
# highway-env classes: its rewards / ends / observation off, one scenario-specific population
# --------------------------------------------------------------------------------------------

class TrafficVehicle(IDMVehicle):
    """highway-env's IDM traffic, minus reversing: its IDM keeps braking at standstill when a gap
    is below the jam distance, so queued cars drove backwards into whoever waited behind them."""

    def step(self, dt: float) -> None:
        super().step(dt)
        if self.speed < 0.0:
            self.speed = 0.0


class UrbanTrafficVehicle(TrafficVehicle):
    """Intersection traffic. intersection-v0 retunes its vehicle class's *class* attributes on every
    reset; a class of its own keeps the other scenarios' traffic untouched in-process."""


class _QuietSim:
    """Mixin: DrivingEnv computes reward, ends and observation itself."""

    def _reward(self, action: Any) -> float:
        return 0.0

    def _rewards(self, action: Any) -> dict[str, float]:
        return {}

    def _is_terminated(self) -> bool:
        return False

    def _is_truncated(self) -> bool:
        return False

    def _info(self, obs: Any, action: Any = None) -> dict[str, Any]:
        return {}


class _RampMergeSim(_QuietSim):
    """merge-v0 with the ego on the on-ramp (so the task is to merge) and N cars on the main road."""

    def _make_vehicles(self) -> None:
        road, rng = self.road, self.np_random
        ramp = road.network.get_lane(("j", "k", 0))
        s0 = float(rng.uniform(30.0, 60.0))
        ego = self.action_type.vehicle_class(road, ramp.position(s0, 0.0), ramp.heading_at(s0),
                                             speed=float(rng.uniform(18.0, 22.0)))
        road.vehicles.append(ego)
        self.vehicle = ego
        other_type = hutils.class_from_path(self.config["other_vehicles_type"])
        taken: dict[int, list[float]] = {0: [], 1: []}
        for _ in range(int(self.config.get("main_road_vehicles", 6))):
            for _try in range(10):
                lane_id, x = int(rng.integers(2)), float(rng.uniform(0.0, 260.0))
                if all(abs(x - p) > 20.0 for p in taken[lane_id]):
                    lane = road.network.get_lane(("a", "b", lane_id))
                    v = other_type(road, lane.position(x, 0.0), speed=float(rng.uniform(22.0, 28.0)))
                    v.randomize_behavior()
                    road.vehicles.append(v)
                    taken[lane_id].append(x)
                    break


def _predict_constant_speed(vehicle: Vehicle, times: np.ndarray) -> tuple[list[np.ndarray], list[float]]:
    """`Vehicle.predict_trajectory_constant_speed` (constant steering, no acceleration) without its
    ``deepcopy(self)``, which copies the whole road: intersection-v0's right-of-way check calls it
    for every vehicle pair, and it was more than half of an urban step."""
    pos, heading, speed = np.array(vehicle.position, dtype=float), float(vehicle.heading), float(vehicle.speed)
    beta = math.atan(0.5 * math.tan(float(vehicle.action["steering"])))
    positions, headings, clock = [], [], 0.0
    for t in times:
        dt, clock = float(t) - clock, float(t)
        pos = pos + speed * np.array([math.cos(heading + beta), math.sin(heading + beta)]) * dt
        heading += speed * math.sin(beta) / (vehicle.LENGTH / 2) * dt
        positions.append(pos)
        headings.append(heading)
    return positions, headings


_SIM_CLASSES: dict[str, type] = {}


def _sim_class(scenario: str, env_id: str) -> type:
    """The highway-env class behind ``env_id``, with our mixin in front."""
    key = f"{scenario}:{env_id}"
    if key not in _SIM_CLASSES:
        base = gym.envs.registration.load_env_creator(gym.spec(env_id).entry_point)
        mixin = _RampMergeSim if scenario == "merge" else _QuietSim
        _SIM_CLASSES[key] = type(f"Driving{base.__name__}", (mixin, base), {})
    return _SIM_CLASSES[key]


# --------------------------------------------------------------------------------------------
# Route: the road sequence the ego should follow, its progress, the reference lane
# --------------------------------------------------------------------------------------------

def _wrap(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


class RouteTracker:
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
        return _wrap(heading - self.lane.heading_at(self.s))

    def remaining_length(self, end_extra: float) -> float:
        """Route length from the ego's start to ``end_extra`` metres into the last road."""
        total, lane_id = self.lane.length - self.s0, self.desired_lane_id()
        for k in range(self.i + 1, len(self.roads)):
            lane_id = self._continuation(k, lane_id)
            length = self.net.get_lane((*self.roads[k], lane_id)).length
            total += min(length, end_extra) if k == len(self.roads) - 1 else length
            lane_id = self.desired[k] if self.desired[k] is not None else lane_id
        return total


# --------------------------------------------------------------------------------------------
# Camera: highway-env's renderer around the ego, heading-up rotation, appearance transforms
# --------------------------------------------------------------------------------------------

# Ego position in a heading-up image (fraction of width, height): more road ahead than behind.
EGO_IN_IMAGE = (0.5, 0.75)
_TILE = 256                  # px, side of a cached road tile
_MAX_TILES = 48              # LRU bound of the tile cache (~9 MB)


class Camera:
    """Renders ``image_size`` RGB frames of a highway-env sim, once per env step.

    The road is static, so highway-env's own road drawing (`RoadGraphics.display`, which redraws
    every lane stripe of the network and cost ~10 ms a frame on the roundabout) runs once per
    256-px tile and is cached; each frame composes the tiles around the ego, rotates them
    (heading-up) and draws the vehicles on top with cv2 in highway-env's colours.
    """

    def __init__(self, cfg: EnvConfig, spec: ScenarioSpec) -> None:
        self.size = cfg.image_size
        self.heading_up = cfg.view == "heading_up"
        self.appearance = spec.appearance
        # Small images are drawn at twice the size and area-averaged: thin lane marks survive.
        self.supersample = 2 if self.size < 128 else 1
        self.px = self.size * self.supersample
        self.span = float(cfg.view_distance or spec.view_distance)
        self.scaling = self.px / self.span
        # Heading-up needs the whole rotated output square inside the canvas: the farthest output
        # corner lies sqrt(0.75² + 0.5²) ≈ 0.9 spans from the ego.
        self.canvas = int(math.ceil(self.px * 1.81 / 2) * 2) if self.heading_up else self.px
        self.centering = (0.5, 0.5) if self.heading_up else spec.world_centering
        self._tiles: dict[tuple[int, int], np.ndarray] = {}
        self._tiles_key: Any = None
        self._surface: Any = None
        self._night_mask: np.ndarray | None = None

    def visible(self, forward: float, right: float, heading: float) -> bool:
        """Is a point at (forward, right) metres from the ego inside the image?"""
        if self.heading_up:
            fx, fy = EGO_IN_IMAGE
            return (-(1 - fy) * self.span <= forward <= fy * self.span
                    and -fx * self.span <= right <= (1 - fx) * self.span)
        # World view: back to world offsets (x right, y down).
        dx = forward * math.cos(heading) - right * math.sin(heading)
        dy = forward * math.sin(heading) + right * math.cos(heading)
        cx, cy = self.centering
        return -cx * self.span <= dx <= (1 - cx) * self.span and -cy * self.span <= dy <= (1 - cy) * self.span

    # -- road layer ----------------------------------------------------------------------------
    @staticmethod
    def _network_key(network: Any) -> tuple:
        """Identifies a road geometry, so that tiles survive resets that rebuild the same roads."""
        key = []
        for _from, tos in sorted(network.graph.items()):
            for _to, lanes in sorted(tos.items()):
                for lane in lanes:
                    key.append((_from, _to, tuple(np.round(lane.position(0.0, 0.0), 2)),
                                tuple(np.round(lane.position(lane.length, 0.0), 2))))
        return tuple(key)

    def _tile(self, road: Any, tx: int, ty: int) -> np.ndarray:
        tile = self._tiles.pop((tx, ty), None)
        if tile is None:
            if self._surface is None:
                pygame.display.init()       # no window: highway-env draws on off-screen surfaces
                self._surface = WorldSurface((_TILE, _TILE), 0, pygame.Surface((_TILE, _TILE)))
            surface = self._surface
            surface.scaling = self.scaling
            surface.origin = np.array([tx * _TILE, ty * _TILE], dtype=float) / self.scaling
            RoadGraphics.display(road, surface)
            tile = np.frombuffer(pygame.image.tobytes(surface, "RGB"), np.uint8).reshape(_TILE, _TILE, 3)
            if len(self._tiles) >= _MAX_TILES:
                self._tiles.pop(next(iter(self._tiles)))
        self._tiles[(tx, ty)] = tile       # most recently used last
        return tile

    def _road_canvas(self, road: Any, left: int, top: int) -> np.ndarray:
        """The cached road drawing of the canvas whose top-left global pixel is (left, top)."""
        if self._tiles_key is None or self._tiles_key[0] is not road.network:
            key = self._network_key(road.network)      # once per reset
            if self._tiles_key is None or key != self._tiles_key[1]:
                self._tiles.clear()
            self._tiles_key = (road.network, key)
        n = self.canvas
        out = np.empty((n, n, 3), dtype=np.uint8)
        for ty in range(top // _TILE, (top + n - 1) // _TILE + 1):
            for tx in range(left // _TILE, (left + n - 1) // _TILE + 1):
                tile = self._tile(road, tx, ty)
                x0, y0 = max(left, tx * _TILE), max(top, ty * _TILE)
                x1, y1 = min(left + n, (tx + 1) * _TILE), min(top + n, (ty + 1) * _TILE)
                out[y0 - top:y1 - top, x0 - left:x1 - left] = \
                    tile[y0 - ty * _TILE:y1 - ty * _TILE, x0 - tx * _TILE:x1 - tx * _TILE]
        return out

    # -- frame ---------------------------------------------------------------------------------
    def render(self, sim: Any, rng: np.random.Generator) -> np.ndarray:
        ego = sim.vehicle
        gx, gy = ego.position * self.scaling            # ego in global pixels
        cx, cy = self.centering
        left, top = int(math.floor(gx - cx * self.canvas)), int(math.floor(gy - cy * self.canvas))
        frame = self._road_canvas(sim.road, left, top)
        # Affine map: global pixels -> output pixels.
        if self.heading_up:
            m = cv2.getRotationMatrix2D((gx - left, gy - top), math.degrees(ego.heading + math.pi / 2), 1.0)
            m[0, 2] += self.px * EGO_IN_IMAGE[0] - (gx - left)
            m[1, 2] += self.px * EGO_IN_IMAGE[1] - (gy - top)
            frame = cv2.warpAffine(frame, m, (self.px, self.px), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REPLICATE)
        else:
            m = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        m = m.copy()
        m[:, 2] -= m[:, :2] @ np.array([left, top], dtype=float)
        self._draw_vehicles(frame, sim, m)
        if self.supersample > 1:
            frame = cv2.resize(frame, (self.size, self.size), interpolation=cv2.INTER_AREA)
        if self.appearance == "night":
            frame = self._night(frame, ego.heading, rng)
        elif self.appearance == "rain":
            frame = self._rain(frame, rng)
        return np.ascontiguousarray(frame, dtype=np.uint8)

    def _draw_vehicles(self, frame: np.ndarray, sim: Any, m: np.ndarray) -> None:
        ego, reach = sim.vehicle, 1.2 * self.span
        shift = 4                                         # sub-pixel vertex precision (1/16 px)
        for obj in [*sim.road.objects, *sim.road.vehicles]:
            if np.abs(obj.position - ego.position).max() > reach:
                continue
            if obj is ego:
                color = VehicleGraphics.RED if ego.crashed else VehicleGraphics.EGO_COLOR
            elif isinstance(obj, Vehicle):
                color = VehicleGraphics.get_color(obj)
            else:
                color = RoadObjectGraphics.get_color(obj)
            pts = obj.polygon()[:4] * self.scaling @ m[:, :2].T + m[:, 2]
            pts = np.round(pts * (1 << shift)).astype(np.int32)
            cv2.fillConvexPoly(frame, pts, color[:3], lineType=cv2.LINE_AA, shift=shift)
            cv2.polylines(frame, [pts], True, VehicleGraphics.BLACK, 1, lineType=cv2.LINE_AA, shift=shift)

    def close(self) -> None:
        self._tiles.clear()
        self._surface = None

    # -- appearance variants (highway-env has no weather: these are image transforms) ------
    def _headlight_mask(self, heading: float) -> np.ndarray:
        n = self.size
        if self.heading_up:
            ex, ey, ang = EGO_IN_IMAGE[0] * n, EGO_IN_IMAGE[1] * n, -math.pi / 2
        else:
            ex, ey, ang = self.centering[0] * n, self.centering[1] * n, heading
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
        dx, dy = xx - ex, yy - ey
        dist = np.hypot(dx, dy) / n
        off = np.abs(np.arctan2(dy, dx) - ang)
        off = np.minimum(off, 2 * np.pi - off)
        cone = np.clip(1.0 - off / 0.55, 0.0, 1.0) * np.clip(1.0 - dist / 0.85, 0.0, 1.0)
        glow = np.clip(1.0 - dist / 0.12, 0.0, 1.0)
        return (0.22 + 0.78 * np.maximum(cone, 0.6 * glow))[..., None].astype(np.float32)

    def _night(self, frame: np.ndarray, heading: float, rng: np.random.Generator) -> np.ndarray:
        if self.heading_up:
            if self._night_mask is None:
                self._night_mask = self._headlight_mask(0.0)
            mask = self._night_mask
        else:
            mask = self._headlight_mask(heading)
        dark = frame.astype(np.float32) * mask * np.array([0.8, 0.85, 1.0], dtype=np.float32)
        dark += rng.normal(0.0, 5.0, size=dark.shape[:2])[..., None]   # sensor noise in the dark
        return np.clip(dark, 0, 255).astype(np.uint8)

    def _rain(self, frame: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n = self.size
        img = cv2.blur(frame, (3, 3) if n < 128 else (5, 5))
        streaks = np.zeros_like(img)
        count = n // 3
        length = max(3.0, n / 12)
        xs = rng.uniform(0, n, count)
        ys = rng.uniform(0, n, count)
        slant = rng.normal(0.25, 0.05, count)
        for x, y, k in zip(xs, ys, slant):
            cv2.line(streaks, (int(x), int(y)), (int(x + k * length), int(y + length)), (210, 210, 220), 1)
        wet = img.astype(np.float32) * 0.75 + 20.0          # dimmer, lower contrast
        wet += 0.35 * streaks.astype(np.float32)
        return np.clip(wet, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# DrivingEnv
# --------------------------------------------------------------------------------------------

@dataclass
class _LaneChangePlan:
    """Open-road command planner: now and then, ask for a lane change."""

    target: int | None = None
    deadline: float = 0.0
    next_time: float = 0.0


class DrivingEnv(gym.Env):
    """The driving env on highway-env (see the module docstring)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, cfg: EnvConfig | None = None, seed: int | None = None,
                 render_mode: str | None = None) -> None:
        super().__init__()
        self.cfg = cfg or EnvConfig()
        if self.cfg.backend != "highway":
            raise ValueError(f"DrivingEnv is the highway backend; got backend={self.cfg.backend!r}")
        self.scenario_spec = get_scenario(self.cfg.scenario)
        self.scenario = self.cfg.scenario
        self.reward_config = self.cfg.resolved_reward()
        self.target_speed = self.reward_config.target_speed
        self.render_mode = render_mode
        self.metadata = {**self.metadata, "render_fps": self.cfg.policy_frequency}
        self.observation_space = observation_space(self.cfg.image_size)
        self.action_space = action_space()
        self.camera = Camera(self.cfg, self.scenario_spec)
        self._default_seed = self.cfg.seed if seed is None else seed
        self._seeded = False
        self.episode_id = 0
        self.sim: Any = None
        self.route: RouteTracker | None = None
        self._frame: np.ndarray | None = None

    # -- gym API -----------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[dict[str, Any], dict[str, Any]]:
        if seed is None and not self._seeded:
            seed = self._default_seed
        super().reset(seed=seed)
        self._seeded = True
        self.episode_id += 1
        sim_seed = int(self.np_random.integers(2**31 - 1))
        if self.sim is None:
            self._make_sim()
        self.sim.reset(seed=sim_seed)
        self.ego = self.sim.vehicle
        self.ego.MIN_SPEED = 0.0
        self.ego.predict_trajectory_constant_speed = lambda times: _predict_constant_speed(self.ego, times)
        self._steps = 0
        self._time = 0.0
        self._last_action = np.zeros(3, dtype=np.float32)
        self._infractions = {"collision": 0, "off_road": 0, "lane_invasion": 0, "wrong_way": 0, "speeding": 0}
        self._plan_route()
        self._command = self._route_command()
        self._frame = self.camera.render(self.sim, self.np_random)
        return self._observe(), self._info(done_reason="")

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        if self.sim is None or self.route is None:
            raise RuntimeError("call reset() before step()")
        a = clip_action(action)
        dt = 1.0 / self.cfg.policy_frequency
        accel = float(a[0]) * MAX_ACCELERATION - float(a[2]) * MAX_BRAKING
        accel = max(accel, -self.ego.speed / dt)   # no reverse gear: brake to a stop, not beyond
        prev_lane = self.route.lane_index
        self.sim.step(np.array([accel / MAX_BRAKING, float(a[1])], dtype=np.float32))
        if self.ego.speed < 1e-6:
            self.ego.speed = 0.0                   # braked to a stop (float residue of v - v/dt * dt)
        self._steps += 1
        self._time += dt
        self._last_action = a
        self.route.update(self.ego.position)
        self._count_infractions(prev_lane)
        self._command = self._route_command()
        self._frame = self.camera.render(self.sim, self.np_random)

        collision = bool(self.ego.crashed)
        off_road = not self.on_road()
        done_reason = ""
        terminated = collision or off_road
        truncated = False
        if terminated:
            done_reason = "collision" if collision else "off_road"
        elif self.route_completion >= 1.0:
            truncated, done_reason = True, "route_completed"
        elif self._steps >= self.cfg.max_episode_steps:
            truncated, done_reason = True, "time_limit"
        info = self._info(done_reason)
        reward = compute_driving_reward(self, a, info, self.reward_config)
        return self._observe(), reward, terminated, truncated, info

    def render(self) -> np.ndarray | None:
        # The observation frame is drawn once per step; rendering returns it rather than drawing again.
        return None if self._frame is None else self._frame.copy()

    def close(self) -> None:
        self.camera.close()
        self.sim = None
        super().close()

    # -- views used by the expert, captions and tests ------------------------------------------
    @property
    def route_completion(self) -> float:
        return float(np.clip(self.route.progress / self.route_length, 0.0, 1.0)) if self.route else 0.0

    @property
    def command(self) -> str:
        return self._command

    def on_road(self) -> bool:
        """Is some part of the car on a lane it may be on (highway-env's lane or the route's)?

        highway-env's own test (the centre inside the nearest lane) fails where its road network
        has gaps between connected lanes (the roundabout's entries are 4.5 m off the ring) and on
        some racetrack curves; a car is off the road when its centre is more than half a lane plus
        half a car width away from every lane around it.
        """
        pos = self.ego.position
        lanes = [self.ego.lane] + [lane for lane, _ in self.route.path_lanes(2, desired=False)]
        return any(lane.on_lane(pos, margin=OFF_ROAD_MARGIN) for lane in lanes)

    def leader(self, lateral_margin: float = 0.0, horizon: float = 80.0, desired: bool = False
               ) -> tuple[float, float, Any]:
        """The nearest vehicle (or obstacle) ahead on the route: (bumper gap m, its speed, it).

        A vehicle counts when its centre is within half a lane plus ``lateral_margin`` of the path;
        ``desired`` looks along the lane the route wants rather than the current one.
        """
        ego, best = self.ego, (math.inf, 0.0, None)
        lanes = self.route.path_lanes(3, desired)
        s_ego = self.route.s if not desired else lanes[0][0].local_coordinates(ego.position)[0]
        for other in list(self.sim.road.vehicles) + list(self.sim.road.objects):
            if other is ego or np.linalg.norm(other.position - ego.position) > horizon:
                continue
            for lane, offset in lanes:
                s, lat = lane.local_coordinates(other.position)
                if -2.0 <= s <= lane.length + 2.0 and abs(lat) <= lane.width_at(s) / 2 + lateral_margin:
                    ahead = offset + s - s_ego            # centre to centre, along the path
                    gap = ahead - (ego.LENGTH + other.LENGTH) / 2
                    if ahead > 0 and gap < best[0]:
                        along = other.speed * math.cos(_wrap(other.heading - lane.heading_at(s)))
                        best = (max(gap, 0.0), along, other)
                    break
        return best

    # -- internals ---------------------------------------------------------------------------
    def _make_sim(self) -> None:
        env_id, sim_cfg = highway_env_config(self.cfg)
        sim_cfg["action"].update({"acceleration_range": [-MAX_BRAKING, MAX_BRAKING],
                                  "steering_range": [-MAX_STEERING, MAX_STEERING],
                                  "speed_range": [0.0, 40.0]})
        traffic = UrbanTrafficVehicle if self.scenario == "urban" else TrafficVehicle
        sim_cfg["other_vehicles_type"] = f"{__name__}.{traffic.__name__}"
        if self.scenario == "merge":
            sim_cfg["main_road_vehicles"] = vehicles_count(self.cfg)
        elif self.scenario_spec.vehicles_key is None and self.cfg.vehicles_count is not None:
            log.warning("%s has a fixed traffic layout in highway-env; vehicles_count=%s is ignored",
                        env_id, self.cfg.vehicles_count)
        self.sim = _sim_class(self.scenario, env_id)(config=sim_cfg)

    def _plan_route(self) -> None:
        """Pick the route (and destination) of this episode and its length."""
        net, ego = self.sim.road.network, self.ego
        kind, start = self.scenario_spec.route_kind, ego.lane_index
        self.destination: str | None = None
        self.exit_number: int | None = None
        # Route roads whose start is a yield line (give way to crossing / circulating traffic there).
        self.yield_roads: frozenset[int] = frozenset()
        self._lane_plan = _LaneChangePlan(next_time=float(self.np_random.uniform(3.0, 8.0)))
        self._merged = False
        episode_distance = 0.8 * self.target_speed * self.cfg.episode_seconds
        if self.scenario == "urban":
            # Entering from the south (o0): o1 is a left turn, o2 straight on, o3 a right turn.
            self.destination = f"o{int(self.np_random.integers(1, 4))}"
            nodes = net.shortest_path(start[1], self.destination)
            roads = [start[:2]] + list(zip(nodes[:-1], nodes[1:]))
            self.route = RouteTracker(net, roads, start, ego.position, extendable=False)
            self.route_length = self.route.remaining_length(end_extra=25.0)
            self.yield_roads = frozenset({1})            # the junction road (ir0 -> il*)
        elif self.scenario == "roundabout":
            exits = ["exs", "nxs", "wxs"]
            self.exit_number = int(self.np_random.integers(1, 4))
            self.destination = exits[self.exit_number - 1]
            nodes = net.shortest_path(start[1], self.destination)
            roads = [start[:2]] + list(zip(nodes[:-1], nodes[1:]))
            self.route = RouteTracker(net, roads, start, ego.position, extendable=False)
            self.route_length = self.route.remaining_length(end_extra=15.0)
            # The first ring road: circulating traffic has the right of way.
            self.yield_roads = frozenset(k for k, road in enumerate(roads) if road[0] == "se")
        elif self.scenario == "merge":
            roads = [("j", "k"), ("k", "b"), ("b", "c"), ("c", "d")]
            self.route = RouteTracker(net, roads, ("j", "k", 0), ego.position, extendable=False)
            self.route_length = min(episode_distance, self.route.remaining_length(end_extra=140.0))
        else:  # open road (highway, night, rain) or loop (racetrack)
            self.route = RouteTracker(net, [start[:2]], start, ego.position, extendable=True)
            self.route_length = episode_distance
        self.route.update(ego.position)
        self.route.progress = 0.0
        self.route_length = max(self.route_length, 1.0)
        if kind == "destination":
            log.debug("route %s -> %s, %.0f m", start, self.destination, self.route_length)

    def _route_command(self) -> str:
        r = self.route
        if self.scenario == "urban":
            on_exit = r.i >= len(r.roads) - 1
            if on_exit:
                return captions.FOLLOW_LANE
            turn = {"o1": captions.TURN_LEFT, "o2": captions.GO_STRAIGHT, "o3": captions.TURN_RIGHT}
            return turn[self.destination]
        if self.scenario == "roundabout":
            on_exit = r.i >= len(r.roads) - 1
            return captions.FOLLOW_LANE if on_exit else captions.roundabout_command(self.exit_number)
        if self.scenario == "merge":
            # Merged once the car is settled in a main-road lane; it stays merged after that.
            self._merged = self._merged or (r.road in (("b", "c"), ("c", "d")) and r.lane_id < 2 and abs(r.lat) < 1.0)
            return captions.FOLLOW_LANE if self._merged else captions.MERGE
        if self.scenario == "racetrack":
            _, ahead = r.point_ahead(25.0)
            bend = _wrap(ahead - r.lane.heading_at(r.s))
            return captions.curve_command(None if abs(bend) < 0.35 else ("right" if bend > 0 else "left"))
        return self._open_road_command()

    def _open_road_command(self) -> str:
        r, plan, t = self.route, self._lane_plan, self._time
        if plan.target is not None:
            done = r.lane_id == plan.target and abs(r.lat) < 1.0
            if done or t > plan.deadline:
                plan.target = None
                r.desired[r.i] = None
                plan.next_time = t + float(self.np_random.uniform(4.0, 10.0))
        elif t >= plan.next_time and r.lanes_count() > 1:
            options = [j for j in (r.lane_id - 1, r.lane_id + 1) if 0 <= j < r.lanes_count()]
            plan.target = int(options[int(self.np_random.integers(len(options)))])
            plan.deadline = t + 8.0
            r.desired[r.i] = plan.target
        if plan.target is None:
            return captions.FOLLOW_LANE
        return captions.CHANGE_LEFT if plan.target < r.lane_id else captions.CHANGE_RIGHT

    def _count_infractions(self, prev_lane: LaneIndex) -> None:
        r, ego, inf = self.route, self.ego, self._infractions
        if prev_lane[:2] == r.road and prev_lane[2] != r.lane_id:
            inf["lane_invasion"] += 1
        if not self.on_road():
            inf["off_road"] += 1
        if abs(r.heading_error(ego.heading)) > math.pi / 2:
            inf["wrong_way"] += 1
        limit = getattr(r.lane, "speed_limit", None)
        if limit and ego.speed > 1.1 * max(limit, self.target_speed):
            inf["speeding"] += 1
        inf["collision"] = int(bool(ego.crashed))

    def _observe(self) -> dict[str, Any]:
        r, ego, a = self.route, self.ego, self._last_action
        gap, _, _ = self.leader()
        state = make_state({
            "speed": ego.speed, "lateral_offset": r.lat, "heading_error": r.heading_error(ego.heading),
            "last_throttle": a[0], "last_steer": a[1], "last_brake": a[2],
            "front_distance": min(gap, FRONT_DISTANCE_MAX), "route_completion": self.route_completion,
        })
        return {"image": self._frame, "state": state, "command": sanitize_command(self._command)}

    def _neighbours(self) -> tuple[captions.Neighbour, ...]:
        ego, r = self.ego, self.route
        c, s = math.cos(ego.heading), math.sin(ego.heading)
        out = []
        for v in self.sim.road.vehicles:
            if v is ego:
                continue
            d = v.position - ego.position
            fwd, right = float(d[0] * c + d[1] * s), float(-d[0] * s + d[1] * c)
            if not self.camera.visible(fwd, right, ego.heading):
                continue
            same_road = tuple(v.lane_index[:2]) == r.road
            out.append(captions.Neighbour(
                forward=fwd, right=right, lane_offset=int(v.lane_index[2]) - r.lane_id if same_road else None,
                relative_heading=_wrap(v.heading - ego.heading)))
        return tuple(out)

    def caption(self) -> str:
        r = self.route
        n = r.lanes_count()
        return captions.describe_scene(captions.SceneSnapshot(
            place=self.scenario_spec.description, speed=float(self.ego.speed), command=self._command,
            lane_number=r.lane_id + 1 if n > 1 else None, lanes_count=n, lateral_offset=r.lat,
            neighbours=self._neighbours(), appearance=self.scenario_spec.appearance,
            collided=bool(self.ego.crashed), off_road=not self.on_road()))

    def _info(self, done_reason: str) -> dict[str, Any]:
        ego, r = self.ego, self.route
        vx, vy = ego.velocity
        return {
            # Poses and velocities leave in a right-handed frame (x along the road, y to the left,
            # yaw counter-clockwise), as the CARLA bridge reports them: highway-env's y points down
            # the screen, i.e. to the driver's right.
            "velocity": np.array([vx, -vy, 0.0], dtype=np.float32),
            "speed": float(ego.speed),
            "lane_deviation": float(r.lat),
            "heading_error": float(r.heading_error(ego.heading)),
            "collision": bool(ego.crashed),
            "route_completion": self.route_completion,
            "infractions": dict(self._infractions),
            "ego_pose": np.array([ego.position[0], -ego.position[1], -ego.heading], dtype=np.float32),
            "command": self._command,
            "caption": self.caption(),
            "scenario": self.scenario,
            "lane_index": int(r.lane_id),
            "done_reason": done_reason,
        }
