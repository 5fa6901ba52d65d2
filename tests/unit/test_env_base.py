"""The env contract (`stages.envs.base.DrivingEnvBase`) on a scripted backend, `wrap_angle`, and the
shape of `stages.envs` (no import cycles, one mission per scenario, modules under 450 lines)."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

from stages.envs import SCENARIOS, RewardConfig, compute_driving_reward
from stages.envs.base import INFO_KEYS, INFRACTION_KEYS, DrivingEnvBase, step_seconds
from stages.envs.geometry import wrap_angle

ROOT = Path(__file__).resolve().parents[2]


class ScriptedBackend(DrivingEnvBase):
    """A backend without a simulator: each step's conditions come from ``script`` (one dict a step)."""

    def __init__(self, script: list[dict[str, Any]] | None = None, max_episode_steps: int = 5,
                 policy_frequency: float = 20, seed: int = 3) -> None:
        super().__init__(scenario="highway", image_size=16, policy_frequency=policy_frequency,
                         max_episode_steps=max_episode_steps, reward_config=RewardConfig(target_speed=10.0),
                         seed=seed)
        self.script = script or []
        self.now: dict[str, Any] = {}
        self.advanced: list[np.ndarray] = []
        self.draw = 0.0

    def _begin_episode(self, options: dict[str, Any]) -> dict[str, Any]:
        self.draw = float(self.np_random.uniform())
        self.now = {}
        self._command = "follow the lane"
        self._frame = np.zeros((16, 16, 3), np.uint8)
        return self._info()

    def _advance(self, action: np.ndarray) -> None:
        self.advanced.append(action)
        self.now = self.script[self._steps] if self._steps < len(self.script) else {}

    def _measure(self) -> dict[str, Any]:
        n = self.now
        self._count_infractions(collisions=int(n.get("collision", False)), lane_invasions=n.get("invasions", 0),
                                off_road=n.get("off_road", False), heading_error=n.get("heading_error", 0.0),
                                speed=n.get("speed", 9.0), speed_limit=n.get("limit"))
        return self._info()

    def _info(self) -> dict[str, Any]:
        n = self.now
        speed = n.get("speed", 9.0)
        return {"velocity": np.array([speed, 0.0, 0.0], np.float32), "speed": speed, "lane_deviation": 0.2,
                "heading_error": n.get("heading_error", 0.0), "collision": n.get("collision", False),
                "route_completion": self.route_completion, "infractions": self.infractions}

    def _off_road(self) -> bool:
        return self.now.get("off_road", False)

    def _off_route(self) -> bool:
        return self.now.get("off_route", False)

    def _front_gap(self) -> float:
        return math.inf

    @property
    def route_completion(self) -> float:
        return self.now.get("completion", 0.0)

    def caption(self) -> str:
        return "a scripted road"


def run_to_end(env: ScriptedBackend) -> tuple[bool, bool, dict[str, Any], int]:
    env.reset()
    steps = 0
    while True:
        _, _, terminated, truncated, info = env.step(np.array([0.5, 0.0, 0.0]))
        steps += 1
        if terminated or truncated:
            return terminated, truncated, info, steps


@pytest.mark.parametrize(("step", "end", "terminated"), [
    ({"collision": True, "off_road": True, "off_route": True, "completion": 1.0}, "collision", True),
    ({"off_road": True, "off_route": True, "completion": 1.0}, "off_road", True),
    ({"off_route": True, "completion": 1.0}, "off_route", True),
    ({"completion": 1.0}, "route_completed", False),
])
def test_episode_ends_in_the_contract_order(step, end, terminated):
    env = ScriptedBackend([{}, step], max_episode_steps=2)
    term, trunc, info, steps = run_to_end(env)
    assert (term, trunc, info["done_reason"], steps) == (terminated, not terminated, end, 2)


def test_time_limit_counts_steps_and_simulated_time():
    env = ScriptedBackend(max_episode_steps=4, policy_frequency=20)
    _, info = env.reset()
    assert info["done_reason"] == "" and env.elapsed_steps == 0
    term, trunc, info, steps = run_to_end(env)
    assert (term, trunc, info["done_reason"], steps) == (False, True, "time_limit", 4)
    assert env.elapsed_steps == 4 and env.elapsed_seconds == pytest.approx(0.2)
    assert env.seconds_per_step == 0.05 and step_seconds(gym.Wrapper(env)) == 0.05
    env.reset()
    assert env.elapsed_steps == 0 and env.elapsed_seconds == 0.0 and env.episode_id == 3   # reset, run_to_end, reset


