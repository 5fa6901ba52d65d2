"""Glue between gymnasium envs and the batched policy: vector envs, observations → tensors."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np


def as_vector_env(env: Any) -> gym.vector.VectorEnv:
    """Accept a vector env as it is; wrap a single env (e.g. a `CARLABridge`) into a one-env vector.

    Same-step autoreset is required: the final observation of an episode arrives in
    ``info["final_obs"]`` so time-limit truncation can be bootstrapped from its value.
    """
    if isinstance(env, gym.vector.VectorEnv):
        mode = env.metadata.get("autoreset_mode")
        if mode is not None and mode != gym.vector.AutoresetMode.SAME_STEP:
            raise ValueError(f"vector env uses autoreset mode {mode}; build it with "
                             "autoreset_mode=gymnasium.vector.AutoresetMode.SAME_STEP")
        return env
    return gym.vector.SyncVectorEnv([lambda: env], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def commands_of(obs: dict[str, Any]) -> list[str]:
    return [str(c) for c in obs["command"]]


def final_values(infos: dict[str, Any], key: str, index: int, default: Any = None) -> Any:
    """A value from the ``final_info`` of env ``index`` (same-step autoreset)."""
    final = infos.get("final_info")
    if not isinstance(final, dict) or key not in final:
        return default
    mask = final.get(f"_{key}")
    if mask is not None and not mask[index]:
        return default
    return final[key][index]


def final_obs(infos: dict[str, Any], index: int) -> dict[str, Any] | None:
    if "final_obs" not in infos or not infos.get("_final_obs", np.zeros(index + 1, bool))[index]:
        return None
    return infos["final_obs"][index]


def vector_env_from_fns(env_fns: list[Callable[[], gym.Env]], context: str | None = None) -> gym.vector.VectorEnv:
    """A same-step-autoreset vector env over ``env_fns``: in-process for one env, one subprocess
    each for several (``shared_memory=False``: see `stages.envs.factory` on Text observations)."""
    mode = gym.vector.AutoresetMode.SAME_STEP
    if len(env_fns) == 1:
        return gym.vector.SyncVectorEnv(env_fns, autoreset_mode=mode)
    return gym.vector.AsyncVectorEnv(env_fns, shared_memory=False, autoreset_mode=mode, context=context)


def is_env_fns(env: Any) -> bool:
    """Whether ``env`` is a sequence of env constructors (rather than a built env)."""
    return isinstance(env, Sequence) and not isinstance(env, (str, bytes)) and all(callable(f) for f in env)
