"""The driving reward is the seed's formula, and CARLARewardWrapper overrides it with custom weights."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from pydantic import ValidationError

from stages.envs import CARLARewardWrapper, EnvConfig, RewardConfig, compute_driving_reward, make_env
from stages.envs.rewards import reward_terms


def seed_reward(env, action, info):
    """The seed's `compute_driving_reward`, verbatim (docs: online-rl-carla.md, "Reward Design")."""
    reward = 0.0

    # Speed reward (target: 30 km/h = 8.33 m/s)
    velocity = info.get("velocity", [0, 0, 0])
    speed = np.linalg.norm(velocity[:2])
    target_speed = 8.33
    speed_reward = 1.0 - abs(speed - target_speed) / target_speed
    speed_reward = max(0, speed_reward)
    reward += speed_reward * 1.0

    # Lane keeping reward
    lane_deviation = info.get("lane_deviation", 0.0)
    lane_reward = max(0, 1.0 - abs(lane_deviation) / 2.0)
    reward += lane_reward * 0.5

    # Collision penalty
    if info.get("collision", False):
        reward -= 10.0

    # Comfort reward (smooth steering/acceleration)
    steering = abs(action[1])
    acceleration = abs(action[0] - action[2])
    comfort_reward = 1.0 - 0.5 * steering - 0.3 * acceleration
    reward += comfort_reward * 0.3

    return reward


CASES = [
    # (info, action)
    ({"velocity": [8.33, 0.0, 0.0], "lane_deviation": 0.0, "collision": False}, [0.0, 0.0, 0.0]),   # at target
    ({"velocity": [6.0, 3.0, 0.0], "lane_deviation": 0.3}, [0.2, 0.1, 0.0]),                      # below
    ({"velocity": [12.0, 0.0, 0.5], "lane_deviation": -1.0}, [0.5, -0.4, 0.0]),                   # above, vz ignored
    ({"velocity": [30.0, 0.0, 0.0], "lane_deviation": 3.0}, [0.0, 0.0, 1.0]),                     # far above, off lane
    ({"velocity": [8.0, 0.0, 0.0], "collision": True}, [0.0, 1.0, 0.6]),                          # collision
    ({}, [1.0, -1.0, 0.0]),                                                                       # empty info
    ({"velocity": [8.0, 0.0, 0.0], "done_reason": "off_road"}, [0.5, 1.0, 0.0]),                  # off the road
]


@pytest.mark.parametrize(("info", "action"), CASES)
def test_default_config_is_exactly_the_seed_formula(info, action):
    action = np.asarray(action, dtype=np.float32)
    assert compute_driving_reward(None, action, info) == pytest.approx(seed_reward(None, action, info), abs=1e-6)


def test_reward_terms_by_hand():
    cfg = RewardConfig()
    at_target = reward_terms(np.zeros(3), {"velocity": [8.33, 0, 0]}, cfg)
    assert at_target == pytest.approx({"speed": 1.0, "lane": 0.5, "collision": 0.0, "off_road": 0.0, "comfort": 0.3})
    # Twice the target speed earns nothing; half of it earns half.
    assert reward_terms(np.zeros(3), {"velocity": [16.66, 0, 0]}, cfg)["speed"] == pytest.approx(0.0)
    assert reward_terms(np.zeros(3), {"velocity": [0, 4.165, 0]}, cfg)["speed"] == pytest.approx(0.5)
    # One metre off the lane centre keeps half the lane term (0.5 * 0.5); two metres none.
    assert reward_terms(np.zeros(3), {"lane_deviation": -1.0}, cfg)["lane"] == pytest.approx(0.25)
    assert reward_terms(np.zeros(3), {"lane_deviation": 2.5}, cfg)["lane"] == 0.0
    # Comfort: full steer and full throttle -> 1 - 0.5 - 0.3 = 0.2, times 0.3.
    assert reward_terms(np.array([1.0, 1.0, 0.0]), {}, cfg)["comfort"] == pytest.approx(0.06)
    # Throttle and brake together cancel in the "acceleration" of the comfort term.
    assert reward_terms(np.array([0.7, 0.0, 0.7]), {}, cfg)["comfort"] == pytest.approx(0.3)
    assert reward_terms(np.zeros(3), {"collision": True}, cfg)["collision"] == -10.0


def test_weights_come_from_the_config():
    info, action = {"velocity": [20.0, 0, 0], "lane_deviation": 0.5, "collision": True}, np.array([0.3, 0.2, 0.0])
    cfg = RewardConfig(speed_weight=2.0, lane_weight=1.0, collision_penalty=50.0, comfort_weight=0.0, target_speed=25.0)
    expected = 2.0 * (1 - 5.0 / 25.0) + 1.0 * (1 - 0.5 / 2.0) - 50.0
    assert compute_driving_reward(None, action, info, cfg) == pytest.approx(expected)
    # A partial dict keeps the other (seed) values.
    partial = compute_driving_reward(None, action, info, {"collision_penalty": 50.0})
    assert partial == pytest.approx(seed_reward(None, action, info) - 40.0)


