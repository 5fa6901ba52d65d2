"""A fake `carla` (0.9.16 client API): the surface `stages.envs.carla_bridge` uses, over a tiny town.

Hand it to the bridge as its client module: ``CARLABridge(config, carla_module=fake_carla)``.

Fidelity. Class, method and parameter names follow the installed carla 0.9.16 wheel, which
``tests/unit/test_fake_carla_signatures.py`` checks against the wheel's Boost.Python docstrings.
Parameters the real API leaves unnamed (``(World)arg1, (WeatherParameters)arg2``) are
positional-only here (``/``), so code that passes them by keyword fails on the fake as it would on
the real client. Everything that is not real API is a module-level function or named ``fake_*``.

What the fake simulates:
- servers: `start_server(host, port, town)` registers one; a `Client` reaches the server on its
  host/port at every call (so a new client after a "restart" sees the new server). Calls that go to
  the server in real CARLA (RPCs) are logged in ``FakeServer.calls`` and fail like the real client
  when the server is down (`FakeServer.kill`) or a failure is queued (`FakeServer.fail_next`):
  ``RuntimeError("time-out of 10000ms while waiting for the simulator, ...")``. Reads the real
  client answers from its local episode cache (``get_transform``, ``get_velocity``, map queries)
  never fail, as in CARLA;
- a town (`FAKE_LANES`): a two-lane road along +x into a junction with a straight, a left and a
  right connector, each continuing into a road with a dead end. Spawn points lie on the lanes in
  `SPAWN_POINTS` order (index 0: (5, 0), yaw 0, on road 1 lane -1);
- synchronous stepping: ``world.tick()`` advances the frame, integrates a kinematic bicycle for
  vehicles that are not on autopilot (autopilot vehicles stay parked: deterministic obstacles),
  detects contacts between the ego-like vehicles that carry a collision sensor and other actors,
  and feeds the listening sensors: an RGB camera frame per tick (BGRA: B=200, G=100,
  R=frame % 256, so tests see both the channel order and the frame), collision events, and a
  lane-invasion event when a vehicle crosses into another lane of its road. Test hooks:
  ``FakeServer.stale_images`` (k stale frames precede each image), ``drop_images`` (no images),
  ``World.fake_inject_collision`` / ``fake_inject_lane_invasion``.
"""
from __future__ import annotations

import copy
import enum
import fnmatch
import itertools
import math
import random
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

VERSION = "0.9.16"
TIMEOUT_TEMPLATE = ("time-out of {ms}ms while waiting for the simulator, make sure the simulator is ready "
                    "and connected to {host}:{port}")
DEFAULT_DELTA = 0.05          # s per tick in asynchronous mode (no fixed_delta_seconds)


# ------------------------------------------------------------------------------------------------
# Enums
# ------------------------------------------------------------------------------------------------

class LaneType(enum.IntEnum):
    NONE = 1
    Driving = 2
    Stop = 4
    Shoulder = 8
    Biking = 16
    Sidewalk = 32
    Any = -2


class LaneChange(enum.IntEnum):
    NONE = 0
    Right = 1
    Left = 2
    Both = 3


class LaneMarkingType(enum.IntEnum):
    NONE = 10
    Other = 0
    Broken = 1
    Solid = 2


class AttachmentType(enum.IntEnum):
    Rigid = 0
    SpringArm = 1
    SpringArmGhost = 2


# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------

class Vector3D:
    def __init__(self, x: float = 0.0, y: float = 0.0, z: float = 0.0) -> None:
        self.x, self.y, self.z = float(x), float(y), float(z)

    def length(self) -> float:
        return math.sqrt(self.x ** 2 + self.y ** 2 + self.z ** 2)

    def __add__(self, other: Vector3D, /) -> Any:
        return type(self)(self.x + other.x, self.y + other.y, self.z + other.z)

    def __sub__(self, other: Vector3D, /) -> Any:
        return type(self)(self.x - other.x, self.y - other.y, self.z - other.z)

    def __mul__(self, other: float, /) -> Any:
        return type(self)(self.x * other, self.y * other, self.z * other)

    def __eq__(self, other: object, /) -> bool:
        return isinstance(other, Vector3D) and (self.x, self.y, self.z) == (other.x, other.y, other.z)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(x={self.x:.3f}, y={self.y:.3f}, z={self.z:.3f})"


class Location(Vector3D):
    def distance(self, location: Location) -> float:
        return math.sqrt((self.x - location.x) ** 2 + (self.y - location.y) ** 2 + (self.z - location.z) ** 2)


class Rotation:
    def __init__(self, pitch: float = 0.0, yaw: float = 0.0, roll: float = 0.0) -> None:
        self.pitch, self.yaw, self.roll = float(pitch), float(yaw), float(roll)

    def get_forward_vector(self) -> Vector3D:
        p, y = math.radians(self.pitch), math.radians(self.yaw)
        return Vector3D(math.cos(p) * math.cos(y), math.cos(p) * math.sin(y), math.sin(p))

    def __repr__(self) -> str:
        return f"Rotation(pitch={self.pitch:.3f}, yaw={self.yaw:.3f}, roll={self.roll:.3f})"


class Transform:
    def __init__(self, location: Location | None = None, rotation: Rotation | None = None) -> None:
        self.location = Location(location.x, location.y, location.z) if location is not None else Location()
        self.rotation = Rotation(rotation.pitch, rotation.yaw, rotation.roll) if rotation is not None else Rotation()

    def get_forward_vector(self) -> Vector3D:
        return self.rotation.get_forward_vector()

    def __repr__(self) -> str:
        return f"Transform({self.location!r}, {self.rotation!r})"


class BoundingBox:
    def __init__(self, location: Location | None = None, extent: Vector3D | None = None) -> None:
        self.location = location or Location()
        self.extent = extent or Vector3D()
        self.rotation = Rotation()


# ------------------------------------------------------------------------------------------------
# Settings, weather, control
# ------------------------------------------------------------------------------------------------

class WorldSettings:
    def __init__(self, synchronous_mode: bool = False, no_rendering_mode: bool = False,
                 fixed_delta_seconds: float | None = None, substepping: bool = True,
                 max_substep_delta_time: float = 0.01, max_substeps: int = 10) -> None:
        self.synchronous_mode = synchronous_mode
        self.no_rendering_mode = no_rendering_mode
        # The real property reads None for a variable time-step.
        self.fixed_delta_seconds = fixed_delta_seconds or None
        self.substepping = substepping
        self.max_substep_delta_time = max_substep_delta_time
        self.max_substeps = max_substeps

    def __eq__(self, other: object, /) -> bool:
        return isinstance(other, WorldSettings) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"WorldSettings({vars(self)})"


