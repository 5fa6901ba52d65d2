"""Stage 3 — online: PPO fine-tuning of the offline policy in the simulator.

The embedded ``highway`` backend runs anywhere; ``env.backend=carla`` drives CARLA servers (the
Prefect flow provisions them). The policy is evaluated on held-out seeds before and after training,
so the metrics show what online RL added to the stage-2 starting point.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from stages.common import resolve_device, seed_everything, stage_main, write_json
from stages.config import PipelineConfig
from stages.rl.evaluation import evaluate_policy
from stages.training import load_or_init, save_checkpoint

log = logging.getLogger(__name__)

# Evaluation seeds lie far from the training and data seeds so the figures are held-out.
EVAL_SEED_OFFSET = 1_000_000


def run(cfg: PipelineConfig) -> dict[str, Any]:
    from stages.envs import make_env, make_vector_env
    from stages.rl.ppo import PPOTrainer

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    o = cfg.online
    if o.algo != "ppo":
        raise NotImplementedError(f"online.algo={o.algo!r} is not available yet; use online.algo=ppo")
    model = load_or_init(cfg, upstream=cfg.offline.out).to(device)

    eval_env = make_env(cfg.env, seed=cfg.seed + EVAL_SEED_OFFSET)
    t0 = time.perf_counter()
    try:
        before = evaluate_policy(model, eval_env, o.eval_episodes, cfg.seed + EVAL_SEED_OFFSET, device=device)
        log.info("online: before fine-tuning %s", before)
        env = make_vector_env(cfg.env, num_envs=o.ppo.num_envs, seed=cfg.seed, autoreset_mode="SameStep")
        try:
            trainer = PPOTrainer(model, env, o.ppo, device=device, seed=cfg.seed)
            train_stats = trainer.train(o.total_timesteps, save_dir=Path("runs") / "online")
        finally:
            env.close()
        after = evaluate_policy(model, eval_env, o.eval_episodes, cfg.seed + EVAL_SEED_OFFSET, device=device)
        log.info("online: after fine-tuning %s", after)
    finally:
        eval_env.close()

    metrics = {
        **{f"before_{k}": v for k, v in before.items() if k != "episodes"},
        **{f"after_{k}": v for k, v in after.items() if k != "episodes"},
        "timesteps": trainer.global_step,
        "steps_per_second": train_stats.get("steps_per_second", 0.0),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    save_checkpoint(model.cpu(), o.out, extra={"stage": "online", "algo": o.algo, "metrics": metrics})
    write_json(Path(cfg.metrics_dir) / "online.json", metrics)
    return {"paths": {"checkpoint": o.out}, "metrics": metrics}


def main() -> None:
    stage_main("online", run, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