def test_first_reset_takes_the_configured_seed():
    a, b = ScriptedBackend(seed=5), ScriptedBackend(seed=5)
    a.reset()
    b.reset(seed=5)
    assert a.draw == b.draw
    a.reset()                                    # later resets continue the generator
    assert a.draw != b.draw
    c = ScriptedBackend(seed=6)
    c.reset()
    assert c.draw != b.draw


def test_reward_is_the_drivers_formula_with_the_env_weights():
    env = ScriptedBackend([{"speed": 7.0}])
    env.reset()
    obs, reward, _, _, info = env.step(np.array([2.0, -0.4, 0.0]))          # clipped to [1, -0.4, 0]
    assert reward == compute_driving_reward(None, np.array([1.0, -0.4, 0.0], np.float32), info,
                                            RewardConfig(target_speed=10.0))
    assert env.advanced[-1].tolist() == pytest.approx([1.0, -0.4, 0.0])
    assert obs["state"][:6].tolist() == pytest.approx([7.0, 0.2, 0.0, 1.0, -0.4, 0.0])
    assert obs["state"][6] == 50.0 and obs["command"] == "follow the lane" and env.render().shape == (16, 16, 3)


def test_infractions_count_per_the_contract():
    env = ScriptedBackend([
        {"heading_error": 2.0, "speed": 10.5, "limit": 10.0},     # wrong way; 10.5 < 1.1 * 10: not speeding
        {"heading_error": -1.6, "speed": 11.5, "limit": 5.0, "invasions": 2},   # wrong way; > 1.1 * target
        {"speed": 30.0, "limit": None, "off_road": False},         # no limit: never speeding
    ], max_episode_steps=3)
    env.reset()
    for _ in range(3):
        *_, info = env.step(np.zeros(3))
    assert set(info["infractions"]) == set(INFRACTION_KEYS)
    assert info["infractions"] == {"collision": 0, "off_road": 0, "lane_invasion": 2, "wrong_way": 2, "speeding": 1}


def test_step_before_reset_and_after_close_is_refused():
    env = ScriptedBackend()
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(3))
    env.reset()
    env.close()
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(3))


def test_step_seconds_needs_a_policy_frequency():
    with pytest.raises(TypeError, match="policy_frequency"):
        step_seconds(gym.make("CartPole-v1"))


# -- wrap_angle ------------------------------------------------------------------------------------

@pytest.mark.parametrize("angle", [0.0, math.pi, -math.pi, 3 * math.pi + 0.1, -7.5, 1e-12, np.float64(4.0)])
def test_wrap_angle_is_the_inline_formula(angle):
    out = wrap_angle(angle)
    assert -math.pi <= out < math.pi and type(out) is type(angle)
    assert out == (angle + math.pi) % (2 * math.pi) - math.pi
    assert math.isclose(math.cos(out), math.cos(angle), abs_tol=1e-9)


def test_wrap_angle_works_on_arrays():
    a = np.array([-4.0, 0.5, 7.0])
    assert np.array_equal(wrap_angle(a), (a + np.pi) % (2 * np.pi) - np.pi)


def test_wrap_angle_has_one_home():
    from stages.data import nuscenes_schema

    assert nuscenes_schema.wrap_angle is wrap_angle          # kept importable there for the nuScenes modules
    # No module of stages/ writes the wrap out again (``(a + pi) % (2 * pi) - pi`` in any spelling).
    inline = re.compile(r"pi\)?\s*%\s*\(?\s*2(\.0)?\s*\*\s*(math|np|numpy)\.pi")
    copies = [f"{path.relative_to(ROOT)}:{n}" for path in sorted((ROOT / "stages").rglob("*.py"))
              if path != ROOT / "stages" / "envs" / "geometry.py"
              for n, line in enumerate(path.read_text().splitlines(), 1) if inline.search(line)]
    assert copies == []


# -- the package's shape ---------------------------------------------------------------------------

def test_the_highway_backend_keeps_the_contract():
    from stages.envs import EnvConfig, make_env
    from stages.envs.highway import DrivingEnv

    env = make_env(EnvConfig(image_size=16, policy_frequency=5, simulation_frequency=10))
    assert isinstance(env, DrivingEnvBase) and isinstance(env, DrivingEnv)
    _, info = env.reset()
    *_, step_info = env.step(np.zeros(3))
    assert set(INFO_KEYS) <= set(info) and set(INFO_KEYS) <= set(step_info)
    assert set(step_info["infractions"]) == set(INFRACTION_KEYS)
    assert env.policy_frequency == 5 and step_seconds(env) == 0.2 and env.elapsed_seconds == 0.2
    env.close()


def test_every_scenario_has_a_highway_mission():
    from stages.envs.highway.missions import MISSIONS, mission_for

    assert set(MISSIONS) == set(SCENARIOS)
    with pytest.raises(ValueError, match="desert"):
        mission_for("desert")