_WEATHER_FIELDS = ("cloudiness", "precipitation", "precipitation_deposits", "wind_intensity",
                   "sun_azimuth_angle", "sun_altitude_angle", "fog_density", "fog_distance", "fog_falloff",
                   "wetness", "scattering_intensity", "mie_scattering_scale", "rayleigh_scattering_scale",
                   "dust_storm")
# The presets' values in carla 0.9.16 (carla.WeatherParameters.<name>).
_WEATHER_PRESETS = {
    "ClearNight": (5.0, 0.0, 0.0, 10.0, -1.0, -90.0, 60.0, 75.0, 1.0, 0.0, 1.0, 0.03, 0.0331, 0.0),
    "ClearNoon": (5.0, 0.0, 0.0, 10.0, -1.0, 45.0, 2.0, 0.75, 0.1, 0.0, 1.0, 0.03, 0.0331, 0.0),
    "ClearSunset": (5.0, 0.0, 0.0, 10.0, -1.0, 15.0, 2.0, 0.75, 0.1, 0.0, 1.0, 0.03, 0.0331, 0.0),
    "CloudyNight": (60.0, 0.0, 0.0, 10.0, -1.0, -90.0, 60.0, 0.75, 0.1, 0.0, 1.0, 0.03, 0.0331, 0.0),
    "CloudyNoon": (60.0, 0.0, 0.0, 10.0, -1.0, 45.0, 3.0, 0.75, 0.1, 0.0, 1.0, 0.03, 0.0331, 0.0),
    "CloudySunset": (60.0, 0.0, 0.0, 10.0, -1.0, 15.0, 3.0, 0.75, 0.1, 0.0, 1.0, 0.03, 0.0331, 0.0),
    "Default": (-1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 1.0, 0.03, 0.0331, 0.0),
    "HardRainNoon": (100.0, 100.0, 90.0, 100.0, -1.0, 45.0, 7.0, 0.75, 0.1, 0.0, 1.0, 0.03, 0.0331, 0.0),
    "SoftRainNoon": (20.0, 30.0, 50.0, 30.0, -1.0, 45.0, 3.0, 0.75, 0.1, 0.0, 1.0, 0.03, 0.0331, 0.0),
    "WetCloudyNoon": (60.0, 0.0, 50.0, 10.0, -1.0, 45.0, 3.0, 0.75, 0.1, 0.0, 1.0, 0.03, 0.0331, 0.0),
    "WetCloudySunset": (60.0, 0.0, 50.0, 10.0, -1.0, 15.0, 2.0, 0.75, 0.1, 0.0, 1.0, 0.03, 0.0331, 0.0),
    "WetNoon": (5.0, 0.0, 50.0, 10.0, -1.0, 45.0, 3.0, 0.75, 0.1, 0.0, 1.0, 0.03, 0.0331, 0.0),
}


class WeatherParameters:
    def __init__(self, cloudiness: float = 0.0, precipitation: float = 0.0, precipitation_deposits: float = 0.0,
                 wind_intensity: float = 0.0, sun_azimuth_angle: float = 0.0, sun_altitude_angle: float = 0.0,
                 fog_density: float = 0.0, fog_distance: float = 0.0, fog_falloff: float = 0.0,
                 wetness: float = 0.0, scattering_intensity: float = 0.0, mie_scattering_scale: float = 0.0,
                 rayleigh_scattering_scale: float = 0.0331, dust_storm: float = 0.0) -> None:
        values = locals()
        for name in _WEATHER_FIELDS:
            setattr(self, name, float(values[name]))

    def __eq__(self, other: object, /) -> bool:
        return isinstance(other, WeatherParameters) and all(
            abs(getattr(self, f) - getattr(other, f)) < 1e-6 for f in _WEATHER_FIELDS)

    def __repr__(self) -> str:
        return "WeatherParameters(" + ", ".join(f"{f}={getattr(self, f)}" for f in _WEATHER_FIELDS) + ")"


for _name, _values in _WEATHER_PRESETS.items():
    setattr(WeatherParameters, _name, WeatherParameters(*_values))


def weather_name(weather: WeatherParameters) -> str | None:
    """The preset a weather equals (test helper)."""
    for name in _WEATHER_PRESETS:
        if getattr(WeatherParameters, name) == weather:
            return name
    return None


class VehicleControl:
    def __init__(self, throttle: float = 0.0, steer: float = 0.0, brake: float = 0.0, hand_brake: bool = False,
                 reverse: bool = False, manual_gear_shift: bool = False, gear: int = 0) -> None:
        self.throttle, self.steer, self.brake = float(throttle), float(steer), float(brake)
        self.hand_brake, self.reverse = bool(hand_brake), bool(reverse)
        self.manual_gear_shift, self.gear = bool(manual_gear_shift), int(gear)

    def __repr__(self) -> str:
        return f"VehicleControl(throttle={self.throttle}, steer={self.steer}, brake={self.brake})"


# ------------------------------------------------------------------------------------------------
# Sensor data
# ------------------------------------------------------------------------------------------------

class SensorData:
    def __init__(self, frame: int, timestamp: float, transform: Transform) -> None:
        self.frame, self.timestamp, self.transform = int(frame), float(timestamp), transform


class Image(SensorData):
    def __init__(self, frame: int, timestamp: float, transform: Transform, width: int, height: int,
                 fov: float) -> None:
        super().__init__(frame, timestamp, transform)
        self.width, self.height, self.fov = int(width), int(height), float(fov)
        bgra = np.empty((self.height, self.width, 4), dtype=np.uint8)
        bgra[..., 0], bgra[..., 1], bgra[..., 2], bgra[..., 3] = 200, 100, frame % 256, 255
        self.raw_data = bgra.tobytes()


class CollisionEvent(SensorData):
    def __init__(self, frame: int, timestamp: float, transform: Transform, actor: Actor, other_actor: Actor,
                 normal_impulse: Vector3D) -> None:
        super().__init__(frame, timestamp, transform)
        self.actor, self.other_actor, self.normal_impulse = actor, other_actor, normal_impulse


class LaneMarking:
    def __init__(self, type: LaneMarkingType = LaneMarkingType.Broken) -> None:  # noqa: A002 - carla's name
        self.type = type
        self.lane_change = LaneChange.Both
        self.width = 0.15


