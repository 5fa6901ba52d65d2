"""Stage 3 — online: RL fine-tuning (PPO or SAC) of the offline policy in the simulator.

The embedded ``highway`` backend runs anywhere; ``env.backend=carla`` drives CARLA servers (the
Prefect flow provisions them). The policy is evaluated on held-out seeds before and after training
(mean ± standard error over ``online.eval_episodes`` episodes), so the metrics show what online RL
added to the stage-2 starting point.

Resuming: the trainer checkpoints into ``runs/online/`` after every update; a killed run started
again with the same settings (and the same stage-2 checkpoint) resumes at the saved step count.
Changed settings start afresh.

Data parallel: ``torchrun --nproc-per-node N -m stages.online`` runs N ranks (one GPU each on CUDA,
``cuda:<local_rank>``). Every rank drives its own envs (seeds offset by rank) and collects its own
rollouts; the gradients are averaged (`stages.rl.ppo`). Rank 0 alone evaluates, writes the run
directory, the checkpoint and the metrics; the other ranks wait for it. With CARLA every env has a
server of its own (`stages.envs.slots`): ``num_envs * world_size + 1`` servers in all.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed

from infra.files import sha256_file
from stages.accel import Distributed, run_on_ranks
from stages.common import StageInputError, resolve_device, seed_everything, stage_main, write_json
from stages.config import PipelineConfig
from stages.data.shards import MANIFEST, load_split_arrays
from stages.envs import make_env
from stages.envs.factory import check_env_slots, env_fns
from stages.envs.rewards import OFF_ROAD_REASONS
from stages.envs.slots import OnlineEnvSlots
from stages.resume import fingerprint
from stages.rl.evaluation import rollout_policy, torch_threads
from stages.rl.ppo import PPOTrainer, rank_seed
from stages.rl.sac import SACTrainer
from stages.rl.selection import BestPolicyKeeper
from stages.training import load_or_init, save_checkpoint

log = logging.getLogger(__name__)

# Evaluation seeds lie far from the training and data seeds so the figures are held-out; validation
# seeds (which pick the best weights) lie elsewhere again, so the held-out figures stay unbiased.
EVAL_SEED_OFFSET = 1_000_000
VAL_SEED_OFFSET = 500_000
RUN_DIR = Path("runs") / "online"


def evaluate(model: Any, env: Any, episodes: int, seed: int, device: str) -> dict[str, Any]:
    """Deterministic episodes on seeds ``seed, seed + 1, …``: means and standard errors."""
    with torch_threads(1 if str(device).startswith("cpu") else None):
        runs = [rollout_policy(model, env, seed + i, True, device) for i in range(episodes)]
    out: dict[str, Any] = {"episodes": float(episodes),
                           # Per episode, so a before/after comparison on the same seeds can be paired.
                           "route_completion_per_episode": [float(r["route_completion"]) for r in runs]}
    for key, values in (("route_completion", [r["route_completion"] for r in runs]),
                        ("episode_return", [r["return"] for r in runs]),
                        ("collision_rate", [float(r["collision"]) for r in runs]),
                        # How episodes end says what fine-tuning traded: fewer crashes for more
                        # departures from the road is not the same gain as fewer crashes alone.
                        ("off_road_rate", [float(r["done_reason"] in OFF_ROAD_REASONS) for r in runs]),
                        ("route_completed_rate", [float(r["done_reason"] == "route_completed") for r in runs]),
                        ("mean_speed", [r.get("mean_speed", 0.0) for r in runs]),
                        ("episode_steps", [r["steps"] for r in runs])):
        arr = np.asarray(values, dtype=np.float64)
        out[key] = float(arr.mean())
        out[f"{key}_stderr"] = float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else 0.0
    return out


_NOT_SCALARS = ("episodes", "route_completion_per_episode")


def paired_gain(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """The route-completion gain and, where both sides drove the same seeds, its paired standard error.

    Before and after drive the same held-out seeds, so a seed's difficulty cancels in the per-seed
    difference: its standard error is far smaller than either side's, and it is the one that says
    whether fine-tuning helped.
    """
    out = {"route_completion_gain": float(after["route_completion"] - before["route_completion"])}
    a, b = after.get("route_completion_per_episode"), before.get("route_completion_per_episode")
    if a is not None and b is not None and len(a) == len(b) > 1:
        diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
        out["route_completion_gain_stderr"] = float(diff.std(ddof=1) / math.sqrt(len(diff)))
        out["episodes_improved"] = int((diff > 1e-9).sum())
        out["episodes_worsened"] = int((diff < -1e-9).sum())
    return out


def offline_transitions(cfg: PipelineConfig) -> Any:
    """The built dataset's train split, which seeds SAC's replay buffer (``online.sac.offline_ratio``
    of every batch comes from it: offline-to-online)."""
    built = Path(cfg.data.built)
    if not (built / MANIFEST).is_file():
        raise StageInputError(
            f"online.sac.offline_ratio={cfg.online.sac.offline_ratio} draws from the built dataset, but "
            f"{built} has none: run the data stage first (`drivevla pipeline`), or set online.sac.offline_ratio=0")
    data = load_split_arrays(built, "train")
    log.info("online: %d offline samples from %s seed the replay buffer", len(data.states), built)
    return data


def _digest(path: Path) -> str:
    """Identity of the stage-2 weights, so a new upstream checkpoint never resumes an old run."""
    weights = path / "model.safetensors"
    return sha256_file(weights, length=16) if weights.is_file() else "none"


@dataclass
class _Run:
    """What the phases share: the settings, this rank, the model and where its envs are."""
    cfg: PipelineConfig
    dist: Distributed
    device: Any
    model: Any
    key: str                    # the run's identity: a checkpoint with another key is not resumed
    slots: OnlineEnvSlots
    offline_data: Any
    eval_env: Any               # rank 0's held-out env (None on the other ranks)
    started: float

    @property
    def eval_seed(self) -> int:
        return self.cfg.seed + EVAL_SEED_OFFSET

    def evaluate(self, episodes: int, seed: int) -> dict[str, Any]:
        return evaluate(self.model, self.eval_env, episodes, seed, self.device)


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Train on this process, or as one rank of a ``torchrun`` job (rank 0 evaluates and writes)."""
    return run_on_ranks(cfg, _run)


