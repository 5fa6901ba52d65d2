"""Stage 2's imitation losses: the trajectory head's error in units of each waypoint's spread, and the
likelihood of the clean expert's controls under the policy (its std floored)."""
from __future__ import annotations

import torch

from models.distributions import ACTION_HIGH, ACTION_LOW

# Expert controls sit on the bounds (zero throttle or brake); a squashed Gaussian needs an infinite
# pre-tanh value there, so targets are pulled this far inside (atanh(0.96) = 1.95 at most).
_EDGE = 0.02


def interior(actions: torch.Tensor) -> torch.Tensor:
    low = torch.as_tensor(ACTION_LOW, dtype=actions.dtype, device=actions.device)
    high = torch.as_tensor(ACTION_HIGH, dtype=actions.dtype, device=actions.device)
    return actions.clamp(low + _EDGE, high - _EDGE)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def trajectory_loss(pred: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, valid: torch.Tensor,
                    kind: str = "l2") -> torch.Tensor:
    """Mean over valid samples and waypoints of the error divided by the waypoint's spread ``scale [T, 2]``."""
    diff = (pred - target) / scale
    per = diff.abs().sum(-1) if kind == "l1" else diff.pow(2).sum(-1).add(1e-9).sqrt()
    return _masked_mean(per.mean(-1), valid)


def training_distribution(model, action_params: tuple[torch.Tensor, torch.Tensor], min_log_std: float):
    """The policy's distribution with its std floored at ``exp(min_log_std)`` (squashed Gaussian).

    The expert's steering is nearly deterministic (std ~0.02): maximum likelihood then drives the std
    towards zero and the gradients on the mean up as 1 / std^2, which swamps every other loss and
    collapses the shared features. The floor bounds them; online RL starts from a usable spread."""
    if model.config.policy == "squashed_gaussian":
        loc, log_std = action_params
        action_params = (loc, log_std.clamp(min=min_log_std))
    return model.distribution(action_params)


def bc_losses(model, out, batch: dict[str, torch.Tensor], scale: torch.Tensor, kind: str = "l2",
              min_log_std: float = -2.0) -> dict[str, torch.Tensor]:
    """Behaviour cloning: the trajectory on clean drives, the clean expert's controls wherever known."""
    dist = training_distribution(model, out.action_params, min_log_std)
    nll = -dist.log_prob(interior(batch["expert_action"]))
    valid_traj = batch["traj_valid"] & ~batch["perturbed"]
    return {"control_nll": _masked_mean(nll, batch["action_valid"]),
            "trajectory": trajectory_loss(out.trajectory, batch["trajectory"], scale, valid_traj, kind),
            "trajectory_l2_m": _masked_mean((out.trajectory - batch["trajectory"]).norm(dim=-1).mean(-1).detach(),
                                            valid_traj)}
