"""The highway backend's DrivingEnv: spaces, info, action mapping, episode ends, captions, seeds, vectors."""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
from highway_env.vehicle.objects import Obstacle
from pydantic import ValidationError

from stages.envs import (
    ACTION_HIGH, ACTION_LOW, SCENARIOS, STATE_FIELDS, EnvConfig, RewardConfig, make_env, make_vector_env)
from stages.envs.highway import DrivingEnv
from stages.envs.highway.sims import MAX_ACCELERATION, MAX_BRAKING
from stages.envs.spaces import COMMAND_CHARSET

INFO_KEYS = {"velocity", "speed", "lane_deviation", "heading_error", "collision", "route_completion",
             "infractions", "ego_pose", "command", "caption", "scenario", "lane_index", "done_reason"}
INFRACTIONS = {"collision", "off_road", "lane_invasion", "wrong_way", "speeding"}
S = {name: i for i, name in enumerate(STATE_FIELDS)}


def env_for(scenario: str = "highway", **kw) -> DrivingEnv:
    return make_env(EnvConfig(scenario=scenario, **{"image_size": 32, **kw}))


# -- config and spaces -----------------------------------------------------------------------

def test_constants():
    assert STATE_FIELDS == ("speed", "lateral_offset", "heading_error", "last_throttle", "last_steer",
                            "last_brake", "front_distance", "route_completion")
    assert isinstance(ACTION_LOW, np.ndarray) and ACTION_LOW.tolist() == [0.0, -1.0, 0.0]
    assert isinstance(ACTION_HIGH, np.ndarray) and ACTION_HIGH.tolist() == [1.0, 1.0, 1.0]
    assert set(SCENARIOS) == {"highway", "urban", "merge", "roundabout", "racetrack", "night", "rain"}


@pytest.mark.parametrize(("values", "field"), [
    ({"scenario": "desert"}, "scenario"),
    ({"backend": "metadrive"}, "backend"),
    ({"image_size": 8}, "image_size"),
    ({"simulation_frequency": 15}, "simulation_frequency"),
    ({"vehicles_count": -1}, "vehicles_count"),
    ({"colour": "red"}, "colour"),
])
def test_bad_config_names_the_field(values, field):
    with pytest.raises(ValidationError, match=field):
        EnvConfig(**values)


def test_target_speed_defaults_per_scenario():
    assert EnvConfig(scenario="highway").resolved_reward().target_speed == 25.0
    assert EnvConfig(scenario="urban").resolved_reward().target_speed == 8.33
    # Weights given without a target speed keep the scenario's target; an explicit one wins.
    cfg = EnvConfig(scenario="merge", reward=RewardConfig(collision_penalty=20.0))
    assert cfg.resolved_reward().target_speed == 25.0 and cfg.resolved_reward().collision_penalty == 20.0
    assert EnvConfig(scenario="highway", reward={"target_speed": 30.0}).resolved_reward().target_speed == 30.0


# -- every scenario --------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_scenario_spaces_and_info(scenario):
    env = env_for(scenario)
    obs, info = env.reset(seed=2)
    assert env.observation_space.contains(obs)
    for _ in range(4):
        obs, reward, terminated, truncated, info = env.step(np.array([0.3, 0.0, 0.0], dtype=np.float32))
        assert env.observation_space.contains(obs), obs["command"]
        assert isinstance(reward, float) and not truncated
    assert obs["image"].dtype == np.uint8 and obs["image"].shape == (32, 32, 3)
    assert obs["image"].std() > 5                                   # a drawn scene, not a blank frame
    assert obs["state"].dtype == np.float32 and obs["state"].shape == (8,)
    assert isinstance(obs["command"], str) and obs["command"] and set(obs["command"]) <= COMMAND_CHARSET
    assert INFO_KEYS <= set(info) and set(info["infractions"]) == INFRACTIONS
    assert np.shape(info["velocity"]) == (3,) and np.shape(info["ego_pose"]) == (3,)
    assert info["speed"] == pytest.approx(np.linalg.norm(info["velocity"][:2]), rel=1e-5)
    assert info["scenario"] == scenario and info["command"] == obs["command"]
    assert obs["state"][S["speed"]] == pytest.approx(info["speed"], rel=1e-5)
    assert obs["state"][S["last_throttle"]] == pytest.approx(0.3)
    assert 0.0 <= info["route_completion"] <= 1.0
    assert "km/h" in info["caption"] and info["caption"].endswith(f"Command: {info['command']}.")
    env.close()


