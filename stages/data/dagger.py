"""DAgger: drive the learner, label every state it visits with the expert's action, train on the union.

Imitation from the expert's own drives only sees the states the expert visits; the cloned policy's
small errors take it to states it never saw (off-centre, heading astray) where it has no idea how to
recover (compounding error, covariate shift). A DAgger round (Ross et al., 2011) drives the current
policy — with probability ``beta`` per episode the expert drives instead — and records, on every
visited state, what the expert would have done there (``expert_actions``, the imitation label) and
what was executed (``actions``, with the reward; kept in the recording, but the round's shards are
imitation data only: see `imitation_only`).

The round is backend-neutral: it talks to the env through `stages.data.recorder.record_episode`
and to the expert through a labeller ``expert(env) -> action`` (`ExpertDriver` on the highway
backend; in CARLA a privileged expert plays the role).

Rounds are recordings like every other (``<out>/round-NN/episodes/ep-*.npz`` and a manifest of the
`stages.data.stage` format, episodes marked ``perturbed``: their paths are the learner's, not the
expert's, so they train the controls and the critic but not the trajectory head) and sharded into
``<out>/round-NN/shards`` (`stages.data.shards`). `extend_dataset` adds a round's shards to a
`ShardedDataset`'s train split. Each round is written atomically and reused when it exists for the
same key, so a resumed stage does not drive again.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from stages.common import staged_dir, torch_threads, write_json
from stages.data.build import sim_episode_samples
from stages.data.dataset import MANIFEST
from stages.data.recorder import record_episode
from stages.data.shards import ShardedDataset, ShardWriter
from stages.envs import ExpertDriver, make_env
from stages.rl.evaluation import policy_actor

log = logging.getLogger(__name__)

# Episode seeds of DAgger rounds: away from the data stage's (seed * 10_007 + i), the online
# stage's validation (500_000 +) and held-out (1_000_000 +) seeds.
SEED_BASE = 3_000_000
Expert = Callable[[Any], np.ndarray]


def highway_expert() -> Expert:
    """The scripted expert of the highway backend as a labeller (noise-free)."""
    driver = ExpertDriver(noise=0.0)
    return driver.act


def drive_labelled(env: Any, act: Callable[[dict[str, Any]], np.ndarray], expert: Expert, seed: int,
                   expert_drives: bool = False):
    """One episode driven by ``act`` (or the expert), every step labelled with the expert's action."""
    label: dict[str, np.ndarray] = {}

    def policy(e: Any, obs: dict[str, Any]) -> np.ndarray:
        # The expert is asked on every step, also when the learner drives: it labels the state.
        label["a"] = np.asarray(expert(e), dtype=np.float32)
        return label["a"] if expert_drives else np.asarray(act(obs), dtype=np.float32)

    return record_episode(env, policy, seed=seed, perturbed=not expert_drives, label=lambda _e: label["a"])