def _run(cfg: PipelineConfig, dist: Distributed) -> dict[str, Any]:
    r = _init(cfg, dist)
    try:
        before = _evaluate_before(r)
        trainer, train_stats, selection = _train(r)
        after = _evaluate_after(r)
    finally:
        if r.eval_env is not None:
            r.eval_env.close()
    if not dist.is_main:
        dist.barrier()  # wait until rank 0 has written the checkpoint and the metrics
        return {"paths": {"checkpoint": cfg.online.out}, "metrics": _from_rank0(dist, None)}
    metrics = _report(r, before, after, selection, trainer, train_stats)
    _write(r, metrics)
    return {"paths": {"checkpoint": cfg.online.out}, "metrics": _from_rank0(dist, metrics)}


def _init(cfg: PipelineConfig, dist: Distributed) -> _Run:
    """Seed, check what the run needs before any work (env slots, SAC's dataset), load the model."""
    seed_everything(cfg.seed)  # the same on every rank: the model starts alike everywhere
    device = dist.device(resolve_device(cfg.device))
    o = cfg.online
    # With CARLA one server per env: fail before loading anything when there are too few.
    slots = OnlineEnvSlots.for_config(o, dist.world_size)
    check_env_slots(cfg.env, slots.total, slots.describe())
    # Likewise a missing dataset for SAC's offline partition (a read, before any driving).
    offline_data = offline_transitions(cfg) if o.algo == "sac" and o.sac.offline_ratio > 0 else None
    model = load_or_init(cfg, upstream=o.init_from or cfg.offline.out).to(device)
    key = fingerprint(cfg.model, cfg.env, o, {"seed": cfg.seed, "upstream": _digest(Path(cfg.offline.out))})
    eval_env = make_env(cfg.env, seed=cfg.seed + EVAL_SEED_OFFSET, slot=slots.eval) if dist.is_main else None
    return _Run(cfg, dist, device, model, key, slots, offline_data, eval_env, time.perf_counter())


