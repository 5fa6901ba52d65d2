"""Write simulator drives as a nuScenes-format dataset that the real nuscenes-devkit loads.

The real nuScenes cannot be downloaded here, so the tests and the demo preset read drives written in
its schema: all 13 tables under ``<dataroot>/<version>/``, one map record whose ``log_tokens`` cover
every log with a small mask PNG under ``maps/``, keyframe CAM_FRONT JPEGs (more cameras when the
episode's images are ``[N, C, H, W, 3]``), a LIDAR_TOP sample_data per keyframe (the devkit's
convention takes the ego trajectory from LIDAR_TOP's ego poses), sample annotations of the other
vehicles, and a CAN-bus record of the controls under ``<dataroot>/can_bus/``.

Mapping of a drive (one `Episode`, or the dict of arrays `Episode.to_arrays` saves):
- one episode -> one log and one scene; a keyframe (sample) every ``keyframe_every`` steps, so the
  simulator's 10 Hz gives nuScenes' 2 Hz with the default 5; only keyframes are written (no sweeps);
- scene names are taken, in order, from the devkit's official split lists (`create_splits_scenes`):
  ``mini_train`` / ``mini_val`` for ``v1.0-mini`` (8 + 2 names, so at most 8 train and 2 val drives),
  ``train`` / ``val`` for ``v1.0-trainval``. The devkit's own split helpers (``create_splits_logs``)
  and our reader's ``split=`` then work unchanged. Names whose CAN bus the devkit refuses are skipped.
- frames: our envs report poses right-handed (y left, yaw counter-clockwise), as nuScenes' global
  and ego frames are, so they are written as they are. Poses taken straight from a left-handed
  simulator (raw highway-env or CARLA: y to the right of x) need ``left_handed=True``, which mirrors
  y and yaw of poses and boxes on the way out; images are not mirrored (they are what the driver sees).
- CAN bus, at the simulator's rate (not the real 50 / 2 / 100 Hz): ``pose`` (pos, orientation, vel,
  accel, rotation_rate), ``vehicle_monitor`` (vehicle_speed km/h, yaw_rate deg/s, throttle 0..1000,
  brake 0..126, steering deg), ``steeranglefeedback`` (rad), ``route`` (the driven path) and ``meta``.
  Steering keeps the sign of our action and of nuScenes' steer feedback: positive turns right.
- each drive is translated so that its path lies ``MAP_MARGIN`` m inside the positive quadrant: a map
  mask has no origin of its own (MapMask puts the global origin at its bottom-left corner), and real
  nuScenes maps keep every pose positive too. Everything the reader returns is ego-relative, so the
  shift changes nothing there. The mask (the devkit's native 0.1 m / px, at most ``MAX_MAP_PX`` a side)
  marks the driven paths, ``ROAD_HALF_WIDTH`` either side, as drivable: a placeholder prior that the
  devkit insists on, not a map.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from infra.files import replace_dir
from stages.data.nuscenes_schema import (CAMERA_CHANNELS, CAN_BUS_UNUSABLE_SCENES, LIDAR_CHANNEL, SCENE_NAME_RE,
                                         TABLES, make_token, wrap_angle, yaw_to_quaternion)
from stages.data.nuscenes_sensors import (BOX_HEIGHT, LIDAR_HEIGHT, MAP_MARGIN, camera_calibration, can_bus_messages,
                                          draw_map, world_to_ego, write_lidar)

log = logging.getLogger(__name__)

START_TIME_US = 1_700_000_000_000_000   # 2023-11-14, any fixed instant: the tables must be reproducible
EPISODE_GAP_US = 3_600 * 1_000_000      # one hour between drives, so no two logs overlap in time
MOVING_SPEED = 0.5                      # m/s above which an annotated vehicle is "vehicle.moving"
NAMESPACE = "drivevla-nuscenes-v1"      # salt of every token

# Fixed vocabulary tables: real nuScenes names (and lidarseg indices), a subset that the drives use.
CATEGORIES = (("vehicle.car", "Vehicle designed primarily for personal use.", 17),
              ("vehicle.truck", "Vehicles primarily designed to haul cargo.", 23),
              ("human.pedestrian.adult", "Adult subcategory.", 2))
ATTRIBUTES = (("vehicle.moving", "Vehicle is moving."),
              ("vehicle.stopped", "Vehicle, with a driver/rider in/on it, is currently stationary."),
              ("vehicle.parked",
               "Vehicle is stationary (usually for longer duration) with no immediate intent to move."))
VISIBILITY = (("1", "v0-40", "visibility of whole object is between 0 and 40%"),
              ("2", "v40-60", "visibility of whole object is between 40 and 60%"),
              ("3", "v60-80", "visibility of whole object is between 60 and 80%"),
              ("4", "v80-100", "visibility of whole object is between 80 and 100%"))


@dataclass
class _Drive:
    """The parts of an episode the writer uses, in nuScenes' right-handed frame."""

    images: np.ndarray      # uint8 [N, C, H, W, 3]
    poses: np.ndarray       # float64 [N, 3] x, y, yaw (right-handed)
    actions: np.ndarray     # float32 [N, 3] throttle, steer (+ right), brake
    speeds: np.ndarray      # float64 [N] m/s
    offset: np.ndarray      # float64 [2] added to the episode's (mirrored) world x, y
    commands: list[str]
    captions: list[str]