def imitation_only(samples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The round's samples as imitation data only: no RL transitions (no next state, no terminal).

    IQL's advantage-weighted regression copies the *executed* actions it rates well; here they are
    the learner's own mistakes, which a critic still learning cannot rate reliably."""
    return {**samples, "next_index": np.full_like(samples["next_index"], -1),
            "terminated": np.zeros_like(samples["terminated"])}


def round_dir(out: str | Path, index: int) -> Path:
    return Path(out) / f"round-{index:02d}"


def record_round(model: Any, env_cfg: Any, out: str | Path, index: int, *, episodes: int, seed: int,
                 horizon: int, stride: int, beta: float = 0.0, key: str = "", shard_size: int = 1024,
                 expert: Expert | None = None, reuse: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Record DAgger round ``index`` into ``out/round-NN`` (episodes, manifest, shards) and return its
    manifest. ``reuse``: keep a recorded round of the same ``key`` (a resumed run's earlier rounds)."""
    path = round_dir(out, index)
    manifest_file = path / MANIFEST
    if reuse and manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("key") == key and all((path / s["file"]).is_file() for s in manifest["shards"]):
            log.info("dagger: round %d already recorded in %s", index, path)
            return manifest
    first = SEED_BASE + 10_000 * seed + 1_000 * index
    expert = expert or highway_expert()
    act = policy_actor(model, device)
    rng = np.random.default_rng([seed, index])
    env = make_env(env_cfg, seed=first)
    entries, t0 = [], time.perf_counter()
    training = getattr(model, "training", False)
    model.eval()
    try:
        with staged_dir(path) as tmp, torch_threads(1):
            (tmp / "episodes").mkdir()
            writer = ShardWriter(tmp, "train", "dagger", shard_size)
            for i in range(episodes):
                by_expert = bool(rng.random() < beta)
                ep = drive_labelled(env, act, expert, first + i, expert_drives=by_expert)
                arrays = ep.to_arrays()
                np.savez_compressed(tmp / "episodes" / f"ep-{i:05d}.npz", **arrays)
                writer.add(imitation_only(sim_episode_samples(arrays, 200_000 + 1_000 * index + i, horizon, stride)))
                entries.append({"index": i, "file": f"episodes/ep-{i:05d}.npz", "split": "train",
                                "steps": len(ep), "perturbed": ep.perturbed, "expert_drove": by_expert,
                                "collision": bool(ep.collisions.any()), "route_completion": ep.route_completion})
            writer.flush()
            learner = [e for e in entries if not e["expert_drove"]] or entries
            counts = {"episodes": episodes, "steps": int(sum(e["steps"] for e in entries)),
                      "learner_route_completion": float(np.mean([e["route_completion"] for e in learner])),
                      "learner_collision_rate": float(np.mean([e["collision"] for e in learner])),
                      "record_seconds": round(time.perf_counter() - t0, 2)}
            manifest = {"source": f"dagger:{env_cfg.backend}/{env_cfg.scenario}", "key": key, "round": index,
                        "beta": beta, "image_size": env_cfg.image_size, "dt": 1.0 / env_cfg.policy_frequency,
                        "episodes": entries, "shards": writer.shards, "counts": counts}
            write_json(tmp / MANIFEST, manifest)
    finally:
        env.close()
        model.train(training)
    log.info("dagger: round %d, %d episodes: the learner completed %.2f of its routes", index, episodes,
             counts["learner_route_completion"])
    return manifest


def extend_dataset(dataset: ShardedDataset, out: str | Path, manifest: dict[str, Any]) -> int:
    """Add a recorded round's shards to ``dataset`` (its train split); return the samples added."""
    root = round_dir(out, manifest["round"]).resolve()
    # Absolute shard paths: `ShardedDataset` joins them to its own root, which leaves them as they are.
    new = [{**s, "file": str(root / s["file"])} for s in manifest["shards"]]
    dataset.shards = [*dataset.shards, *new]
    return sum(s["samples"] for s in new)


def round_epochs(o: Any) -> list[int]:
    """The epoch (0-based: after that many epochs of training) at which each round of ``o`` (the
    offline params) is recorded; rounds that would fall past the last epoch are dropped."""
    return [e for r in range(o.dagger_rounds) if (e := o.dagger_start_epoch + r * o.dagger_every) < o.epochs]


def prepare(o: Any, fresh: bool) -> None:
    """Create ``o.dagger_out`` (a DVC output of the offline stage, so it exists with no rounds too) with
    an index of the planned rounds; a fresh (not resumed) run drops rounds recorded before."""
    out = Path(o.dagger_out)
    out.mkdir(parents=True, exist_ok=True)
    if fresh:
        for old in out.glob("round-*"):
            shutil.rmtree(old, ignore_errors=True)
    write_json(out / "index.json", {"rounds": o.dagger_rounds, "round_epochs": round_epochs(o),
                                    "episodes_per_round": o.dagger_episodes, "beta": o.dagger_beta})


def aggregate(model: Any, cfg: Any, dataset: ShardedDataset, epoch: int, start_epoch: int, key: str,
              device: str = "cpu", dist: Any = None) -> int:
    """Before ``epoch``: record the rounds due now (and, on a resumed run's first epoch, add the rounds
    recorded before it) into ``dataset``; return the samples added (0: nothing due). Under torchrun
    (``dist``, `stages.accel.Distributed`) rank 0 drives and writes, the other ranks read its round."""
    o = cfg.offline
    main = dist is None or dist.is_main
    added = 0
    for index, at in enumerate(round_epochs(o)):
        if at > epoch or (at < epoch and epoch != start_epoch):
            continue
        if main:
            manifest = record_round(model, cfg.env, o.dagger_out, index, episodes=o.dagger_episodes, seed=cfg.seed,
                                    horizon=cfg.model.trajectory_length, stride=cfg.data.waypoint_stride,
                                    beta=o.dagger_beta, key=f"{key}-{index}", shard_size=cfg.data.shard_size,
                                    reuse=at < epoch, device=device)
        if dist is not None:
            dist.barrier()
        if not main:
            manifest = json.loads((round_dir(o.dagger_out, index) / MANIFEST).read_text())
        added += extend_dataset(dataset, o.dagger_out, manifest)
    return added
