"""Per scenario, what the ego is asked to do on highway-env: its route, the yield lines, the command.

One `Mission` class per kind of task, one instance per episode (`MISSIONS` maps scenario names to
them); the simulator side of a scenario (its traffic class, its sim class, extra highway-env config
keys) is a class attribute or class method of the same mission, so a scenario lives in one place:

- `OpenRoadMission` (highway, night, rain): a distance along an open road; now and then a lane
  change is asked for;
- `LoopMission` (racetrack): a distance along a loop; the command names the bends;
- `IntersectionMission` (urban): through the junction to one of its three exits;
- `RoundaboutMission`: to the first, second or third exit;
- `MergeMission`: from the on-ramp onto the main road.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.envs import captions
from stages.envs.config import EnvConfig
from stages.envs.geometry import wrap_angle
from stages.envs.highway.route import LaneRoute
from stages.envs.highway.sims import (
    QuietSim, RampMergeSim, TrafficVehicle, UrbanTrafficVehicle, vehicles_count)
from stages.envs.scenarios import get_scenario


class Mission:
    """The task of one episode (see the module docstring); subclasses fill in `plan` and `command`."""

    traffic: type = TrafficVehicle   # class of the other vehicles
    sim_mixin: type = QuietSim       # put in front of highway-env's env class
    places_own_traffic = False       # the sim places its traffic itself and reads the count from `sim_overrides`

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        # Drawn on every scenario (only open roads use it) so that seeded episodes stay what they were.
        self.first_lane_change = float(rng.uniform(3.0, 8.0))
        self.destination: str | None = None
        self.exit_number: int | None = None
        # Route roads whose start is a yield line (give way to crossing / circulating traffic there).
        self.yield_roads: frozenset[int] = frozenset()

    @classmethod
    def sim_overrides(cls, cfg: EnvConfig) -> dict[str, Any]:
        """highway-env config keys of this scenario beyond `sims.highway_env_config`."""
        return {}

    def plan(self, network: Any, ego: Any, episode_distance: float) -> tuple[LaneRoute, float]:
        """The episode's route and its length (m) from the ego's start."""
        raise NotImplementedError

    def command(self, route: LaneRoute, time: float) -> str:
        """The text command at simulated ``time`` s, the ego at its place on ``route``."""
        raise NotImplementedError


def _route_to(network: Any, ego: Any, destination: str) -> LaneRoute:
    start = ego.lane_index
    nodes = network.shortest_path(start[1], destination)
    roads = [start[:2]] + list(zip(nodes[:-1], nodes[1:]))
    return LaneRoute(network, roads, start, ego.position, extendable=False)


@dataclass
class LaneChangePlan:
    """Open-road command planner: now and then, ask for a lane change."""

    target: int | None = None
    deadline: float = 0.0
    next_time: float = 0.0


class OpenRoadMission(Mission):
    def __init__(self, rng: np.random.Generator) -> None:
        super().__init__(rng)
        self.lane_plan = LaneChangePlan(next_time=self.first_lane_change)

    def plan(self, network: Any, ego: Any, episode_distance: float) -> tuple[LaneRoute, float]:
        start = ego.lane_index
        return LaneRoute(network, [start[:2]], start, ego.position, extendable=True), episode_distance

    def command(self, route: LaneRoute, time: float) -> str:
        r, plan, t = route, self.lane_plan, time
        if plan.target is not None:
            done = r.lane_id == plan.target and abs(r.lat) < 1.0
            if done or t > plan.deadline:
                plan.target = None
                r.desired[r.i] = None
                plan.next_time = t + float(self.rng.uniform(4.0, 10.0))
        elif t >= plan.next_time and r.lanes_count() > 1:
            options = [j for j in (r.lane_id - 1, r.lane_id + 1) if 0 <= j < r.lanes_count()]
            plan.target = int(options[int(self.rng.integers(len(options)))])
            plan.deadline = t + 8.0
            r.desired[r.i] = plan.target
        if plan.target is None:
            return captions.FOLLOW_LANE
        return captions.CHANGE_LEFT if plan.target < r.lane_id else captions.CHANGE_RIGHT


class LoopMission(OpenRoadMission):
    @classmethod
    def sim_overrides(cls, cfg: EnvConfig) -> dict[str, Any]:
        return {"terminate_off_road": False}

    def command(self, route: LaneRoute, time: float) -> str:
        _, ahead = route.point_ahead(25.0)
        bend = wrap_angle(ahead - route.lane.heading_at(route.s))
        return captions.curve_command(None if abs(bend) < 0.35 else ("right" if bend > 0 else "left"))


class IntersectionMission(Mission):
    traffic = UrbanTrafficVehicle
    TURNS = {"o1": captions.TURN_LEFT, "o2": captions.GO_STRAIGHT, "o3": captions.TURN_RIGHT}

    @classmethod
    def sim_overrides(cls, cfg: EnvConfig) -> dict[str, Any]:
        # highway-env tries a spawn every policy step; its default (0.6 at 1 Hz) would flood the
        # junction at 10 Hz, so keep the per-second rate.
        per_second = get_scenario(cfg.scenario).sim_config["spawn_probability"]
        return {"spawn_probability": min(1.0, per_second / cfg.policy_frequency), "destination": None}

    def plan(self, network: Any, ego: Any, episode_distance: float) -> tuple[LaneRoute, float]:
        # Entering from the south (o0): o1 is a left turn, o2 straight on, o3 a right turn.
        self.destination = f"o{int(self.rng.integers(1, 4))}"
        route = _route_to(network, ego, self.destination)
        self.yield_roads = frozenset({1})            # the junction road (ir0 -> il*)
        return route, route.remaining_length(end_extra=25.0)

    def command(self, route: LaneRoute, time: float) -> str:
        if route.i >= len(route.roads) - 1:          # on the exit road
            return captions.FOLLOW_LANE
        return self.TURNS[self.destination]


class RoundaboutMission(Mission):
    EXITS = ("exs", "nxs", "wxs")

    def plan(self, network: Any, ego: Any, episode_distance: float) -> tuple[LaneRoute, float]:
        self.exit_number = int(self.rng.integers(1, 4))
        self.destination = self.EXITS[self.exit_number - 1]
        route = _route_to(network, ego, self.destination)
        # The first ring road: circulating traffic has the right of way.
        self.yield_roads = frozenset(k for k, road in enumerate(route.roads) if road[0] == "se")
        return route, route.remaining_length(end_extra=15.0)

    def command(self, route: LaneRoute, time: float) -> str:
        on_exit = route.i >= len(route.roads) - 1
        return captions.FOLLOW_LANE if on_exit else captions.roundabout_command(self.exit_number)


class MergeMission(Mission):
    sim_mixin = RampMergeSim
    places_own_traffic = True
    ROADS = (("j", "k"), ("k", "b"), ("b", "c"), ("c", "d"))
    MAIN_ROAD = (("b", "c"), ("c", "d"))

    def __init__(self, rng: np.random.Generator) -> None:
        super().__init__(rng)
        self.merged = False

    @classmethod
    def sim_overrides(cls, cfg: EnvConfig) -> dict[str, Any]:
        return {"main_road_vehicles": vehicles_count(cfg)}

    def plan(self, network: Any, ego: Any, episode_distance: float) -> tuple[LaneRoute, float]:
        route = LaneRoute(network, list(self.ROADS), ("j", "k", 0), ego.position, extendable=False)
        return route, min(episode_distance, route.remaining_length(end_extra=140.0))

    def command(self, route: LaneRoute, time: float) -> str:
        # Merged once the car is settled in a main-road lane; it stays merged after that.
        r = route
        self.merged = self.merged or (r.road in self.MAIN_ROAD and r.lane_id < 2 and abs(r.lat) < 1.0)
        return captions.FOLLOW_LANE if self.merged else captions.MERGE


MISSIONS: dict[str, type[Mission]] = {
    "highway": OpenRoadMission, "night": OpenRoadMission, "rain": OpenRoadMission,
    "racetrack": LoopMission, "urban": IntersectionMission, "roundabout": RoundaboutMission,
    "merge": MergeMission,
}


def mission_for(scenario: str) -> type[Mission]:
    try:
        return MISSIONS[scenario]
    except KeyError:
        raise ValueError(f"the highway backend has no mission for scenario={scenario!r}; "
                         f"it knows {sorted(MISSIONS)}") from None
