"""Stage 0 — data: drive the scripted expert (and perturbed experts) and write a dataset.

Episodes are written one file at a time, so a killed run resumes where it stopped; the manifest
is written last and names every episode, its split and the counts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from stages.common import atomic_write_text, seed_everything, stage_main, write_json
from stages.config import PipelineConfig
from stages.data.dataset import MANIFEST
from stages.data.recorder import record_episode

log = logging.getLogger(__name__)


def _fingerprint(cfg: PipelineConfig) -> str:
    """What the recorded episodes depend on; a change invalidates what was recorded before."""
    blob = json.dumps({"env": cfg.env.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json"),
                       "seed": cfg.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save_episode(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def run(cfg: PipelineConfig) -> dict[str, Any]:
    from stages.envs import ExpertDriver, make_env

    seed_everything(cfg.seed)
    out = Path(cfg.data.out)
    ep_dir = out / "episodes"
    ep_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(cfg)
    progress_file = out / "progress.json"
    if progress_file.exists() and json.loads(progress_file.read_text()).get("fingerprint") != fingerprint:
        log.info("config changed since the last recording: starting the dataset afresh")
        for old in ep_dir.glob("ep-*.npz"):
            old.unlink()
    atomic_write_text(progress_file, json.dumps({"fingerprint": fingerprint}))
    (out / MANIFEST).unlink(missing_ok=True)

    n = cfg.data.episodes
    n_val = max(1, round(n * cfg.data.val_fraction))
    rng = np.random.default_rng(cfg.seed)
    perturbed = rng.random(n) < cfg.data.perturbed_fraction
    # Validation episodes are the last ones and are always driven by the clean expert.
    perturbed[n - n_val:] = False

    env = make_env(cfg.env, seed=cfg.seed)
    episodes, stats = [], {"steps": 0, "collisions": 0, "route_completion": []}
    start = time.perf_counter()
    try:
        for i in tqdm(range(n), desc="data: recording episodes", unit="ep"):
            path = ep_dir / f"ep-{i:05d}.npz"
            split = "val" if i >= n - n_val else "train"
            if not path.exists():
                expert = ExpertDriver(noise=cfg.data.expert_noise if perturbed[i] else 0.0,
                                      rng=np.random.default_rng(cfg.seed * 100_003 + i))
                episode = record_episode(env, lambda e, _obs: expert.act(e), seed=cfg.seed * 10_007 + i,
                                         perturbed=bool(perturbed[i]))
                _save_episode(path, episode.to_arrays())
            with np.load(path) as z:
                steps, collided, completion = len(z["actions"]), bool(z["collisions"].any()), float(z["route_completion"])
            stats["steps"] += steps
            stats["collisions"] += int(collided)
            stats["route_completion"].append(completion)
            episodes.append({"index": i, "file": f"episodes/{path.name}", "split": split, "steps": steps,
                             "perturbed": bool(perturbed[i]), "collision": collided,
                             "route_completion": completion})
    finally:
        env.close()

    metrics = {
        "episodes": n, "steps": stats["steps"],
        "train_episodes": n - n_val, "val_episodes": n_val,
        "perturbed_episodes": int(perturbed.sum()),
        "collision_rate": stats["collisions"] / n,
        "mean_route_completion": float(np.mean(stats["route_completion"])),
        "seconds": round(time.perf_counter() - start, 2),
    }
    manifest = {"source": f"sim:{cfg.env.backend}/{cfg.env.scenario}", "fingerprint": fingerprint,
                "image_size": cfg.env.image_size, "episodes": episodes, "counts": metrics}
    write_json(out / MANIFEST, manifest)
    write_json(Path(cfg.metrics_dir) / "data.json", metrics)
    log.info("data: %d episodes, %d steps, collision rate %.2f", n, stats["steps"], metrics["collision_rate"])
    return {"paths": {"dataset": str(out)}, "metrics": metrics}


def main() -> None:
    stage_main("data", run, __doc__.splitlines()[0])