def _field(ep: Any, name: str) -> Any:
    return ep[name] if isinstance(ep, Mapping) else getattr(ep, name)


def _as_drive(ep: Any, dt: float, left_handed: bool) -> _Drive:
    images = np.asarray(_field(ep, "images"))
    if images.ndim == 4:
        images = images[:, None]
    if images.ndim != 5 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"episode images must be uint8 [N, H, W, 3] or [N, C, H, W, 3], got "
                         f"{images.dtype} {images.shape}")
    if images.shape[1] > len(CAMERA_CHANNELS):
        raise ValueError(f"at most {len(CAMERA_CHANNELS)} cameras, got {images.shape[1]}")
    poses = np.asarray(_field(ep, "poses"), dtype=np.float64).copy()
    n = len(poses)
    if n == 0:
        raise ValueError("an episode without steps cannot be a scene")
    if len(images) != n:
        raise ValueError(f"episode has {len(images)} images but {n} poses")
    if left_handed:
        poses[:, 1] *= -1.0
        poses[:, 2] *= -1.0
    poses[:, 2] = wrap_angle(poses[:, 2])
    offset = MAP_MARGIN - poses[:, :2].min(axis=0)
    poses[:, :2] += offset
    actions = np.asarray(_field(ep, "actions"), dtype=np.float32).reshape(n, 3)
    states = ep.get("states") if isinstance(ep, Mapping) else getattr(ep, "states", None)
    if states is not None and np.asarray(states).ndim == 2:
        speeds = np.asarray(states, dtype=np.float64)[:, 0]   # STATE_FIELDS[0] is the speed along the heading
    else:
        speeds = _pose_speeds(poses, dt)
    return _Drive(images=images, poses=poses, actions=actions, speeds=speeds, offset=offset,
                  commands=[str(c) for c in _field(ep, "commands")],
                  captions=[str(c) for c in _field(ep, "captions")])


def _pose_speeds(poses: np.ndarray, dt: float) -> np.ndarray:
    if len(poses) < 2:
        return np.zeros(len(poses))
    step = np.linalg.norm(np.diff(poses[:, :2], axis=0), axis=1) / dt
    return np.append(step, step[-1])


# -- scene names and splits ---------------------------------------------------------------------------

def default_splits(n: int, val_fraction: float = 0.2) -> list[str]:
    """The last episodes are validation ones, as in the data stage (at least one once there are two)."""
    n_val = 0 if n < 2 else max(1, round(n * val_fraction))
    return ["train"] * (n - n_val) + ["val"] * n_val


