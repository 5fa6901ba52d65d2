"""The training dataset, built from both sources: simulator recordings and a nuScenes-format folder.

Every sample, whatever its source, carries the same fields (see `stages.data.shards`): the future
trajectory on one time grid (``trajectory_length`` waypoints ``step_seconds`` apart, ego frame,
x forward / y left), the future boxes of the other agents at the waypoint times (for the collision
metric), the ego state vector, the command and a caption.

- ``sim``: the recorder's episodes (``data/sim``): every step, executed and expert actions, rewards
  and done flags (offline RL), frame captions from simulator ground truth.
- ``nuscenes``: every keyframe with a full future, read through nuscenes-devkit (`read_nuscenes`'s
  machinery): CAM_FRONT, speed (CAN bus where present), the trajectory resampled from nuScenes' 2 Hz
  onto the grid, the VAD command, the scene description as caption, annotated boxes at the future
  keyframes. No controls or rewards: those samples train the trajectory and the captions only.
  The state vector holds the speed; fields nuScenes has no counterpart for take neutral values.

`write_sim_as_nuscenes` writes the simulator drives as a nuScenes ``v1.0-trainval`` dataset (official
train / val scene names following the recording's split), which is what the ``demo`` preset reads back
as its nuScenes source.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stages.common import staged_dir
from stages.data.dataset import load_episode, read_manifest as read_sim_manifest
from stages.data.errors import DatasetError
from stages.data.nuscenes_reader import (DEFAULT_AGENT_CATEGORIES, annotated_boxes, iter_nuscenes,
                                         load_nuscenes, select_scenes, warn_skipped)
from stages.data.nuscenes_schema import CAMERA_CHANNELS, LIDAR_CHANNEL
from stages.data.recorder import episode_from_arrays, future_agent_boxes, future_waypoints
from stages.data.shards import ShardWriter, read_shard, write_manifest
from stages.envs.spaces import FRONT_DISTANCE_MAX, STATE_DIM

log = logging.getLogger(__name__)

SOURCES = ("sim", "nuscenes")
NUSCENES_KEYFRAME_SECONDS = 0.5
# Ego boxes (length, width) for the collision metric: highway-env's Vehicle, and the nuScenes ego
# (a Renault Zoe, the size ST-P3 and VAD use).
EGO_SIZE = {"sim": (5.0, 2.0), "nuscenes": (4.084, 1.85)}


def _neutral_state(speed: float) -> np.ndarray:
    state = np.zeros(STATE_DIM, dtype=np.float32)
    state[0] = speed
    state[6] = FRONT_DISTANCE_MAX   # "nobody ahead": the neutral value of the front distance
    return state


def _pack_agents(per_sample: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    counts = [len(b) for b in per_sample]
    boxes = np.concatenate(per_sample).astype(np.float32) if per_sample else np.zeros((0, 6), np.float32)
    return boxes.reshape(-1, 6), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


# -- simulator recordings -----------------------------------------------------------------------------

def sim_episode_samples(arrays: dict[str, np.ndarray], index: int, horizon: int, stride: int,
                        reach: float = 120.0) -> dict[str, np.ndarray]:
    """One recorded episode as shard arrays (trajectories ``stride`` steps apart)."""
    ep = episode_from_arrays(arrays)
    n = len(ep)
    traj, valid = future_waypoints(ep.poses, horizon, stride)
    boxes = [future_agent_boxes(ep, t, seconds=horizon * stride * ep.dt, reach=reach) for t in range(n)]
    agent_boxes, agent_offsets = _pack_agents(boxes)
    next_index = np.arange(1, n + 1, dtype=np.int32)
    next_index[-1] = -1          # the recorder keeps no observation after the last step
    return {
        "images": ep.images, "states": ep.states.astype(np.float32), "actions": ep.actions.astype(np.float32),
        "expert_actions": np.asarray(ep.expert_actions, dtype=np.float32), "action_valid": np.ones(n, bool),
        "rewards": ep.rewards.astype(np.float32), "terminated": np.asarray(ep.terminated, bool),
        "next_index": next_index, "trajectories": traj, "traj_valid": valid,
        "commands": np.asarray(ep.commands, dtype=str), "captions": np.asarray(ep.captions, dtype=str),
        "perturbed": np.full(n, ep.perturbed), "episode": np.full(n, index, np.int32),
        "agent_boxes": agent_boxes, "agent_offsets": agent_offsets,
    }


def iter_sim_episodes(sim_root: str | Path) -> Iterator[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """``(manifest entry, arrays)`` of every recorded episode, in the recording's order."""
    root = Path(sim_root)
    for entry in read_sim_manifest(root)["episodes"]:
        yield entry, load_episode(root / entry["file"])


