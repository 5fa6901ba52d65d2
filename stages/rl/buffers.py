"""Rollout storage for on-policy learning and the GAE computation (SB3-style).

The buffer stores observations as the named arrays an `stages.rl.policies.ObsAdapter` describes
(``image``/``state``/``tokens`` for the driving envs, ``obs`` for a Box env), so one buffer serves
every policy. Its arrays can live in shared memory (``shared=True``): the asynchronous collector
(`stages.rl.async_collector`) fills them in another process while the learner updates on the
previous rollout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

FieldSpec = dict[str, tuple[tuple[int, ...], np.dtype]]


def compute_gae(rewards: np.ndarray, values: np.ndarray, dones: np.ndarray, last_values: np.ndarray,
                last_dones: np.ndarray, gamma: float, gae_lambda: float) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation over a ``[T, N]`` rollout.

    ``dones[t]`` marks that the observation at step ``t`` starts a new episode (the previous step
    ended one); ``last_dones`` does the same for the observation after the rollout. Time-limit
    truncation is handled before this call by adding ``gamma * V(final_obs)`` to the reward of the
    truncated step (SB3's convention), so here every episode end cuts the bootstrap.
    """
    T = len(rewards)
    adv = np.zeros_like(rewards, dtype=np.float32)
    last = np.zeros(rewards.shape[1], dtype=np.float32)
    for t in reversed(range(T)):
        if t == T - 1:
            next_nonterminal = 1.0 - np.asarray(last_dones).astype(np.float32)
            next_values = last_values
        else:
            next_nonterminal = 1.0 - dones[t + 1].astype(np.float32)
            next_values = values[t + 1]
        delta = rewards[t] + gamma * next_values * next_nonterminal - values[t]
        last = delta + gamma * gae_lambda * next_nonterminal * last
        adv[t] = last
    return adv, (adv + values).astype(np.float32)


@dataclass
class RolloutBatch:
    """One minibatch: the observation arrays by name, then the per-step learning targets."""

    obs: dict[str, torch.Tensor]
    actions: torch.Tensor
    log_probs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


_SCALARS = ("log_probs", "values", "rewards", "advantages", "returns")


class RolloutBuffer:
    """``num_steps`` steps of ``num_envs`` envs as ``[T, N, ...]`` arrays.

    ``obs_fields`` is ``{name: (shape, dtype)}`` (see `ObsAdapter.fields`). With ``shared=True``
    the arrays are numpy views of shared-memory torch tensors, so a buffer sent to another
    process (through `torch.multiprocessing`) is written in place, not copied.
    """

    def __init__(self, num_steps: int, num_envs: int, obs_fields: FieldSpec, action_dim: int,
                 shared: bool = False):
        T, N = num_steps, num_envs
        self.num_steps, self.num_envs, self.action_dim = T, N, action_dim
        self.obs_fields = {k: (tuple(shape), np.dtype(dtype)) for k, (shape, dtype) in obs_fields.items()}
        self.shared = shared
        specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {
            **{f"obs.{k}": ((T, N, *shape), dtype) for k, (shape, dtype) in self.obs_fields.items()},
            "actions": ((T, N, action_dim), np.dtype(np.float32)),
            **{k: ((T, N), np.dtype(np.float32)) for k in _SCALARS},
            "dones": ((T, N), np.dtype(np.bool_)),
            "last_values": ((N,), np.dtype(np.float32)),
            "last_dones": ((N,), np.dtype(np.bool_)),
        }
        self._tensors = {k: _zeros(shape, dtype, shared) for k, (shape, dtype) in specs.items()}
        self._bind()
        self.pos = 0

    def _bind(self) -> None:
        arrays = {k: t.numpy() for k, t in self._tensors.items()}
        self.obs = {k[4:]: v for k, v in arrays.items() if k.startswith("obs.")}
        for k, v in arrays.items():
            if not k.startswith("obs."):
                setattr(self, k, v)

    def __getstate__(self) -> dict[str, Any]:
        # Pickle the tensors (shared storage travels by handle) and rebuild the numpy views after.
        keep = ("num_steps", "num_envs", "action_dim", "obs_fields", "shared", "_tensors", "pos")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._bind()

    # -- filling ---------------------------------------------------------------------------------
    def add(self, obs: dict[str, np.ndarray], actions: np.ndarray, log_probs: np.ndarray, values: np.ndarray,
            rewards: np.ndarray, dones: np.ndarray) -> None:
        """Append one step of every env. ``dones[i]``: ``obs[i]`` starts a new episode."""
        t = self.pos
        for k, v in obs.items():
            self.obs[k][t] = v
        self.actions[t], self.log_probs[t], self.values[t] = actions, log_probs, values
        self.rewards[t], self.dones[t] = rewards, dones
        self.pos += 1

    @property
    def full(self) -> bool:
        return self.pos == self.num_steps

    def finish(self, last_values: np.ndarray, last_dones: np.ndarray, gamma: float, gae_lambda: float) -> None:
        """Bootstrap from the observation after the rollout and compute advantages and returns."""
        self.last_values[:] = last_values
        self.last_dones[:] = last_dones
        self.compute_advantages(gamma, gae_lambda)

    def compute_advantages(self, gamma: float, gae_lambda: float) -> None:
        adv, ret = compute_gae(self.rewards, self.values, self.dones, self.last_values, self.last_dones,
                               gamma, gae_lambda)
        self.advantages[:], self.returns[:] = adv, ret

    # -- reading ---------------------------------------------------------------------------------
    def epochs(self, num_epochs: int, batch_size: int, device: str | torch.device,
               rng: np.random.Generator) -> Iterator[Iterator[RolloutBatch]]:
        """``num_epochs`` shuffled passes over all ``T * N`` steps, each an iterator of minibatches
        (the last one may be smaller).

        The rollout goes to ``device`` once, and each minibatch is gathered there: on a GPU a host
        gather and copy per minibatch (at 256, 150 MB of stored vision tokens, or 38 MB of 224 px
        images) would hold the update up more than the minibatch's compute does.
        """
        device = torch.device(device)
        n = self.num_steps * self.num_envs
        flat = lambda a: torch.from_numpy(a.reshape(n, *a.shape[2:])).to(device)  # noqa: E731
        obs = {k: flat(v) for k, v in self.obs.items()}
        rest = [flat(a) for a in (self.actions, self.log_probs, self.values, self.advantages, self.returns)]
        for _ in range(num_epochs):
            yield _shuffled(obs, rest, torch.from_numpy(rng.permutation(n)).to(device), batch_size)

    def minibatches(self, batch_size: int, device: str | torch.device,
                    rng: np.random.Generator) -> Iterator[RolloutBatch]:
        """One shuffled pass over all ``T * N`` steps (see :meth:`epochs`)."""
        return next(self.epochs(1, batch_size, device, rng))

    def reset(self) -> None:
        self.pos = 0


def _shuffled(obs: dict[str, torch.Tensor], rest: list[torch.Tensor], order: torch.Tensor,
              batch_size: int) -> Iterator[RolloutBatch]:
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        yield RolloutBatch({k: v[idx] for k, v in obs.items()}, *(a[idx] for a in rest))


def _zeros(shape: tuple[int, ...], dtype: np.dtype, shared: bool) -> torch.Tensor:
    t = torch.from_numpy(np.zeros(shape, dtype=dtype))
    return t.share_memory_() if shared else t