def official_scene_names(version: str, splits: Sequence[str]) -> list[str]:
    """One official scene name per episode, drawn in order from the version's train / val lists."""
    from nuscenes.utils.splits import create_splits_scenes

    official = create_splits_scenes()
    prefix = {"v1.0-mini": "mini_", "v1.0-trainval": ""}.get(version)
    if prefix is None:
        raise ValueError(f"no official scene names for version {version!r}: use v1.0-mini or v1.0-trainval, "
                         "or pass scene_names")
    pools = {s: [n for n in official[prefix + s] if int(n[-4:]) not in CAN_BUS_UNUSABLE_SCENES]
             for s in ("train", "val")}
    used = {"train": 0, "val": 0}
    names = []
    for i, split in enumerate(splits):
        if split not in pools:
            raise ValueError(f"episode {i}: split {split!r} is not 'train' or 'val'")
        if used[split] >= len(pools[split]):
            raise ValueError(f"{version} has {len(pools[split])} official {prefix}{split} scene names and more "
                             f"{split} episodes were given; write v1.0-trainval for more drives")
        names.append(pools[split][used[split]])
        used[split] += 1
    return names


def scene_description(commands: Sequence[str], captions: Sequence[str], limit: int = 256) -> str:
    """A nuScenes-style scene description: what the frame captions say for most of the drive.

    Captions describe single frames (speed, nearby cars change every step); the sentences found in at least
    half of them are the scene's lasting facts (the place, the route command). Commands no kept sentence
    mentions are appended, so every instruction of the drive is named.
    """
    counts: dict[str, int] = {}
    for caption in captions:
        for sentence in dict.fromkeys(x.strip() for x in re.split(r"(?<=[.!?])\s+", caption) if x.strip()):
            counts[sentence] = counts.get(sentence, 0) + 1
    kept = [x for x, c in counts.items() if c * 2 >= len(captions)]
    if not kept and counts:
        kept = [next(iter(counts))]
    text = " ".join(kept)
    extra = [c.strip() for c in dict.fromkeys(commands) if c.strip() and c.strip().lower() not in text.lower()]
    if extra:
        text = f"{text} Also: {', '.join(extra)}." if text else ", ".join(extra)
    text = text or "simulated drive"
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


# -- the writer -------------------------------------------------------------------------------------

class _Tables:
    """The 13 tables being filled, plus the vocabulary records every dataset shares."""

    def __init__(self, channels: Sequence[str]):
        self.rows: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES}
        self.category = {}
        for name, description, index in CATEGORIES:
            tok = make_token(NAMESPACE, "category", name)
            self.category[name] = tok
            self.rows["category"].append({"token": tok, "name": name, "description": description, "index": index})
        self.attribute = {}
        for name, description in ATTRIBUTES:
            tok = make_token(NAMESPACE, "attribute", name)
            self.attribute[name] = tok
            self.rows["attribute"].append({"token": tok, "name": name, "description": description})
        # The real visibility tokens are "1".."4"; keep them.
        self.rows["visibility"] = [{"token": t, "level": lvl, "description": d} for t, lvl, d in VISIBILITY]
        self.sensor = {}
        for channel in [*channels, LIDAR_CHANNEL]:
            tok = make_token(NAMESPACE, "sensor", channel)
            self.sensor[channel] = tok
            self.rows["sensor"].append({"token": tok, "channel": channel,
                                        "modality": "lidar" if channel == LIDAR_CHANNEL else "camera"})


def _dump(path: Path, data: Any) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)