class _LazyBoxes(Sequence):
    """``other_agents`` for `write_nuscenes` without holding every episode in memory."""

    def __init__(self, sim_root: Path, entries: list[dict[str, Any]]):
        self.root, self.entries = sim_root, entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> list[np.ndarray] | None:  # type: ignore[override]
        ep = episode_from_arrays(load_episode(self.root / self.entries[i]["file"]))
        if ep.agent_boxes is None or not len(ep.agent_boxes):
            return None
        return [ep.boxes_at(s) for s in range(len(ep))]


def write_sim_as_nuscenes(sim_root: str | Path, out: str | Path, version: str = "v1.0-trainval",
                          keyframe_every: int = 5, **writer_kwargs: Any) -> Path:
    """Write the recorded drives as a nuScenes dataset (scene splits = the recording's splits)."""
    # Deferred: the writer imports pyquaternion (the `nuscenes` extra) when loaded; sim-only builds need none.
    from stages.data.nuscenes_writer import write_nuscenes

    root = Path(sim_root)
    entries = read_sim_manifest(root)["episodes"]
    episodes = (load_episode(root / e["file"]) for e in entries)
    return write_nuscenes(episodes, out, version=version, keyframe_every=keyframe_every,
                          other_agents=_LazyBoxes(root, entries), splits=[e["split"] for e in entries],
                          overwrite=True, **writer_kwargs)


# -- nuScenes --------------------------------------------------------------------------------------

def _future_boxes(nusc: Any, sample: dict[str, Any], pose: dict[str, Any], keyframes: int,
                  categories: Sequence[str]) -> np.ndarray:
    """Annotated boxes of the next ``keyframes`` samples in the ego frame of ``pose``, rows (t, x, y, yaw, l, w)."""
    rows, token = [], sample["next"]
    for _ in range(keyframes):
        if not token:
            break
        future = nusc.get("sample", token)
        boxes = annotated_boxes(nusc, future, pose, categories)
        t = (future["timestamp"] - sample["timestamp"]) / 1e6
        if len(boxes):
            rows.append(np.column_stack([np.full(len(boxes), t), boxes]))
        token = future["next"]
    return np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, 6), np.float32)


