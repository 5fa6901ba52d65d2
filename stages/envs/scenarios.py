"""Scenario names (the seed's urban, highway, night, rain, plus merge, roundabout, racetrack).

Each name maps to data for the embedded backend (a highway-env env id and config, read by
`stages.envs.highway`) and for the CARLA backend (town, weather preset, traffic), which
`stages.envs.carla_bridge` reads. This module is plain data: it imports nothing of the project.

highway-env has no weather or lighting: ``night`` and ``rain`` are the highway road with an image
transform (``appearance``) applied to the rendered frame — darkness with a headlight cone and sensor
noise, or rain streaks with blur. They change what the policy sees, not the physics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from collections.abc import Mapping
from typing import Any, Literal

RouteKind = Literal["open_road", "destination", "loop"]
Appearance = Literal["day", "night", "rain"]

# The seed's "Available Towns" table, as data.
CARLA_TOWNS: tuple[dict[str, str], ...] = (
    {"town": "Town01", "description": "Small town, simple layout", "best_for": "Basic training"},
    {"town": "Town02", "description": "Small town, more junctions", "best_for": "Junction handling"},
    {"town": "Town03", "description": "Larger town, highway", "best_for": "Highway driving"},
    {"town": "Town04", "description": "Small town with highway loop", "best_for": "Mixed scenarios"},
    {"town": "Town05", "description": "Urban grid, multi-lane", "best_for": "Urban driving"},
    {"town": "Town06", "description": "Low density, long roads", "best_for": "Highway training"},
    {"town": "Town07", "description": "Rural, narrow roads", "best_for": "Rural driving"},
    {"town": "Town10", "description": "Urban, complex junctions", "best_for": "Advanced training"},
)


@dataclass(frozen=True)
class CarlaScenario:
    """What the seed's `setup_training_scenario` does for a scenario, as data."""

    town: str | None = None               # None: keep the configured town
    weather: str | None = None            # a `carla.WeatherParameters` preset name
    vehicles: int = 30
    pedestrians: int = 0
    vehicle_type: Literal["any", "fast"] = "any"
    distance_to_leading_vehicle: float | None = None  # traffic manager, metres


@dataclass(frozen=True)
class ScenarioSpec:
    name: str
    env_id: str                           # highway-env's registered id
    description: str                      # how captions name the place
    target_speed: float                   # m/s, RewardConfig.target_speed when unset
    view_distance: float                  # metres the observation image spans
    route_kind: RouteKind                 # open_road: a distance along the road; destination: a goal
    default_vehicles: int                 # other vehicles when EnvConfig.vehicles_count is None
    # highway-env config key for the vehicle count; None: merge places its main-road cars itself,
    # roundabout-v0 has a fixed layout (vehicles_count is ignored there, with a warning).
    vehicles_key: str | None
    sim_config: Mapping[str, Any] = field(default_factory=dict)
    appearance: Appearance = "day"
    world_centering: tuple[float, float] = (0.3, 0.5)  # ego position in the image for view="world"
    carla: CarlaScenario = CarlaScenario()


_HIGHWAY_ROAD: Mapping[str, Any] = MappingProxyType({"lanes_count": 3, "ego_spacing": 1.5, "vehicles_density": 1.0})

SCENARIOS: Mapping[str, ScenarioSpec] = MappingProxyType({
    "highway": ScenarioSpec(
        "highway", "highway-fast-v0", "a three-lane highway", 25.0, 60.0, "open_road", 20, "vehicles_count",
        _HIGHWAY_ROAD, carla=CarlaScenario(town="Town06", vehicles=30, vehicle_type="fast")),
    "urban": ScenarioSpec(
        "urban", "intersection-v0", "a four-way urban intersection", 8.33, 50.0, "destination", 10,
        "initial_vehicle_count", {"spawn_probability": 0.6}, world_centering=(0.5, 0.6),
        carla=CarlaScenario(vehicles=50, pedestrians=30, distance_to_leading_vehicle=2.0)),
    "merge": ScenarioSpec(
        "merge", "merge-v0", "an on-ramp merging onto a two-lane highway", 25.0, 60.0, "destination", 6, None,
        carla=CarlaScenario(town="Town04", vehicles=30)),
    "roundabout": ScenarioSpec(
        "roundabout", "roundabout-v0", "a two-lane roundabout", 8.33, 60.0, "destination", 4, None,
        world_centering=(0.5, 0.6), carla=CarlaScenario(town="Town03", vehicles=30)),
    "racetrack": ScenarioSpec(
        "racetrack", "racetrack-v0", "a winding two-lane track", 8.33, 50.0, "loop", 1, "other_vehicles",
        world_centering=(0.5, 0.5), carla=CarlaScenario(town="Town07", vehicles=10)),
    "night": ScenarioSpec(
        "night", "highway-fast-v0", "a three-lane highway at night", 25.0, 60.0, "open_road", 20,
        "vehicles_count", _HIGHWAY_ROAD, appearance="night", carla=CarlaScenario(weather="ClearNight")),
    "rain": ScenarioSpec(
        "rain", "highway-fast-v0", "a three-lane highway in the rain", 25.0, 60.0, "open_road", 20,
        "vehicles_count", _HIGHWAY_ROAD, appearance="rain", carla=CarlaScenario(weather="WetCloudySunset")),
})


def get_scenario(name: str) -> ScenarioSpec:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ValueError(f"scenario={name!r} is not one of {sorted(SCENARIOS)}") from None