def _evaluate_before(r: _Run) -> dict[str, Any]:
    """The starting point's figures (rank 0), kept with the run: a resumed run does not re-drive them."""
    before: dict[str, Any] = {}
    if r.dist.is_main:
        path = RUN_DIR / "before.json"
        saved = json.loads(path.read_text()) if path.is_file() else None
        if saved is not None and saved.get("key") == r.key:
            before = saved["metrics"]
        else:
            before = r.evaluate(r.cfg.online.eval_episodes, r.eval_seed)
            write_json(path, {"key": r.key, "metrics": before})
        log.info("online: before fine-tuning %s", _scalars(before))
    r.dist.barrier()  # the other ranks wait for rank 0's evaluation
    return before


def _train(r: _Run) -> tuple[Any, dict[str, float], dict[str, Any] | None]:
    """Fine-tune with PPO or SAC; with ``select_best``, end on the weights that validated best."""
    cfg, o, dist = r.cfg, r.cfg.online, r.dist
    keeper = None
    if o.select_best and dist.is_main:  # rank 0 alone drives, keeps and saves the best weights
        val_seed = cfg.seed + VAL_SEED_OFFSET
        keeper = BestPolicyKeeper(r.model, lambda: r.evaluate(o.val_episodes, val_seed)["route_completion"],
                                  RUN_DIR, every=o.validate_every, key=r.key)
    # Each rank's envs start from seeds of their own (rank 0's are a one-process run's). Constructors,
    # not built envs: the trainer starts them in processes of their own.
    train_seed, first_slot = rank_seed(cfg.seed, dist), r.slots.first_train(dist.rank)
    if o.algo == "sac":
        envs = env_fns(cfg.env, o.sac.num_envs, seed=train_seed, first_slot=first_slot)
        trainer: Any = SACTrainer(r.model, envs, o.sac, device=r.device, seed=cfg.seed,
                                  offline_data=r.offline_data, dist=dist)
    else:
        envs = env_fns(cfg.env, o.ppo.num_envs, seed=train_seed, first_slot=first_slot)
        trainer = PPOTrainer(r.model, envs, o.ppo, device=r.device, seed=cfg.seed, dist=dist)
    try:
        if keeper is not None:
            keeper.start()
        stats = trainer.train(o.total_timesteps, save_dir=RUN_DIR, checkpoint_key=r.key, callback=keeper)
    finally:
        trainer.close()
    selection = keeper.restore() if keeper is not None else None
    if selection is not None:
        log.info("online: keeping the weights of step %d (validation route completion %.3f)",
                 selection["best_step"], selection["best_score"])
    return trainer, stats, selection


def _evaluate_after(r: _Run) -> dict[str, Any]:
    """The fine-tuned policy on the same held-out seeds as before (rank 0)."""
    if not r.dist.is_main:
        return {}
    after = r.evaluate(r.cfg.online.eval_episodes, r.eval_seed)
    log.info("online: after fine-tuning %s", _scalars(after))
    return after


def _report(r: _Run, before: dict[str, Any], after: dict[str, Any], selection: dict[str, Any] | None,
            trainer: Any, train_stats: dict[str, float]) -> dict[str, Any]:
    """The stage's metrics: both sides' figures, the paired gain, the selection, the run's size."""
    return {
        **{f"before_{k}": v for k, v in _scalars(before).items()},
        **{f"after_{k}": v for k, v in _scalars(after).items()},
        **paired_gain(before, after),
        "eval_episodes": r.cfg.online.eval_episodes,
        **({"selected_step": selection["best_step"], "selected_val_route_completion": selection["best_score"]}
           if selection is not None else {}),
        "timesteps": int(trainer.global_step),
        "steps_per_second": float(train_stats.get("steps_per_second", 0.0)),
        "seconds": round(time.perf_counter() - r.started, 2),
    }


def _write(r: _Run, metrics: dict[str, Any]) -> None:
    """Rank 0 writes the checkpoint and the metrics; then the other ranks may read them."""
    o = r.cfg.online
    save_checkpoint(r.model.cpu(), o.out, extra={"stage": "online", "algo": o.algo, "metrics": metrics,
                                                 "world_size": r.dist.world_size})
    write_json(Path(r.cfg.metrics_dir) / "online.json", metrics)
    r.dist.barrier()


def _scalars(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in figures.items() if k not in _NOT_SCALARS}


def _from_rank0(dist: Distributed, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (so every rank returns the same result)."""
    if not dist.enabled:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def main() -> None:
    stage_main("online", run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