class LaneInvasionEvent(SensorData):
    def __init__(self, frame: int, timestamp: float, transform: Transform, actor: Actor,
                 crossed_lane_markings: list[LaneMarking]) -> None:
        super().__init__(frame, timestamp, transform)
        self.actor, self.crossed_lane_markings = actor, crossed_lane_markings


# ------------------------------------------------------------------------------------------------
# The town: lanes, waypoints, map
# ------------------------------------------------------------------------------------------------

def _straight(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    n = max(2, int(math.hypot(x1 - x0, y1 - y0)) + 1)
    return np.stack([np.linspace(x0, x1, n), np.linspace(y0, y1, n)], axis=1)


def _arc(cx: float, cy: float, r: float, a0: float, a1: float) -> np.ndarray:
    a = np.radians(np.linspace(a0, a1, 19))
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], axis=1)


class _Lane:
    def __init__(self, road_id: int, lane_id: int, points: np.ndarray, junction: bool = False,
                 lane_change: LaneChange = LaneChange.NONE, width: float = 3.5, speed_limit: float = 30.0) -> None:
        self.road_id, self.lane_id, self.section_id = road_id, lane_id, 0
        self.points = np.asarray(points, dtype=np.float64)
        self.s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(self.points, axis=0), axis=1))])
        self.length = float(self.s[-1])
        self.junction, self.lane_change, self.width, self.speed_limit = junction, lane_change, width, speed_limit
        self.successors: list[_Lane] = []
        self.predecessors: list[_Lane] = []
        self.left: _Lane | None = None
        self.right: _Lane | None = None

    def pose(self, s: float) -> tuple[float, float, float]:
        s = float(np.clip(s, 0.0, self.length))
        i = int(np.clip(np.searchsorted(self.s, s, side="right") - 1, 0, len(self.points) - 2))
        a, b = self.points[i], self.points[i + 1]
        t = (s - self.s[i]) / max(self.s[i + 1] - self.s[i], 1e-9)
        p = a + t * (b - a)
        return float(p[0]), float(p[1]), math.degrees(math.atan2(b[1] - a[1], b[0] - a[0]))

    def project(self, x: float, y: float) -> tuple[float, float, float]:
        """(s, lateral offset positive right, distance) of the nearest point of the centre line."""
        a, b = self.points[:-1], self.points[1:]
        d = b - a
        seg2 = np.maximum(np.sum(d * d, axis=1), 1e-12)
        p = np.array([x, y])
        t = np.clip(np.sum((p - a) * d, axis=1) / seg2, 0.0, 1.0)
        closest = a + t[:, None] * d
        dist2 = np.sum((p - closest) ** 2, axis=1)
        i = int(np.argmin(dist2))
        heading = d[i] / math.sqrt(seg2[i])
        right = np.array([-heading[1], heading[0]])       # CARLA frame: y to the right of x
        lateral = float(np.dot(p - closest[i], right))
        return float(self.s[i] + t[i] * math.sqrt(seg2[i])), lateral, math.sqrt(float(dist2[i]))


def _build_town() -> list[_Lane]:
    road1_a = _Lane(1, -1, _straight(0, 0, 100, 0), lane_change=LaneChange.Right)
    road1_b = _Lane(1, -2, _straight(0, 3.5, 100, 3.5), lane_change=LaneChange.Left)
    straight_a = _Lane(10, -1, _straight(100, 0, 120, 0), junction=True)
    straight_b = _Lane(11, -1, _straight(100, 3.5, 120, 3.5), junction=True)
    left_turn = _Lane(12, -1, _arc(100, -10, 10, 90, 0), junction=True)      # ends heading -y (left)
    right_turn = _Lane(13, -1, _arc(100, 13.5, 10, -90, 0), junction=True)   # ends heading +y (right)
    road2_a = _Lane(2, -1, _straight(120, 0, 300, 0), lane_change=LaneChange.Right, speed_limit=90.0)
    road2_b = _Lane(2, -2, _straight(120, 3.5, 300, 3.5), lane_change=LaneChange.Left, speed_limit=90.0)
    road3 = _Lane(3, -1, _straight(110, -10, 110, -150))
    road4 = _Lane(4, -1, _straight(110, 13.5, 110, 150))
    road1_a.right, road1_b.left = road1_b, road1_a
    road2_a.right, road2_b.left = road2_b, road2_a
    for lane, nxt in ((road1_a, straight_a), (road1_a, left_turn), (road1_b, straight_b), (road1_b, right_turn),
                      (straight_a, road2_a), (straight_b, road2_b), (left_turn, road3), (right_turn, road4)):
        lane.successors.append(nxt)
        nxt.predecessors.append(lane)
    return [road1_a, road1_b, straight_a, straight_b, left_turn, right_turn, road2_a, road2_b, road3, road4]


FAKE_LANES = _build_town()


def _spawn_points() -> list[Transform]:
    out = []
    for lane in FAKE_LANES:
        if lane.junction:
            continue
        start = 5.0 if lane.road_id == 1 else 10.0
        for s in np.arange(start, lane.length - 5.0, 25.0):
            x, y, yaw = lane.pose(float(s))
            out.append(Transform(Location(x, y, 0.5), Rotation(yaw=yaw)))
    return out


SPAWN_POINTS = _spawn_points()


class Waypoint:
    def __init__(self, lane: _Lane, s: float) -> None:
        self._lane = lane
        self.s = float(np.clip(s, 0.0, lane.length))
        x, y, yaw = lane.pose(self.s)
        self.transform = Transform(Location(x, y, 0.0), Rotation(yaw=yaw))
        self.road_id, self.section_id, self.lane_id = lane.road_id, lane.section_id, lane.lane_id
        self.is_junction = lane.junction
        self.lane_width = lane.width
        self.lane_type = LaneType.Driving
        self.lane_change = lane.lane_change
        self.id = hash((lane.road_id, lane.lane_id, round(self.s, 3)))

    def next(self, distance: float) -> list[Waypoint]:
        target = self.s + float(distance)
        if target <= self._lane.length + 1e-9:
            return [Waypoint(self._lane, target)]
        rest = target - self._lane.length
        out: list[Waypoint] = []
        for succ in self._lane.successors:
            out.extend(Waypoint(succ, 0.0).next(rest))
        return out

    def previous(self, distance: float) -> list[Waypoint]:
        target = self.s - float(distance)
        if target >= -1e-9:
            return [Waypoint(self._lane, max(target, 0.0))]
        out: list[Waypoint] = []
        for pred in self._lane.predecessors:
            out.extend(Waypoint(pred, pred.length).previous(-target))
        return out

    def get_left_lane(self) -> Waypoint | None:
        lane = self._lane.left
        return None if lane is None else Waypoint(lane, min(self.s, lane.length))

    def get_right_lane(self) -> Waypoint | None:
        lane = self._lane.right
        return None if lane is None else Waypoint(lane, min(self.s, lane.length))

    def __repr__(self) -> str:
        return f"Waypoint(road={self.road_id}, lane={self.lane_id}, s={self.s:.1f})"


