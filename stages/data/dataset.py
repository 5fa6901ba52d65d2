"""Recorded episodes read back as arrays (the simulator half of the dataset; `shards.py` builds the
training set).

On disk a dataset is a folder with ``manifest.json`` and ``episodes/ep-XXXXX.npz`` (compressed);
the manifest records the source, the split of every episode and the counts.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.data.errors import DatasetError  # its home; shards, offline and export import it from here too
from stages.data.recorder import future_waypoints

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.exists():
        raise DatasetError(f"{path} not found: run the data stage first (`python -m stages.data`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc}); delete the folder and rerun the data stage") from exc


def load_episode(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:  # zipfile.BadZipFile, ValueError, EOFError ...
        raise DatasetError(f"{path} cannot be read ({exc}); delete it and rerun the data stage") from exc


@dataclass
class Samples:
    images: np.ndarray
    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray
    trajectories: np.ndarray
    traj_valid: np.ndarray
    commands: np.ndarray
    captions: np.ndarray
    episode: np.ndarray
    perturbed: np.ndarray


def load_split(root: str | Path, split: str, horizon: int, stride: int) -> Samples:
    """Concatenate every episode of ``split`` ("train" or "val") with its future trajectories."""
    root = Path(root)
    manifest = read_manifest(root)
    parts: dict[str, list[np.ndarray]] = {}
    for ep in manifest["episodes"]:
        if ep["split"] != split:
            continue
        arrays = load_episode(root / ep["file"])
        traj, valid = future_waypoints(arrays["poses"], horizon, stride)
        n = len(arrays["actions"])
        extra = {
            "trajectories": traj, "traj_valid": valid,
            "dones": arrays["terminated"] | arrays["truncated"],
            "episode": np.full(n, ep["index"]), "perturbed": np.full(n, bool(arrays["perturbed"])),
        }
        for key in ("images", "states", "actions", "rewards", "commands", "captions"):
            parts.setdefault(key, []).append(arrays[key])
        for key, value in extra.items():
            parts.setdefault(key, []).append(value)
    if not parts:
        raise DatasetError(f"{root}: the manifest lists no '{split}' episodes")
    return Samples(**{k: np.concatenate(v) for k, v in parts.items()})
