"""Collectors: what steps a trainer's envs, apart from the algorithm that learns from them.

Every collector is a `Collector`: the envs it steps (how many, one env's spaces), ``restart``
(fresh episodes on the next step, after a checkpoint was loaded) and ``close``. A trainer is
handed one and asks it for data in the form its algorithm learns from:

- PPO, whole rollouts (`RolloutCollector`): `VectorRollouts` steps a vector env itself, then the
  update runs (exactly on-policy); `AsyncRollouts` has env workers keep stepping in a collector
  process while the learner updates (`stages.rl.async_collector`);
- SAC, transitions into its replay buffer (`stages.rl.sac_collection`): a vector env in
  lockstep, or each env at its own pace in the one env-process pool (`stages.rl.workers`).
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, Callable, Protocol

import gymnasium as gym
import numpy as np
import torch

from stages.rl.async_collector import AsyncCollector
from stages.rl.buffers import RolloutBuffer
from stages.rl.vector import as_vector_env, final_obs, final_values, is_env_fns, vector_env_from_fns

__all__ = ["AsyncRollouts", "Collector", "RolloutAgent", "RolloutCollector", "VectorRollouts",
           "make_rollout_collector"]


class Collector(ABC):
    """Steps ``num_envs`` envs for a trainer."""
    num_envs: int
    observation_space: gym.Space  # one env's
    action_space: gym.Space

    @abstractmethod
    def restart(self) -> None:
        """Start fresh episodes on the next step (environments cannot be restored from a checkpoint)."""

    @abstractmethod
    def close(self) -> None: ...


class RolloutAgent(Protocol):
    """What a rollout collector needs of the trainer."""
    model: torch.nn.Module
    adapter: Any
    policy: Any
    device: torch.device
    rollout_len: int
    action_dim: int

    def reset_seed(self) -> int: ...
    def end_episode(self, episode_return: float, completion: float) -> None: ...


class RolloutCollector(Collector):
    """Hands out full rollouts (advantages computed) for PPO's updates."""

    def start(self, agent: RolloutAgent, gamma: float, gae_lambda: float, num_slots: int) -> None:
        """Before the first rollout of a ``train`` call."""

    @abstractmethod
    def rollout(self, agent: RolloutAgent) -> tuple[RolloutBuffer, dict[str, float]]:
        """The next rollout of ``rollout_len`` steps of every env, and its statistics."""

    def release(self, agent: RolloutAgent, buffer: RolloutBuffer) -> dict[str, float]:
        """After the update learned from ``buffer``; returns statistics to log with it."""
        return {}

    def stop(self) -> None:
        """After the last rollout of a ``train`` call."""


class VectorRollouts(RolloutCollector):
    """A vector env, stepped by the trainer's process; ``owns``: close it with us."""

    def __init__(self, env: gym.vector.VectorEnv, owns: bool = False) -> None:
        self.env, self.owns = as_vector_env(env), owns
        self.num_envs = self.env.num_envs
        self.observation_space, self.action_space = self.env.single_observation_space, self.env.single_action_space
        self._obs: Any = None
        self._dones = np.zeros(self.num_envs, dtype=bool)
        self._ep_return = np.zeros(self.num_envs, dtype=np.float64)
        self._buffer: RolloutBuffer | None = None

    def start(self, agent: RolloutAgent, gamma: float, gae_lambda: float, num_slots: int) -> None:
        self._gamma, self._gae_lambda = gamma, gae_lambda
        self._buffer = RolloutBuffer(agent.rollout_len, self.num_envs, agent.adapter.fields(), agent.action_dim)

    def rollout(self, agent: RolloutAgent) -> tuple[RolloutBuffer, dict[str, float]]:
        self.fill(agent, self._buffer, self._gamma, self._gae_lambda)
        return self._buffer, {}

    def restart(self) -> None:
        self._obs = None

    @torch.no_grad()
    def fill(self, agent: RolloutAgent, buffer: RolloutBuffer, gamma: float, gae_lambda: float) -> None:
        """Fill ``buffer`` with its ``num_steps`` steps of every env, then compute GAE."""
        policy, adapter, device = agent.policy, agent.adapter, agent.device
        agent.model.eval()
        if self._obs is None:
            self._obs, _ = self.env.reset(seed=agent.reset_seed())
            self._dones[:] = False
            self._ep_return[:] = 0.0
        buffer.reset()
        while not buffer.full:
            fields = adapter.encode(self._obs)
            inputs = adapter.model_inputs({k: torch.as_tensor(v, device=device) for k, v in fields.items()})
            action, log_prob, value = policy.act(*inputs)
            actions = action.cpu().numpy()
            next_obs, reward, terminated, truncated, infos = self.env.step(actions)
            reward = np.asarray(reward, dtype=np.float32).copy()
            terminated, truncated = np.asarray(terminated, bool), np.asarray(truncated, bool)
            self._ep_return += reward
            done = terminated | truncated
            # Time-limit truncation: the episode did not really end, so bootstrap from V(s_T).
            cut = [i for i in np.flatnonzero(truncated & ~terminated) if final_obs(infos, i) is not None]
            if cut:
                finals = adapter.stack([final_obs(infos, i) for i in cut])
                reward[cut] += gamma * policy(*adapter.to_inputs(finals, device)).value.float().cpu().numpy()
            for i in np.flatnonzero(done):
                agent.end_episode(float(self._ep_return[i]), float(final_values(infos, "route_completion", i, 0.0)))
                self._ep_return[i] = 0.0
            buffer.add(fields, actions, log_prob.float().cpu().numpy(), value.float().cpu().numpy(), reward,
                       self._dones)
            self._obs, self._dones = next_obs, done
        last_value = policy(*adapter.to_inputs(self._obs, device)).value.float().cpu().numpy()
        buffer.finish(last_value, self._dones, gamma, gae_lambda)

    def close(self) -> None:
        if self.owns:
            self.env.close()


