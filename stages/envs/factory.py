"""`make_env` / `make_vector_env`: the one way the stages build environments.

Vector envs and the Text ``command``: gymnasium 1.4 batches a ``spaces.Text`` as a ``Tuple`` of Text
spaces, so a batched observation's ``command`` is a tuple of ``num_envs`` strings (images and states
are stacked arrays as usual). Two things had to be right for that:

- the charset: gymnasium's default Text charset is alphanumeric, so "follow the lane" (spaces) is not
  in it; `stages.envs.spaces.command_space` names its own charset and the env passes every command
  through `sanitize_command`;
- `AsyncVectorEnv` must run with ``shared_memory=False``. With shared memory, gymnasium 1.4 decodes
  the Text part of the buffer into a tuple of strings once, when the vector env is built, and never
  again (array parts are live views, strings are not), so every later ``command`` comes back as
  blanks. Without shared memory the workers send observations through their pipes and gymnasium
  concatenates them on every step; at 64 px that costs well under a millisecond per step.

`SyncVectorEnv` works as is. The tests check both kinds. Per-env infos (``caption`` included) are
batched by gymnasium into arrays with ``_key`` masks; nested dicts (``infractions``) stay nested.

Episodes auto-reset in gymnasium's default ``NextStep`` mode unless ``autoreset_mode`` says otherwise.

Slots: every env has a slot number (`stages.envs.slots`); with CARLA, env slot k drives server k of
the CARLA resource's list, since a synchronous server takes one client. ``env_fns(..., first_slot=s)``
numbers its envs ``s, s + 1, …``; `check_env_slots` fails before any env is built when there are not
enough servers. The highway backend ignores slots.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any, Callable

import gymnasium as gym
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv

from stages.envs.config import EnvConfig

log = logging.getLogger(__name__)

CARLA_BRIDGE_MODULE = "stages.envs.carla_bridge"


def make_env(cfg: EnvConfig, seed: int | None = None, slot: int = 0) -> gym.Env:
    """One environment for ``cfg``; ``seed`` (default ``cfg.seed``) seeds its first reset. ``slot``:
    which simulator server it uses (CARLA: server ``slot`` of the resource's list; highway: none)."""
    if cfg.backend == "highway":
        from stages.envs.highway import DrivingEnv   # highway-env and pygame: loaded when used

        return DrivingEnv(cfg, seed=seed)
    if cfg.backend == "carla":
        return _carla_bridge().make_carla_env(cfg, seed=seed, slot=slot)
    raise ValueError(f"backend={cfg.backend!r} is not one of ['highway', 'carla']")


def check_env_slots(cfg: EnvConfig, slots: int, layout: str = "") -> None:
    """Fail now, before any env is built, unless ``slots`` envs can each have a simulator of their own
    (CARLA: a server each; `EnvSlotError` names how many are needed and how to provision them).
    ``layout`` says where the number comes from (`OnlineEnvSlots.describe`). Highway: nothing to check."""
    if cfg.backend == "carla":
        _carla_bridge().check_server_slots(slots, layout)


def _carla_bridge() -> Any:
    # The CARLA bridge is its own module (the only one that imports `carla`); it is looked up
    # lazily so that the highway backend never needs the CARLA client installed.
    if importlib.util.find_spec(CARLA_BRIDGE_MODULE) is None:
        raise NotImplementedError(
            f"backend='carla' needs {CARLA_BRIDGE_MODULE} (the CARLA bridge), which is not in this "
            "checkout yet; use backend='highway' for the embedded simulator")
    bridge = importlib.import_module(CARLA_BRIDGE_MODULE)
    if getattr(bridge, "make_carla_env", None) is None:
        raise NotImplementedError(f"{CARLA_BRIDGE_MODULE} does not define make_carla_env(cfg, seed, slot)")
    return bridge


def env_fns(cfg: EnvConfig, num_envs: int, seed: int | None = None,
            first_slot: int = 0) -> list[Callable[[], gym.Env]]:
    """Constructors of ``num_envs`` envs seeded ``seed + i`` in slots ``first_slot + i`` (picklable,
    for subprocesses)."""
    base = cfg.seed if seed is None else seed
    return [_EnvFn(cfg.model_dump(mode="json"), base + i, first_slot + i) for i in range(num_envs)]


class _EnvFn:
    """A picklable ``lambda: make_env(cfg, seed, slot)`` (the config travels as plain data)."""

    def __init__(self, cfg: dict[str, Any], seed: int, slot: int = 0) -> None:
        self.cfg, self.seed, self.slot = cfg, seed, slot

    def __call__(self) -> gym.Env:
        return make_env(EnvConfig.model_validate(self.cfg), seed=self.seed, slot=self.slot)


def make_vector_env(cfg: EnvConfig, num_envs: int, asynchronous: bool = False, seed: int | None = None,
                    autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
                    context: str | None = None, first_slot: int = 0) -> gym.vector.VectorEnv:
    """``num_envs`` copies of ``cfg`` with distinct seeds (``seed + i``) in slots ``first_slot + i``, one
    process each if asynchronous.

    ``context`` is the multiprocessing start method of the async workers (None: Python's default).
    """
    if num_envs < 1:
        raise ValueError(f"num_envs={num_envs} must be >= 1")
    fns = env_fns(cfg, num_envs, seed, first_slot=first_slot)
    mode = AutoresetMode(autoreset_mode)
    if asynchronous:
        # shared_memory=False: see the module docstring (Text observations in gymnasium 1.4).
        return AsyncVectorEnv(fns, shared_memory=False, autoreset_mode=mode, context=context)
    return SyncVectorEnv(fns, autoreset_mode=mode)