def write_nuscenes(
    episodes: Iterable[Any],
    dataroot: str | Path,
    version: str = "v1.0-mini",
    keyframe_every: int = 5,
    other_agents: Sequence[Sequence[np.ndarray] | None] | None = None,
    *,
    splits: Sequence[str] | None = None,
    scene_names: Sequence[str] | None = None,
    dt: float = 0.1,
    left_handed: bool = False,
    annotation_range: float = 50.0,
    camera_fov_deg: float = 90.0,
    location: str = "drivevla-sim",
    overwrite: bool = False,
) -> Path:
    """Write ``episodes`` as a nuScenes ``version`` dataset at ``dataroot`` and return ``dataroot``.

    ``episodes``: `Episode`s or their ``to_arrays()`` dicts (images uint8 ``[N, H, W, 3]`` or
    ``[N, C, H, W, 3]`` for C cameras, poses ``[N, 3]``, actions, commands, captions, states optional).
    ``other_agents[i]``, if given, holds per step of episode ``i`` the boxes ``[K, 5]`` (x, y, yaw, length,
    width) of the other vehicles in the episode's world frame, or ``[K, 6]`` with a track id in the last
    column (`stages.data.agents.other_vehicle_boxes(env, with_ids=True)`); without ids the row index is the
    track. Boxes farther than ``annotation_range`` m from the ego are not annotated (nuScenes' own reach).
    ``splits`` (per episode, "train" / "val"; default: the last ~20 % are "val") pick the official scene
    names unless ``scene_names`` gives them. ``dt`` is the simulator's step in seconds.
    The folder is built beside ``dataroot`` and renamed into place at the end, so a crash leaves no half
    dataset; an existing ``dataroot`` is replaced only with ``overwrite``.
    """
    if keyframe_every < 1:
        raise ValueError(f"keyframe_every must be >= 1, got {keyframe_every}")
    dataroot = Path(dataroot)
    if dataroot.exists() and not overwrite:
        raise FileExistsError(f"{dataroot} exists; pass overwrite=True to replace it")
    episodes = list(episodes) if (splits is None and scene_names is None) else episodes
    if scene_names is None:
        splits = list(splits) if splits is not None else default_splits(len(episodes))  # type: ignore[arg-type]
        scene_names = official_scene_names(version, splits)
    scene_names = list(scene_names)
    if len(set(scene_names)) != len(scene_names):
        raise ValueError("scene_names must be unique")
    can_names_ok = all(SCENE_NAME_RE.match(n) and int(n[-4:]) not in CAN_BUS_UNUSABLE_SCENES for n in scene_names)
    if not can_names_ok:
        log.warning("some scene names are not 'scene-NNNN' names the CAN bus API accepts: no CAN bus written")

    tmp = dataroot.parent / f".{dataroot.name}.writing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        summary = _write_all(episodes, tmp, version, keyframe_every, other_agents, scene_names, dt, left_handed,
                             annotation_range, camera_fov_deg, location, can_names_ok)
        replace_dir(tmp, dataroot)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("nuScenes %s written at %s: %s", version, dataroot, summary)
    return dataroot


def _write_all(episodes: Iterable[Any], root: Path, version: str, keyframe_every: int,
               other_agents: Sequence[Sequence[np.ndarray] | None] | None, scene_names: list[str], dt: float,
               left_handed: bool, annotation_range: float, camera_fov_deg: float, location: str,
               write_can: bool) -> dict[str, int]:
    (root / version).mkdir(parents=True)
    (root / "maps").mkdir()
    if write_can:
        (root / "can_bus").mkdir()
    tables: _Tables | None = None
    paths: list[np.ndarray] = []
    count = 0
    for i, ep in enumerate(episodes):
        if i >= len(scene_names):
            raise ValueError(f"more episodes than scene names ({len(scene_names)})")
        drive = _as_drive(ep, dt, left_handed)
        n_cams = drive.images.shape[1]
        channels = list(CAMERA_CHANNELS[:n_cams])
        if tables is None:
            tables = _Tables(channels)
            for ch in [*channels, LIDAR_CHANNEL]:
                (root / "samples" / ch).mkdir(parents=True)
        elif any(ch not in tables.sensor for ch in channels):
            raise ValueError(f"episode {i} has {n_cams} cameras, the first one had {len(tables.sensor) - 1}")
        boxes = other_agents[i] if other_agents is not None and i < len(other_agents) else None
        if boxes is not None and len(boxes) != len(drive.poses):
            raise ValueError(f"other_agents[{i}] has {len(boxes)} steps, the episode {len(drive.poses)}")
        _write_scene(tables, root, i, scene_names[i], drive, boxes, keyframe_every, dt, left_handed,
                     annotation_range, camera_fov_deg, location, channels, write_can)
        paths.append(drive.poses[:, :2])
        count += 1
    if tables is None:
        raise ValueError("no episodes to write")
    map_token = make_token(NAMESPACE, "map", *scene_names[:count])
    map_file = f"maps/{map_token}.png"
    draw_map(root / map_file, paths)
    tables.rows["map"].append({"token": map_token, "category": "semantic_prior", "filename": map_file,
                               "log_tokens": [r["token"] for r in tables.rows["log"]]})
    for name, rows in tables.rows.items():
        _dump(root / version / f"{name}.json", rows)
    return {name: len(rows) for name, rows in tables.rows.items() if name in ("scene", "sample", "sample_annotation")}


