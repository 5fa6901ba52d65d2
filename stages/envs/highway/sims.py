"""highway-env's side of the embedded backend: the simulator classes and their config.

Our action ``[throttle, steer, brake]`` drives highway-env's ``ContinuousAction`` (longitudinal +
lateral): ``acceleration = throttle * MAX_ACCELERATION - brake * MAX_BRAKING`` m/s², ``steering =
steer * MAX_STEERING`` rad. Braking stops the car; it never reverses.

highway-env's own rewards, terminations and observations are switched off (`QuietSim`; its
Kinematics observation alone halves the step rate): `DrivingEnv` computes them itself.
"""
from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import highway_env  # noqa: F401  (registers the highway-env ids)
import numpy as np
from highway_env import utils as hutils
from highway_env.vehicle.behavior import IDMVehicle
from highway_env.vehicle.kinematics import Vehicle

from stages.envs.config import EnvConfig
from stages.envs.scenarios import get_scenario

MAX_ACCELERATION = 5.0            # m/s² at full throttle (highway-env's ContinuousAction range)
MAX_BRAKING = 8.0                 # m/s² at full brake (~0.8 g)
MAX_STEERING = math.pi / 4        # rad at full steer (highway-env's default steering range)


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


class QuietSim:
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


class RampMergeSim(QuietSim):
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


def predict_constant_speed(vehicle: Vehicle, times: np.ndarray) -> tuple[list[np.ndarray], list[float]]:
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


def vehicles_count(cfg: EnvConfig) -> int:
    """Other vehicles of ``cfg``: its own count, else the scenario's default."""
    return get_scenario(cfg.scenario).default_vehicles if cfg.vehicles_count is None else cfg.vehicles_count


def highway_env_config(cfg: EnvConfig) -> tuple[str, dict[str, Any]]:
    """The highway-env env id and the config every scenario shares (a mission adds its own keys).

    The sim's own viewer is not used (`stages.envs.highway.camera.Camera` draws the observation),
    so no screen settings are passed.
    """
    spec = get_scenario(cfg.scenario)
    sim: dict[str, Any] = {
        # The env computes its own observation; this one is the cheapest highway-env offers
        # (Kinematics builds a pandas frame every step and halves the step rate).
        "observation": {"type": "AttributesObservation", "attributes": ["time"]},
        "action": {"type": "ContinuousAction", "longitudinal": True, "lateral": True, "clip": True,
                   "acceleration_range": [-MAX_BRAKING, MAX_BRAKING],
                   "steering_range": [-MAX_STEERING, MAX_STEERING], "speed_range": [0.0, 40.0]},
        "simulation_frequency": cfg.simulation_frequency,
        "policy_frequency": cfg.policy_frequency,
        # DrivingEnv decides when an episode ends; keep highway-env's own clock out of the way.
        "duration": 10 * cfg.episode_seconds + 1000,
        "offroad_terminal": False,
        "show_trajectories": False,
        "offscreen_rendering": True,
        # v1.12 behaviour: leaders are also found on the next/previous lane segment.
        "neighbour_vehicles_connected_lanes": True,
        **spec.sim_config,
    }
    if spec.vehicles_key is not None:
        sim[spec.vehicles_key] = vehicles_count(cfg)
    return spec.env_id, sim


_SIM_CLASSES: dict[tuple[type, str], type] = {}


def sim_class(mixin: type, env_id: str) -> type:
    """The highway-env class behind ``env_id`` with ``mixin`` (a `QuietSim`) in front."""
    key = (mixin, env_id)
    if key not in _SIM_CLASSES:
        base = gym.envs.registration.load_env_creator(gym.spec(env_id).entry_point)
        _SIM_CLASSES[key] = type(f"Driving{base.__name__}", (mixin, base), {})
    return _SIM_CLASSES[key]


def class_path(cls: type) -> str:
    """``module.Class``: how highway-env's config names a vehicle class (``other_vehicles_type``)."""
    return f"{cls.__module__}.{cls.__qualname__}"