# -- actions ---------------------------------------------------------------------------------

def test_action_mapping_throttle_brake_steer():
    env = env_for("highway", vehicles_count=0)
    env.reset(seed=0)
    ego, dt = env.unwrapped.ego, 0.1
    v0 = ego.speed
    env.step(np.array([1.0, 0.0, 0.0]))
    assert ego.speed == pytest.approx(v0 + MAX_ACCELERATION * dt)
    env.step(np.array([0.0, 0.0, 1.0]))
    assert ego.speed == pytest.approx(v0 + (MAX_ACCELERATION - MAX_BRAKING) * dt)
    env.step(np.array([0.5, 0.0, 0.5]))                                  # 0.5*5 - 0.5*8 = -1.5 m/s²
    assert ego.speed == pytest.approx(v0 + (MAX_ACCELERATION - MAX_BRAKING - 1.5) * dt)
    h0 = ego.heading
    _, _, _, _, info = env.step(np.array([0.0, 0.5, 0.0]))               # positive steer turns right
    assert ego.heading > h0 and info["ego_pose"][2] == pytest.approx(-ego.heading, abs=1e-6)
    # Out-of-range actions are clipped; the state records the applied action.
    obs, _, _, _, _ = env.step(np.array([2.0, -3.0, -1.0]))
    assert obs["state"][[S["last_throttle"], S["last_steer"], S["last_brake"]]].tolist() == [1.0, -1.0, 0.0]
    env.close()


def test_brake_stops_the_car_without_reversing():
    env = env_for("highway", vehicles_count=0)
    env.reset(seed=0)
    for _ in range(40):
        obs, *_ = env.step(np.array([0.0, 0.0, 1.0]))
    assert env.unwrapped.ego.speed == 0.0 and obs["state"][S["speed"]] == 0.0
    env.close()


# -- episode ends ----------------------------------------------------------------------------

def test_time_limit_truncates():
    env = env_for("urban", max_episode_steps=3)
    env.reset(seed=0)
    ends = [env.step(np.array([0.2, 0.0, 0.0]))[2:5] for _ in range(3)]
    assert [(t, tr) for t, tr, _ in ends] == [(False, False), (False, False), (False, True)]
    assert ends[-1][2]["done_reason"] == "time_limit"


def test_collision_terminates_with_the_penalty():
    env = env_for("highway", vehicles_count=0)
    env.reset(seed=0)
    sim, ego = env.unwrapped.sim, env.unwrapped.ego
    sim.road.objects.append(Obstacle(sim.road, ego.position + np.array([12.0, 0.0])))
    obs, _, _, _, info = env.step(np.zeros(3))
    assert obs["state"][S["front_distance"]] < 12.0                     # the obstacle is on the path
    for _ in range(10):
        obs, reward, terminated, truncated, info = env.step(np.array([0.5, 0.0, 0.0]))
        if terminated:
            break
    assert terminated and not truncated and info["collision"] and info["done_reason"] == "collision"
    assert info["infractions"]["collision"] == 1 and reward < -8.0


def test_leaving_the_road_terminates():
    env = env_for("highway", vehicles_count=0)
    env.reset(seed=0)
    for _ in range(60):
        _, _, terminated, _, info = env.step(np.array([0.2, -0.3, 0.0]))
        if terminated:
            break
    assert terminated and info["done_reason"] == "off_road" and info["infractions"]["off_road"] >= 1


