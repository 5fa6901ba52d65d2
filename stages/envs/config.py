"""Validated configuration of the driving environments (every backend reads the same `EnvConfig`).

`RewardConfig` holds the weights of the seed's `compute_driving_reward`; its `target_speed` default
(8.33 m/s, the seed's 30 km/h) is the urban one. When a config leaves `target_speed` unset, the
scenario's own target applies (25 m/s on the highway-like roads): see `EnvConfig.resolved_reward`.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from stages.config_model import StrictModel

from stages.envs.scenarios import get_scenario

ScenarioName = Literal["highway", "urban", "merge", "roundabout", "racetrack", "night", "rain"]
BackendName = Literal["highway", "carla"]
ViewName = Literal["heading_up", "world"]


class RewardConfig(StrictModel):
    """Weights of the seed's driving reward (names as in the seed's `CARLARewardWrapper`)."""

    speed_weight: float = Field(1.0, ge=0, description="weight of the speed-tracking term")
    lane_weight: float = Field(0.5, ge=0, description="weight of the lane-keeping term")
    collision_penalty: float = Field(10.0, ge=0, description="subtracted on a step with a collision")
    comfort_weight: float = Field(0.3, ge=0, description="weight of the smoothness term")
    # Not in the seed's formula: there, leaving the road ends the episode at no cost beyond the lost
    # future reward, so a policy learns to swerve off the road rather than risk a collision's penalty.
    off_road_penalty: float = Field(0.0, ge=0, description="subtracted on the step that ends the episode off "
                                                            "the road or route (0: the seed's reward)")
    target_speed: float = Field(8.33, gt=0, le=60, description="speed the speed term rewards, m/s")


class EnvConfig(StrictModel):
    """One environment: backend, scenario, observation size, episode length, traffic, reward, seed."""

    backend: BackendName = "highway"
    scenario: ScenarioName = "highway"
    image_size: int = Field(64, ge=16, le=512, description="side of the square RGB observation, px")
    max_episode_steps: int = Field(200, ge=1, description="policy steps before the episode is truncated")
    policy_frequency: int = Field(10, ge=1, le=60, description="policy steps per simulated second, Hz")
    # highway-env runs int(simulation_frequency // policy_frequency) sub-steps per action, so a
    # frequency that is not a multiple silently slows simulated time down (15 // 10 = 1 sub-step of
    # 1/15 s per 1/10 s step); the validator below refuses it. 10 Hz (one sub-step per action) is the
    # fastest setting and still checks collisions every 0.1 s.
    simulation_frequency: int = Field(10, ge=1, le=120, description="physics steps per simulated second, Hz")
    vehicles_count: int | None = Field(None, ge=0, le=100, description="other vehicles; None = scenario default")
    reward: RewardConfig | None = None
    seed: int = Field(0, ge=0)
    view: ViewName = Field("heading_up", description="heading_up: ego-centred, driving direction up; "
                                                     "world: highway-env's fixed world axes")
    view_distance: float | None = Field(None, gt=5, le=300, description="metres the image spans; None = scenario default")
    offset_reference: Literal["lane", "route"] = Field(
        "lane", description="the state's lateral offset and heading error: to the lane the car is in, or to the "
                            "lane the route wants (they differ during a lane change; highway backend)")

    @model_validator(mode="after")
    def _frequencies_divide(self) -> EnvConfig:
        if self.simulation_frequency % self.policy_frequency:
            raise ValueError(
                f"simulation_frequency={self.simulation_frequency} must be a multiple of "
                f"policy_frequency={self.policy_frequency} (highway-env runs a whole number of "
                "physics sub-steps per action)")
        return self

    @property
    def episode_seconds(self) -> float:
        """Simulated duration of a full-length episode."""
        return self.max_episode_steps / self.policy_frequency

    def resolved_reward(self) -> RewardConfig:
        """The reward config in force: the given weights, the scenario's target speed when unset."""
        return resolve_reward(self.reward, self.scenario)


def resolve_reward(reward: RewardConfig | None, scenario: str) -> RewardConfig:
    """``reward`` with the scenario's target speed filled in where the config left it unset."""
    target = get_scenario(scenario).target_speed
    if reward is None:
        return RewardConfig(target_speed=target)
    if "target_speed" not in reward.model_fields_set:
        return reward.model_copy(update={"target_speed": target})
    return reward
