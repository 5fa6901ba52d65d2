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

The evaluation may choose the command of an episode: ``reset(options={"command": text})`` with one
of the mission's `COMMANDS` builds the route for it (the turn, the exit, the lane change) from the
same start and traffic the seed gives any command, so two commands on one seed differ only in what
is asked. A reset without a command is what it always was.
"""
from __future__ import annotations

import math
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


LANE_CHANGE_SECONDS = 8.0        # s a requested lane change has before the request lapses


class Mission:
    """The task of one episode (see the module docstring); subclasses fill in `plan` and `command`."""

    traffic: type = TrafficVehicle   # class of the other vehicles
    sim_mixin: type = QuietSim       # put in front of highway-env's env class
    places_own_traffic = False       # the sim places its traffic itself and reads the count from `sim_overrides`
    COMMANDS: tuple[str, ...] = ()   # the commands an evaluation may choose at reset (each decides the manoeuvre)

    def __init__(self, rng: np.random.Generator, command: str | None = None) -> None:
        self.check_command(command)
        self.rng = rng
        self.chosen = command            # the command chosen at reset, None: the mission draws its own
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

    @classmethod
    def check_command(cls, command: str | None) -> None:
        if command is not None and command not in cls.COMMANDS:
            raise ValueError(f"command={command!r} cannot be chosen in this scenario; "
                             f"it takes one of {list(cls.COMMANDS)}" if cls.COMMANDS else
                             f"command={command!r}: this scenario has no command to choose")

    @classmethod
    def reset_config(cls, command: str | None) -> dict[str, Any]:
        """highway-env config keys set before each reset (the start a chosen command needs)."""
        cls.check_command(command)
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
    COMMANDS = (captions.CHANGE_LEFT, captions.CHANGE_RIGHT, captions.FOLLOW_LANE)
    LANE_STEP = {captions.CHANGE_LEFT: -1, captions.CHANGE_RIGHT: 1, captions.FOLLOW_LANE: 0}   # lane ids grow rightwards

    def __init__(self, rng: np.random.Generator, command: str | None = None) -> None:
        super().__init__(rng, command)
        # A chosen command is the episode's only one: no lane change is drawn besides it.
        self.lane_plan = LaneChangePlan(next_time=math.inf if command else self.first_lane_change)

    @classmethod
    def reset_config(cls, command: str | None) -> dict[str, Any]:
        # A chosen command starts in the middle lane, where both lane changes are possible (and every
        # command of a seed has the same start); None restores highway-env's random lane.
        cls.check_command(command)
        return {"initial_lane_id": None if command is None else 1}

    def plan(self, network: Any, ego: Any, episode_distance: float) -> tuple[LaneRoute, float]:
        start = ego.lane_index
        route = LaneRoute(network, [start[:2]], start, ego.position, extendable=True)
        step = self.LANE_STEP.get(self.chosen or captions.FOLLOW_LANE, 0)
        if step:
            target = route.lane_id + step
            if not 0 <= target < route.lanes_count():
                raise ValueError(f"command={self.chosen!r} cannot be followed from lane {route.lane_id} of "
                                 f"{route.lanes_count()}")
            self.lane_plan.target, self.lane_plan.deadline = target, LANE_CHANGE_SECONDS
            route.desired[route.i] = target
        return route, episode_distance

    def command(self, route: LaneRoute, time: float) -> str:
        r, plan, t = route, self.lane_plan, time
        if plan.target is not None:
            done = r.lane_id == plan.target and abs(r.lat) < 1.0
            if done or t > plan.deadline:
                plan.target = None
                r.desired[r.i] = None
                plan.next_time = math.inf if self.chosen else t + float(self.rng.uniform(4.0, 10.0))
        elif t >= plan.next_time and r.lanes_count() > 1:
            options = [j for j in (r.lane_id - 1, r.lane_id + 1) if 0 <= j < r.lanes_count()]
            plan.target = int(options[int(self.rng.integers(len(options)))])
            plan.deadline = t + LANE_CHANGE_SECONDS
            r.desired[r.i] = plan.target
        if plan.target is None:
            return captions.FOLLOW_LANE
        return captions.CHANGE_LEFT if plan.target < r.lane_id else captions.CHANGE_RIGHT


class LoopMission(OpenRoadMission):
    COMMANDS = ()        # the bends decide the command; nothing to choose

    @classmethod
    def reset_config(cls, command: str | None) -> dict[str, Any]:
        cls.check_command(command)
        return {}

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
    COMMANDS = (captions.TURN_LEFT, captions.GO_STRAIGHT, captions.TURN_RIGHT)
    # Entering from the south: the road leaving the junction towards each exit, and the manoeuvre it means.
    EXIT_ROADS = {("il1", "o1"): "left", ("il2", "o2"): "straight", ("il3", "o3"): "right",
                  ("il0", "o0"): "u-turn"}

    @classmethod
    def sim_overrides(cls, cfg: EnvConfig) -> dict[str, Any]:
        # highway-env tries a spawn every policy step; its default (0.6 at 1 Hz) would flood the
        # junction at 10 Hz, so keep the per-second rate.
        per_second = get_scenario(cfg.scenario).sim_config["spawn_probability"]
        return {"spawn_probability": min(1.0, per_second / cfg.policy_frequency), "destination": None}

    def plan(self, network: Any, ego: Any, episode_distance: float) -> tuple[LaneRoute, float]:
        # Entering from the south (o0): o1 is a left turn, o2 straight on, o3 a right turn.
        drawn = f"o{int(self.rng.integers(1, 4))}"      # drawn also when chosen: the same rng stream
        self.destination = drawn if self.chosen is None else {c: o for o, c in self.TURNS.items()}[self.chosen]
        route = _route_to(network, ego, self.destination)
        self.yield_roads = frozenset({1})            # the junction road (ir0 -> il*)
        return route, route.remaining_length(end_extra=25.0)

    def command(self, route: LaneRoute, time: float) -> str:
        if route.i >= len(route.roads) - 1:          # on the exit road
            return captions.FOLLOW_LANE
        return self.TURNS[self.destination]


class RoundaboutMission(Mission):
    EXITS = ("exs", "nxs", "wxs")
    COMMANDS = tuple(captions.roundabout_command(n) for n in (1, 2, 3))
    # The roads out of the ring (and on), by exit number; the fourth is the way back south.
    EXIT_ROADS = {("ex", "exs"): "exit 1", ("exs", "exr"): "exit 1", ("nx", "nxs"): "exit 2",
                  ("nxs", "nxr"): "exit 2", ("wx", "wxs"): "exit 3", ("wxs", "wxr"): "exit 3",
                  ("sx", "sxs"): "exit 4", ("sxs", "sxr"): "exit 4"}

    def plan(self, network: Any, ego: Any, episode_distance: float) -> tuple[LaneRoute, float]:
        drawn = int(self.rng.integers(1, 4))             # drawn also when chosen: the same rng stream
        self.exit_number = drawn if self.chosen is None else self.COMMANDS.index(self.chosen) + 1
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
    COMMANDS = (captions.MERGE,)

    def __init__(self, rng: np.random.Generator, command: str | None = None) -> None:
        super().__init__(rng, command)
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


def commands_for(scenario: str) -> tuple[str, ...]:
    """The commands an evaluation may choose in ``scenario`` (empty: none)."""
    return mission_for(scenario).COMMANDS


def mission_for(scenario: str) -> type[Mission]:
    try:
        return MISSIONS[scenario]
    except KeyError:
        raise ValueError(f"the highway backend has no mission for scenario={scenario!r}; "
                         f"it knows {sorted(MISSIONS)}") from None
