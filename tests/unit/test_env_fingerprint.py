"""The highway backend's behaviour, fixed bit for bit: a fingerprint of seeded episodes.

For every scenario (and the world view), one env is reset with a fixed seed and stepped 50 times
with a fixed action sequence (random but seeded: throttle, steer, brake); then the same env is
driven 50 steps by a noisy `ExpertDriver` with a seeded generator. Each run hashes the observations
(image bytes, state bytes, command), rewards, terminated / truncated flags, the infos (every key,
arrays as bytes, floats by ``repr``) and, for the expert, its applied and clean actions. An episode
that ends early is reset with the next seed, so every run covers 50 steps.

The expected digests were recorded on main before the env refactor (issue #13) and must not move
unless a change of behaviour is meant: then regenerate them with
``PYTHONPATH=$PWD python tests/unit/test_env_fingerprint.py`` and say why in the commit.
They depend on the pinned numpy / opencv / highway-env of this project's environment.
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest

from stages.envs import EnvConfig, ExpertDriver, make_env

STEPS = 50
CASES: dict[str, dict[str, Any]] = {
    "highway": {"scenario": "highway"},
    "urban": {"scenario": "urban"},
    "merge": {"scenario": "merge"},
    "roundabout": {"scenario": "roundabout"},
    "racetrack": {"scenario": "racetrack"},
    "night": {"scenario": "night"},
    "rain": {"scenario": "rain"},
    "highway-world-128": {"scenario": "highway", "view": "world", "image_size": 128},
    "urban-world": {"scenario": "urban", "view": "world", "reward": {"off_road_penalty": 5.0}},
    "highway-short": {"scenario": "highway", "max_episode_steps": 20, "vehicles_count": 5},   # route_completed
    "roundabout-short": {"scenario": "roundabout", "max_episode_steps": 15},                 # time_limit
}
PARTS = ("obs", "rewards", "dones", "infos", "actions")

# Recorded on main (2355554), see the module docstring.
EXPECTED: dict[str, dict[str, str]] = {
    'highway': {
        'obs': '718286ae45f9343bed151f05', 'rewards': 'effb233de7cb0eec7d9331b4', 'dones': 'ceeb70f4c1ec9ff9ba14eaa9',
        'infos': '061b2405f16e809dad5cf283', 'actions': 'c0f3154fc535bcd553b74dc3'},
    'highway-short': {
        'obs': 'e54f0cf545d57e29bdad928e', 'rewards': '4440493ee99cb96207fcc528', 'dones': '86d00d0f9ed08f251c8bcf79',
        'infos': '888b98b16693f450dfebe093', 'actions': 'df4877fab711a80a573e032c'},
    'highway-world-128': {
        'obs': 'c41cce557dd90345f8401ee3', 'rewards': 'effb233de7cb0eec7d9331b4', 'dones': 'ceeb70f4c1ec9ff9ba14eaa9',
        'infos': '30ad2a9583d5ff863bb02d35', 'actions': 'c0f3154fc535bcd553b74dc3'},
    'merge': {
        'obs': '58e1ecbac62bf5a02170aff5', 'rewards': 'e5fbde5eb12a924e4d7d9fc9', 'dones': 'bfb4715dd71aa16d35e8c2e5',
        'infos': '5fbe6c603c1efc1b0076a5da', 'actions': '374d398cb34788149045baa6'},
    'night': {
        'obs': '8a351e35c44d35c494a3adde', 'rewards': 'effb233de7cb0eec7d9331b4', 'dones': 'ceeb70f4c1ec9ff9ba14eaa9',
        'infos': '4c269c90170ef652cc6cf25a', 'actions': 'c0f3154fc535bcd553b74dc3'},
    'racetrack': {
        'obs': '2a8b5bbf504df48ed2f05ae5', 'rewards': 'b6837f1ad0f4573d01793064', 'dones': '6f081985430e369e9ea325fd',
        'infos': 'aca7df6582a008a3118783e6', 'actions': '8b4c664ce5594a86175924e5'},
    'rain': {
        'obs': '85c4bfd69b501d47ddad5559', 'rewards': 'effb233de7cb0eec7d9331b4', 'dones': 'ceeb70f4c1ec9ff9ba14eaa9',
        'infos': '2d6fc6c717c37635bb3ee756', 'actions': 'c0f3154fc535bcd553b74dc3'},
    'roundabout': {
        'obs': '4f44543b4311e50a86cf1d3b', 'rewards': 'af3bf2e00b4ddb5553c2f3db', 'dones': '56c18752019bb4b5049f03e2',
        'infos': 'a06fcfae605e77ef8683b762', 'actions': 'd78bc36bbc231b5544153fbd'},
    'roundabout-short': {
        'obs': '6f751a8d3b3628c357fd3305', 'rewards': '7e29949a8eaf15e8b66de1fd', 'dones': '188b8e6892d4366498642934',
        'infos': '539dfca70dd5dce0faefade7', 'actions': '68e600d2275f7b3fed7ed49d'},
    'urban': {
        'obs': '84d2598a0472a417565661fd', 'rewards': '8d3cbd2bc049a5878d0add64', 'dones': '64840338692f5c3d7331b15c',
        'infos': '2c1cb56b4e2a96c58330f526', 'actions': '68536802171f88df5dc078a9'},
    'urban-world': {
        'obs': '33e55aa5e64eb1fe8b969615', 'rewards': '4cff177f6832f97a87638939', 'dones': '64840338692f5c3d7331b15c',
        'infos': 'eb23735897e85c8bd9a2d00a', 'actions': '68536802171f88df5dc078a9'},
}


def _feed(h: Any, value: Any) -> None:
    """Hash ``value`` exactly: arrays by dtype, shape and bytes; floats by repr; dicts by sorted key."""
    if isinstance(value, np.ndarray):
        h.update(f"nd{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        h.update(b"{")
        for key in sorted(value):
            h.update(repr(key).encode())
            _feed(h, value[key])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for item in value:
            _feed(h, item)
        h.update(b"]")
    else:
        h.update(f"{type(value).__name__}:{value!r}".encode())


def fingerprint(name: str) -> dict[str, str]:
    """Per-part digests of the fixed-action run and the expert run of case ``name``."""
    cfg = EnvConfig(**{"image_size": 64, **CASES[name]})
    env = make_env(cfg, seed=0)
    h = {part: hashlib.sha256() for part in PARTS}
    rng = np.random.default_rng(1234)
    fixed = np.stack([rng.uniform(0.0, 0.8, STEPS), rng.normal(0.0, 0.15, STEPS),
                      rng.uniform(0.0, 0.3, STEPS) * (rng.uniform(size=STEPS) < 0.3)], axis=1).astype(np.float32)
    expert = ExpertDriver(noise=0.5, rng=7)

    def record(obs: dict[str, Any], info: dict[str, Any]) -> None:
        _feed(h["obs"], obs)
        _feed(h["infos"], info)

    for phase, seed in (("fixed", 3), ("expert", 11)):
        obs, info = env.reset(seed=seed)
        record(obs, info)
        for k in range(STEPS):
            if phase == "fixed":
                action = fixed[k]
            else:
                action = expert.act(env)
                _feed(h["actions"], [action, expert.clean_action])
            obs, reward, terminated, truncated, info = env.step(action)
            record(obs, info)
            _feed(h["rewards"], reward)
            _feed(h["dones"], (terminated, truncated, info["done_reason"]))
            if terminated or truncated:
                seed += 100
                obs, info = env.reset(seed=seed)
                record(obs, info)
    env.close()
    return {part: h[part].hexdigest()[:24] for part in PARTS}


@pytest.mark.parametrize("name", sorted(CASES))
def test_env_fingerprint_is_unchanged(name):
    assert fingerprint(name) == EXPECTED[name]


if __name__ == "__main__":
    print("EXPECTED: dict[str, dict[str, str]] = {")
    for case in sorted(CASES):
        digests = list(fingerprint(case).items())
        print(f"    {case!r}: {{")
        print("        " + ", ".join(f"{k!r}: {v!r}" for k, v in digests[:3]) + ",")
        print("        " + ", ".join(f"{k!r}: {v!r}" for k, v in digests[3:]) + "},")
    print("}")