def test_off_road_penalty_prices_the_step_that_leaves_the_road():
    priced = RewardConfig(off_road_penalty=10.0)
    for reason in ("off_road", "off_route"):
        assert reward_terms(np.zeros(3), {"done_reason": reason}, priced)["off_road"] == -10.0
    for reason in ("", "collision", "route_completed", "time_limit"):
        assert reward_terms(np.zeros(3), {"done_reason": reason}, priced)["off_road"] == 0.0
    # The seed's reward (the default) has no such term.
    assert reward_terms(np.zeros(3), {"done_reason": "off_road"}, RewardConfig())["off_road"] == 0.0


def test_an_env_that_drives_off_the_road_pays_its_off_road_penalty():
    cfg = EnvConfig(scenario="highway", image_size=32, vehicles_count=0,
                    reward=RewardConfig(off_road_penalty=7.0))
    env = make_env(cfg, seed=0)
    env.reset(seed=0)
    action = np.array([1.0, 1.0, 0.0], dtype=np.float32)     # full throttle, full right: off the road
    for _ in range(cfg.max_episode_steps):
        _, reward, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break
    env.close()
    assert info["done_reason"] == "off_road"
    seed_part = compute_driving_reward(None, action, info, env.unwrapped.reward_config.model_copy(
        update={"off_road_penalty": 0.0}))
    assert reward == pytest.approx(seed_part - 7.0)


def test_bad_reward_config_names_the_field():
    with pytest.raises(ValidationError, match="target_speed"):
        RewardConfig(target_speed=0.0)
    with pytest.raises(ValidationError, match="speed_wieght"):
        compute_driving_reward(None, np.zeros(3), {}, {"speed_wieght": 1.0})


def test_env_reward_is_the_same_function_with_the_env_config():
    env = make_env(EnvConfig(scenario="highway", image_size=32, vehicles_count=5), seed=3)
    env.reset()
    action = np.array([0.4, 0.05, 0.0], dtype=np.float32)
    _, reward, _, _, info = env.step(action)
    assert env.unwrapped.reward_config.target_speed == 25.0            # highway default target
    assert reward == pytest.approx(compute_driving_reward(env, action, info))
    assert reward == pytest.approx(compute_driving_reward(None, action, info, RewardConfig(target_speed=25.0)))
    env.close()


def test_wrapper_overrides_the_reward_with_custom_weights():
    base = make_env(EnvConfig(scenario="urban", image_size=32), seed=1)
    env = CARLARewardWrapper(base, {"speed_weight": 3.0, "collision_penalty": 100.0, "target_speed": 5.0})
    assert (env.speed_weight, env.lane_weight, env.collision_penalty, env.target_speed) == (3.0, 0.5, 100.0, 5.0)
    assert env.config["comfort_weight"] == 0.3
    env.reset(seed=1)
    action = np.array([0.2, 0.0, 0.0], dtype=np.float32)
    _, reward, _, _, info = env.step(action)
    custom = RewardConfig(speed_weight=3.0, collision_penalty=100.0, target_speed=5.0)
    assert reward == pytest.approx(compute_driving_reward(None, action, info, custom))
    assert reward != pytest.approx(info["env_reward"])
    assert info["env_reward"] == pytest.approx(compute_driving_reward(None, action, info))   # urban: the seed's
    # Changing an attribute changes the reward (as the seed's class reads its attributes).
    env.target_speed = 8.33
    _, reward2, _, _, info2 = env.step(action)
    assert reward2 == pytest.approx(compute_driving_reward(
        None, action, info2, RewardConfig(speed_weight=3.0, collision_penalty=100.0, target_speed=8.33)))
    env.close()


def test_wrapper_defaults_follow_the_env_or_the_seed():
    highway = CARLARewardWrapper(make_env(EnvConfig(scenario="highway", image_size=32)))
    assert highway.target_speed == 25.0 and highway.collision_penalty == 10.0
    highway.close()

    class Plain(gym.Env):
        observation_space = gym.spaces.Discrete(1)
        action_space = gym.spaces.Box(-1, 1, (3,))

        def reset(self, *, seed=None, options=None):
            return 0, {}

        def step(self, action):
            return 0, 0.0, False, False, {"velocity": [8.33, 0.0, 0.0], "lane_deviation": 0.0}

    wrapped = CARLARewardWrapper(Plain(), RewardConfig(lane_weight=0.0))
    assert wrapped.target_speed == 8.33
    _, reward, _, _, _ = wrapped.step(np.zeros(3))
    assert reward == pytest.approx(1.0 + 0.0 + 0.3)
    # Out-of-bounds actions are scored as applied (clipped).
    _, reward, _, _, _ = wrapped.step(np.array([0.0, 5.0, 0.0]))
    assert reward == pytest.approx(1.0 + 0.3 * 0.5)