def _write_scene(tables: _Tables, root: Path, index: int, name: str, drive: _Drive,
                 boxes: Sequence[np.ndarray] | None, keyframe_every: int, dt: float, left_handed: bool,
                 annotation_range: float, camera_fov_deg: float, location: str, channels: list[str],
                 write_can: bool) -> None:
    rows = tables.rows
    n = len(drive.poses)
    start = START_TIME_US + index * EPISODE_GAP_US
    stamps = start + np.round(np.arange(n) * dt * 1e6).astype(np.int64)
    started = datetime.fromtimestamp(start / 1e6, tz=timezone.utc)
    logfile = f"sim-{started:%Y-%m-%d-%H-%M-%S}+0000"
    log_token = make_token(NAMESPACE, name, "log")
    rows["log"].append({"token": log_token, "logfile": logfile, "vehicle": "drivevla-sim",
                        "date_captured": f"{started:%Y-%m-%d}", "location": location})
    height, width = drive.images.shape[2:4]
    calib = {}
    for ch in [*channels, LIDAR_CHANNEL]:
        tok = make_token(NAMESPACE, name, "calibrated_sensor", ch)
        calib[ch] = tok
        if ch == LIDAR_CHANNEL:
            # Axes of the ego frame, raised to the roof: point clouds read in ego axes.
            record = {"translation": [0.0, 0.0, LIDAR_HEIGHT], "rotation": [1.0, 0.0, 0.0, 0.0],
                      "camera_intrinsic": []}
        else:
            record = camera_calibration(ch, width, height, camera_fov_deg)
        rows["calibrated_sensor"].append({"token": tok, "sensor_token": tables.sensor[ch], **record})

    keyframes = list(range(0, n, keyframe_every))
    scene_token = make_token(NAMESPACE, name, "scene")
    sample_tokens = [make_token(NAMESPACE, name, "sample", s) for s in keyframes]
    sd_tokens = {ch: [make_token(NAMESPACE, name, "sample_data", ch, s) for s in keyframes]
                 for ch in [*channels, LIDAR_CHANNEL]}
    tracks: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    for k, s in enumerate(keyframes):
        ts, pose = int(stamps[s]), drive.poses[s]
        ego_token = make_token(NAMESPACE, name, "ego_pose", s)
        rows["ego_pose"].append({"token": ego_token, "timestamp": ts,
                                 "translation": [float(pose[0]), float(pose[1]), 0.0],
                                 "rotation": yaw_to_quaternion(float(pose[2]))})
        rows["sample"].append({"token": sample_tokens[k], "timestamp": ts, "scene_token": scene_token,
                               "prev": sample_tokens[k - 1] if k else "",
                               "next": sample_tokens[k + 1] if k + 1 < len(keyframes) else ""})
        for c, ch in enumerate([*channels, LIDAR_CHANNEL]):
            is_cam = ch != LIDAR_CHANNEL
            filename = f"samples/{ch}/{logfile}__{ch}__{ts}.{'jpg' if is_cam else 'pcd.bin'}"
            if is_cam:
                Image.fromarray(drive.images[s, c]).save(root / filename, quality=95)
            rows["sample_data"].append({
                "token": sd_tokens[ch][k], "sample_token": sample_tokens[k], "ego_pose_token": ego_token,
                "calibrated_sensor_token": calib[ch], "timestamp": ts,
                "fileformat": "jpg" if is_cam else "pcd", "is_key_frame": True,
                "height": int(height) if is_cam else 0, "width": int(width) if is_cam else 0,
                "filename": filename,
                "prev": sd_tokens[ch][k - 1] if k else "",
                "next": sd_tokens[ch][k + 1] if k + 1 < len(keyframes) else ""})
        centres = _annotate(tables, name, sample_tokens[k], s, drive.poses[s], drive.offset,
                            None if boxes is None else boxes[s], left_handed, annotation_range, tracks)
        lidar_file = f"samples/{LIDAR_CHANNEL}/{logfile}__{LIDAR_CHANNEL}__{ts}.pcd.bin"
        write_lidar(root / lidar_file, world_to_ego(centres, drive.poses[s]) if len(centres) else centres)
    _link_tracks(tables, name, tracks, stamps)

    rows["scene"].append({"token": scene_token, "name": name, "log_token": log_token,
                          "description": scene_description(drive.commands, drive.captions),
                          "nbr_samples": len(keyframes), "first_sample_token": sample_tokens[0],
                          "last_sample_token": sample_tokens[-1]})
    if write_can:
        for message, content in can_bus_messages(drive, stamps, dt).items():
            _dump(root / "can_bus" / f"{name}_{message}.json", content)