class Map:
    def __init__(self, town: str) -> None:
        self.name = f"Carla/Maps/{town}"

    def get_spawn_points(self) -> list[Transform]:
        return [Transform(t.location, t.rotation) for t in SPAWN_POINTS]

    def get_waypoint(self, location: Location, project_to_road: bool = True,
                     lane_type: LaneType = LaneType.Driving) -> Waypoint | None:
        best: tuple[float, _Lane, float, float] | None = None
        for lane in FAKE_LANES:
            s, lateral, dist = lane.project(location.x, location.y)
            if best is None or dist < best[0] - 1e-9:
                best = (dist, lane, s, lateral)
        assert best is not None
        dist, lane, s, lateral = best
        if not project_to_road and abs(lateral) > lane.width / 2:
            return None
        return Waypoint(lane, s)

    def get_topology(self) -> list[tuple[Waypoint, Waypoint]]:
        return [(Waypoint(lane, 0.0), Waypoint(lane, lane.length)) for lane in FAKE_LANES]

    def generate_waypoints(self, distance: float) -> list[Waypoint]:
        return [Waypoint(lane, float(s)) for lane in FAKE_LANES for s in np.arange(0.0, lane.length, distance)]


# ------------------------------------------------------------------------------------------------
# Blueprints
# ------------------------------------------------------------------------------------------------

class ActorAttribute:
    def __init__(self, id: str, value: str, recommended_values: Iterable[str] = (),  # noqa: A002
                 is_modifiable: bool = True) -> None:
        self.id, self._value = id, str(value)
        self.recommended_values = list(recommended_values)
        self.is_modifiable = is_modifiable

    def as_str(self) -> str:
        return self._value

    def as_int(self) -> int:
        return int(float(self._value))

    def as_float(self) -> float:
        return float(self._value)

    def as_bool(self) -> bool:
        return self._value.lower() in ("true", "1")

    def __str__(self) -> str:
        return self._value


class ActorBlueprint:
    def __init__(self, id: str, tags: Iterable[str] = (), attributes: dict[str, ActorAttribute] | None = None  # noqa: A002
                 ) -> None:
        self.id = id
        self.tags = list(tags)
        self._attributes = dict(attributes or {})

    def has_attribute(self, id: str, /) -> bool:  # noqa: A002
        return id in self._attributes

    def get_attribute(self, id: str, /) -> ActorAttribute:  # noqa: A002
        if id not in self._attributes:
            raise IndexError(f"no such attribute: {id}")
        return self._attributes[id]

    def set_attribute(self, id: str, value: str, /) -> None:  # noqa: A002
        if id not in self._attributes:
            raise IndexError(f"no such attribute: {id}")
        attr = self._attributes[id]
        if not attr.is_modifiable:
            raise RuntimeError(f"attribute '{id}' is not modifiable")
        if not isinstance(value, str):
            # The real binding takes str only (set_attribute( (ActorBlueprint)arg1, (str)arg2, (str)arg3)).
            raise TypeError(f"set_attribute value must be str, got {type(value).__name__}")
        self._attributes[id] = ActorAttribute(id, value, attr.recommended_values, attr.is_modifiable)

    def has_tag(self, tag: str, /) -> bool:
        return tag in self.tags

    def fake_values(self) -> dict[str, str]:
        return {k: a.as_str() for k, a in self._attributes.items()}


def _attrs(**values: Any) -> dict[str, ActorAttribute]:
    out = {}
    for key, value in values.items():
        if isinstance(value, tuple):
            out[key] = ActorAttribute(key, value[0], value)
        else:
            out[key] = ActorAttribute(key, value)
    return out


def _library() -> list[ActorBlueprint]:
    def vehicle(bp_id: str, base_type: str, wheels: int) -> ActorBlueprint:
        return ActorBlueprint(bp_id, ["vehicle", base_type], _attrs(
            role_name="autopilot", number_of_wheels=str(wheels), base_type=base_type,
            color=("255,0,0", "0,0,255", "20,20,20")))

    bps = [
        vehicle("vehicle.lincoln.mkz_2020", "car", 4),
        vehicle("vehicle.tesla.model3", "car", 4),
        vehicle("vehicle.audi.tt", "car", 4),
        vehicle("vehicle.carlamotors.carlacola", "truck", 4),
        vehicle("vehicle.mercedes.sprinter", "van", 4),
        vehicle("vehicle.harley-davidson.low_rider", "motorcycle", 2),
        vehicle("vehicle.diamondback.century", "bicycle", 2),
        ActorBlueprint("walker.pedestrian.0001", ["walker", "pedestrian"],
                       _attrs(role_name="walker", is_invincible="true", speed=("0.0", "1.4", "2.8"))),
        ActorBlueprint("walker.pedestrian.0002", ["walker", "pedestrian"],
                       _attrs(role_name="walker", is_invincible="true", speed=("0.0", "1.2", "2.4"))),
        ActorBlueprint("controller.ai.walker", ["controller", "walker"], {}),
        ActorBlueprint("sensor.camera.rgb", ["sensor", "camera", "rgb"], _attrs(
            role_name="front", image_size_x="800", image_size_y="600", fov="90.0", sensor_tick="0.0")),
        ActorBlueprint("sensor.other.collision", ["sensor", "other", "collision"], _attrs(role_name="front")),
        ActorBlueprint("sensor.other.lane_invasion", ["sensor", "other", "lane_invasion"], _attrs(role_name="front")),
    ]
    return bps


class BlueprintLibrary:
    def __init__(self, blueprints: Iterable[ActorBlueprint]) -> None:
        self._bps = list(blueprints)

    def filter(self, wildcard_pattern: str) -> BlueprintLibrary:
        return BlueprintLibrary(b for b in self._bps if fnmatch.fnmatch(b.id, wildcard_pattern)
                                or any(fnmatch.fnmatch(t, wildcard_pattern) for t in b.tags))

    def find(self, id: str) -> ActorBlueprint:  # noqa: A002
        for bp in self._bps:
            if bp.id == id:
                return bp
        raise IndexError(f"blueprint '{id}' not found")

    def __iter__(self) -> Iterator[ActorBlueprint]:
        return iter(self._bps)

    def __len__(self) -> int:
        return len(self._bps)

    def __getitem__(self, index: int, /) -> ActorBlueprint:
        return self._bps[index]


