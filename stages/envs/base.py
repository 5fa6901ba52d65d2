"""`DrivingEnvBase`: the contract every driving-env backend shares, written once.

The base class owns what must be the same on every backend:

- seeding: the first ``reset()`` without a seed uses the configured one (``seed``), later ones
  continue the env's generator (`self.np_random`, which the backend draws its episodes from);
- counting: ``episode_id``, the steps of the episode and the simulated time (``policy_frequency``
  steps per simulated second, `seconds_per_step` each);
- the infraction counters (`INFRACTION_KEYS`) and when wrong-way driving and speeding count
  (`_count_infractions`);
- the episode ends and their order (`_episode_end`): terminated on a collision, leaving the road or
  (backends that follow a route) leaving the route; else truncated when the route is completed or
  at ``max_episode_steps``; ``info["done_reason"]`` names the end;
- the reward: `compute_driving_reward` with the env's `RewardConfig` (``reward_config``);
- the observation: ``image`` (``self._frame``), ``state`` packed from the info, ``command``.

A backend implements the simulator side (see `DrivingEnvBase` for the signatures):

- ``_begin_episode(options) -> info``: build an episode from ``self.np_random`` (spawn, route, first
  frame); set ``self._frame`` and ``self._command``; return the first info, without ``done_reason``;
- ``_advance(action)``: apply the clipped ``[throttle, steer, brake]`` and advance the simulation by one
  policy step;
- ``_measure() -> info``: after the tick, update route, command and frame, count infractions through
  `_count_infractions`, and return the info of the contract (the base adds ``done_reason``);
- ``_off_road() -> bool`` and ``_front_gap() -> float`` (bumper gap to the vehicle ahead, m);
- the ``route_completion`` property (0..1) and ``caption() -> str``;
- optionally ``_off_route()``, ``_collided(info)``, ``_route_completed()``, ``_check_can_step()``.

`step_seconds(env)` reads the step length of any driving env, wrapped or not.
"""
from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np

from stages.envs.config import RewardConfig
from stages.envs.rewards import compute_driving_reward
from stages.envs.scenarios import ScenarioSpec, get_scenario
from stages.envs.spaces import (
    FRONT_DISTANCE_MAX, action_space, clip_action, make_state, observation_space, sanitize_command)

# What every step's info carries (backends may add their own keys, e.g. CARLA's ``town``, ``frame``).
INFO_KEYS: tuple[str, ...] = (
    "velocity", "speed", "lane_deviation", "heading_error", "collision", "route_completion", "infractions",
    "ego_pose", "command", "caption", "scenario", "lane_index", "done_reason")
INFRACTION_KEYS: tuple[str, ...] = ("collision", "off_road", "lane_invasion", "wrong_way", "speeding")
WRONG_WAY_ANGLE = math.pi / 2    # rad off the lane direction beyond which the car drives the wrong way
SPEEDING_FACTOR = 1.1            # speeding: above this times max(speed limit, target speed)
TERMINATING_ENDS: tuple[str, ...] = ("collision", "off_road", "off_route")   # checked in this order
TRUNCATING_ENDS: tuple[str, ...] = ("route_completed", "time_limit")         # then these


