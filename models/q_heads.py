"""Twin Q heads for SAC: ``Q(features, action)`` twice, so the critic target can take the minimum.

They read the same fused features as the policy head (``DrivingVLA.compute_features``, or the raw
observation for a plain MLP agent). Actions are rescaled from their box to ``[-1, 1]`` first, so a
steering of 1 and a throttle of 1 (or Pendulum's torque of 2) enter the network on the same scale.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class QNetwork(nn.Module):
    """An MLP ``[features, action] -> scalar``: ReLU hidden layers, as in the SAC paper and SB3."""

    def __init__(self, feature_dim: int, action_dim: int, hidden_dim: int = 256, num_layers: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = feature_dim + action_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
            width = hidden_dim
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: Tensor, action: Tensor) -> Tensor:
        return self.net(torch.cat([features, action], dim=-1)).squeeze(-1)


class TwinQHead(nn.Module):
    """Two independent Q networks over ``(features [B, F], action [B, A])`` -> ``(q1 [B], q2 [B])``."""

    def __init__(
        self,
        feature_dim: int,
        action_low: Tensor | tuple[float, ...],
        action_high: Tensor | tuple[float, ...],
        hidden_dim: int = 256,
        num_layers: int = 2,
    ) -> None:
        super().__init__()
        low = torch.as_tensor(action_low, dtype=torch.float32)
        high = torch.as_tensor(action_high, dtype=torch.float32)
        if low.shape != high.shape or low.dim() != 1 or not bool((high > low).all()):
            raise ValueError(f"action bounds must be 1-D with high > low, got low={low.tolist()} high={high.tolist()}")
        action_dim = low.numel()
        # Buffers, not parameters: the bounds move with .to(device) and are saved with the heads.
        self.register_buffer("center", (high + low) / 2)
        self.register_buffer("half_range", (high - low) / 2)
        self.q1 = QNetwork(feature_dim, action_dim, hidden_dim, num_layers)
        self.q2 = QNetwork(feature_dim, action_dim, hidden_dim, num_layers)

    def normalize_action(self, action: Tensor) -> Tensor:
        return (action.to(self.center.dtype) - self.center) / self.half_range

    def forward(self, features: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        a = self.normalize_action(action)
        f = features.to(self.center.dtype)
        return self.q1(f, a), self.q2(f, a)