# ------------------------------------------------------------------------------------------------
# Actors
# ------------------------------------------------------------------------------------------------

class Actor:
    def __init__(self, world: World, actor_id: int, blueprint: ActorBlueprint, transform: Transform,
                 parent: Actor | None = None) -> None:
        self._world = world
        self.id = actor_id
        self.type_id = blueprint.id
        self.attributes = blueprint.fake_values()
        self.parent = parent
        self._transform = Transform(transform.location, transform.rotation)
        self._velocity = Vector3D()
        self.fake_destroyed = False
        half = {"vehicle": (2.4, 1.0), "walker": (0.3, 0.3)}.get(self.type_id.split(".")[0], (0.1, 0.1))
        self.bounding_box = BoundingBox(Location(), Vector3D(half[0], half[1], 0.8))

    @property
    def is_alive(self) -> bool:
        return not self.fake_destroyed and self.id in self._world.fake_actors

    def get_transform(self) -> Transform:
        if self.parent is None:
            return Transform(self._transform.location, self._transform.rotation)
        p = self.parent.get_transform()
        yaw = math.radians(p.rotation.yaw)
        off = self._transform.location
        loc = Location(p.location.x + off.x * math.cos(yaw) - off.y * math.sin(yaw),
                       p.location.y + off.x * math.sin(yaw) + off.y * math.cos(yaw), p.location.z + off.z)
        return Transform(loc, Rotation(p.rotation.pitch, p.rotation.yaw + self._transform.rotation.yaw))

    def get_location(self) -> Location:
        return self.get_transform().location

    def get_velocity(self) -> Vector3D:
        return Vector3D(self._velocity.x, self._velocity.y, self._velocity.z)

    def set_transform(self, transform: Transform) -> None:
        self._world._server.rpc("Actor.set_transform")
        self._transform = Transform(transform.location, transform.rotation)

    def destroy(self) -> bool:
        self._world._server.rpc("Actor.destroy")
        return self._world.fake_destroy(self.id)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id}, type={self.type_id})"


class Vehicle(Actor):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._control = VehicleControl()
        self.fake_autopilot = False
        self.fake_tm_port: int | None = None
        self.fake_speed = 0.0

    def apply_control(self, control: VehicleControl) -> None:
        self._world._server.rpc("Vehicle.apply_control")
        self._control = control

    def get_control(self) -> VehicleControl:
        return self._control

    def set_autopilot(self, enabled: bool = True, tm_port: int = 8000) -> None:
        self._world._server.rpc("Vehicle.set_autopilot")
        self.fake_autopilot, self.fake_tm_port = bool(enabled), int(tm_port)

    def get_speed_limit(self) -> float:
        loc = self._transform.location
        best = min(FAKE_LANES, key=lambda lane: lane.project(loc.x, loc.y)[2])
        return best.speed_limit

    def fake_step(self, dt: float) -> None:
        """Kinematic bicycle: throttle 5 m/s², brake 8 m/s², 70° full steer (as CARLA's sedans), 2.8 m wheelbase."""
        if self.fake_autopilot:
            return
        c = self._control
        accel = 5.0 * c.throttle - 8.0 * c.brake - 0.05 * self.fake_speed
        self.fake_speed = max(0.0, self.fake_speed + accel * dt)
        t = self._transform
        yaw = math.radians(t.rotation.yaw)
        yaw += self.fake_speed / 2.8 * math.tan(c.steer * math.radians(70.0)) * dt
        t.location.x += self.fake_speed * math.cos(yaw) * dt
        t.location.y += self.fake_speed * math.sin(yaw) * dt
        t.location.z = 0.0
        t.rotation.yaw = math.degrees(yaw)
        self._velocity = Vector3D(self.fake_speed * math.cos(yaw), self.fake_speed * math.sin(yaw), 0.0)


class Walker(Actor):
    pass


class WalkerAIController(Actor):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fake_started = False
        self.fake_target: Location | None = None
        self.fake_max_speed: float | None = None

    def start(self) -> None:
        self._world._server.rpc("WalkerAIController.start")
        if self.fake_started is False and self._world.fake_ticks_since_spawn(self.id) < 1:
            raise RuntimeError("walker controller started before a tick (fake check)")
        self.fake_started = True

    def stop(self) -> None:
        self._world._server.rpc("WalkerAIController.stop")
        self.fake_started = False

    def go_to_location(self, destination: Location) -> None:
        self._world._server.rpc("WalkerAIController.go_to_location")
        self.fake_target = destination

    def set_max_speed(self, speed: float) -> None:
        self._world._server.rpc("WalkerAIController.set_max_speed")
        self.fake_max_speed = float(speed)


class Sensor(Actor):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._callback: Callable[[Any], None] | None = None

    def listen(self, callback: Callable[[Any], None]) -> None:
        self._world._server.rpc("Sensor.listen")
        self._callback = callback

    def stop(self) -> None:
        self._world._server.rpc("Sensor.stop")
        self._callback = None

    def is_listening(self) -> bool:
        return self._callback is not None

    def fake_emit(self, data: Any) -> None:
        if self._callback is not None:
            self._callback(data)


class ActorList(list):
    def filter(self, wildcard_pattern: str) -> ActorList:
        return ActorList(a for a in self if fnmatch.fnmatch(a.type_id, wildcard_pattern))

    def find(self, id: int) -> Actor | None:  # noqa: A002 - carla's name
        return next((a for a in self if a.id == id), None)


def _actor_class(type_id: str) -> type[Actor]:
    if type_id.startswith("vehicle."):
        return Vehicle
    if type_id.startswith("walker."):
        return Walker
    if type_id == "controller.ai.walker":
        return WalkerAIController
    if type_id.startswith("sensor."):
        return Sensor
    return Actor


# ------------------------------------------------------------------------------------------------
# World, traffic manager, client
# ------------------------------------------------------------------------------------------------

_EPISODES = itertools.count(1)


