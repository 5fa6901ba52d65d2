"""SAC's collectors: what steps the envs and stores their transitions, apart from the algorithm.

``utd_ratio`` is gradient updates per env step (summed over envs), whichever collector runs:

- `VectorCollector`, a vector env: while its envs step (``step_async``, e.g. gymnasium's
  ``AsyncVectorEnv``, one process per env), the learner runs the updates that step is owed, then
  collects the step (``step_wait``): a slow simulator and the updates overlap instead of taking
  turns. The updates of step t sample what steps 1 … t-1 stored. Deterministic for a given seed.
  Every step still waits for the slowest env, and the policy's forward pass for all of them sits
  between two steps (the tiny model at N = 8: ~4 ms of a 44 ms step);
- `PoolCollector`, env constructors (`stages.rl.workers.EnvWorkers`): each env gets its next
  action as soon as its own step is back (a forward pass for the envs that are back), and the
  updates run in a `LearnerThread` while the main thread acts; the learner may fall at most
  ``2 × num_envs × utd_ratio`` updates behind, else acting waits for it. Which transitions an
  update samples depends on timing, so runs are not bit-for-bit repeatable. The benchmark
  (``benchmarks/parallel_envs.py --algo sac``) compares the two.

A collector talks to the trainer through `Agent`: observations → stored fields, actions for
stored fields, where transitions and finished episodes go.
"""
from __future__ import annotations

import contextlib
import threading
from abc import abstractmethod
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from stages.rl.collectors import Collector
from stages.rl.vector import as_vector_env, final_obs, final_values, is_env_fns, vector_env_from_fns
from stages.rl.workers import EnvWorkers

__all__ = ["Agent", "LearnerThread", "PoolCollector", "SACCollector", "VectorCollector", "make_collector"]

_POLL_S = 0.2


class Agent(Protocol):
    """What a collector needs of the trainer."""
    adapter: Any

    def encode(self, obs: Any) -> dict[str, np.ndarray]: ...          # a batched observation -> stored fields
    def encode_one(self, obs: Any) -> dict[str, np.ndarray]: ...      # one observation -> a batch of one
    def actions(self, encoded: dict[str, np.ndarray], count: int) -> np.ndarray: ...
    def store(self, obs: dict[str, np.ndarray], actions: np.ndarray, rewards: np.ndarray,
              next_obs: dict[str, np.ndarray], terminated: np.ndarray, done: np.ndarray,
              envs: np.ndarray | None = None) -> None: ...
    def end_episode(self, episode_return: float, completion: Any) -> None: ...
    def reset_seed(self) -> int: ...


class SACCollector(Collector):
    """Steps ``num_envs`` envs and stores their transitions through an `Agent`."""
    concurrent_learner = False  # whether the updates run in a `LearnerThread` meanwhile

    def __init__(self, num_envs: int) -> None:
        self.num_envs = num_envs
        self._ep_return = np.zeros(num_envs, dtype=np.float64)

    @abstractmethod
    def step(self, agent: Agent, during: Callable[[], None] | None = None) -> int:
        """Store the steps of the envs that are back; returns how many (0: none yet). ``during()``
        runs while the envs step where the collector can overlap them."""

    def _end_episodes(self, agent: Agent, envs: Sequence[int], done: np.ndarray,
                      completion: Callable[[int], Any]) -> None:
        for j in np.flatnonzero(done):
            i = envs[j]
            agent.end_episode(float(self._ep_return[i]), completion(j))
            self._ep_return[i] = 0.0


class VectorCollector(SACCollector):
    """A vector env (or a single env, wrapped), stepped in lockstep; ``owns``: close it with us."""

    def __init__(self, env: Any, owns: bool = False) -> None:
        self.env = as_vector_env(env)
        self.owns = owns
        super().__init__(self.env.num_envs)
        self.observation_space, self.action_space = self.env.single_observation_space, self.env.single_action_space
        self._obs: Any = None
        self._encoded: dict[str, np.ndarray] | None = None

    def restart(self) -> None:
        self._obs, self._encoded = None, None

    def step(self, agent: Agent, during: Callable[[], None] | None = None) -> int:
        env = self.env
        if self._obs is None:
            self._obs, _ = env.reset(seed=agent.reset_seed())
            self._encoded = agent.encode(self._obs)
            self._ep_return[:] = 0.0
        encoded = self._encoded
        actions = agent.actions(encoded, self.num_envs)
        if during is not None and hasattr(env, "step_async"):
            env.step_async(actions)
            try:
                during()
            except BaseException:
                try:  # leave the vector env ready for close(), not waiting on a step
                    env.step_wait()
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    pass
                raise
            next_obs, reward, terminated, truncated, infos = env.step_wait()
        else:
            if during is not None:
                during()
            next_obs, reward, terminated, truncated, infos = env.step(actions)
        terminated, truncated = np.asarray(terminated, bool), np.asarray(truncated, bool)
        done = terminated | truncated
        next_encoded = agent.encode(next_obs)
        stored_next = {k: v.copy() for k, v in next_encoded.items()} if done.any() else next_encoded
        for i in np.flatnonzero(done):
            # Same-step autoreset: next_obs[i] is already the reset observation; the transition
            # must end in the real final observation (bootstrapped from when truncated).
            fo = final_obs(infos, i)
            if fo is None:
                raise RuntimeError("the vector env did not return info['final_obs']; build it with "
                                   "autoreset_mode=gymnasium.vector.AutoresetMode.SAME_STEP")
            for key, value in agent.encode_one(fo).items():
                stored_next[key][i] = value[0]
        agent.store(encoded, actions, reward, stored_next, terminated, done)
        self._ep_return += np.asarray(reward, dtype=np.float64)
        self._end_episodes(agent, range(self.num_envs), done, lambda i: final_values(infos, "route_completion", i))
        # The next step's observation is encoded already (before the final observations went in).
        self._obs, self._encoded = next_obs, next_encoded
        return self.num_envs

    def close(self) -> None:
        if self.owns:
            self.env.close()


