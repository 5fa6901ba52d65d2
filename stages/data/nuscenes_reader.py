"""nuScenes (real, or written by `nuscenes_writer`) as open-loop planning samples, through nuscenes-devkit.

For every keyframe with a full future of ``horizon`` samples (6 at 2 Hz = 3 s, as ST-P3 / UniAD / VAD):
- the camera images (CAM_FRONT, then the other channels of `CAMERA_CHANNELS` with ``num_cameras > 1``);
- ego speed and yaw rate: from the CAN bus ``pose`` messages (interpolated at the sample's time) when the
  CAN bus expansion is present for the scene, else from the ego poses of the neighbouring sample_data;
- the future trajectory ``[horizon, 2]`` in the ego frame at the sample (x forward, y left), from the
  ego poses of the LIDAR_TOP keyframes (the devkit's and VAD's convention; CAM_FRONT's when there is no
  lidar), and the command VAD derives from it (last waypoint's lateral offset >= 2 m: turn left / right);
- the scene description, and the annotated boxes of other agents ``[K, 5]`` (x, y, yaw, length, width)
  in the same ego frame, for the collision metric.

`validate_nuscenes` runs first and fails with a `NuScenesFormatError` naming the table, the record's
token and field, or the file, before the devkit loads anything (its own failures are bare KeyErrors
and asserts) and before any training starts.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from infra.packages import require_package
from stages.data.errors import DatasetError
from stages.data.nuscenes_schema import (CAMERA_CHANNELS, CAN_BUS_UNUSABLE_SCENES, LIDAR_CHANNEL, REFERENCES,
                                         REQUIRED_FIELDS, SCENE_NAME_RE, TABLES, NuScenesFormatError,
                                         command_from_trajectory, quaternion_yaw, wrap_angle)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "mini_train", "mini_val")
MAX_PROBLEMS = 20
DEFAULT_AGENT_CATEGORIES = ("vehicle.", "human.")   # what the planning collision metrics count (ST-P3 / VAD)


# -- validation -------------------------------------------------------------------------------------

class _Problems:
    """Collects defects; keeps the first ``MAX_PROBLEMS`` and counts the rest."""

    def __init__(self, root: Path, version: str):
        self.root, self.version, self.items, self.more = root, version, [], 0

    def add(self, text: str) -> None:
        if len(self.items) < MAX_PROBLEMS:
            self.items.append(text)
        else:
            self.more += 1

    @property
    def full(self) -> bool:
        return len(self.items) >= MAX_PROBLEMS

    def raise_if_any(self) -> None:
        if not self.items:
            return
        extra = f" (and {self.more} more)" if self.more else ""
        raise NuScenesFormatError(
            f"{self.root} is not a valid nuScenes {self.version} dataset: " + "; ".join(self.items) + extra,
            problems=list(self.items))


def validate_nuscenes(dataroot: str | Path, version: str = "v1.0-mini", channels: Sequence[str] = ("CAM_FRONT",),
                      strict: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Check a nuScenes folder before the devkit loads it; return the parsed tables.

    Checks: the 13 table files exist and parse as lists of records with the fields the devkit reads;
    tokens are unique; every foreign key resolves (`REFERENCES`); every log is covered by a map record and
    the map masks exist; the keyframe files of ``channels`` exist. A sample without a keyframe of one of
    ``channels`` is a defect only when ``strict``; otherwise `iter_nuscenes` skips it (and counts it):
    one camera dropout must not cost a whole dataset.
    """
    root = Path(dataroot)
    problems = _Problems(root, version)
    table_dir = root / version
    if not table_dir.is_dir():
        raise NuScenesFormatError(f"{table_dir} not found: no table folder for nuScenes version {version!r} "
                                  f"under {root}")
    tables: dict[str, list[dict[str, Any]]] = {}
    for name in TABLES:
        path = table_dir / f"{name}.json"
        if not path.is_file():
            problems.add(f"table '{name}': file {path} is missing")
            continue
        try:
            with open(path) as fh:
                data = json.load(fh)
        except (OSError, ValueError) as exc:
            problems.add(f"table '{name}': file {path} cannot be parsed ({exc})")
            continue
        if not isinstance(data, list):
            problems.add(f"table '{name}': file {path} holds a {type(data).__name__}, not a list of records")
            continue
        tables[name] = data
    problems.raise_if_any()

    for name, rows in tables.items():
        for i, rec in enumerate(rows):
            if not isinstance(rec, dict):
                problems.add(f"table '{name}': record {i} is not an object")
                continue
            missing = [f for f in REQUIRED_FIELDS[name] if f not in rec]
            if missing:
                problems.add(f"table '{name}': record {i} (token {rec.get('token')!r}) lacks {', '.join(missing)}")
    problems.raise_if_any()

    tokens = {name: {rec["token"] for rec in rows} for name, rows in tables.items()}
    for name, rows in tables.items():
        if len(tokens[name]) != len(rows):
            problems.add(f"table '{name}': {len(rows) - len(tokens[name])} duplicate token(s)")
    for table, fld, target, may_be_empty, is_list in REFERENCES:
        for rec in tables[table]:
            values = rec[fld] if is_list else [rec[fld]]
            if not isinstance(values, list):
                problems.add(f"{table}[{rec['token']}].{fld} must be a list of tokens")
                continue
            for value in values:
                if value == "" and may_be_empty:
                    continue
                if value not in tokens[target]:
                    problems.add(f"{table}[{rec['token']}].{fld} = {value!r} does not resolve in table '{target}'")
            if problems.full:
                break
    if not tables["map"]:
        problems.add("table 'map' is empty: the devkit needs a map record whose log_tokens cover every log")
    covered = {t for rec in tables["map"] if isinstance(rec["log_tokens"], list) for t in rec["log_tokens"]}
    for rec in tables["log"]:
        if rec["token"] not in covered:
            problems.add(f"log[{rec['token']}] is in no map record's log_tokens (table 'map')")
    for rec in tables["map"]:
        if not (root / str(rec["filename"])).is_file():
            problems.add(f"map[{rec['token']}].filename: map mask {root / str(rec['filename'])} is missing")
    problems.raise_if_any()

    channel_of = _channels_of_calibrations(tables)
    present = {s["channel"] for s in tables["sensor"]}
    for ch in channels:
        if ch not in present:
            problems.add(f"table 'sensor' has no channel {ch!r} (channels: {sorted(present)})")
    problems.raise_if_any()
    keyframes: dict[str, dict[str, dict[str, Any]]] = {}
    for sd in tables["sample_data"]:
        ch = channel_of[sd["calibrated_sensor_token"]]
        if sd["is_key_frame"] and ch in channels:
            keyframes.setdefault(sd["sample_token"], {})[ch] = sd
    for sample in tables["sample"]:
        for ch in channels:
            sd = keyframes.get(sample["token"], {}).get(ch)
            if sd is None and strict:
                problems.add(f"sample[{sample['token']}] has no keyframe {ch} record in table 'sample_data' "
                             "(strict mode; without it such samples are skipped and counted)")
            elif sd is None:
                continue
            elif not (root / sd["filename"]).is_file():
                problems.add(f"sample_data[{sd['token']}] ({ch}): file {root / sd['filename']} is missing")
        if problems.full:
            break
    problems.raise_if_any()
    return tables