class World:
    def __init__(self, server: FakeServer, town: str) -> None:
        self._server = server
        self.id = next(_EPISODES)          # the episode: a new one after every load or restart
        self.fake_town = town
        self._map = Map(town)
        self._settings = WorldSettings()
        self._weather = copy.copy(WeatherParameters.ClearNoon)
        self.fake_actors: dict[int, Actor] = {}
        self._spawned_at: dict[int, int] = {}
        self._pending_collisions: list[tuple[int, int | None]] = []
        self._pending_invasions: list[int] = []
        self._last_lane: dict[int, tuple[int, int]] = {}
        self._contacts: set[tuple[int, int]] = set()
        self._nav_rng = random.Random(0)
        self.fake_pedestrians_seed: int | None = None
        self.fake_settings_applied: list[WorldSettings] = []
        self.fake_map_requests = 0
        self._spectator = Actor(self, server.fake_new_id(), ActorBlueprint("spectator"), Transform())

    # -- real API ------------------------------------------------------------------------------
    def get_map(self) -> Map:
        self._server.rpc("World.get_map")
        self.fake_map_requests += 1
        return self._map

    def get_settings(self) -> WorldSettings:
        self._server.rpc("World.get_settings")
        return copy.copy(self._settings)

    def apply_settings(self, settings: WorldSettings, seconds: float = 0.0) -> int:
        self._server.rpc("World.apply_settings")
        self._settings = copy.copy(settings)
        self.fake_settings_applied.append(copy.copy(settings))
        return self._server.fake_frame

    def get_blueprint_library(self) -> BlueprintLibrary:
        self._server.rpc("World.get_blueprint_library")
        return BlueprintLibrary(_library())

    def set_weather(self, weather: WeatherParameters, /) -> None:
        self._server.rpc("World.set_weather")
        self._weather = copy.copy(weather)

    def get_weather(self) -> WeatherParameters:
        self._server.rpc("World.get_weather")
        return copy.copy(self._weather)

    def get_spectator(self) -> Actor:
        self._server.rpc("World.get_spectator")
        return self._spectator

    def set_pedestrians_seed(self, seed: int) -> None:
        self._server.rpc("World.set_pedestrians_seed")
        self.fake_pedestrians_seed = int(seed)
        self._nav_rng = random.Random(int(seed))

    def get_random_location_from_navigation(self) -> Location | None:
        self._server.rpc("World.get_random_location_from_navigation")
        # Sidewalks beside road 1 and road 2.
        side = self._nav_rng.choice((-6.0, 9.5))
        return Location(self._nav_rng.uniform(0.0, 300.0), side, 0.9)

    def spawn_actor(self, blueprint: ActorBlueprint, transform: Transform, attach_to: Actor | None = None,
                    attachment_type: AttachmentType = AttachmentType.Rigid, bone: str = "") -> Actor:
        self._server.rpc("World.spawn_actor")
        actor = self.fake_spawn(blueprint, transform, attach_to)
        if actor is None:
            raise RuntimeError("Spawn failed because of collision at spawn position")
        return actor

    def try_spawn_actor(self, blueprint: ActorBlueprint, transform: Transform, attach_to: Actor | None = None,
                        attachment_type: AttachmentType = AttachmentType.Rigid, bone: str = "") -> Actor | None:
        self._server.rpc("World.try_spawn_actor")
        return self.fake_spawn(blueprint, transform, attach_to)

    def get_actor(self, actor_id: int) -> Actor | None:
        self._server.rpc("World.get_actor")
        return self.fake_actors.get(int(actor_id))

    def get_actors(self, actor_ids: list[int] | None = None) -> ActorList:
        self._server.rpc("World.get_actors")
        if actor_ids is None:
            return ActorList(self.fake_actors.values())
        return ActorList(self.fake_actors[i] for i in actor_ids if i in self.fake_actors)

    def tick(self, seconds: float = 0.0) -> int:
        self._server.rpc("World.tick")
        server = self._server
        server.fake_frame += 1
        frame = server.fake_frame
        dt = self._settings.fixed_delta_seconds or DEFAULT_DELTA
        server.fake_sim_time += dt
        actors = list(self.fake_actors.values())
        for actor in actors:
            if isinstance(actor, Vehicle):
                actor.fake_step(dt)
        sensors = [a for a in actors if isinstance(a, Sensor) and a.is_listening()]
        self._emit_collisions(frame, sensors)
        self._emit_lane_invasions(frame, sensors)
        for sensor in sensors:
            if sensor.type_id == "sensor.camera.rgb" and not server.drop_images:
                w = int(sensor.attributes.get("image_size_x", "800"))
                h = int(sensor.attributes.get("image_size_y", "600"))
                fov = float(sensor.attributes.get("fov", "90"))
                for k in range(server.stale_images, 0, -1):
                    sensor.fake_emit(Image(max(0, frame - k), server.fake_sim_time, sensor.get_transform(), w, h, fov))
                sensor.fake_emit(Image(frame, server.fake_sim_time, sensor.get_transform(), w, h, fov))
        return frame

    # -- fake internals and test hooks ---------------------------------------------------------
    def fake_spawn(self, blueprint: ActorBlueprint, transform: Transform, parent: Actor | None) -> Actor | None:
        kind = blueprint.id.split(".")[0]
        if parent is None and kind in ("vehicle", "walker"):
            for other in self.fake_actors.values():
                other_kind = other.type_id.split(".")[0]
                clearance = 2.0 if kind == other_kind == "vehicle" else 0.7
                if other_kind in ("vehicle", "walker") and other.parent is None and \
                        other.get_location().distance(transform.location) < clearance:
                    return None
        if parent is not None and parent.id not in self.fake_actors:
            raise RuntimeError(f"parent actor {parent.id} not found")
        actor = _actor_class(blueprint.id)(self, self._server.fake_new_id(), blueprint, transform, parent)
        self.fake_actors[actor.id] = actor
        self._spawned_at[actor.id] = self._server.fake_frame
        return actor

    def fake_destroy(self, actor_id: int) -> bool:
        actor = self.fake_actors.pop(int(actor_id), None)
        if actor is None:
            return False
        if isinstance(actor, Sensor) and actor.is_listening():
            self._server.fake_destroyed_while_listening.append(actor.id)
        actor.fake_destroyed = True
        self._server.fake_destroyed.append(actor.id)
        return True

    def fake_ticks_since_spawn(self, actor_id: int) -> int:
        return self._server.fake_frame - self._spawned_at.get(actor_id, self._server.fake_frame)

    def fake_inject_collision(self, actor: Actor, other: Actor | None = None) -> None:
        """On the next tick, the collision sensors of ``actor`` report a hit with ``other``."""
        self._pending_collisions.append((actor.id, None if other is None else other.id))

    def fake_inject_lane_invasion(self, actor: Actor) -> None:
        """On the next tick, the lane-invasion sensors of ``actor`` report a crossed broken line."""
        self._pending_invasions.append(actor.id)

    def fake_sensors_of(self, actor: Actor, type_id: str) -> list[Sensor]:
        return [a for a in self.fake_actors.values()
                if isinstance(a, Sensor) and a.parent is actor and a.type_id == type_id]

    def _emit_collisions(self, frame: int, sensors: list[Sensor]) -> None:
        carriers = {s.parent.id for s in sensors if s.type_id == "sensor.other.collision" and s.parent is not None}
        events: list[tuple[int, int | None]] = list(self._pending_collisions)
        self._pending_collisions.clear()
        bodies = [a for a in self.fake_actors.values()
                  if a.parent is None and a.type_id.split(".")[0] in ("vehicle", "walker")]
        contacts: set[tuple[int, int]] = set()
        for aid in carriers:
            a = self.fake_actors.get(aid)
            if a is None:
                continue
            for b in bodies:
                if b is a:
                    continue
                reach = a.bounding_box.extent.x + b.bounding_box.extent.x * 0.5
                if a.get_location().distance(b.get_location()) < reach:
                    contacts.add((a.id, b.id))
        # Like CARLA, a contact reports on every tick it lasts.
        events.extend(contacts)
        self._contacts = contacts
        for aid, oid in events:
            actor = self.fake_actors.get(aid)
            other = self.fake_actors.get(oid) if oid is not None else self._spectator
            if actor is None:
                continue
            for sensor in sensors:
                if sensor.type_id == "sensor.other.collision" and sensor.parent is actor:
                    sensor.fake_emit(CollisionEvent(frame, self._server.fake_sim_time, actor.get_transform(),
                                                    actor, other, Vector3D(1000.0, 0.0, 0.0)))

    def _emit_lane_invasions(self, frame: int, sensors: list[Sensor]) -> None:
        invaded = list(self._pending_invasions)
        self._pending_invasions.clear()
        for sensor in sensors:
            if sensor.type_id != "sensor.other.lane_invasion" or sensor.parent is None:
                continue
            actor = sensor.parent
            loc = actor.get_location()
            wp = self._map.get_waypoint(loc)
            key = (wp.road_id, wp.lane_id)
            last = self._last_lane.get(actor.id)
            self._last_lane[actor.id] = key
            if (last is not None and last[0] == key[0] and last[1] != key[1]) or actor.id in invaded:
                sensor.fake_emit(LaneInvasionEvent(frame, self._server.fake_sim_time, actor.get_transform(),
                                                   actor, [LaneMarking(LaneMarkingType.Broken)]))


