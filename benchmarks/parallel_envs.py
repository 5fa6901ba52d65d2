"""PPO throughput with N parallel simulators whose step takes a fixed time (CARLA at 25 FPS: 40 ms).

    python -m benchmarks.parallel_envs                      # frozen encoders N = 1, 2, 4, 8; full N = 2, 8
    python -m benchmarks.parallel_envs --envs 8 --train full --updates 2

The target (issue 4): N envs reach >= 90% of N x 25 steps/s, counted over the whole wall-clock
time *including the updates*, with the seed's PPO settings (num_steps=2048, num_epochs=10,
batch_size=64) and the tiny DrivingVLA. Each env is `stages.envs.testing.FixedLatencyEnv`, which
sleeps through its step like a client waiting on a remote server. Collection is asynchronous
(`stages.rl.async_collector`): env workers keep stepping while the learner updates.

Per N the clock starts when the first actions go to the envs (env processes up and reset, as
simulators would be; that start-up is reported as ``startup_seconds``) and stops when the learner
finishes its ``--updates``-th update; the rate is every env step taken in
that time (the steps taken during the last update are in the buffer the next update reads). ``--train``
picks what the update trains: ``frozen`` (freeze_encoders: the rollout stores the encoders' outputs,
the update runs fusion + heads) or ``full`` (every parameter, the ViT included). Prints a table and
writes benchmarks/results/parallel_envs.json. A full run takes about 5 minutes: N = 1 alone needs
2048 / 25 = 82 s to fill its first rollout; ``--train frozen`` alone about 3.5.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from models import DrivingVLA, DrivingVLAConfig
from stages.envs.testing import FixedLatencyEnv
from stages.rl.configs import PPOConfig
from stages.rl.ppo import PPOTrainer

RESULTS = Path(__file__).resolve().parent / "results" / "parallel_envs.json"


def measure(num_envs: int, train: str, updates: int, step_ms: float, image_size: int, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = DrivingVLA(DrivingVLAConfig.from_size("tiny", image_size=image_size))
    fns = [functools.partial(FixedLatencyEnv, step_seconds=step_ms / 1000, image_size=image_size)
           for _ in range(num_envs)]
    cfg = PPOConfig(num_steps=2048, num_epochs=10, batch_size=64, num_envs=num_envs, async_collection=True,
                    freeze_encoders=train == "frozen")
    trainer = PPOTrainer(model, fns, cfg, seed=seed)
    seen: list[dict[str, float]] = []
    t0 = time.perf_counter()

    def stop_after(stats: dict[str, float]) -> bool:
        seen.append({**stats, "elapsed": time.perf_counter() - t0})
        return len(seen) < updates

    try:
        trainer.train(10**9, callback=stop_after)
    finally:
        trainer.close()
    last = seen[-1]
    limit = num_envs * 1000.0 / step_ms
    rate = last["env_steps"] / last["env_seconds"]
    return {"num_envs": num_envs, "train": train, "updates": updates, "limit_steps_per_s": limit,
            "env_steps": int(last["env_steps"]), "seconds": round(last["env_seconds"], 2),
            "startup_seconds": round(last["elapsed"] - last["env_seconds"], 2),
            "inference_ms": round(sum(s["inference_ms"] for s in seen) / len(seen), 2),
            "inference_batch": round(sum(s["inference_batch"] for s in seen) / len(seen), 2),
            "steps_per_s": round(rate, 2), "fraction_of_limit": round(rate / limit, 4),
            "update_seconds": round(sum(s["update_seconds"] for s in seen) / len(seen), 2),
            "rollout_fill_seconds": round(cfg.num_steps / limit, 2),
            "max_policy_lag": max(s["policy_lag"] for s in seen),
            "meets_90_percent": rate >= 0.9 * limit}


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| train | N | limit N×25 (steps/s) | measured (steps/s) | % of limit | update (s) | fill 2048 (s) | ≥ 90% |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['train']} | {r['num_envs']} | {r['limit_steps_per_s']:.0f} | {r['steps_per_s']:.1f} | "
                     f"{100 * r['fraction_of_limit']:.1f}% | {r['update_seconds']:.1f} | {r['rollout_fill_seconds']:.1f} | "
                     f"{'yes' if r['meets_90_percent'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--train", choices=["frozen", "full", "both"], default="both")
    parser.add_argument("--full-envs", type=int, nargs="+", default=[2, 8],
                        help="N for --train full (each takes an update of 25-35 s on 2 cores)")
    parser.add_argument("--updates", type=int, default=None,
                        help="learner updates per measurement (default: 2 for N >= 4, else 1)")
    parser.add_argument("--step-ms", type=float, default=40.0, help="env step time (40 ms = 25 FPS)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="learner torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = ["frozen", "full"] if args.train == "both" else [args.train]
    rows = []
    for mode in modes:
        for n in (args.full_envs if mode == "full" and args.train == "both" else args.envs):
            updates = args.updates if args.updates is not None else (2 if n >= 4 else 1)
            row = measure(n, mode, max(1, updates), args.step_ms, args.image_size)
            print(f"{mode:6s} N={n}: {row['steps_per_s']:.1f} steps/s = {100 * row['fraction_of_limit']:.1f}% "
                  f"of {row['limit_steps_per_s']:.0f} (update {row['update_seconds']:.1f} s)", flush=True)
            rows.append(row)
    print(format_table(rows))
    result = {"benchmark": "parallel_envs", "step_ms": args.step_ms, "image_size": args.image_size,
              "ppo": {"num_steps": 2048, "num_epochs": 10, "batch_size": 64}, "model": "tiny",
              "machine": {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                          "processor": platform.processor() or platform.machine(),
                          "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                          "load_average": list(os.getloadavg())},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