class AsyncRollouts(RolloutCollector):
    """Env workers and a collector process that keep stepping while the learner updates (see
    `stages.rl.async_collector`): each rollout is at most one update behind the learner."""

    def __init__(self, env_fns: list[Callable[[], gym.Env]], context: str | None = None) -> None:
        self.collector = AsyncCollector(env_fns, context=context)
        self.num_envs = self.collector.num_envs
        self.observation_space, self.action_space = self.collector.observation_space, self.collector.action_space

    def start(self, agent: RolloutAgent, gamma: float, gae_lambda: float, num_slots: int) -> None:
        self._gamma, self._gae_lambda = gamma, gae_lambda
        # Where the behaviour policy infers: the trainer says (`PPOTrainer.collector_device`); None
        # is a CPU process of its own.
        self.collector.start(agent.model, agent.adapter, agent.rollout_len, agent.action_dim, gamma,
                             seed=agent.reset_seed(), num_slots=num_slots,
                             device=getattr(agent, "collector_device", None), bf16=getattr(agent, "bf16", False),
                             graphs=getattr(agent, "cuda_graphs", True))

    def rollout(self, agent: RolloutAgent) -> tuple[RolloutBuffer, dict[str, float]]:
        buffer, stats = self.collector.get()
        buffer.compute_advantages(self._gamma, self._gae_lambda)
        for ret, completion in zip(stats.pop("episode_returns"), stats.pop("episode_completion")):
            agent.end_episode(ret, completion)
        return buffer, stats

    def release(self, agent: RolloutAgent, buffer: RolloutBuffer) -> dict[str, float]:
        self.collector.publish(agent.model)  # the next inferences act with the updated weights
        self.collector.release(buffer)
        first = self.collector.first_step_time
        return {"env_steps": float(self.collector.steps_taken),
                "env_seconds": time.monotonic() - (first or time.monotonic())}

    def restart(self) -> None:
        pass  # every start() resets the envs

    def stop(self) -> None:
        self.collector.stop()

    def close(self) -> None:
        self.collector.close()


def make_rollout_collector(env: Any, async_collection: bool, context: str | None = None) -> RolloutCollector:
    """`AsyncRollouts` for env constructors with ``async_collection``, else `VectorRollouts` (over a
    vector env built from constructors, one subprocess each when there are several); a collector
    as it is."""
    if isinstance(env, RolloutCollector):
        return env
    if is_env_fns(env):
        if async_collection:
            return AsyncRollouts(list(env), context=context)
        return VectorRollouts(vector_env_from_fns(list(env), context=context), owns=True)
    if async_collection:
        raise ValueError("async_collection needs env constructors (e.g. stages.envs.factory.env_fns(cfg, n)), "
                         "not a built env: the collector starts the envs in its own worker processes")
    return VectorRollouts(env)
