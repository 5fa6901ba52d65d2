"""Stage 0 — data: record expert and perturbed-expert drives, write them as nuScenes, build the dataset.

1. Record: the scripted expert, and experts with injected noise that recover (offline-RL diversity),
   drive the env; every step keeps image, state, executed and clean-expert actions, the reward (the
   online reward function), done flags, command, caption and the other vehicles' boxes
   (``data/sim/episodes/*.npz``, one file per episode, so a killed run resumes where it stopped).
2. nuScenes: the drives are written as a nuScenes ``v1.0-trainval`` dataset (``data/nuscenes-sim``)
   that the real devkit loads; ``data.nuscenes_root`` reads a real nuScenes folder instead.
3. Build: both sources -> the sharded training dataset (``data/train``) with a manifest of sources,
   splits and counts (`stages.data.build`).

Every input the config names is checked before anything is written (`check_inputs`), and the build
writes into a staging folder swapped in at the end, so a failed run leaves the previous outputs as
they were; a rerun with nothing to record leaves ``data/sim`` byte-identical.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from stages.common import atomic_write_bytes, atomic_write_text, seed_everything, stage_main, write_json
from stages.config import PipelineConfig
from stages.data.build import build_dataset, write_sim_as_nuscenes
from stages.data.dataset import MANIFEST
from stages.data.errors import DatasetError
from stages.data.nuscenes_reader import validate_nuscenes
from stages.data.nuscenes_schema import CAMERA_CHANNELS, NuScenesFormatError
from stages.data.recorder import record_episode

log = logging.getLogger(__name__)

# What the recorded episodes depend on: a change in anything else (sources, shards) rebuilds the
# dataset but keeps the recordings.
_RECORDING_FIELDS = ("episodes", "perturbed_fraction", "expert_noise", "val_fraction")


def _fingerprint(cfg: PipelineConfig) -> str:
    blob = json.dumps({"env": cfg.env.model_dump(mode="json"),
                       "data": {k: getattr(cfg.data, k) for k in _RECORDING_FIELDS}, "seed": cfg.seed,
                       "recorder": 2}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save_episode(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def plan_episodes(n: int, val_fraction: float, perturbed_fraction: float, seed: int) -> tuple[list[str], np.ndarray]:
    """Split and perturbation of each episode. Validation is the last episodes and, like train, mixes
    clean and perturbed drives (at least one of each when both are asked for), so held-out data can
    show whether the value function tells them apart; open-loop metrics use its clean drives."""
    n_val = max(1, round(n * val_fraction))
    rng = np.random.default_rng(seed)
    perturbed = rng.random(n) < perturbed_fraction
    perturbed[n - n_val:] = False
    if n_val >= 2 and perturbed_fraction > 0:
        k = min(n_val - 1, max(1, round(n_val * perturbed_fraction)))
        perturbed[n - n_val: n - n_val + k] = True
    splits = ["train"] * (n - n_val) + ["val"] * n_val
    return splits, perturbed


def check_inputs(cfg: PipelineConfig) -> None:
    """Fail on a bad input the config names before the stage writes anything (a failed run must leave
    the previous recordings, dataset and metrics byte-identical)."""
    d = cfg.data
    if "sim" in d.sources and cfg.env.image_size != cfg.model.image_size:
        raise DatasetError(f"env.image_size={cfg.env.image_size} records images the model "
                           f"(model.image_size={cfg.model.image_size}) does not take: set both to the same size")
    if "nuscenes" not in d.sources or d.nuscenes_root is None:
        return
    root = Path(d.nuscenes_root)
    fix = ("point data.nuscenes_root at a nuScenes folder (holding the tables in "
           f"{d.nuscenes_version}/ and the images in samples/), or set it to null to use the recorded drives "
           "written as nuScenes")
    if not root.is_dir():
        raise NuScenesFormatError(f"data.nuscenes_root={str(root)!r}: no such folder; {fix}")
    try:
        validate_nuscenes(root, d.nuscenes_version, CAMERA_CHANNELS[:cfg.model.num_cameras], d.nuscenes_strict)
    except NuScenesFormatError as exc:
        raise NuScenesFormatError(f"data.nuscenes_root={str(root)!r}: {exc}; {fix}", exc.problems) from None


def _recorded(out: Path, fingerprint: str, n: int) -> dict[str, Any] | None:
    """The manifest of a finished recording of this config, or None when something is left to record."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if (manifest.get("fingerprint") != fingerprint or len(manifest.get("episodes", ())) != n
            or not all((out / e["file"]).is_file() for e in manifest["episodes"])):
        return None
    return manifest