def test_route_completion_truncates_and_grows():
    env = env_for("highway", vehicles_count=0, max_episode_steps=400)
    env.reset(seed=0)
    completions, info, truncated = [], {}, False
    while not truncated:
        _, _, terminated, truncated, info = env.step(np.array([0.3, 0.0, 0.0]))
        assert not terminated
        completions.append(info["route_completion"])
    assert info["done_reason"] == "route_completed" and completions[-1] == 1.0
    assert all(b >= a for a, b in zip(completions, completions[1:]))
    # The route of an open road is 0.8 * target speed * episode duration.
    assert env.unwrapped.route_length == pytest.approx(0.8 * 25.0 * 40.0)


# -- commands, captions, images --------------------------------------------------------------

def test_urban_command_follows_the_destination():
    env = env_for("urban")
    seen = {}
    for seed in range(12):
        obs, _ = env.reset(seed=seed)
        seen[env.unwrapped.destination] = obs["command"]
    assert seen == {"o1": "turn left at the next intersection", "o2": "go straight at the next intersection",
                    "o3": "turn right at the next intersection"}


def test_roundabout_and_merge_commands():
    env = env_for("roundabout")
    obs, _ = env.reset(seed=1)
    assert obs["command"] == f"take the {['first', 'second', 'third'][env.unwrapped.exit_number - 1]} exit at the roundabout"
    merge = env_for("merge")
    obs, _ = merge.reset(seed=1)
    assert obs["command"] == "merge onto the main road"


def test_captions_describe_the_frame_and_change_with_it():
    env = env_for("highway", vehicles_count=20)
    _, info = env.reset(seed=4)
    captions = {info["caption"]}
    for _ in range(15):
        _, _, _, _, info = env.step(np.array([0.6, 0.0, 0.0]))
        captions.add(info["caption"])
    assert len(captions) >= 10                                         # speed and distances move
    text = info["caption"]
    speed_kmh = round(info["speed"] * 3.6)
    assert f"{speed_kmh} km/h" in text and "lane" in text and " m " in text


def test_views_and_appearance_variants_change_the_image():
    day = env_for("highway", image_size=64)
    night = env_for("night", image_size=64)
    rain = env_for("rain", image_size=64)
    world = env_for("highway", image_size=64, view="world")
    images = {name: e.reset(seed=5)[0]["image"] for name, e in
              {"day": day, "night": night, "rain": rain, "world": world}.items()}
    assert images["night"].mean() < 0.6 * images["day"].mean()
    assert not np.array_equal(images["rain"], images["day"])
    assert not np.array_equal(images["world"], images["day"])
    assert day.render().shape == (64, 64, 3)
    # Heading-up: the road runs up the image, so lane marks make columns (vertical structure).
    gray = images["day"].astype(float).mean(axis=2)
    assert np.abs(np.diff(gray, axis=0)).mean() < np.abs(np.diff(gray, axis=1)).mean()


# -- seeds and vector envs -------------------------------------------------------------------

def rollout(env, seed: int, steps: int = 6):
    obs, info = env.reset(seed=seed)
    out = [(obs["image"].copy(), obs["state"].copy(), info["caption"])]
    for _ in range(steps):
        obs, reward, *_, info = env.step(np.array([0.4, 0.05, 0.0]))
        out.append((obs["image"].copy(), obs["state"].copy(), info["caption"], reward))
    return out


@pytest.mark.parametrize("scenario", ["highway", "urban"])
def test_same_seed_same_episode(scenario):
    a, b = rollout(env_for(scenario), 7), rollout(env_for(scenario), 7)
    for x, y in zip(a, b):
        assert np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) and x[2:] == y[2:]
    c = rollout(env_for(scenario), 8)
    assert not all(np.array_equal(x[1], y[1]) for x, y in zip(a, c))


