"""The scripted expert finishes most episodes without a collision, follows commands, and perturbs."""
from __future__ import annotations

import numpy as np
import pytest

from stages.envs import EnvConfig, ExpertDriver, make_env


def drive(env, expert: ExpertDriver, seed: int) -> tuple[dict, list[np.ndarray], list[str]]:
    obs, info = env.reset(seed=seed)
    actions, commands, done = [], [obs["command"]], False
    while not done:
        action = expert.act(env)
        assert action.dtype == np.float32 and action.shape == (3,)
        assert env.action_space.contains(action)
        obs, _, terminated, truncated, info = env.step(action)
        actions.append(action)
        commands.append(obs["command"])
        done = terminated or truncated
    return info, actions, commands


# Short episodes keep this fast: 10 s on the highway (250 m), 15 s in town (through the junction).
@pytest.mark.parametrize(("scenario", "steps"), [("highway", 100), ("urban", 150)])
def test_expert_finishes_most_episodes_without_collision(scenario, steps):
    env = make_env(EnvConfig(scenario=scenario, image_size=32, max_episode_steps=steps))
    results = [drive(env, ExpertDriver(), seed=100 + i)[0] for i in range(10)]
    failures = [r["done_reason"] for r in results if r["done_reason"] in ("collision", "off_road")]
    assert len(failures) <= 2, failures
    assert np.mean([r["route_completion"] for r in results]) > 0.5
    env.close()


def test_expert_executes_lane_change_commands():
    env = make_env(EnvConfig(scenario="highway", image_size=32, max_episode_steps=150))
    asked, done = 0, 0
    for seed in range(3):
        obs, info = env.reset(seed=seed)
        expert, pending, finished = ExpertDriver(), None, False
        while not finished:
            obs, _, terminated, truncated, info = env.step(expert.act(env))
            finished = terminated or truncated
            command = obs["command"]
            if command.startswith("change to the") and pending is None:
                pending = (command, info["lane_index"])
                asked += 1
            elif command == "follow the lane" and pending is not None:
                wanted = -1 if "left" in pending[0] else 1
                done += info["lane_index"] - pending[1] == wanted    # lane ids grow to the right
                pending = None
        assert info["done_reason"] not in ("collision", "off_road")
    assert asked >= 3 and done >= asked - 1, (asked, done)


def test_expert_merges_onto_the_main_road():
    env = make_env(EnvConfig(scenario="merge", image_size=32, max_episode_steps=150))
    info, _, commands = drive(env, ExpertDriver(), seed=3)
    assert commands[0] == "merge onto the main road" and commands[-1] == "follow the lane"
    assert info["done_reason"] not in ("collision", "off_road") and info["lane_index"] < 2


def test_noise_perturbs_and_the_expert_recovers():
    env = make_env(EnvConfig(scenario="highway", image_size=32, max_episode_steps=120))
    clean_info, clean, _ = drive(env, ExpertDriver(), seed=5)
    noisy_expert = ExpertDriver(noise=0.5, rng=np.random.default_rng(0))
    deviations, differences = [], []
    obs, info = env.reset(seed=5)
    done = False
    while not done:
        action = noisy_expert.act(env)
        differences.append(np.abs(action - noisy_expert.clean_action).max())
        obs, _, terminated, truncated, info = env.step(action)
        deviations.append(abs(info["lane_deviation"]))
        done = terminated or truncated
    assert info["done_reason"] not in ("collision", "off_road")
    assert max(differences) > 0.02                        # the applied action is perturbed ...
    assert np.mean(deviations) < 1.5                       # ... and the car comes back to its lane
    # Same rng seed, same perturbed drive.
    _, again, _ = drive(env, ExpertDriver(noise=0.5, rng=0), seed=5)
    _, first, _ = drive(env, ExpertDriver(noise=0.5, rng=0), seed=5)
    assert np.array_equal(np.stack(again), np.stack(first))
    assert not np.array_equal(np.stack(clean[:50]), np.stack(first[:50]))


def test_expert_refuses_other_envs():
    import gymnasium as gym

    with pytest.raises(TypeError, match="DrivingEnv"):
        ExpertDriver().act(gym.make("CartPole-v1"))
    with pytest.raises(ValueError, match="noise"):
        ExpertDriver(noise=-1.0)