class TrafficManager:
    def __init__(self, server: FakeServer, port: int) -> None:
        self._server = server
        self._port = int(port)
        self.fake_synchronous_mode = False
        self.fake_seed: int | None = None
        self.fake_leading_distance: float | None = None
        self.fake_speed_difference: float | None = None
        self.fake_hybrid_physics: bool | None = None

    def set_synchronous_mode(self, mode_switch: bool) -> None:
        self._server.rpc("TrafficManager.set_synchronous_mode")
        self.fake_synchronous_mode = bool(mode_switch)

    def set_random_device_seed(self, value: int) -> None:
        self._server.rpc("TrafficManager.set_random_device_seed")
        self.fake_seed = int(value)

    def set_global_distance_to_leading_vehicle(self, distance: float) -> None:
        self._server.rpc("TrafficManager.set_global_distance_to_leading_vehicle")
        self.fake_leading_distance = float(distance)

    def global_percentage_speed_difference(self, percentage: float) -> None:
        self._server.rpc("TrafficManager.global_percentage_speed_difference")
        self.fake_speed_difference = float(percentage)

    def set_hybrid_physics_mode(self, enabled: bool) -> None:
        self._server.rpc("TrafficManager.set_hybrid_physics_mode")
        self.fake_hybrid_physics = bool(enabled)

    def get_port(self) -> int:
        return self._port


class _Response:
    """carla.command.Response (cannot be built from Python in the real API)."""

    def __init__(self, actor_id: int, error: str = "") -> None:
        self.actor_id, self.error = int(actor_id), str(error)

    def has_error(self) -> bool:
        return bool(self.error)


class _SpawnActor:
    def __init__(self, blueprint: ActorBlueprint, transform: Transform, parent: Actor | int | None = None) -> None:
        # The real command holds the blueprint by value: later set_attribute calls do not change it.
        self.fake_blueprint = copy.deepcopy(blueprint)
        self.transform = Transform(transform.location, transform.rotation)
        self.parent_id = parent if isinstance(parent, int) or parent is None else parent.id
        self.fake_then: list[Any] = []

    def then(self, command: Any) -> _SpawnActor:
        self.fake_then.append(command)
        return self


class _DestroyActor:
    def __init__(self, actor: Actor | int) -> None:
        self.actor_id = int(actor) if isinstance(actor, int) else int(actor.id)


class _SetAutopilot:
    def __init__(self, actor: Actor | int, enabled: bool, tm_port: int = 8000) -> None:
        self.actor_id = int(actor) if isinstance(actor, int) else int(actor.id)
        self.enabled, self.tm_port = bool(enabled), int(tm_port)


_SpawnActor.__name__ = _SpawnActor.__qualname__ = "SpawnActor"
_DestroyActor.__name__ = _DestroyActor.__qualname__ = "DestroyActor"
_SetAutopilot.__name__ = _SetAutopilot.__qualname__ = "SetAutopilot"
_Response.__name__ = _Response.__qualname__ = "Response"

command = types.ModuleType("fake_carla.command", "carla.command: batch commands")
command.SpawnActor = _SpawnActor            # type: ignore[attr-defined]
command.DestroyActor = _DestroyActor        # type: ignore[attr-defined]
command.SetAutopilot = _SetAutopilot        # type: ignore[attr-defined]
command.FutureActor = 0                     # type: ignore[attr-defined]
command.Response = _Response                # type: ignore[attr-defined]


