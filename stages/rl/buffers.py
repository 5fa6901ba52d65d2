"""Rollout storage for on-policy learning and the GAE computation (SB3-style, torch tensors)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch


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
            next_nonterminal = 1.0 - last_dones.astype(np.float32)
            next_values = last_values
        else:
            next_nonterminal = 1.0 - dones[t + 1].astype(np.float32)
            next_values = values[t + 1]
        delta = rewards[t] + gamma * next_values * next_nonterminal - values[t]
        last = delta + gamma * gae_lambda * next_nonterminal * last
        adv[t] = last
    return adv, adv + values


@dataclass
class RolloutBatch:
    images: torch.Tensor
    states: torch.Tensor
    tokens: torch.Tensor
    actions: torch.Tensor
    log_probs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


class RolloutBuffer:
    """``num_steps`` steps of ``num_envs`` envs, stored as numpy arrays until the update."""

    def __init__(self, num_steps: int, num_envs: int, image_shape: tuple[int, ...], state_dim: int,
                 token_length: int, action_dim: int = 3):
        T, N = num_steps, num_envs
        self.images = np.zeros((T, N, *image_shape), dtype=np.uint8)
        self.states = np.zeros((T, N, state_dim), dtype=np.float32)
        self.tokens = np.zeros((T, N, token_length), dtype=np.int64)
        self.actions = np.zeros((T, N, action_dim), dtype=np.float32)
        self.log_probs = np.zeros((T, N), dtype=np.float32)
        self.values = np.zeros((T, N), dtype=np.float32)
        self.rewards = np.zeros((T, N), dtype=np.float32)
        self.dones = np.zeros((T, N), dtype=bool)
        self.advantages = np.zeros((T, N), dtype=np.float32)
        self.returns = np.zeros((T, N), dtype=np.float32)
        self.num_steps, self.num_envs = T, N
        self.pos = 0

    def add(self, images, states, tokens, actions, log_probs, values, rewards, dones) -> None:
        t = self.pos
        self.images[t], self.states[t], self.tokens[t] = images, states, tokens
        self.actions[t], self.log_probs[t], self.values[t] = actions, log_probs, values
        self.rewards[t], self.dones[t] = rewards, dones
        self.pos += 1

    @property
    def full(self) -> bool:
        return self.pos == self.num_steps

    def finish(self, last_values: np.ndarray, last_dones: np.ndarray, gamma: float, gae_lambda: float) -> None:
        self.advantages, self.returns = compute_gae(self.rewards, self.values, self.dones, last_values,
                                                    last_dones, gamma, gae_lambda)

    def minibatches(self, batch_size: int, device: str | torch.device,
                    rng: np.random.Generator) -> Iterator[RolloutBatch]:
        flat = lambda a: a.reshape(self.num_steps * self.num_envs, *a.shape[2:])  # noqa: E731
        arrays = [flat(a) for a in (self.images, self.states, self.tokens, self.actions, self.log_probs,
                                    self.values, self.advantages, self.returns)]
        order = rng.permutation(len(arrays[0]))
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield RolloutBatch(*(torch.from_numpy(a[idx]).to(device) for a in arrays))

    def reset(self) -> None:
        self.pos = 0
