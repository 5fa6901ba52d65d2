"""Stand-in environments for tests and benchmarks (no simulator needed).

`FixedLatencyEnv` has the driving observation and action spaces and takes a fixed wall-clock time
per step, spent *sleeping*: it behaves like a remote CARLA server in synchronous mode at 25 FPS
(40 ms a tick), which costs the client no CPU while it waits. The throughput benchmark
(`benchmarks/parallel_envs.py`) measures the RL loop against it.
"""
from __future__ import annotations

import time
from typing import Any

import gymnasium as gym
import numpy as np

from stages.envs.spaces import action_space, observation_space


class FixedLatencyEnv(gym.Env):
    """A driving-shaped env whose ``step`` lasts ``step_seconds`` (sleeping), e.g. 0.04 s = 25 FPS.

    Observations are a constant-size random image, a state vector and a fixed command; the reward
    is the throttle minus the brake, so a policy can learn something, but the point is the timing.
    Episodes are truncated after ``max_episode_steps``.
    """

    metadata = {"render_modes": []}

    def __init__(self, step_seconds: float = 0.04, image_size: int = 64, max_episode_steps: int = 200,
                 command: str = "follow the lane") -> None:
        if step_seconds < 0:
            raise ValueError(f"step_seconds={step_seconds} must be >= 0")
        self.step_seconds = float(step_seconds)
        self.max_episode_steps = int(max_episode_steps)
        self.command = command
        self.observation_space = observation_space(image_size)
        self.action_space = action_space()
        self._image = np.zeros((image_size, image_size, 3), dtype=np.uint8)
        self._t = 0

    def _obs(self) -> dict[str, Any]:
        state = np.zeros(8, dtype=np.float32)
        state[6] = 50.0  # no vehicle ahead
        state[7] = self._t / self.max_episode_steps
        return {"image": self._image, "state": state, "command": self.command}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict[str, Any], dict]:
        super().reset(seed=seed)
        self._image = self.np_random.integers(0, 256, size=self._image.shape, dtype=np.uint8)
        self._t = 0
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict]:
        deadline = time.perf_counter() + self.step_seconds
        self._t += 1
        action = np.asarray(action, dtype=np.float32)
        reward = float(action[0] - action[2])
        obs = self._obs()
        truncated = self._t >= self.max_episode_steps
        info = {"route_completion": self._t / self.max_episode_steps}
        remaining = deadline - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
        return obs, reward, False, truncated, info
