"""Driving environments: one observation/action/reward contract, two backends.

The contract is `stages.envs.base.DrivingEnvBase` (seeding, counting, infractions, episode ends,
reward, ``policy_frequency``); the backends subclass it:
- ``highway``: `DrivingEnv` on highway-env, embedded (no server), the default (`stages.envs.highway`);
- ``carla``: the CARLA bridge (`stages.envs.carla_bridge`, imported only when asked for).

Heavy pieces (highway-env, pygame) load on first use, so `from stages.envs import EnvConfig` stays cheap.
"""
from __future__ import annotations

from typing import Any

from stages.envs.captions import SceneSnapshot, describe_scene
from stages.envs.config import EnvConfig, RewardConfig
from stages.envs.factory import make_env, make_vector_env
from stages.envs.rewards import CARLARewardWrapper, compute_driving_reward
from stages.envs.scenarios import CARLA_TOWNS, SCENARIOS, ScenarioSpec, get_scenario
from stages.envs.spaces import (
    ACTION_FIELDS, ACTION_HIGH, ACTION_LOW, STATE_DIM, STATE_FIELDS, action_space, observation_space)

__all__ = [
    "ACTION_FIELDS", "ACTION_HIGH", "ACTION_LOW", "CARLA_TOWNS", "CARLARewardWrapper", "DrivingEnv",
    "EnvConfig", "ExpertDriver", "RewardConfig", "SCENARIOS", "STATE_DIM", "STATE_FIELDS", "SceneSnapshot",
    "ScenarioSpec", "action_space", "compute_driving_reward", "describe_scene", "get_scenario", "make_env",
    "make_vector_env", "observation_space",
]


def __getattr__(name: str) -> Any:
    # DrivingEnv and ExpertDriver import highway-env and pygame; load them only when used.
    if name == "DrivingEnv":
        from stages.envs.highway import DrivingEnv

        return DrivingEnv
    if name == "ExpertDriver":
        from stages.envs.expert import ExpertDriver

        return ExpertDriver
    raise AttributeError(f"module 'stages.envs' has no attribute {name!r}")