def _annotate(tables: _Tables, scene: str, sample_token: str, step: int, ego: np.ndarray, offset: np.ndarray,
              boxes: np.ndarray | None, left_handed: bool, reach: float,
              tracks: dict[int, list[tuple[int, dict[str, Any]]]]) -> np.ndarray:
    """Sample annotations of one keyframe; returns the annotated box centres (world xy)."""
    if boxes is None or len(boxes) == 0:
        return np.zeros((0, 2))
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] not in (5, 6):
        raise ValueError(f"boxes must be [K, 5] or [K, 6], got {b.shape}")
    b = b.copy()
    if left_handed:
        b[:, 1] *= -1.0
        b[:, 2] *= -1.0
    b[:, :2] += offset
    ids = b[:, 5].astype(np.int64) if b.shape[1] == 6 else np.arange(len(b))
    near = np.linalg.norm(b[:, :2] - ego[:2], axis=1) <= reach
    for row, tid in zip(b[near], ids[near]):
        x, y, yaw, length, width = (float(v) for v in row[:5])
        record = {"token": make_token(NAMESPACE, scene, "ann", int(tid), step), "sample_token": sample_token,
                  "instance_token": make_token(NAMESPACE, scene, "instance", int(tid)),
                  "visibility_token": "4", "attribute_tokens": [],
                  "translation": [x, y, BOX_HEIGHT / 2.0], "size": [width, length, BOX_HEIGHT],
                  "rotation": yaw_to_quaternion(float(wrap_angle(yaw))), "num_lidar_pts": 1, "num_radar_pts": 0,
                  "prev": "", "next": ""}
        tables.rows["sample_annotation"].append(record)
        tracks.setdefault(int(tid), []).append((step, record))
    return b[near, :2]


def _link_tracks(tables: _Tables, scene: str, tracks: dict[int, list[tuple[int, dict[str, Any]]]],
                 stamps: np.ndarray) -> None:
    """prev/next links, the moving/stopped attribute and one instance record per track."""
    for tid, anns in tracks.items():
        for j, (step, rec) in enumerate(anns):
            rec["prev"] = anns[j - 1][1]["token"] if j else ""
            rec["next"] = anns[j + 1][1]["token"] if j + 1 < len(anns) else ""
            a, b = (j - 1, j) if j else (j, j + 1)
            speed = 0.0
            if 0 <= a and b < len(anns):
                (sa, ra), (sb, rb) = anns[a], anns[b]
                gap = (stamps[sb] - stamps[sa]) / 1e6
                speed = math.dist(ra["translation"][:2], rb["translation"][:2]) / gap if gap > 0 else 0.0
            state = "vehicle.moving" if speed > MOVING_SPEED else "vehicle.stopped"
            rec["attribute_tokens"] = [tables.attribute[state]]
        tables.rows["instance"].append({"token": anns[0][1]["instance_token"],
                                        "category_token": tables.category["vehicle.car"],
                                        "nbr_annotations": len(anns), "first_annotation_token": anns[0][1]["token"],
                                        "last_annotation_token": anns[-1][1]["token"]})
