"""The env-process pool every collector uses: one env per process (`stages.rl.env_worker`),
stepped one by one, so an env's next action can go out as soon as its own step is back.

- `EnvWorkers` starts the processes and knows their spaces; :meth:`EnvWorkers.close` stops them.
- `EnvPipes` is the parent's end of their pipes: ``reset`` / ``send`` / ``ready`` / ``recv``.
  It pickles, so the asynchronous rollout collector steps the envs from a process of its own
  (`stages.rl.async_collector`), while SAC's pool collector steps them from the trainer's
  (`stages.rl.sac_collection`).

Processes start with ``forkserver`` (or ``spawn``): forking a process that already runs torch
threads is unsafe, so the env constructors must be picklable (`stages.envs.factory.env_fns`).
Episodes reset in the worker on the step that ends them; the reply then carries the final
observation and info.
"""
from __future__ import annotations

from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np
import torch.multiprocessing as mp

from stages.rl.env_worker import close_workers, env_worker

__all__ = ["EnvPipes", "EnvWorkerError", "EnvWorkers", "StepReply"]

# ``(obs, reward, terminated, truncated, final)``; ``final`` = ``(final_obs, final_info)`` when the
# step ended the episode (``obs`` then starts the next one), else None.
StepReply = tuple[Any, float, bool, bool, "tuple[Any, dict] | None"]


class EnvWorkerError(RuntimeError):
    """An env worker failed or exited; the message carries its traceback."""


def start_context(context: str | None) -> Any:
    """``forkserver`` (the default: one fresh process imports the modules once and forks the
    workers) or ``spawn``; never ``fork``, which is unsafe once torch has started its threads."""
    return mp.get_context(context if context in ("spawn", "forkserver") else "forkserver")


class EnvPipes:
    """The parent's ends of the env workers' pipes, and which envs have a step in flight."""

    def __init__(self, conns: list[Connection]) -> None:
        self.conns = conns
        self.num_envs = len(conns)
        self.in_flight: set[int] = set()
        self._index = {id(c): i for i, c in enumerate(conns)}

    def __getstate__(self) -> dict[str, Any]:
        return {"conns": self.conns, "in_flight": self.in_flight}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["conns"])
        self.in_flight = state["in_flight"]

    def _recv(self, i: int) -> Any:
        try:
            status, payload = self.conns[i].recv()
        except (EOFError, OSError) as exc:
            raise EnvWorkerError(f"env worker {i} exited") from exc
        if status != "ok":
            raise EnvWorkerError(f"env worker {i} failed:\n{payload}")
        return payload

    def reset(self, seed: int) -> list[Any]:
        """Every env's first observation (seeds ``seed + i``); steps in flight are dropped."""
        for i in sorted(self.in_flight):
            self._recv(i)
        self.in_flight.clear()
        for i, conn in enumerate(self.conns):
            conn.send(("reset", seed + i))
        return [self._recv(i) for i in range(self.num_envs)]

    def send(self, i: int, action: np.ndarray) -> None:
        self.conns[i].send(("step", action))
        self.in_flight.add(i)

    def ready(self, timeout: float | None) -> list[int]:
        """Envs in flight whose step is back, in env order (waits up to ``timeout`` for one)."""
        conns = [self.conns[i] for i in self.in_flight]
        return sorted(self._index[id(c)] for c in wait(conns, timeout)) if conns else []

    def recv(self, i: int) -> StepReply:
        """Env ``i``'s step (see `StepReply`)."""
        self.in_flight.discard(i)
        return self._recv(i)


class EnvWorkers:
    """Env constructors, each started in a process of its own; ``pipes`` steps them."""

    def __init__(self, env_fns: Sequence[Callable[[], gym.Env]], context: str | None = None) -> None:
        if not env_fns:
            raise ValueError("EnvWorkers needs at least one env constructor")
        ctx = start_context(context)
        self.num_envs = len(env_fns)
        conns: list[Connection] = []
        self._procs: list[Any] = []
        for fn in env_fns:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=env_worker, args=(child, fn), daemon=True, name="env-worker")
            proc.start()
            child.close()
            conns.append(parent)
            self._procs.append(proc)
        self.pipes = EnvPipes(conns)
        try:  # each worker's first reply is its env's spaces
            spaces = [self.pipes._recv(i) for i in range(self.num_envs)]
        except BaseException:
            self.close()
            raise
        self.single_observation_space, self.single_action_space = spaces[0]

    def close(self) -> None:
        """Ask every worker to close its env, then reap the processes."""
        close_workers(self.pipes.conns, self._procs)
        self.pipes = EnvPipes([])
        self._procs = []
