"""A small SAC actor for vector (``Box``) observations, with the interface `SACTrainer` drives.

`SACTrainer` talks to its model through three methods that `DrivingVLA` already has:
``compute_features(*inputs) -> [B, F]``, ``policy_params(features)`` and ``distribution(params)``
(a squashed Gaussian with ``rsample_with_log_prob``). `MLPActor` offers the same three over a flat
observation, so SAC can be checked on gymnasium's continuous-control tasks (Pendulum) with the
exact code that fine-tunes DrivingVLA. Its "features" are the observation itself: the Q heads are
then the usual ``Q(s, a)`` MLPs and there is no shared trunk.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from models.distributions import LOG_STD_MAX, LOG_STD_MIN, SquashedGaussian
from stages.rl.policies import VectorObsModel


class MLPActor(VectorObsModel):
    """Squashed-Gaussian policy ``obs -> (loc, log_std)`` over the box ``low .. high``."""

    def __init__(self, obs_dim: int, action_low: Sequence[float] | np.ndarray,
                 action_high: Sequence[float] | np.ndarray, hidden_dim: int = 256, num_layers: int = 2) -> None:
        super().__init__()
        low = torch.as_tensor(np.asarray(action_low, dtype=np.float32))
        high = torch.as_tensor(np.asarray(action_high, dtype=np.float32))
        if low.shape != high.shape or low.dim() != 1:
            raise ValueError(f"action bounds must be 1-D and of equal shape, got {tuple(low.shape)} / {tuple(high.shape)}")
        self.feature_dim = int(obs_dim)
        self.action_dim = int(low.numel())
        self.register_buffer("action_low", low)
        self.register_buffer("action_high", high)
        layers: list[nn.Module] = []
        width = obs_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
            width = hidden_dim
        layers.append(nn.Linear(width, 2 * self.action_dim))
        # Named like DrivingVLA's head: SACTrainer optimises the parameters under ``policy_head``
        # with the actor loss and everything else on the feature path with the critic loss.
        self.policy_head = nn.Sequential(*layers)

    @classmethod
    def for_env(cls, env, hidden_dim: int = 256, num_layers: int = 2) -> "MLPActor":
        """Size the actor from a (single or vector) env with ``Box`` observation and action spaces."""
        obs_space = getattr(env, "single_observation_space", env.observation_space)
        act_space = getattr(env, "single_action_space", env.action_space)
        return cls(int(np.prod(obs_space.shape)), act_space.low, act_space.high, hidden_dim, num_layers)

    # Parameter groups as `DrivingVLA` names them: the policy head is all there is.
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"encoders": [], "actor": list(self.policy_head.parameters()), "critic": [], "trunk": []}

    def policy_params(self, features: Tensor) -> tuple[Tensor, Tensor]:
        loc, log_std = self.policy_head(features).chunk(2, dim=-1)
        return loc, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def distribution(self, params: tuple[Tensor, Tensor]) -> SquashedGaussian:
        return SquashedGaussian(params[0], params[1], self.action_low, self.action_high)

    @torch.no_grad()
    def act(self, obs: Tensor, deterministic: bool = False) -> Tensor:
        dist = self.distribution(self.policy_params(self.compute_features(obs)))
        return dist.mode() if deterministic else dist.sample()