def _channels_of_calibrations(tables: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    sensor_channel = {s["token"]: s["channel"] for s in tables["sensor"]}
    return {cs["token"]: sensor_channel[cs["sensor_token"]] for cs in tables["calibrated_sensor"]}


def load_nuscenes(dataroot: str | Path, version: str = "v1.0-mini", channels: Sequence[str] = ("CAM_FRONT",),
                  validate: bool = True, strict: bool = False) -> Any:
    """`validate_nuscenes`, then the devkit's `NuScenes` built from the tables already parsed (parsing
    trainval's sample_annotation.json twice would cost tens of seconds)."""
    NuScenes = require_package("nuscenes.nuscenes", "nuscenes", "reading nuScenes").NuScenes

    class _ParsedNuScenes(NuScenes):
        def __init__(self, parsed: dict[str, list[dict[str, Any]]], **kwargs: Any):
            self._parsed = parsed
            super().__init__(**kwargs)

        def __load_table__(self, table_name: str) -> Any:  # the devkit's loader hook (not name-mangled)
            if table_name in self._parsed:
                return self._parsed.pop(table_name)
            return super().__load_table__(table_name)

    tables = validate_nuscenes(dataroot, version, channels, strict) if validate else {}
    try:
        return _ParsedNuScenes(tables, version=version, dataroot=str(dataroot), verbose=False)
    except Exception as exc:  # the devkit fails with asserts and KeyErrors that name nothing
        raise NuScenesFormatError(f"nuscenes-devkit cannot load {dataroot} ({version}): "
                                  f"{type(exc).__name__}: {exc}") from exc


# -- splits -----------------------------------------------------------------------------------------

def select_scenes(nusc: Any, split: str | None, val_fraction: float = 0.2) -> list[dict[str, Any]]:
    """Scene records of ``split`` (the devkit's official lists; ``train`` / ``val`` mean ``mini_train`` /
    ``mini_val`` on a mini version). When the dataset has none of the version's official scene names,
    a deterministic split is used instead: scenes sorted by name, the last ``val_fraction`` are val."""
    create_splits_scenes = require_package("nuscenes.utils.splits", "nuscenes", "reading nuScenes").create_splits_scenes
    scenes = sorted(nusc.scene, key=lambda s: s["name"])
    if split is None:
        return scenes
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    mini = nusc.version.endswith("mini")
    key = f"mini_{split}" if mini and split in ("train", "val") else split
    official = create_splits_scenes()
    known = set(official["mini_train"] + official["mini_val"]) if mini else set(official["train"] + official["val"])
    names = {s["name"] for s in scenes}
    if names & known:
        wanted = set(official[key])
        chosen = [s for s in scenes if s["name"] in wanted]
        log.info("nuScenes split %s: %d of %d scenes (official list)", key, len(chosen), len(scenes))
    else:
        n_val = 0 if len(scenes) < 2 else max(1, round(len(scenes) * val_fraction))
        cut = len(scenes) - n_val
        chosen = scenes[cut:] if key.endswith("val") else scenes[:cut]
        log.warning("none of the %d scene names in %s is an official nuScenes %s name: deterministic split "
                    "instead (scenes sorted by name, the last %d are val); %s has %d scenes",
                    len(scenes), nusc.dataroot, nusc.version, n_val, key, len(chosen))
    if not chosen:
        raise DatasetError(f"{nusc.dataroot} ({nusc.version}) has no scene of split {key!r}")
    return chosen


# -- CAN bus ---------------------------------------------------------------------------------------

class _CanBus:
    """Speed and yaw rate from the CAN bus ``pose`` messages (50 Hz in nuScenes), where present."""

    def __init__(self, root: Path | None):
        self.api = None
        if root is not None and (root / "can_bus").is_dir():
            can_bus_api = require_package("nuscenes.can_bus.can_bus_api", "nuscenes", "reading nuScenes CAN bus data")
            self.api = can_bus_api.NuScenesCanBus(dataroot=str(root))

    def pose_track(self, scene_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(utime, forward speed, yaw rate)`` arrays sorted by time, or None without CAN data."""
        if self.api is None or not SCENE_NAME_RE.match(scene_name) or int(scene_name[-4:]) in CAN_BUS_UNUSABLE_SCENES:
            return None
        path = Path(self.api.can_dir) / f"{scene_name}_pose.json"
        if not path.is_file():
            return None
        try:
            msgs = self.api.get_messages(scene_name, "pose", print_warnings=False)
            utime = np.array([m["utime"] for m in msgs], dtype=np.float64)
            speed = np.array([m["vel"][0] for m in msgs], dtype=np.float64)
            yaw_rate = np.array([m["rotation_rate"][2] for m in msgs], dtype=np.float64)
        except (OSError, ValueError, KeyError, IndexError, TypeError, AssertionError) as exc:
            raise NuScenesFormatError(f"CAN bus file {path} cannot be read ({type(exc).__name__}: {exc})") from exc
        if len(utime) == 0:
            return None
        order = np.argsort(utime)
        return utime[order], speed[order], yaw_rate[order]


# -- samples ---------------------------------------------------------------------------------------

@dataclass
class NuScenesSamples:
    """Keyframes of one split, every array indexed by sample."""

    images: np.ndarray          # uint8 [N, H, W, 3], or [N, C, H, W, 3] with C > 1 cameras
    speed: np.ndarray           # float32 [N] m/s along the heading
    yaw_rate: np.ndarray        # float32 [N] rad/s, positive turning left
    trajectories: np.ndarray    # float32 [N, horizon, 2] ego frame at the sample: x forward, y left
    commands: np.ndarray        # str [N] "turn left" / "turn right" / "go straight"
    captions: np.ndarray        # str [N] the scene's description
    agents: list[np.ndarray]    # per sample float32 [K, 5]: x, y, yaw, length, width in the same ego frame
    scene_names: np.ndarray     # str [N]
    sample_tokens: np.ndarray   # str [N]
    timestamps: np.ndarray      # int64 [N] microseconds
    speed_from_can: np.ndarray  # bool [N] speed / yaw rate came from the CAN bus (else from ego poses)
    channels: tuple[str, ...] = field(default=("CAM_FRONT",))
    skipped_samples: int = 0    # keyframes left out for a missing camera keyframe or ego pose (non-strict)

    def __len__(self) -> int:
        return len(self.sample_tokens)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "speed": float(self.speed[i]), "yaw_rate": float(self.yaw_rate[i]),
                "trajectory": self.trajectories[i], "command": str(self.commands[i]),
                "caption": str(self.captions[i]), "agents": self.agents[i], "scene": str(self.scene_names[i]),
                "sample_token": str(self.sample_tokens[i]), "timestamp": int(self.timestamps[i])}


def _load_image(path: Path, image_size: int | None) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if image_size is not None and img.size != (image_size, image_size):
                # Stretch, not crop: the planner needs the camera's whole field of view.
                img = img.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except OSError as exc:
        raise NuScenesFormatError(f"image {path} cannot be read ({exc})") from exc


def _to_ego(points: np.ndarray, pose: dict[str, Any]) -> np.ndarray:
    """Global points ``[M, 3]`` into the ego frame of ``pose`` (translation, then the inverse rotation)."""
    Quaternion = require_package("pyquaternion", "nuscenes", "reading nuScenes").Quaternion
    rot = Quaternion(pose["rotation"]).inverse.rotation_matrix
    return (points - np.asarray(pose["translation"], dtype=np.float64)) @ rot.T


def _ego_motion(nusc: Any, sd: dict[str, Any]) -> tuple[float, float]:
    """Speed along the heading and yaw rate from the ego poses of the neighbouring sample_data of the same
    channel (central difference; one-sided at a scene's ends)."""
    a = nusc.get("sample_data", sd["prev"]) if sd["prev"] else sd
    b = nusc.get("sample_data", sd["next"]) if sd["next"] else sd
    if a is b:
        return 0.0, 0.0
    pa, pb = nusc.get("ego_pose", a["ego_pose_token"]), nusc.get("ego_pose", b["ego_pose_token"])
    seconds = (pb["timestamp"] - pa["timestamp"]) / 1e6
    if seconds <= 0:
        return 0.0, 0.0
    current = nusc.get("ego_pose", sd["ego_pose_token"])
    step = np.asarray(pb["translation"], dtype=np.float64) - np.asarray(pa["translation"], dtype=np.float64)
    forward = float(_to_ego(step[None] + np.asarray(current["translation"]), current)[0, 0])
    turn = float(wrap_angle(quaternion_yaw(pb["rotation"]) - quaternion_yaw(pa["rotation"])))
    return forward / seconds, turn / seconds


def annotated_boxes(nusc: Any, sample: dict[str, Any], pose: dict[str, Any], categories: Sequence[str]) -> np.ndarray:
    anns = [nusc.get("sample_annotation", t) for t in sample["anns"]]
    anns = [a for a in anns if a["category_name"].startswith(tuple(categories))]
    if not anns:
        return np.zeros((0, 5), dtype=np.float32)
    centres = _to_ego(np.array([a["translation"] for a in anns], dtype=np.float64), pose)
    ego_yaw = quaternion_yaw(pose["rotation"])
    yaws = wrap_angle(np.array([quaternion_yaw(a["rotation"]) for a in anns]) - ego_yaw)
    sizes = np.array([a["size"] for a in anns], dtype=np.float64)   # width, length, height
    return np.stack([centres[:, 0], centres[:, 1], yaws, sizes[:, 1], sizes[:, 0]], axis=1).astype(np.float32)


def iter_nuscenes(nusc: Any, scenes: Sequence[dict[str, Any]], channels: Sequence[str] = ("CAM_FRONT",),
                  horizon: int = 6, image_size: int | None = None, can_bus_root: str | Path | None = None,
                  agent_categories: Sequence[str] = DEFAULT_AGENT_CATEGORIES,
                  skipped: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """One dict per keyframe of ``scenes`` that has ``horizon`` keyframes after it (see `NuScenesSamples`).

    A keyframe without a keyframe of one of ``channels``, or whose future lacks an ego pose (no
    reference-channel keyframe), is skipped; its token is appended to ``skipped``.
    """
    can = _CanBus(Path(can_bus_root) if can_bus_root is not None else Path(nusc.dataroot))
    root = Path(nusc.dataroot)
    for scene in scenes:
        samples = []
        token = scene["first_sample_token"]
        while token:
            sample = nusc.get("sample", token)
            samples.append(sample)
            token = sample["next"]
        ref_channel = LIDAR_CHANNEL if any(LIDAR_CHANNEL in s["data"] for s in samples) else channels[0]
        ref_sd = [nusc.get("sample_data", s["data"][ref_channel]) if ref_channel in s["data"] else None
                  for s in samples]
        poses = [nusc.get("ego_pose", sd["ego_pose_token"]) if sd is not None else None for sd in ref_sd]
        track = can.pose_track(scene["name"])
        for t in range(len(samples) - horizon):
            sample, pose = samples[t], poses[t]
            missing = [ch for ch in channels if ch not in sample["data"]]
            if missing or any(p is None for p in poses[t: t + 1 + horizon]):
                why = (f"no keyframe {', '.join(missing)}" if missing
                       else f"no {ref_channel} keyframe (ego pose) in it or its {horizon} next samples")
                log.debug("nuScenes sample %s (%s) skipped: %s", sample["token"], scene["name"], why)
                if skipped is not None:
                    skipped.append(sample["token"])
                continue
            future = np.array([p["translation"] for p in poses[t + 1: t + 1 + horizon]], dtype=np.float64)
            trajectory = _to_ego(future, pose)[:, :2].astype(np.float32)
            if track is not None:
                utime, speeds, rates = track
                speed = float(np.interp(sample["timestamp"], utime, speeds))
                yaw_rate = float(np.interp(sample["timestamp"], utime, rates))
            else:
                speed, yaw_rate = _ego_motion(nusc, ref_sd[t])
            images = [_load_image(root / nusc.get("sample_data", sample["data"][ch])["filename"], image_size)
                      for ch in channels]
            yield {"image": images[0] if len(channels) == 1 else np.stack(images),
                   "speed": speed, "yaw_rate": yaw_rate, "trajectory": trajectory,
                   "command": command_from_trajectory(trajectory), "caption": scene.get("description", ""),
                   "agents": annotated_boxes(nusc, sample, pose, agent_categories), "scene": scene["name"],
                   "sample_token": sample["token"], "timestamp": int(sample["timestamp"]),
                   "speed_from_can": track is not None}


def warn_skipped(tokens: Sequence[str], dataroot: str | Path, channels: Sequence[str]) -> None:
    """One warning for the keyframes `iter_nuscenes` left out (a few tokens, not thousands of lines)."""
    if tokens:
        shown = ", ".join(tokens[:5]) + (f" and {len(tokens) - 5} more" if len(tokens) > 5 else "")
        log.warning("nuScenes %s: %d keyframe(s) skipped for a missing %s keyframe or ego pose: %s "
                    "(data.nuscenes_strict=true rejects such a folder instead)", dataroot, len(tokens),
                    "/".join(channels), shown)


def read_nuscenes(dataroot: str | Path, version: str = "v1.0-mini", split: str | None = None,
                  num_cameras: int = 1, horizon: int = 6, image_size: int | None = None, *,
                  can_bus_root: str | Path | None = None,
                  agent_categories: Sequence[str] = DEFAULT_AGENT_CATEGORIES,
                  validate: bool = True, strict: bool = False) -> NuScenesSamples:
    """Every keyframe of ``split`` with a full ``horizon``-sample future, as `NuScenesSamples`.

    ``image_size`` resizes every image to a square (None keeps the stored size); ``can_bus_root`` is the
    folder holding ``can_bus/`` (default ``dataroot``). Raises `NuScenesFormatError` for a corrupt or
    incomplete folder, before reading any sample. A keyframe lacking one of the cameras is skipped and
    counted (``skipped_samples``, and a warning), or with ``strict`` fails the whole folder.
    """
    if not 1 <= num_cameras <= len(CAMERA_CHANNELS):
        raise ValueError(f"num_cameras must be 1..{len(CAMERA_CHANNELS)}, got {num_cameras}")
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    channels = CAMERA_CHANNELS[:num_cameras]
    nusc = load_nuscenes(dataroot, version, channels, validate=validate, strict=strict)
    scenes = select_scenes(nusc, split)
    skipped: list[str] = []
    rows = list(iter_nuscenes(nusc, scenes, channels, horizon, image_size, can_bus_root, agent_categories,
                              skipped=skipped))
    warn_skipped(skipped, dataroot, channels)
    if not rows:
        raise DatasetError(f"{dataroot} ({version}, split {split}): no keyframe has {horizon} keyframes after it")
    shapes = {r["image"].shape for r in rows}
    if len(shapes) > 1:
        raise ValueError(f"images of several sizes {sorted(shapes)}: pass image_size to resize them")
    out = NuScenesSamples(
        images=np.stack([r["image"] for r in rows]),
        speed=np.array([r["speed"] for r in rows], dtype=np.float32),
        yaw_rate=np.array([r["yaw_rate"] for r in rows], dtype=np.float32),
        trajectories=np.stack([r["trajectory"] for r in rows]),
        commands=np.array([r["command"] for r in rows], dtype=str),
        captions=np.array([r["caption"] for r in rows], dtype=str),
        agents=[r["agents"] for r in rows],
        scene_names=np.array([r["scene"] for r in rows], dtype=str),
        sample_tokens=np.array([r["sample_token"] for r in rows], dtype=str),
        timestamps=np.array([r["timestamp"] for r in rows], dtype=np.int64),
        speed_from_can=np.array([r["speed_from_can"] for r in rows], dtype=bool),
        channels=tuple(channels), skipped_samples=len(skipped))
    log.info("nuScenes %s %s: %d keyframes from %d scenes (%d with CAN bus speed)", version, split or "all",
             len(out), len(scenes), int(out.speed_from_can.sum()))
    return out
