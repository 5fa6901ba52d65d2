"""Record drives in a `DrivingEnv` (expert or perturbed expert) as episode arrays.

The recorder only talks to the env interface (`reset`/`step`, the `info` keys of the contract), so
it records the embedded `highway` backend and the `carla` backend alike. Two optional callbacks add
what only the driver or the simulator knows:

- ``label(env)``: the action the clean expert would have taken at this step. A perturbed drive
  executes a noisy action (what offline RL must learn the value of) but is labelled with the clean
  one (what imitation should copy: the recovery, DART-style).
- ``boxes(env)``: the other vehicles' boxes ``[K, 5]`` or ``[K, 6]`` (x, y, yaw, length, width[, track
  id]) in the frame of ``info["ego_pose"]``, for the open-loop collision metric and the nuScenes
  writer's sample annotations. `default_boxes` picks `stages.data.agents.other_vehicle_boxes` on
  the highway backend and ``info["agent_boxes"]`` where a backend reports them (CARLA).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from stages.envs.base import step_seconds

log = logging.getLogger(__name__)

BOX_COLUMNS = 6   # x, y, yaw, length, width, track id


@dataclass
class Episode:
    """One drive, every array indexed by step."""

    images: np.ndarray        # uint8 [N, H, W, 3]
    states: np.ndarray        # float32 [N, 8]
    actions: np.ndarray       # float32 [N, 3] the executed action
    rewards: np.ndarray       # float32 [N]  the env's reward (compute_driving_reward, as online)
    terminated: np.ndarray    # bool [N]  (true on the last step when the episode ended in failure)
    truncated: np.ndarray     # bool [N]
    poses: np.ndarray         # float32 [N, 3] world x, y, yaw (the frame of info["ego_pose"])
    commands: list[str]
    captions: list[str]
    collisions: np.ndarray    # bool [N]
    route_completion: float
    perturbed: bool
    expert_actions: np.ndarray | None = None   # float32 [N, 3] the clean expert's action (None: = actions)
    agent_boxes: np.ndarray | None = None      # float32 [M, 6] other vehicles of every step, concatenated
    agent_offsets: np.ndarray | None = None    # int64 [N + 1] step i owns rows offsets[i]:offsets[i+1]
    dt: float = field(default=0.1)             # seconds per step

    def __len__(self) -> int:
        return len(self.actions)

    def boxes_at(self, step: int) -> np.ndarray:
        """Other vehicles' boxes ``[K, 6]`` at ``step`` (empty without recorded boxes)."""
        if self.agent_boxes is None or self.agent_offsets is None:
            return np.zeros((0, BOX_COLUMNS), dtype=np.float32)
        return self.agent_boxes[self.agent_offsets[step]:self.agent_offsets[step + 1]]

    def to_arrays(self) -> dict[str, np.ndarray]:
        n = len(self)
        boxes = self.agent_boxes if self.agent_boxes is not None else np.zeros((0, BOX_COLUMNS), np.float32)
        offsets = self.agent_offsets if self.agent_offsets is not None else np.zeros(n + 1, np.int64)
        return {
            "images": self.images, "states": self.states, "actions": self.actions, "rewards": self.rewards,
            "terminated": self.terminated, "truncated": self.truncated, "poses": self.poses,
            "collisions": self.collisions,
            "commands": np.asarray(self.commands, dtype=object).astype(str),
            "captions": np.asarray(self.captions, dtype=object).astype(str),
            "route_completion": np.float32(self.route_completion), "perturbed": np.bool_(self.perturbed),
            "expert_actions": self.expert_actions if self.expert_actions is not None else self.actions,
            "agent_boxes": boxes.astype(np.float32), "agent_offsets": offsets.astype(np.int64),
            "dt": np.float32(self.dt),
        }


def episode_from_arrays(arrays: dict[str, np.ndarray]) -> Episode:
    """The inverse of `Episode.to_arrays` (older files without boxes or labels load too)."""
    n = len(arrays["actions"])
    return Episode(
        images=arrays["images"], states=arrays["states"], actions=arrays["actions"], rewards=arrays["rewards"],
        terminated=arrays["terminated"], truncated=arrays["truncated"], poses=arrays["poses"],
        commands=[str(c) for c in arrays["commands"]], captions=[str(c) for c in arrays["captions"]],
        collisions=arrays["collisions"], route_completion=float(arrays["route_completion"]),
        perturbed=bool(arrays["perturbed"]),
        expert_actions=arrays.get("expert_actions", arrays["actions"]),
        agent_boxes=arrays.get("agent_boxes"),
        agent_offsets=arrays.get("agent_offsets", np.zeros(n + 1, np.int64)),
        dt=float(arrays.get("dt", 0.1)))


def default_boxes(env: Any, info: dict[str, Any]) -> np.ndarray:
    """Other vehicles around the ego with track ids, from whatever the backend offers."""
    if "agent_boxes" in info:
        return np.asarray(info["agent_boxes"], dtype=np.float32).reshape(-1, BOX_COLUMNS)
    try:
        from stages.data.agents import other_vehicle_boxes

        return other_vehicle_boxes(env, with_ids=True).astype(np.float32)
    except TypeError:   # not a highway-env simulation and no boxes in info: nothing to annotate
        return np.zeros((0, BOX_COLUMNS), dtype=np.float32)


