"""Closed-loop evaluation: drive a policy for whole episodes and summarise how it drove.

`rollout_policy` drives one episode and records what the driving score needs (route completion,
infraction *events* rather than per-step counters, the route share driven outside the lanes, the
distance and time driven) and, on request, the camera frames with the command and speed of each.
`evaluate_policy` averages a few episodes (the online stage's before/after figures);
`stages.evaluate` is the full evaluation stage built on `rollout_policy`.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from stages.common import torch_threads
from stages.envs.base import step_seconds
from stages.metrics.driving_score import (
    OUTSIDE_LANES_KEYS,
    collision_counts,
    count_events,
    summarise,
)
from stages.training import TokenCache

log = logging.getLogger(__name__)

# The leaderboard's blocked test (ActorSpeedAboveThresholdTest): below this speed the car counts as
# standing still; standing still for too long ends the route.
BLOCKED_SPEED = 0.1        # m/s


def _speed(info: dict[str, Any]) -> float:
    return float(info.get("speed", 0.0))


def policy_actor(model: torch.nn.Module, device: str | torch.device = "cpu", deterministic: bool = True
                 ) -> Any:
    """``act(obs) -> action``: the model's action (its mode when ``deterministic``) for one observation."""
    tokens = TokenCache(model)

    @torch.no_grad()
    def act(obs: dict[str, Any]) -> np.ndarray:
        image = torch.as_tensor(obs["image"][None], device=device)
        state = torch.as_tensor(obs["state"][None], device=device)
        action, _, _ = model.act(image, state, tokens([str(obs["command"])], device), deterministic=deterministic)
        return action[0].cpu().numpy()

    return act


@torch.no_grad()
def rollout_policy(model: torch.nn.Module, env: Any, seed: int, deterministic: bool = True,
                   device: str | torch.device = "cpu", keep_frames: bool = False,
                   max_blocked_steps: int | None = None) -> dict[str, Any]:
    """One episode with the model's deterministic (mode) or sampled action.

    ``max_blocked_steps``: end the episode (``done_reason="agent_blocked"``) once the car has stood
    still (speed < `BLOCKED_SPEED`) for that many consecutive steps, as the leaderboard ends a route
    whose agent is blocked; None never does.

    Returns ``return``, ``steps``, ``seconds``, ``distance_m``, ``mean_speed`` (m/s),
    ``route_completion``, ``collision``, ``infractions`` (the final counters),
    ``infraction_events`` (see `count_events`), ``outside_lanes_completion`` (route share gained on
    steps where ``off_road`` or ``wrong_way`` rose), ``done_reason``, ``scenario``, ``seed`` and, with
    ``keep_frames``, ``frames`` (uint8 images, the final one included) with ``frame_info``
    (``{"t", "speed", "command"}`` per frame); without it both are empty lists.
    """
    model.eval()
    act = policy_actor(model, device, deterministic)
    dt = step_seconds(env)
    obs, info = env.reset(seed=seed)
    counters = [dict(info.get("infractions", {}))]
    total, steps, distance, outside, still = 0.0, 0, 0.0, 0.0, 0
    completion = float(info.get("route_completion", 0.0))
    pose = info.get("ego_pose")
    frames: list[np.ndarray] = []
    frame_info: list[dict[str, Any]] = []
    done_reason = ""

    def keep(o: dict[str, Any], i: dict[str, Any]) -> None:
        frames.append(np.array(o["image"], dtype=np.uint8, copy=True))
        frame_info.append({"t": steps * dt, "speed": _speed(i), "command": str(o["command"])})

    while True:
        if keep_frames:
            keep(obs, info)
        obs, reward, terminated, truncated, info = env.step(act(obs))
        total += float(reward)
        steps += 1
        # Odometry from the pose where the backend gives one (exact along curves), else speed * dt.
        new_pose = info.get("ego_pose")
        if pose is not None and new_pose is not None:
            distance += float(np.linalg.norm(np.asarray(new_pose[:2], float) - np.asarray(pose[:2], float)))
        else:
            distance += abs(_speed(info)) * dt
        pose = new_pose
        inf = dict(info.get("infractions", {}))
        new_completion = float(info.get("route_completion", completion))
        if any(float(inf.get(k, 0)) > float(counters[-1].get(k, 0)) for k in OUTSIDE_LANES_KEYS):
            outside += max(0.0, new_completion - completion)
        completion = new_completion
        counters.append(inf)
        still = still + 1 if abs(_speed(info)) < BLOCKED_SPEED else 0
        if terminated or truncated:
            done_reason = str(info.get("done_reason") or ("terminated" if terminated else "truncated"))
            break
        if max_blocked_steps is not None and still >= max_blocked_steps:
            done_reason = "agent_blocked"
            break
    if keep_frames:
        keep(obs, info)
    events = count_events(counters)
    seconds = steps * dt
    return {
        "return": total, "steps": steps, "seconds": seconds, "distance_m": distance,
        "mean_speed": distance / seconds if seconds > 0 else 0.0,
        "route_completion": float(np.clip(completion, 0.0, 1.0)),
        "collision": bool(sum(collision_counts(events).values())) or bool(info.get("collision", False)),
        "infractions": counters[-1], "infraction_events": events,
        "outside_lanes_completion": float(np.clip(outside, 0.0, 1.0)),
        "done_reason": done_reason, "scenario": str(info.get("scenario", "")), "seed": int(seed),
        "frames": frames, "frame_info": frame_info,
    }


def evaluate_policy(model: torch.nn.Module, env: Any, episodes: int, seed: int,
                    deterministic: bool = True, device: str | torch.device = "cpu",
                    cpu_threads: int | None = 1) -> dict[str, float]:
    """Mean figures over ``episodes`` episodes seeded ``seed``, ``seed + 1``, ...

    Keys: ``episode_return``, ``route_completion``, ``collision_rate``, ``episode_steps``,
    ``driving_score``, ``infraction_penalty`` (leaderboard-style, `stages.metrics.driving_score`)
    and ``episodes``. On a CPU device inference runs on ``cpu_threads`` threads (see `torch_threads`).
    """
    threads = cpu_threads if str(device).startswith("cpu") else None
    with torch_threads(threads):
        runs = [rollout_policy(model, env, seed + i, deterministic, device) for i in range(episodes)]
    summary = summarise(runs)
    return {
        "episode_return": float(np.mean([r["return"] for r in runs])),
        "route_completion": float(np.mean([r["route_completion"] for r in runs])),
        "collision_rate": float(np.mean([r["collision"] for r in runs])),
        "episode_steps": float(np.mean([r["steps"] for r in runs])),
        "driving_score": float(summary["driving_score"]),
        "infraction_penalty": float(summary["infraction_penalty"]),
        "episodes": episodes,
    }