class Client:
    def __init__(self, host: str = "127.0.0.1", port: int = 2000, worker_threads: int = 0) -> None:
        self.fake_host, self.fake_port = str(host), int(port)
        self._timeout = 5.0

    def _server(self, name: str) -> FakeServer:
        server = _SERVERS.get((_norm_host(self.fake_host), self.fake_port))
        if server is None:
            raise RuntimeError(TIMEOUT_TEMPLATE.format(ms=int(self._timeout * 1000), host=self.fake_host,
                                                       port=self.fake_port))
        server.fake_client_timeout = self._timeout
        server.rpc(name)
        return server

    def set_timeout(self, seconds: float) -> None:
        self._timeout = float(seconds)

    def get_client_version(self) -> str:
        return VERSION

    def get_server_version(self) -> str:
        return self._server("Client.get_server_version").version

    def get_world(self) -> World:
        return self._server("Client.get_world").world

    def load_world(self, map_name: str, reset_settings: bool = True) -> World:
        server = self._server("Client.load_world")
        town = str(map_name).rstrip("/").rsplit("/", 1)[-1]
        if town not in server.fake_towns:
            raise RuntimeError(f"map '{map_name}' not found")
        server.fake_load(town, reset_settings)
        return server.world

    def get_available_maps(self) -> list[str]:
        server = self._server("Client.get_available_maps")
        return [f"/Game/Carla/Maps/{t}" for t in server.fake_towns]

    def get_trafficmanager(self, port: int = 8000) -> TrafficManager:
        server = self._server("Client.get_trafficmanager")
        if port in (server.port, server.port + 1, server.port + 2):
            raise RuntimeError("trying to create rpc server for traffic manager; but the system failed to "
                               "create because of bind error.")
        return server.traffic_managers.setdefault(int(port), TrafficManager(server, int(port)))

    def apply_batch(self, commands: Iterable[Any], do_tick: bool = False) -> None:
        self.apply_batch_sync(commands, do_tick)

    def apply_batch_sync(self, commands: Iterable[Any], do_tick: bool = False) -> list[_Response]:
        server = self._server("Client.apply_batch_sync")
        world = server.world
        responses = []
        for cmd in commands:
            responses.append(server.fake_execute(world, cmd))
        if do_tick:
            world.tick()
        return responses


# ------------------------------------------------------------------------------------------------
# Servers (test control)
# ------------------------------------------------------------------------------------------------

class FakeServer:
    """One simulated CARLA server; tests drive failures and sensor behaviour through it."""

    fake_towns = ("Town01", "Town02", "Town03", "Town04", "Town05", "Town06", "Town07", "Town10HD")

    def __init__(self, host: str, port: int, town: str = "Town01") -> None:
        self.host, self.port = host, int(port)
        self.version = VERSION
        self.alive = True
        self.failures: list[str] = []
        self.calls: list[str] = []
        self.traffic_managers: dict[int, TrafficManager] = {}
        self.stale_images = 0
        self.drop_images = False
        self.fake_frame = 0
        self.fake_sim_time = 0.0
        self.fake_client_timeout = 5.0
        self.fake_destroyed: list[int] = []
        self.fake_destroyed_while_listening: list[int] = []
        self.loads: list[str] = []
        self._ids = itertools.count(100)
        self.world = World(self, town)

    # -- failure control -------------------------------------------------------------------------
    def timeout_message(self) -> str:
        return TIMEOUT_TEMPLATE.format(ms=int(self.fake_client_timeout * 1000), host=self.host, port=self.port)

    def fail_next(self, count: int = 1, message: str | None = None) -> None:
        """The next ``count`` server calls raise ``RuntimeError(message)`` (default: the client time-out)."""
        self.failures.extend([message or self.timeout_message()] * count)

    def kill(self) -> None:
        """The server stops answering: every call times out."""
        self.alive = False

    def revive(self) -> None:
        """The server answers again, with its state (it was only stuck)."""
        self.alive = True

    def restart(self, town: str | None = None) -> None:
        """A fresh server process on the same ports: no actors, default settings, no traffic managers."""
        self.alive = True
        self.failures.clear()
        self.traffic_managers.clear()
        self._ids = itertools.count(100)    # a new process numbers its actors from the start again
        self.world = World(self, town or self.world.fake_town)

    def rpc(self, name: str) -> None:
        self.calls.append(name)
        if not self.alive:
            raise RuntimeError(self.timeout_message())
        if self.failures:
            raise RuntimeError(self.failures.pop(0))

    # -- internals -------------------------------------------------------------------------------
    def fake_new_id(self) -> int:
        return next(self._ids)

    def fake_load(self, town: str, reset_settings: bool) -> None:
        settings = self.world._settings
        self.loads.append(town)
        self.world = World(self, town)
        if not reset_settings:
            self.world._settings = settings

    def fake_execute(self, world: World, cmd: Any) -> _Response:
        if isinstance(cmd, _SpawnActor):
            parent = world.fake_actors.get(cmd.parent_id) if cmd.parent_id is not None else None
            if cmd.parent_id is not None and parent is None:
                return _Response(0, f"parent actor {cmd.parent_id} not found")
            actor = world.fake_spawn(cmd.fake_blueprint, cmd.transform, parent)
            if actor is None:
                return _Response(0, "Spawn failed because of collision at spawn position")
            for then in cmd.fake_then:
                if isinstance(then, _SetAutopilot) and isinstance(actor, Vehicle):
                    actor.fake_autopilot, actor.fake_tm_port = then.enabled, then.tm_port
            return _Response(actor.id)
        if isinstance(cmd, _DestroyActor):
            ok = world.fake_destroy(cmd.actor_id)
            return _Response(cmd.actor_id, "" if ok else f"unable to destroy actor {cmd.actor_id}: not found")
        if isinstance(cmd, _SetAutopilot):
            actor = world.fake_actors.get(cmd.actor_id)
            if isinstance(actor, Vehicle):
                actor.fake_autopilot, actor.fake_tm_port = cmd.enabled, cmd.tm_port
                return _Response(actor.id)
            return _Response(cmd.actor_id, "not a vehicle")
        raise TypeError(f"fake carla does not run {type(cmd).__name__} commands")

    def alive_actors(self, prefix: str = "") -> list[Actor]:
        return [a for a in self.world.fake_actors.values() if a.type_id.startswith(prefix)]


_SERVERS: dict[tuple[str, int], FakeServer] = {}


def _norm_host(host: str) -> str:
    return "localhost" if host in ("127.0.0.1", "localhost", "") else host


def start_server(host: str = "localhost", port: int = 2000, town: str = "Town01") -> FakeServer:
    """Register a running server at host:port (replacing one there)."""
    server = FakeServer(_norm_host(host), port, town)
    _SERVERS[(_norm_host(host), int(port))] = server
    return server


def get_server(host: str = "localhost", port: int = 2000) -> FakeServer:
    return _SERVERS[(_norm_host(host), int(port))]


def stop_server(host: str = "localhost", port: int = 2000) -> None:
    """The server process is gone: the port answers nothing."""
    _SERVERS.pop((_norm_host(host), int(port)), None)


def reset() -> None:
    """Forget every server (call between tests)."""
    _SERVERS.clear()