def record_episode(env: Any, policy: Callable[[Any, dict[str, Any]], np.ndarray], seed: int,
                   perturbed: bool = False, label: Callable[[Any], np.ndarray] | None = None,
                   boxes: Callable[[Any, dict[str, Any]], np.ndarray] | None = default_boxes,
                   box_range: float = 60.0) -> Episode:
    """Drive one episode with ``policy(env, obs)`` and keep every transition.

    ``label(env)`` (called right after ``policy``) gives the clean expert's action for the step;
    ``boxes(env, info)`` the other vehicles at the step, kept within ``box_range`` m of the ego.
    """
    obs, info = env.reset(seed=seed)
    rows: dict[str, list] = {k: [] for k in ("images", "states", "actions", "rewards", "terminated",
                                             "truncated", "poses", "commands", "captions", "collisions",
                                             "expert_actions", "boxes")}
    done = False
    while not done:
        action = np.asarray(policy(env, obs), dtype=np.float32)
        rows["expert_actions"].append(np.asarray(label(env), dtype=np.float32) if label is not None else action)
        pose = np.asarray(info["ego_pose"], dtype=np.float32)
        if boxes is not None:
            b = np.asarray(boxes(env, info), dtype=np.float32).reshape(-1, BOX_COLUMNS)
            rows["boxes"].append(b[np.linalg.norm(b[:, :2] - pose[:2], axis=1) <= box_range])
        rows["images"].append(obs["image"])
        rows["states"].append(obs["state"])
        rows["commands"].append(str(obs["command"]))
        rows["captions"].append(str(info.get("caption", obs["command"])))
        rows["poses"].append(pose)
        obs, reward, terminated, truncated, info = env.step(action)
        rows["actions"].append(action)
        rows["rewards"].append(float(reward))
        rows["terminated"].append(bool(terminated))
        rows["truncated"].append(bool(truncated))
        rows["collisions"].append(bool(info.get("collision", False)))
        done = terminated or truncated
    n = len(rows["actions"])
    if boxes is not None:
        counts = [len(b) for b in rows["boxes"]]
        agent_boxes = np.concatenate(rows["boxes"]) if n else np.zeros((0, BOX_COLUMNS), np.float32)
        agent_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    else:
        agent_boxes, agent_offsets = None, None
    return Episode(
        images=np.stack(rows["images"]).astype(np.uint8),
        states=np.stack(rows["states"]).astype(np.float32),
        actions=np.stack(rows["actions"]).astype(np.float32),
        rewards=np.asarray(rows["rewards"], dtype=np.float32),
        terminated=np.asarray(rows["terminated"]), truncated=np.asarray(rows["truncated"]),
        poses=np.stack(rows["poses"]), commands=rows["commands"], captions=rows["captions"],
        collisions=np.asarray(rows["collisions"]),
        route_completion=float(info.get("route_completion", 0.0)), perturbed=perturbed,
        expert_actions=np.stack(rows["expert_actions"]).astype(np.float32),
        agent_boxes=agent_boxes, agent_offsets=agent_offsets,
        dt=step_seconds(env),
    )


def future_waypoints(poses: np.ndarray, horizon: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Future positions in the ego frame of each step: x forward, y left (in a right-handed world).

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
        out[t, : ok.sum()] = to_ego_frame(poses[idx[ok], :2], poses[t])
        valid[t] = bool(ok.all())
    return out, valid


def to_ego_frame(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """World points ``[..., 2]`` into the frame of ``pose`` (x, y, yaw): the offset rotated by -yaw."""
    x0, y0, yaw = (float(v) for v in pose[:3])
    delta = np.asarray(points, dtype=np.float64)[..., :2] - np.array([x0, y0])
    c, s = np.cos(yaw), np.sin(yaw)
    return np.stack([c * delta[..., 0] + s * delta[..., 1], -s * delta[..., 0] + c * delta[..., 1]],
                    axis=-1).astype(np.float32)


def future_agent_boxes(episode: Episode, step: int, seconds: float = 3.0, every: float = 0.5,
                       reach: float = 120.0) -> np.ndarray:
    """Other vehicles every ``every`` s up to ``seconds`` after ``step``, in ``step``'s ego frame.

    Rows ``[t_seconds, x, y, yaw, length, width]``: what the open-loop collision metric checks a
    planned trajectory against (ego box at time t vs these boxes at time t). The default 2 Hz over
    3 s is nuScenes' keyframe grid, so both sources are checked at the same times. ``reach`` (m from
    the current ego) must cover where the ego can be at the horizon (75 m at 25 m/s over 3 s).
    """
    pose = episode.poses[step]
    rows = []
    for k in range(1, int(round(seconds / every)) + 1):
        s = step + int(round(k * every / episode.dt))
        if s >= len(episode):
            break
        b = episode.boxes_at(s)
        if not len(b):
            continue
        xy = to_ego_frame(b[:, :2], pose)
        near = np.linalg.norm(xy, axis=1) <= reach
        if not near.any():
            continue
        yaw = np.arctan2(np.sin(b[near, 2] - pose[2]), np.cos(b[near, 2] - pose[2]))
        rows.append(np.column_stack([np.full(near.sum(), k * every), xy[near], yaw, b[near, 3], b[near, 4]]))
    return np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, 6), np.float32)
