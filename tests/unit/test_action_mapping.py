"""What the action head learns from agrees with what the env does with an action.

The controls target ([throttle, steer, brake], the expert's `_to_action`) maps onto highway-env's
continuous action as `stages.envs.highway.sims` says, and the trajectory target (future poses in the
ego frame, x forward, y left) turns the way the steering does.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from stages.data.recorder import future_waypoints, record_episode
from stages.envs import EnvConfig, ExpertDriver, make_env
from stages.envs.highway.sims import MAX_ACCELERATION, MAX_BRAKING, MAX_STEERING

ENV = EnvConfig(scenario="highway", image_size=32, max_episode_steps=30, vehicles_count=0)


@pytest.mark.parametrize(("steer", "accel"), [(0.0, 0.0), (0.05, 2.0), (-0.2, -3.0), (0.5, 4.9), (-1.0, -7.5)])
def test_controls_round_trip_onto_the_simulator(steer, accel):
    """The expert's (wheel angle, acceleration) -> [throttle, steer, brake] -> what highway-env applies."""
    action = ExpertDriver._to_action(steer, accel)
    assert action[0] * action[2] == 0.0          # never throttle and brake at once
    env = make_env(ENV)
    env.reset(seed=0)
    ego = env.unwrapped.ego
    ego.speed = 20.0                               # fast enough that no brake is capped at standstill
    env.step(action)
    applied = ego.action
    env.close()
    assert applied["steering"] == pytest.approx(steer * MAX_STEERING, abs=1e-6)
    assert applied["acceleration"] == pytest.approx(accel, abs=1e-5)
    # And back: the applied commands give the same controls.
    back = ExpertDriver._to_action(applied["steering"] / MAX_STEERING, applied["acceleration"])
    np.testing.assert_allclose(back, action, atol=1e-6)


def test_throttle_and_brake_scale():
    env = make_env(ENV)
    env.reset(seed=0)
    ego = env.unwrapped.ego
    ego.speed = 20.0
    env.step(np.array([1.0, 0.0, 0.0], np.float32))
    assert ego.action["acceleration"] == pytest.approx(MAX_ACCELERATION)
    env.step(np.array([0.0, 0.0, 1.0], np.float32))
    assert ego.action["acceleration"] == pytest.approx(-MAX_BRAKING)
    env.close()


@pytest.mark.parametrize("steer", [0.05, -0.05])
def test_trajectory_target_turns_with_the_steering(steer):
    """Positive steer turns right: the future waypoints (x forward, y left) bend to negative y, and the
    heading rate is the bicycle model's v * delta / wheelbase the expert's pure pursuit assumes."""
    env = make_env(ENV)
    action = np.array([0.0, steer, 0.0], np.float32)
    ep = record_episode(env, lambda e, o: action, seed=1, boxes=None)
    env.close()
    wp, valid = future_waypoints(ep.poses, horizon=5, stride=2)
    assert valid[0]
    assert np.sign(wp[0, -1, 1]) == -np.sign(steer)
    assert wp[0, -1, 0] > 10.0                     # still mostly forward
    yaw_rate = -np.diff(np.unwrap(ep.poses[:6, 2])) / ep.dt   # right-handed yaw: turning right lowers it
    speed = float(ep.states[1, 0])
    expected = speed * math.sin(math.atan(0.5 * math.tan(steer * MAX_STEERING))) / 2.5
    assert yaw_rate[2] == pytest.approx(expected, rel=0.1)