class DrivingEnvBase(gym.Env):
    """A driving env: one observation, action, info and reward contract for every backend."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, *, scenario: str, image_size: int, policy_frequency: float, max_episode_steps: int,
                 reward_config: RewardConfig, seed: int, render_mode: str | None = None,
                 render_fps: float | None = None) -> None:
        super().__init__()
        self.scenario = scenario
        self.scenario_spec: ScenarioSpec = get_scenario(scenario)
        self.reward_config = reward_config
        self.target_speed = reward_config.target_speed
        self.policy_frequency = policy_frequency
        self.max_episode_steps = max_episode_steps
        self.render_mode = render_mode
        fps = policy_frequency if render_fps is None else render_fps
        self.metadata = {**self.metadata, "render_fps": fps}
        self.observation_space = observation_space(image_size)
        self.action_space = action_space()
        self._default_seed = seed
        self._seeded = False
        self._episode_ready = False
        self.episode_id = 0
        self._steps = 0
        self._time = 0.0
        self._last_action = np.zeros(3, dtype=np.float32)
        self._infractions = zero_infractions()
        self._command = ""
        self._frame: np.ndarray | None = None

    # -- the contract's numbers ------------------------------------------------------------------
    @property
    def seconds_per_step(self) -> float:
        """Simulated seconds per env step: 1 / ``policy_frequency``."""
        return 1.0 / self.policy_frequency

    @property
    def elapsed_steps(self) -> int:
        """Steps taken in the current episode."""
        return self._steps

    @property
    def elapsed_seconds(self) -> float:
        """Simulated seconds of the current episode."""
        return self._time

    @property
    def infractions(self) -> dict[str, int]:
        """The infraction counters of the current episode (a copy)."""
        return dict(self._infractions)

    @property
    def command(self) -> str:
        """The current text command."""
        return self._command

    @property
    def route_completion(self) -> float:
        raise NotImplementedError

    # -- gym API ---------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[dict[str, Any], dict[str, Any]]:
        if seed is None and not self._seeded:
            seed = self._default_seed
        super().reset(seed=seed)
        self._seeded = True
        self.episode_id += 1
        self._episode_ready = False
        self._steps = 0
        self._time = 0.0
        self._last_action = np.zeros(3, dtype=np.float32)
        self._infractions = zero_infractions()
        info = self._begin_episode(options or {})
        self._episode_ready = True
        info["done_reason"] = ""
        return self._observe(info), info

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        self._check_can_step()
        a = clip_action(action)
        self._advance(a)
        self._steps += 1
        self._time += self.seconds_per_step
        self._last_action = a
        info = self._measure()
        terminated, truncated, info["done_reason"] = self._episode_end(info)
        reward = compute_driving_reward(self, a, info, self.reward_config)
        return self._observe(info), reward, terminated, truncated, info

    def render(self) -> np.ndarray | None:
        # The observation frame is drawn once per step; rendering returns it rather than drawing again.
        return None if self._frame is None else self._frame.copy()

    def close(self) -> None:
        self._episode_ready = False
        super().close()

    # -- shared rules ----------------------------------------------------------------------------
    def _episode_end(self, info: dict[str, Any]) -> tuple[bool, bool, str]:
        """(terminated, truncated, done_reason) after a step, in the order of the module docstring."""
        if self._collided(info):
            return True, False, "collision"
        if self._off_road():
            return True, False, "off_road"
        if self._off_route():
            return True, False, "off_route"
        if self._route_completed():
            return False, True, "route_completed"
        if self._steps >= self.max_episode_steps:
            return False, True, "time_limit"
        return False, False, ""

    def _count_infractions(self, *, collisions: int, lane_invasions: int, off_road: bool,
                           heading_error: float, speed: float, speed_limit: float | None) -> None:
        """Add one step's infractions: ``collisions`` and ``lane_invasions`` are new events; off-road,
        wrong-way (heading more than `WRONG_WAY_ANGLE` off the lane) and speeding count per step.
        ``speed_limit`` (m/s) None or 0: the road has none."""
        inf = self._infractions
        inf["collision"] += collisions
        inf["lane_invasion"] += lane_invasions
        if off_road:
            inf["off_road"] += 1
        if abs(heading_error) > WRONG_WAY_ANGLE:
            inf["wrong_way"] += 1
        if speed_limit and speed > SPEEDING_FACTOR * max(speed_limit, self.target_speed):
            inf["speeding"] += 1

    def _observe(self, info: dict[str, Any]) -> dict[str, Any]:
        """The observation of the contract, from the step's info and the backend's frame and command."""
        a = self._last_action
        lateral, heading = self._tracking_error(info)
        state = make_state({
            "speed": info["speed"], "lateral_offset": lateral,
            "heading_error": heading, "last_throttle": a[0], "last_steer": a[1],
            "last_brake": a[2], "front_distance": min(self._front_gap(), FRONT_DISTANCE_MAX),
            "route_completion": info["route_completion"],
        })
        return {"image": self._frame, "state": state, "command": sanitize_command(self._command)}

    def _tracking_error(self, info: dict[str, Any]) -> tuple[float, float]:
        """The state's lateral offset (m) and heading error (rad): to the lane the route wants, the
        error a driver nulls. The info's ``lane_deviation`` / ``heading_error`` are to the lane the car
        is in; a backend whose route can want another lane (a lane change) overrides this."""
        return float(info["lane_deviation"]), float(info["heading_error"])

    # -- what a backend implements ---------------------------------------------------------------
    def _begin_episode(self, options: dict[str, Any]) -> dict[str, Any]:
        """Build an episode from ``self.np_random``; return its first info (no ``done_reason``)."""
        raise NotImplementedError

    def _advance(self, action: np.ndarray) -> None:
        """Apply the (clipped) action and advance the simulation by one policy step."""
        raise NotImplementedError

    def _measure(self) -> dict[str, Any]:
        """After a step: update route, command, frame and infractions; the info (no ``done_reason``)."""
        raise NotImplementedError

    def _off_road(self) -> bool:
        raise NotImplementedError

    def _front_gap(self) -> float:
        """Bumper gap (m) to the nearest vehicle ahead on the ego's path, inf when none."""
        raise NotImplementedError

    def caption(self) -> str:
        raise NotImplementedError

    def _off_route(self) -> bool:
        """Has the car left its route (backends that can tell it from leaving the road)?"""
        return False

    def _collided(self, info: dict[str, Any]) -> bool:
        """Does this step's collision end the episode?"""
        return bool(info["collision"])

    def _route_completed(self) -> bool:
        return self.route_completion >= 1.0

    def _check_can_step(self) -> None:
        if not self._episode_ready:
            raise RuntimeError("call reset() before step()")


def zero_infractions() -> dict[str, int]:
    return dict.fromkeys(INFRACTION_KEYS, 0)


def step_seconds(env: Any) -> float:
    """Simulated seconds per step of a driving env or a wrapper of one: 1 / its ``policy_frequency``."""
    inner = getattr(env, "unwrapped", env)
    try:
        frequency = inner.policy_frequency
    except AttributeError:
        raise TypeError(f"{type(inner).__name__} has no policy_frequency: a driving env says how many policy "
                        "steps it takes per simulated second (see stages.envs.base.DrivingEnvBase)") from None
    return 1.0 / float(frequency)