class PoolCollector(SACCollector):
    """Env constructors in worker processes, each env at its own pace (see the module docstring)."""
    concurrent_learner = True

    def __init__(self, env_fns: Sequence[Callable[[], Any]]) -> None:
        self.workers = EnvWorkers(env_fns)
        super().__init__(self.workers.num_envs)
        self.observation_space = self.workers.single_observation_space
        self.action_space = self.workers.single_action_space
        # Per env: the (stored fields of the) observation it acts on, the action in flight.
        self._obs: dict[str, np.ndarray] | None = None
        self._actions = np.zeros((self.num_envs, int(np.prod(self.action_space.shape))), dtype=np.float32)

    def restart(self) -> None:
        self._obs = None

    def _send(self, agent: Agent, envs: np.ndarray) -> None:
        actions = agent.actions({k: v[envs] for k, v in self._obs.items()}, len(envs))
        self._actions[envs] = actions
        for i, action in zip(envs, actions):
            self.workers.pipes.send(int(i), action)

    def step(self, agent: Agent, during: Callable[[], None] | None = None) -> int:
        if during is not None:
            during()
        pipes = self.workers.pipes
        if self._obs is None:
            first = pipes.reset(agent.reset_seed())
            self._obs = agent.encode(agent.adapter.stack(first))
            self._ep_return[:] = 0.0
            self._send(agent, np.arange(self.num_envs))
            return 0
        ready = pipes.ready(_POLL_S)
        if not ready:
            return 0
        replies = [pipes.recv(i) for i in ready]
        envs = np.asarray(ready, dtype=np.int64)
        ended = [j for j, r in enumerate(replies) if r[4] is not None]
        # One forward pass for the new observations and the final ones of ended episodes.
        encoded = agent.encode(agent.adapter.stack([r[0] for r in replies] + [replies[j][4][0] for j in ended]))
        k = len(ready)
        obs = {key: v[envs] for key, v in self._obs.items()}
        actions = self._actions[envs]
        stored_next = {key: v[:k].copy() for key, v in encoded.items()}
        for m, j in enumerate(ended):
            for key, v in encoded.items():
                stored_next[key][j] = v[k + m]
        for key, v in encoded.items():
            self._obs[key][envs] = v[:k]
        self._send(agent, envs)  # the envs step again while their transitions are stored
        rewards = np.array([r[1] for r in replies], dtype=np.float32)
        terminated = np.array([r[2] for r in replies], dtype=bool)
        done = terminated | np.array([r[3] for r in replies], dtype=bool)
        agent.store(obs, actions, rewards, stored_next, terminated, done, envs=envs)
        self._ep_return[envs] += rewards
        self._end_episodes(agent, envs, done, lambda j: replies[j][4][1].get("route_completion"))
        return k

    def close(self) -> None:
        self.workers.close()


def make_collector(env: Any, lockstep: bool) -> SACCollector:
    """A `PoolCollector` for env constructors (unless ``lockstep``: data-parallel ranks step
    together), else a `VectorCollector` (over a vector env built from them, when they are); a
    collector as it is."""
    if isinstance(env, SACCollector):
        return env
    fns = is_env_fns(env)
    if fns and not lockstep:
        return PoolCollector(list(env))
    return VectorCollector(vector_env_from_fns(list(env)) if fns else env, owns=fns)


class LearnerThread:
    """The gradient updates in a thread of their own, while the main thread steps the envs.

    The main thread adds what each env step owes (``owe``: ``utd_ratio`` updates per step); the
    thread runs them. When it falls ``max_debt`` updates behind, ``owe`` waits (no new actions go
    out), so a learner slower than the envs lowers the step rate instead of ``utd_ratio``.
    ``paused()`` holds it between two updates (checkpoints, statistics).
    """

    def __init__(self, trainer: Any, window: dict[str, list[float]], max_debt: float) -> None:
        self.trainer, self.window, self.max_debt = trainer, window, max_debt
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self._stop = False
        self._pauses = 0
        self._busy = False
        self.thread = threading.Thread(target=self._run, name="sac-learner", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        t = self.trainer
        try:
            while True:
                with self.cond:
                    while not self._stop and (self._pauses or t.update_debt < 1.0):
                        self.cond.wait()
                    if self._stop:
                        return
                    self._busy = True
                stats = t.update()  # samples its batch under the buffer's lock
                with self.cond:
                    t.update_debt -= 1.0
                    for key, value in stats.items():
                        self.window.setdefault(key, []).append(value)
                    self._busy = False
                    self.cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - raised in the main thread
            with self.cond:
                self.error, self._busy = exc, False
                self.cond.notify_all()

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError("the SAC learner thread failed") from self.error

    def owe(self, updates: float) -> None:
        with self.cond:
            self.trainer.update_debt += updates
            self.cond.notify_all()
            while self.trainer.update_debt > self.max_debt and self.error is None:
                self.cond.wait()
        self.check()

    def drain(self) -> None:
        """Wait until every owed update has run."""
        with self.cond:
            while self.trainer.update_debt >= 1.0 and self.error is None:
                self.cond.wait()
        self.check()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        with self.cond:
            self._pauses += 1
            while self._busy:
                self.cond.wait()
        try:
            yield
        finally:
            with self.cond:
                self._pauses -= 1
                self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        self.thread.join()