def resample_trajectory(trajectory: np.ndarray, times: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Waypoints at ``times`` (s, increasing) -> waypoints at ``grid`` (linear, from the origin at t=0)."""
    t = np.concatenate([[0.0], times])
    xy = np.concatenate([np.zeros((1, 2)), trajectory], axis=0)
    return np.stack([np.interp(grid, t, xy[:, 0]), np.interp(grid, t, xy[:, 1])], axis=1).astype(np.float32)


def iter_nuscenes_scenes(dataroot: str | Path, version: str, split: str, horizon: int, step_seconds: float,
                         image_size: int | None, num_cameras: int = 1, first_index: int = 0, *,
                         strict: bool = False, skipped: list[str] | None = None,
                         ) -> Iterator[dict[str, np.ndarray]]:
    """Shard arrays, one scene at a time, of every keyframe of ``split`` with a full future.

    Keyframes lacking a camera keyframe are skipped, their tokens appended to ``skipped`` (``strict``:
    the folder is rejected instead, naming the sample).
    """
    channels = CAMERA_CHANNELS[:num_cameras]
    grid = step_seconds * np.arange(1, horizon + 1)
    keyframes = math.ceil(grid[-1] / NUSCENES_KEYFRAME_SECONDS - 1e-6)
    nusc = load_nuscenes(dataroot, version, channels, strict=strict)
    for k, scene in enumerate(select_scenes(nusc, split)):
        rows = list(iter_nuscenes(nusc, [scene], channels, keyframes, image_size, skipped=skipped))
        if not rows:
            continue
        trajs, boxes = [], []
        for r in rows:
            sample = nusc.get("sample", r["sample_token"])
            ref = LIDAR_CHANNEL if LIDAR_CHANNEL in sample["data"] else channels[0]
            pose = nusc.get("ego_pose", nusc.get("sample_data", sample["data"][ref])["ego_pose_token"])
            boxes.append(_future_boxes(nusc, sample, pose, keyframes, DEFAULT_AGENT_CATEGORIES))
            # The keyframes' real times (nominally 0.5 s apart) place the waypoints on the grid.
            stamps, token = [], sample["next"]
            for _ in range(keyframes):
                nxt = nusc.get("sample", token)
                stamps.append((nxt["timestamp"] - sample["timestamp"]) / 1e6)
                token = nxt["next"]
            trajs.append(resample_trajectory(r["trajectory"], np.asarray(stamps), grid))
        n = len(rows)
        agent_boxes, agent_offsets = _pack_agents(boxes)
        yield {
            "images": np.stack([r["image"] for r in rows]),
            "states": np.stack([_neutral_state(r["speed"]) for r in rows]),
            "actions": np.zeros((n, 3), np.float32), "expert_actions": np.zeros((n, 3), np.float32),
            "action_valid": np.zeros(n, bool), "rewards": np.zeros(n, np.float32),
            "terminated": np.zeros(n, bool), "next_index": np.full(n, -1, np.int32),
            "trajectories": np.stack(trajs), "traj_valid": np.ones(n, bool),
            "commands": np.array([r["command"] for r in rows], dtype=str),
            "captions": np.array([r["caption"] or "a drive" for r in rows], dtype=str),
            "perturbed": np.zeros(n, bool), "episode": np.full(n, first_index + k, np.int32),
            "agent_boxes": agent_boxes, "agent_offsets": agent_offsets,
        }


def _train_stats(root: Path, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Statistics of the train split the training stages start from: per-waypoint mean and spread of the
    trajectories (loss normalisation, head initialisation) and the reward per step (critic initialisation)."""
    trajs, rewards = [], []
    for sh in shards:
        if sh["split"] != "train":
            continue
        z = read_shard(root / sh["file"], {"trajectories", "traj_valid", "rewards", "action_valid"})
        trajs.append(z["trajectories"][z["traj_valid"]])
        rewards.append(z["rewards"][z["action_valid"]])
    traj = np.concatenate(trajs) if trajs else np.zeros((0, 1, 2), np.float32)
    rew = np.concatenate(rewards) if rewards else np.zeros(0, np.float32)
    return {"trajectory_mean": traj.mean(0).tolist() if len(traj) else None,
            "trajectory_std": traj.std(0).tolist() if len(traj) else None,
            "reward_mean": float(rew.mean()) if len(rew) else 0.0,
            "reward_std": float(rew.std()) if len(rew) else 1.0}


# -- the build -------------------------------------------------------------------------------------

def build_dataset(out: str | Path, *, sources: Sequence[str], sim_root: str | Path | None = None,
                  nuscenes_root: str | Path | None = None, nuscenes_version: str = "v1.0-trainval",
                  horizon: int = 10, stride: int = 3, sim_dt: float = 0.1, image_size: int | None = None,
                  num_cameras: int = 1, shard_size: int = 1024, nuscenes_strict: bool = False) -> dict[str, Any]:
    """Build the sharded training dataset at ``out`` (atomically) and return its manifest.

    Trajectories are ``horizon`` waypoints ``stride * sim_dt`` seconds apart for every source. nuScenes
    keyframes without a camera keyframe are skipped and counted (``sources.nuscenes.skipped_samples``);
    ``nuscenes_strict`` rejects such a folder instead.
    """
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise ValueError(f"sources must be a non-empty subset of {SOURCES}, got {list(sources)}")
    if "sim" in sources and sim_root is None:
        raise ValueError("source 'sim' needs sim_root (the recorded episodes)")
    if "nuscenes" in sources and nuscenes_root is None:
        raise ValueError("source 'nuscenes' needs nuscenes_root (a nuScenes folder)")
    step_seconds = stride * sim_dt
    shards: list[dict[str, Any]] = []
    info: dict[str, Any] = {"trajectory": {"length": horizon, "step_seconds": step_seconds},
                            "ego_size": {s: list(EGO_SIZE[s]) for s in sources}, "sources": {}}
    with staged_dir(out) as tmp:
        if "sim" in sources:
            sim_manifest = read_sim_manifest(sim_root)
            size = sim_manifest.get("image_size")
            if image_size is not None and size is not None and size != image_size:
                raise DatasetError(f"{sim_root} holds {size}px images but the model takes {image_size}px: "
                                   f"record again with env.image_size={image_size}")
            writers = {s: ShardWriter(tmp, s, "sim", shard_size) for s in ("train", "val")}
            for entry, arrays in iter_sim_episodes(sim_root):
                writers[entry["split"]].add(sim_episode_samples(arrays, entry["index"], horizon, stride))
            for w in writers.values():
                w.flush()
                shards += w.shards
            info["sources"]["sim"] = {"path": str(sim_root), "kind": sim_manifest.get("source", "sim")}
        if "nuscenes" in sources:
            skipped: list[str] = []
            for split in ("train", "val"):
                w = ShardWriter(tmp, split, "nuscenes", shard_size)
                for scene in iter_nuscenes_scenes(nuscenes_root, nuscenes_version, split, horizon, step_seconds,
                                                  image_size, num_cameras, first_index=100_000,
                                                  strict=nuscenes_strict, skipped=skipped):
                    w.add(scene)
                w.flush()
                shards += w.shards
            warn_skipped(skipped, nuscenes_root, CAMERA_CHANNELS[:num_cameras])
            info["sources"]["nuscenes"] = {"path": str(nuscenes_root), "version": nuscenes_version,
                                           "skipped_samples": len(skipped)}
        info["stats"] = _train_stats(tmp, shards)
        manifest = write_manifest(tmp, shards, info)
    log.info("built dataset %s: %s", out, {k: v["samples"] for k, v in manifest["counts"].items()})
    return manifest