def test_make_env_seed_applies_to_the_first_reset():
    a = make_env(EnvConfig(image_size=32), seed=11)
    b = make_env(EnvConfig(image_size=32, seed=11))
    assert np.array_equal(a.reset()[0]["state"], b.reset()[0]["state"])


@pytest.mark.parametrize("asynchronous", [False, True])
def test_vector_env_batches_commands(asynchronous):
    cfg = EnvConfig(scenario="highway", image_size=32, max_episode_steps=4)
    venv = make_vector_env(cfg, 2, asynchronous=asynchronous)
    try:
        obs, infos = venv.reset(seed=3)
        assert obs["image"].shape == (2, 32, 32, 3) and obs["state"].shape == (2, 8)
        assert isinstance(obs["command"], tuple) and len(obs["command"]) == 2
        assert all(isinstance(c, str) and c.strip() for c in obs["command"])
        assert not np.array_equal(obs["state"], obs["state"][::-1]) or infos["caption"][0] != infos["caption"][1]
        for _ in range(6):                                              # across an autoreset
            obs, rewards, terminated, truncated, infos = venv.step(np.tile([0.3, 0.0, 0.0], (2, 1)).astype(np.float32))
            assert all(c in ("follow the lane", "change to the left lane", "change to the right lane")
                       for c in obs["command"])
        assert rewards.shape == (2,) and len(infos["caption"]) == 2 and infos["infractions"]["collision"].shape == (2,)
    finally:
        venv.close()


def test_vector_env_seeds_are_distinct():
    venv = make_vector_env(EnvConfig(image_size=32), 3, seed=20)
    obs, infos = venv.reset()
    poses = {tuple(np.round(p, 3)) for p in infos["ego_pose"]}
    assert len(poses) == 3
    venv.close()


def test_carla_backend_goes_to_the_bridge():
    if importlib.util.find_spec("stages.envs.carla_bridge") is None:
        with pytest.raises(NotImplementedError, match="carla_bridge"):
            make_env(EnvConfig(backend="carla"))
    else:
        env = make_env(EnvConfig(backend="carla"))                     # built, not connected
        assert not isinstance(env, DrivingEnv)
        env.close()


def test_state_signs_match_the_geometry():
    env = env_for("highway", vehicles_count=0)
    env.reset(seed=0)
    for _ in range(3):
        obs, _, _, _, info = env.step(np.array([0.0, 0.3, 0.0]))        # drift right
    assert obs["state"][S["heading_error"]] > 0 and obs["state"][S["lateral_offset"]] > 0
    assert info["lane_deviation"] == pytest.approx(obs["state"][S["lateral_offset"]], abs=1e-5)
    assert math.isclose(info["heading_error"], obs["state"][S["heading_error"]], abs_tol=1e-5)


def test_state_offset_can_be_to_the_lane_the_route_wants_during_a_lane_change():
    # The observation's offset keeps one sign until a lane change is done (the info's stays to the
    # nearest lane), so "steer towards the wanted lane" follows from the state.
    env = make_env(EnvConfig(scenario="highway", image_size=32, max_episode_steps=60, offset_reference="route"))
    obs, info = env.reset(seed=0, options={"command": "change to the left lane"})
    base = env.unwrapped
    assert base.route.desired_lane_id() == base.route.lane_id - 1
    # Lane ids grow rightwards: the wanted lane is one lane width (4 m) to the left, so the car sits
    # about 4 m to its right.
    assert obs["state"][1] == pytest.approx(info["lane_deviation"] + 4.0, abs=0.3)
    assert abs(info["lane_deviation"]) < 0.5
    env.close()
    lane = make_env(EnvConfig(scenario="highway", image_size=32, max_episode_steps=60))    # the default
    obs, info = lane.reset(seed=0, options={"command": "change to the left lane"})
    assert obs["state"][1] == pytest.approx(info["lane_deviation"], abs=1e-5)
    lane.close()
