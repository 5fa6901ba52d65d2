"""Closed-loop evaluation: drive a policy for whole episodes and summarise how it drove."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from stages.training import trim_padding

log = logging.getLogger(__name__)


@torch.no_grad()
def rollout_policy(model: torch.nn.Module, env: Any, seed: int, deterministic: bool = True,
                   device: str | torch.device = "cpu", keep_frames: bool = False) -> dict[str, Any]:
    """One episode with the model's deterministic (mode) or sampled action."""
    model.eval()
    obs, info = env.reset(seed=seed)
    total, steps, distance, frames = 0.0, 0, 0.0, []
    dt = 1.0 / float(getattr(env.unwrapped, "policy_frequency", 10))
    while True:
        if keep_frames:
            frames.append(obs["image"])
        image = torch.as_tensor(obs["image"][None], device=device)
        state = torch.as_tensor(obs["state"][None], device=device)
        tokens = trim_padding(model.tokenize([str(obs["command"])])).to(device)
        action, _, _ = model.act(image, state, tokens, deterministic=deterministic)
        obs, reward, terminated, truncated, info = env.step(action[0].cpu().numpy())
        total += float(reward)
        steps += 1
        distance += float(info.get("speed", 0.0)) * dt
        if terminated or truncated:
            break
    return {"return": total, "steps": steps, "distance_m": distance,
            "route_completion": float(info.get("route_completion", 0.0)),
            "collision": bool(info.get("collision", False)),
            "infractions": info.get("infractions", {}), "frames": frames}


def evaluate_policy(model: torch.nn.Module, env: Any, episodes: int, seed: int,
                    deterministic: bool = True, device: str | torch.device = "cpu") -> dict[str, float]:
    runs = [rollout_policy(model, env, seed + i, deterministic, device) for i in range(episodes)]
    return {
        "episode_return": float(np.mean([r["return"] for r in runs])),
        "route_completion": float(np.mean([r["route_completion"] for r in runs])),
        "collision_rate": float(np.mean([r["collision"] for r in runs])),
        "episode_steps": float(np.mean([r["steps"] for r in runs])),
        "episodes": episodes,
    }