def record(cfg: PipelineConfig) -> dict[str, Any]:
    """Step 1: record the episodes into ``data.out`` (resuming) and write its manifest; return the counts."""
    from stages.envs import ExpertDriver, make_env

    out = Path(cfg.data.out)
    fingerprint = _fingerprint(cfg)
    n = cfg.data.episodes
    done = _recorded(out, fingerprint, n)
    if done is not None:
        # Nothing to record: keep every file as it is (DVC sees no change; the manifest's timings are
        # those of the run that recorded).
        log.info("data: the %d episodes in %s are already recorded for this config", n, out)
        return done["counts"]
    ep_dir = out / "episodes"
    ep_dir.mkdir(parents=True, exist_ok=True)
    progress_file = out / "progress.json"
    if progress_file.exists() and json.loads(progress_file.read_text()).get("fingerprint") != fingerprint:
        log.info("recording config changed since the last run: recording the episodes afresh")
        for old in ep_dir.glob("ep-*.npz"):
            old.unlink()
    atomic_write_text(progress_file, json.dumps({"fingerprint": fingerprint}))
    (out / MANIFEST).unlink(missing_ok=True)

    splits, perturbed = plan_episodes(n, cfg.data.val_fraction, cfg.data.perturbed_fraction, cfg.seed)
    env = make_env(cfg.env, seed=cfg.seed)
    episodes, steps, collisions, completion = [], 0, 0, []
    start = time.perf_counter()
    recorded_steps, record_seconds = 0, 0.0
    try:
        for i in tqdm(range(n), desc="data: recording episodes", unit="ep"):
            path = ep_dir / f"ep-{i:05d}.npz"
            if not path.exists():
                t0 = time.perf_counter()
                expert = ExpertDriver(noise=cfg.data.expert_noise if perturbed[i] else 0.0,
                                      rng=np.random.default_rng(cfg.seed * 100_003 + i))
                episode = record_episode(env, lambda e, _obs: expert.act(e), seed=cfg.seed * 10_007 + i,
                                         perturbed=bool(perturbed[i]), label=lambda _e: expert.clean_action)
                _save_episode(path, episode.to_arrays())
                recorded_steps += len(episode)
                record_seconds += time.perf_counter() - t0
            with np.load(path) as z:
                n_steps, collided, done = len(z["actions"]), bool(z["collisions"].any()), float(z["route_completion"])
                ret = float(z["rewards"].sum())
            steps += n_steps
            collisions += int(collided)
            completion.append(done)
            episodes.append({"index": i, "file": f"episodes/{path.name}", "split": splits[i], "steps": n_steps,
                             "perturbed": bool(perturbed[i]), "collision": collided, "route_completion": done,
                             "return": ret})
    finally:
        env.close()
    n_val = splits.count("val")
    counts = {
        "episodes": n, "steps": steps, "train_episodes": n - n_val, "val_episodes": n_val,
        "perturbed_episodes": int(perturbed.sum()), "collision_rate": collisions / n,
        "mean_route_completion": float(np.mean(completion)),
        "mean_return_clean": float(np.mean([e["return"] for e in episodes if not e["perturbed"]] or [0.0])),
        "mean_return_perturbed": float(np.mean([e["return"] for e in episodes if e["perturbed"]] or [0.0])),
        "record_steps_per_second": round(recorded_steps / record_seconds, 1) if record_seconds else None,
        "record_seconds": round(time.perf_counter() - start, 2),
    }
    manifest = {"source": f"sim:{cfg.env.backend}/{cfg.env.scenario}", "fingerprint": fingerprint,
                "image_size": cfg.env.image_size, "dt": 1.0 / cfg.env.policy_frequency,
                "episodes": episodes, "counts": counts}
    write_json(out / MANIFEST, manifest)
    return counts


def run(cfg: PipelineConfig) -> dict[str, Any]:
    check_inputs(cfg)
    seed_everything(cfg.seed)
    d = cfg.data
    metrics: dict[str, Any] = {}
    paths: dict[str, str] = {"built": d.built}
    if "sim" in d.sources or d.nuscenes_root is None:
        metrics.update(record(cfg))
        paths["sim"] = d.out
    nuscenes_root, nuscenes_version = d.nuscenes_root, d.nuscenes_version
    if "nuscenes" in d.sources and nuscenes_root is None:
        # No real nuScenes here: the recorded drives, written in its schema, are the nuScenes source.
        t0 = time.perf_counter()
        write_sim_as_nuscenes(d.out, d.nuscenes_out, version=d.nuscenes_version,
                              keyframe_every=max(1, round(0.5 * cfg.env.policy_frequency)))
        metrics["nuscenes_write_seconds"] = round(time.perf_counter() - t0, 2)
        nuscenes_root = d.nuscenes_out
        paths["nuscenes"] = d.nuscenes_out
    elif nuscenes_root is not None:
        paths["nuscenes"] = nuscenes_root
    t0 = time.perf_counter()
    manifest = build_dataset(d.built, sources=d.sources, sim_root=d.out, nuscenes_root=nuscenes_root,
                             nuscenes_version=nuscenes_version, horizon=cfg.model.trajectory_length,
                             stride=d.waypoint_stride, sim_dt=1.0 / cfg.env.policy_frequency,
                             image_size=cfg.model.image_size, num_cameras=cfg.model.num_cameras,
                             shard_size=d.shard_size, nuscenes_strict=d.nuscenes_strict)
    if "nuscenes" in manifest["sources"]:
        metrics["nuscenes_skipped_samples"] = manifest["sources"]["nuscenes"]["skipped_samples"]
    metrics["build_seconds"] = round(time.perf_counter() - t0, 2)
    for split, c in manifest["counts"].items():
        metrics[f"{split}_samples"] = c["samples"]
        for source, sc in c["by_source"].items():
            metrics[f"{split}_{source}_samples"] = sc["samples"]
    metrics["horizon_seconds"] = round(manifest["trajectory"]["length"] * manifest["trajectory"]["step_seconds"], 6)
    write_json(Path(cfg.metrics_dir) / "data.json", metrics)
    log.info("data: %s", metrics)
    return {"paths": paths, "metrics": metrics}


def main() -> None:
    stage_main("data", run, __doc__.splitlines()[0])
