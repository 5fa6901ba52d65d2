"""Record drives in a `DrivingEnv` (expert or perturbed expert) as episode arrays.

The recorder only talks to the env interface (`reset`/`step`, the `info` keys of the contract), so
it records the embedded `highway` backend and the `carla` backend alike.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Episode:
    """One drive, every array indexed by step."""

    images: np.ndarray        # uint8 [N, H, W, 3]
    states: np.ndarray        # float32 [N, 8]
    actions: np.ndarray       # float32 [N, 3]
    rewards: np.ndarray       # float32 [N]
    terminated: np.ndarray    # bool [N]  (true on the last step when the episode ended in failure)
    truncated: np.ndarray     # bool [N]
    poses: np.ndarray         # float32 [N, 3] world x, y, yaw
    commands: list[str]
    captions: list[str]
    collisions: np.ndarray    # bool [N]
    route_completion: float
    perturbed: bool

    def __len__(self) -> int:
        return len(self.actions)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "images": self.images, "states": self.states, "actions": self.actions, "rewards": self.rewards,
            "terminated": self.terminated, "truncated": self.truncated, "poses": self.poses,
            "collisions": self.collisions,
            "commands": np.asarray(self.commands, dtype=object).astype(str),
            "captions": np.asarray(self.captions, dtype=object).astype(str),
            "route_completion": np.float32(self.route_completion), "perturbed": np.bool_(self.perturbed),
        }


def record_episode(env: Any, policy: Callable[[Any, dict[str, Any]], np.ndarray], seed: int,
                   perturbed: bool = False) -> Episode:
    """Drive one episode with ``policy(env, obs)`` and keep every transition."""
    obs, info = env.reset(seed=seed)
    rows: dict[str, list] = {k: [] for k in ("images", "states", "actions", "rewards", "terminated",
                                             "truncated", "poses", "commands", "captions", "collisions")}
    done = False
    while not done:
        action = np.asarray(policy(env, obs), dtype=np.float32)
        rows["images"].append(obs["image"])
        rows["states"].append(obs["state"])
        rows["commands"].append(str(obs["command"]))
        rows["captions"].append(str(info.get("caption", obs["command"])))
        rows["poses"].append(np.asarray(info["ego_pose"], dtype=np.float32))
        obs, reward, terminated, truncated, info = env.step(action)
        rows["actions"].append(action)
        rows["rewards"].append(float(reward))
        rows["terminated"].append(bool(terminated))
        rows["truncated"].append(bool(truncated))
        rows["collisions"].append(bool(info.get("collision", False)))
        done = terminated or truncated
    return Episode(
        images=np.stack(rows["images"]).astype(np.uint8),
        states=np.stack(rows["states"]).astype(np.float32),
        actions=np.stack(rows["actions"]).astype(np.float32),
        rewards=np.asarray(rows["rewards"], dtype=np.float32),
        terminated=np.asarray(rows["terminated"]), truncated=np.asarray(rows["truncated"]),
        poses=np.stack(rows["poses"]), commands=rows["commands"], captions=rows["captions"],
        collisions=np.asarray(rows["collisions"]),
        route_completion=float(info.get("route_completion", 0.0)), perturbed=perturbed,
    )


def future_waypoints(poses: np.ndarray, horizon: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Future positions in the ego frame of each step: x forward, y left.

    Returns ``(waypoints [N, horizon, 2], valid [N])``; a step is valid when its whole horizon lies
    inside the episode (no padding is invented).
    """
    n = len(poses)
    out = np.zeros((n, horizon, 2), dtype=np.float32)
    valid = np.zeros(n, dtype=bool)
    offsets = stride * np.arange(1, horizon + 1)
    for t in range(n):
        idx = t + offsets
        ok = idx < n
        if not ok.any():
            continue
        x0, y0, yaw = poses[t]
        delta = poses[idx[ok], :2] - np.array([x0, y0], dtype=np.float32)
        c, s = np.cos(yaw), np.sin(yaw)
        # Rotate the world offset by -yaw into the ego frame.
        out[t, : ok.sum(), 0] = c * delta[:, 0] + s * delta[:, 1]
        out[t, : ok.sum(), 1] = -s * delta[:, 0] + c * delta[:, 1]
        valid[t] = bool(ok.all())
    return out, valid
