"""Env slots: which simulator server each env of the online stage uses.

A CARLA server in synchronous mode advances only when its one client ticks it, so every env needs a
server of its own. The online stage numbers its envs ("slots") and env slot k connects to server k of
the list the CARLA resource publishes (``DRIVEVLA_CARLA_SERVERS``, see `stages.envs.carla_bridge.endpoints`):

    train env i of rank r  ->  slot r * num_envs + i          (0 .. num_envs * world_size - 1)
    evaluation env, rank 0 ->  slot num_envs * world_size     (the last one)

The evaluation env has a slot of its own because validation between updates (``online.select_best``)
runs while the asynchronous train workers keep stepping. So the stage needs
``num_envs * world_size + 1`` servers (`OnlineEnvSlots.total`). The embedded highway backend has no
servers and ignores slots.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stages.common import StageInputError


class EnvSlotError(StageInputError):
    """The simulator servers on offer cannot give every env slot a server of its own."""


@dataclass(frozen=True)
class OnlineEnvSlots:
    """The slot layout of the online stage (see the module docstring)."""

    num_envs: int        # train envs per rank
    world_size: int = 1  # ranks of the torchrun job
    setting: str = "num_envs"  # the config key that sets num_envs, for messages

    def __post_init__(self) -> None:
        if self.num_envs < 1 or self.world_size < 1:
            raise ValueError(f"num_envs={self.num_envs} and world_size={self.world_size} must be >= 1")

    @classmethod
    def for_config(cls, online: Any, world_size: int = 1) -> OnlineEnvSlots:
        """The layout for an `OnlineParams` section (``online.ppo`` or ``online.sac`` by ``algo``)."""
        algo = "sac" if online.algo == "sac" else "ppo"
        return cls(getattr(online, algo).num_envs, world_size, f"online.{algo}.num_envs")

    def first_train(self, rank: int) -> int:
        """Slot of train env 0 of ``rank``; its env i uses ``first_train(rank) + i``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside world size {self.world_size}")
        return rank * self.num_envs

    @property
    def eval(self) -> int:
        """Slot of rank 0's evaluation env: the one after every train env."""
        return self.num_envs * self.world_size

    @property
    def total(self) -> int:
        """Servers needed: ``num_envs * world_size + 1``."""
        return self.num_envs * self.world_size + 1

    def describe(self) -> str:
        return (f"{self.setting}={self.num_envs} train env(s) per rank x {self.world_size} rank(s) "
                f"+ 1 evaluation env")
