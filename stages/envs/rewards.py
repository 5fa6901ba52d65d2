"""The seed's driving reward, the same function for every backend, and its configurable wrapper.

`compute_driving_reward` is the formula of the seed's "Reward Design" section term by term; only its
constants come from a `RewardConfig` (whose defaults are the seed's constants), so with the default
config it returns exactly what the seed's function returns.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np

from stages.envs.config import RewardConfig
from stages.envs.spaces import clip_action

RewardLike = RewardConfig | Mapping[str, Any] | None
OFF_ROAD_REASONS = ("off_road", "off_route")  # the ``done_reason`` values `off_road_penalty` prices


def as_reward_config(config: RewardLike, base: RewardConfig | None = None) -> RewardConfig:
    """A `RewardConfig` from a config, a (partial) dict or None; missing values come from ``base``."""
    base = base or RewardConfig()
    if config is None:
        return base
    if isinstance(config, RewardConfig):
        return config
    # Validate the dict through the model so that a bad key or value names itself.
    return RewardConfig.model_validate({**base.model_dump(), **dict(config)})


def env_reward_config(env: Any) -> RewardConfig | None:
    """The reward config an env (or a wrapped env) carries, if any."""
    base = getattr(env, "unwrapped", env)
    return getattr(base, "reward_config", None)


def reward_terms(action: np.ndarray, info: Mapping[str, Any], config: RewardConfig) -> dict[str, float]:
    """The weighted components of the seed's reward (they sum to the reward)."""
    # Speed reward (the seed's target: 30 km/h = 8.33 m/s, configurable)
    velocity = info.get("velocity", [0, 0, 0])
    speed = float(np.linalg.norm(np.asarray(velocity, dtype=np.float64)[:2]))
    target_speed = config.target_speed
    speed_reward = max(0.0, 1.0 - abs(speed - target_speed) / target_speed)

    # Lane keeping reward
    lane_deviation = float(info.get("lane_deviation", 0.0))
    lane_reward = max(0.0, 1.0 - abs(lane_deviation) / 2.0)

    # Collision penalty
    collision = -config.collision_penalty if info.get("collision", False) else 0.0

    # Leaving the road (or, in CARLA, the route) ends the episode: priced like a collision when asked.
    off_road = -config.off_road_penalty if info.get("done_reason") in OFF_ROAD_REASONS else 0.0

    # Comfort reward (smooth steering/acceleration): action = [throttle, steer, brake]
    steering = abs(float(action[1]))
    acceleration = abs(float(action[0]) - float(action[2]))
    comfort_reward = 1.0 - 0.5 * steering - 0.3 * acceleration

    return {
        "speed": speed_reward * config.speed_weight,
        "lane": lane_reward * config.lane_weight,
        "collision": collision,
        "off_road": off_road,
        "comfort": comfort_reward * config.comfort_weight,
    }


def compute_driving_reward(env: Any, action: np.ndarray, info: Mapping[str, Any],
                           config: RewardLike = None) -> float:
    """Compute reward for autonomous driving (the seed's formula).

    Components: speed (track ``target_speed``), lane keeping, collision penalty, comfort, and an
    off-road penalty that is 0 (absent) unless the config sets it.
    ``config`` None means the env's own reward config when it has one, else the seed's constants.
    """
    cfg = as_reward_config(config, base=env_reward_config(env) if env is not None else None)
    return float(sum(reward_terms(action, info, cfg).values()))


class CARLARewardWrapper(gym.Wrapper):
    """Wrapper to customize driving rewards (the seed's class, usable on every backend).

    ``reward_config`` may be a dict (the seed's form), a `RewardConfig` or None. Keys it leaves out
    keep the wrapped env's reward config (the seed's defaults when the env has none), so
    ``CARLARewardWrapper(env, {"collision_penalty": 50})`` changes only the collision penalty.
    """

    def __init__(self, env: gym.Env, reward_config: RewardLike = None) -> None:
        super().__init__(env)
        self.reward_config = as_reward_config(reward_config, base=env_reward_config(env))
        self.config: dict[str, float] = self.reward_config.model_dump()

        # Reward weights (the seed's attribute names)
        self.speed_weight = self.reward_config.speed_weight
        self.lane_weight = self.reward_config.lane_weight
        self.collision_penalty = self.reward_config.collision_penalty
        self.comfort_weight = self.reward_config.comfort_weight
        self.off_road_penalty = self.reward_config.off_road_penalty
        self.target_speed = self.reward_config.target_speed

    def step(self, action: np.ndarray) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)

        # Override reward
        custom_reward = self.compute_reward(action, info)
        info = dict(info)
        info["env_reward"] = reward
        return obs, custom_reward, terminated, truncated, info

    def compute_reward(self, action: np.ndarray, info: Mapping[str, Any]) -> float:
        # The attributes win over the stored config so that `wrapper.target_speed = x` takes effect.
        cfg = RewardConfig(speed_weight=self.speed_weight, lane_weight=self.lane_weight,
                           collision_penalty=self.collision_penalty, comfort_weight=self.comfort_weight,
                           off_road_penalty=self.off_road_penalty, target_speed=self.target_speed)
        # Score the action the env applied (clipped to the action bounds), as the env itself does.
        return compute_driving_reward(self.env, clip_action(action), info, cfg)
