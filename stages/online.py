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

import hashlib
import inspect
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from stages.accel import Distributed, distributed
from stages.common import StageInputError, resolve_device, seed_everything, stage_main, write_json
from stages.config import PipelineConfig
from stages.resume import fingerprint
from stages.training import load_or_init, save_checkpoint

log = logging.getLogger(__name__)

# Evaluation seeds lie far from the training and data seeds so the figures are held-out; validation
# seeds (which pick the best weights) lie elsewhere again, so the held-out figures stay unbiased.
EVAL_SEED_OFFSET = 1_000_000
VAL_SEED_OFFSET = 500_000
RUN_DIR = Path("runs") / "online"


def evaluate(model: Any, env: Any, episodes: int, seed: int, device: str) -> dict[str, Any]:
    """Deterministic episodes on seeds ``seed, seed + 1, …``: means and standard errors."""
    from stages.envs.rewards import OFF_ROAD_REASONS
    from stages.rl.evaluation import rollout_policy, torch_threads

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
    from stages.data.shards import MANIFEST, load_split_arrays

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
    if not weights.is_file():
        return "none"
    h = hashlib.sha256()
    with weights.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Train on this process, or as one rank of a ``torchrun`` job (rank 0 evaluates and writes)."""
    with distributed(resolve_device(cfg.device)) as dist:
        return _run(cfg, dist)


def _run(cfg: PipelineConfig, dist: Distributed) -> dict[str, Any]:
    from stages.envs import make_env
    from stages.envs.factory import check_env_slots, env_fns
    from stages.envs.slots import OnlineEnvSlots
    from stages.rl.ppo import rank_seed

    seed_everything(cfg.seed)  # the same on every rank: the model starts alike everywhere
    device = dist.device(resolve_device(cfg.device))
    o = cfg.online
    sac_kwargs = _sac_dist_kwargs(dist) if o.algo == "sac" else {}
    # With CARLA one server per env: fail before loading anything when there are too few.
    slots = OnlineEnvSlots.for_config(o, dist.world_size)
    check_env_slots(cfg.env, slots.total, slots.describe())
    first_slot = slots.first_train(dist.rank)
    # Likewise a missing dataset for SAC's offline partition (a read, before any driving).
    offline_data = offline_transitions(cfg) if o.algo == "sac" and o.sac.offline_ratio > 0 else None
    model = load_or_init(cfg, upstream=o.init_from or cfg.offline.out).to(device)
    key = fingerprint(cfg.model, cfg.env, o, {"seed": cfg.seed, "upstream": _digest(Path(cfg.offline.out))})
    eval_seed = cfg.seed + EVAL_SEED_OFFSET
    # Each rank's envs start from seeds of their own (rank 0's are a one-process run's).
    train_seed = rank_seed(cfg.seed, dist)

    eval_env = make_env(cfg.env, seed=eval_seed, slot=slots.eval) if dist.is_main else None
    t0 = time.perf_counter()
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    try:
        if dist.is_main:
            # The starting point's figures are kept with the run: a resumed run does not re-drive them.
            saved = json.loads((RUN_DIR / "before.json").read_text()) if (RUN_DIR / "before.json").is_file() else None
            if saved is not None and saved.get("key") == key:
                before = saved["metrics"]
            else:
                before = evaluate(model, eval_env, o.eval_episodes, eval_seed, device)
                write_json(RUN_DIR / "before.json", {"key": key, "metrics": before})
            log.info("online: before fine-tuning %s", {k: v for k, v in before.items() if k not in _NOT_SCALARS})
        dist.barrier()  # the other ranks wait for rank 0's evaluation

        keeper = None
        if o.select_best and dist.is_main:  # rank 0 alone drives, keeps and saves the best weights
            from stages.rl.selection import BestPolicyKeeper

            val_seed = cfg.seed + VAL_SEED_OFFSET
            keeper = BestPolicyKeeper(
                model, lambda: evaluate(model, eval_env, o.val_episodes, val_seed, device)["route_completion"],
                RUN_DIR, every=o.validate_every, key=key)
        if o.algo == "sac":
            from stages.rl.sac import SACTrainer

            # Constructors, not a built vector env: each env then steps in its own process and gets its
            # next action as soon as its own step returns, while a learner thread updates.
            train_envs = env_fns(cfg.env, o.sac.num_envs, seed=train_seed, first_slot=first_slot)
            trainer = SACTrainer(model, train_envs, o.sac, device=device, seed=cfg.seed, offline_data=offline_data,
                                 **sac_kwargs)
        else:
            from stages.rl.ppo import PPOTrainer

            train_envs = env_fns(cfg.env, o.ppo.num_envs, seed=train_seed, first_slot=first_slot)
            trainer = PPOTrainer(model, train_envs, o.ppo, device=device, seed=cfg.seed, dist=dist)
        try:
            if keeper is not None:
                keeper.start()
            train_stats = trainer.train(o.total_timesteps, save_dir=RUN_DIR, checkpoint_key=key, callback=keeper)
        finally:
            trainer.close()
        selection = keeper.restore() if keeper is not None else None
        if selection is not None:
            log.info("online: keeping the weights of step %d (validation route completion %.3f)",
                     selection["best_step"], selection["best_score"])

        if dist.is_main:
            after = evaluate(model, eval_env, o.eval_episodes, eval_seed, device)
            log.info("online: after fine-tuning %s", {k: v for k, v in after.items() if k not in _NOT_SCALARS})
    finally:
        if eval_env is not None:
            eval_env.close()

    if not dist.is_main:
        dist.barrier()  # wait until rank 0 has written the checkpoint and the metrics
        return {"paths": {"checkpoint": o.out}, "metrics": _from_rank0(dist, None)}
    metrics = {
        **{f"before_{k}": v for k, v in before.items() if k not in _NOT_SCALARS},
        **{f"after_{k}": v for k, v in after.items() if k not in _NOT_SCALARS},
        **paired_gain(before, after),
        "eval_episodes": o.eval_episodes,
        **({"selected_step": selection["best_step"], "selected_val_route_completion": selection["best_score"]}
           if selection is not None else {}),
        "timesteps": int(trainer.global_step),
        "steps_per_second": float(train_stats.get("steps_per_second", 0.0)),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    save_checkpoint(model.cpu(), o.out, extra={"stage": "online", "algo": o.algo, "metrics": metrics,
                                               "world_size": dist.world_size})
    write_json(Path(cfg.metrics_dir) / "online.json", metrics)
    dist.barrier()
    return {"paths": {"checkpoint": o.out}, "metrics": _from_rank0(dist, metrics)}


def _sac_dist_kwargs(dist: Distributed) -> dict[str, Any]:
    """``{"dist": dist}`` where `SACTrainer` takes it; alone, nothing. Several ranks need it: without
    it every rank would train a SAC of its own and all of them write the same run directory."""
    from stages.rl.sac import SACTrainer

    if "dist" in inspect.signature(SACTrainer).parameters:
        return {"dist": dist}
    if dist.enabled:
        raise RuntimeError(f"online.algo=sac under torchrun (world size {dist.world_size}): this SACTrainer "
                           "takes no dist argument, so it cannot train data-parallel; run SAC as one process "
                           "(python -m stages.online) or use online.algo=ppo")
    return {}


def _from_rank0(dist: Distributed, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (so every rank returns the same result)."""
    if not dist.enabled:
        return value
    import torch.distributed

    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def main() -> None:
    stage_main("online", run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
