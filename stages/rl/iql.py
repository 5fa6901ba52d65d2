"""Implicit Q-Learning (Kostrikov et al., 2021) on DrivingVLA's heads, for offline RL on recorded drives.

Three losses on a batch of transitions ``(s, a, r, s', done)``:

- value: expectile regression of ``V(s)`` (the model's value head) towards ``min_i Q_target_i(s, a)``,
  ``L = |tau - 1(u < 0)| * u^2`` with ``u = Q_target - V``: with ``tau > 0.5`` V approaches an upper
  expectile of Q over the data's actions, i.e. the value of the better actions in the data, without ever
  querying Q on actions outside it;
- Q: ``(r + gamma * (1 - done) * V(s') - Q_i(s, a))^2`` for both twin heads (`models.q_heads.TwinQHead`
  over the fused features), with a Polyak-averaged target copy of the Q heads for the value's target;
- policy (advantage-weighted regression): ``-exp(beta * (Q_target(s, a) - V(s))) * log pi(a | s)``,
  the weights clipped at ``max_weight``, on the same policy head behaviour cloning trains.

Errors are measured in ``reward_scale`` * reward units so the critic's losses sit on the scale of the
imitation losses; the value head itself stays in reward units with the discount of the online stage, so
stage 3 (PPO) starts with a critic of its own returns.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.q_heads import TwinQHead


@dataclass
class IQLConfig:
    gamma: float = 0.99
    expectile: float = 0.7
    temperature: float = 3.0
    max_weight: float = 100.0
    tau: float = 0.005
    reward_scale: float = 1.0


def expectile_loss(diff: Tensor, expectile: float) -> Tensor:
    """Asymmetric squared loss of ``diff = target - prediction`` (mean over the batch)."""
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return (weight * diff.pow(2)).mean()


class IQLCritic(nn.Module):
    """Twin Q heads over the model's fused features, and their slowly moving target copy."""

    def __init__(self, feature_dim: int, action_low: Tensor, action_high: Tensor, hidden_dim: int = 256):
        super().__init__()
        self.q = TwinQHead(feature_dim, action_low, action_high, hidden_dim=hidden_dim)
        self.q_target = copy.deepcopy(self.q).requires_grad_(False)

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        for p, tp in zip(self.q.parameters(), self.q_target.parameters()):
            tp.lerp_(p, tau)

    @torch.no_grad()
    def init_bias(self, value: float) -> None:
        """Start the Q heads (and target) at ``value``: the data's mean discounted return."""
        for head in (self.q, self.q_target):
            for net in (head.q1, head.q2):
                net.net[-1].bias.fill_(value)


def iql_losses(value: Tensor, next_value: Tensor, features: Tensor, log_prob: Tensor, actions: Tensor,
               rewards: Tensor, dones: Tensor, critic: IQLCritic, cfg: IQLConfig) -> dict[str, Tensor]:
    """The three IQL losses and diagnostics.

    ``value`` ``V(s)`` [B] (with gradient); ``next_value`` ``V(s')`` [B] (no gradient; anything where done);
    ``features`` [B, F] the fused features of s; ``log_prob`` ``log pi(a|s)`` [B] of the data's actions.
    """
    scale = cfg.reward_scale
    with torch.no_grad():
        q_t1, q_t2 = critic.q_target(features.detach(), actions)
        q_target = torch.minimum(q_t1, q_t2)
        backup = rewards + cfg.gamma * (1.0 - dones.float()) * next_value
    value_loss = expectile_loss(scale * (q_target - value), cfg.expectile)
    q1, q2 = critic.q(features, actions)
    q_loss = 0.5 * ((scale * (q1 - backup)).pow(2).mean() + (scale * (q2 - backup)).pow(2).mean())
    with torch.no_grad():
        advantage = q_target - value
        weights = torch.exp(cfg.temperature * scale * advantage).clamp(max=cfg.max_weight)
    policy_loss = -(weights * log_prob).mean()
    return {"value_loss": value_loss, "q_loss": q_loss, "awr_loss": policy_loss,
            "advantage": advantage.mean(), "awr_weight": weights.mean(), "q": q_target.mean(), "v": value.mean().detach()}
