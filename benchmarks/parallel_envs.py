"""PPO and SAC throughput with N parallel simulators whose step takes a fixed time (CARLA at 25 FPS: 40 ms).

    python -m benchmarks.parallel_envs                      # frozen encoders N = 1, 2, 4, 8; full N = 2, 8
    python -m benchmarks.parallel_envs --envs 8 --train full --updates 2
    # one GPU, the carla preset's model (behaviour inference on the GPU, bf16 update, minibatch 256):
    python -m benchmarks.parallel_envs --device cuda --size base --image-size 224 --train full --envs 4 8 \
        --updates 3 --latency 1 8 16
    python -m benchmarks.parallel_envs --device cuda --size base --image-size 224 --train frozen --envs 16
    python -m benchmarks.parallel_envs --algo sac --device cuda --size base --image-size 224 --envs 8 \
        --sac-settings heads_b256_utd025

On CUDA each row also has ``steady_*`` (from the end of the first update, which holds compilation
and CUDA-graph capture, to the end of the last), the learner's samples/s and the update's MFU
(torch's FLOP count of an update sample over a bf16 8192^3 matmul rate measured in the same run),
and ``ratio_dev_first_update`` (largest |ratio - 1| of the first minibatch of the first, lag-0 rollout).

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

SAC (``--algo sac``; the same target, "SAC likewise"): `stages.rl.sac.SACTrainer` on the same envs
and model. Per N and setting (``--sac-settings``, the SAC settings in ``SAC_SETTINGS``) the trainer
first takes ``learning_starts`` random-action steps (``warmup_seconds``, no updates), then the
clock runs over ``--seconds`` worth of steps at the limit, every one of them owing updates
(``utd_ratio`` per env step): the rate is those steps over that wall-clock time, inference, replay
and updates included. ``--loop`` picks how the trainer steps the envs: ``pool`` (the env
constructors: each env at its own pace, the updates in a learner thread), ``vector`` (a gymnasium
``AsyncVectorEnv``, one process per env for N = 1 too: the updates run between ``step_async``
and ``step_wait``) or ``sync`` (the same vector env, its ``step_async`` hidden: update, then step).
Writes benchmarks/results/parallel_envs_sac.json (``--append`` keeps the rows of other runs); about
3 minutes per setting and loop.

    python -m benchmarks.parallel_envs --algo sac
    python -m benchmarks.parallel_envs --algo sac --threads 1 --loop vector --sac-settings heads_b256_utd025 --append
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

import gymnasium as gym
import numpy as np
import torch

from models import DrivingVLA, DrivingVLAConfig
from stages.envs.testing import FixedLatencyEnv
from stages.rl.configs import PPOConfig, SACConfig
from stages.rl.ppo import PPOTrainer

RESULTS = Path(__file__).resolve().parent / "results" / "parallel_envs.json"
SAC_RESULTS = Path(__file__).resolve().parent / "results" / "parallel_envs_sac.json"
# SAC settings for the tiny model on a CPU: frozen vision and text encoders (as PPO's "frozen"),
# SB3's batch of 256. "heads": the trunk does not train either (the replay buffer holds the fused
# features; an update runs the Q heads and the policy head). "fusion": the critic's TD loss trains
# the state encoder and the fusion transformer too (the buffer holds the encoders' outputs).
SAC_SETTINGS: dict[str, dict[str, Any]] = {
    "heads_b256_utd025": dict(freeze_encoders=True, train_trunk=False, batch_size=256, utd_ratio=0.25),
    "heads_b256_utd05": dict(freeze_encoders=True, train_trunk=False, batch_size=256, utd_ratio=0.5),
    "heads_b256_utd1": dict(freeze_encoders=True, train_trunk=False, batch_size=256, utd_ratio=1.0),
    "fusion_b256_utd025": dict(freeze_encoders=True, train_trunk=True, batch_size=256, utd_ratio=0.25),
    "fusion_b64_utd025": dict(freeze_encoders=True, train_trunk=True, batch_size=64, utd_ratio=0.25),
}
SAC_LOOPS = {
    "pool": "env constructors: each env in its own process at its own pace; updates in a learner thread",
    "vector": "AsyncVectorEnv: updates between step_async and step_wait",
    "sync": "the same vector env without step_async: update, then step",
}
SAC_COMMON = dict(learning_rate=3e-4, gamma=0.99, tau=0.005, buffer_size=50_000, learning_starts=256)


def make_model(size: str, image_size: int, device: str) -> DrivingVLA:
    return DrivingVLA(DrivingVLAConfig.from_size(size, image_size=image_size)).to(device)


def update_flops_per_sample(trainer: PPOTrainer, buffer: Any) -> float:
    """FLOPs of one update sample (forward + backward of ``evaluate_actions``), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    mb = next(buffer.minibatches(4, trainer.device, np.random.default_rng(0)))
    counter = FlopCounterMode(display=False)
    with counter:
        log_prob, _, value = trainer.policy.evaluate_actions(*trainer.adapter.model_inputs(mb.obs), mb.actions)
        (log_prob.sum() + value.sum()).backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 4


def measure(num_envs: int, train: str, updates: int, step_ms: float, image_size: int, seed: int = 0,
            device: str = "cpu", size: str = "tiny", batch_size: int = 64, compile_update: bool | None = None,
            peak: float | None = None) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = make_model(size, image_size, device)
    fns = [functools.partial(FixedLatencyEnv, step_seconds=step_ms / 1000, image_size=image_size)
           for _ in range(num_envs)]
    cfg = PPOConfig(num_steps=2048, num_epochs=10, batch_size=batch_size, num_envs=num_envs, async_collection=True,
                    freeze_encoders=train == "frozen", compile=compile_update)
    trainer = PPOTrainer(model, fns, cfg, device=device, seed=seed)
    seen: list[dict[str, float]] = []
    flops: list[float] = []
    t0 = time.perf_counter()

    def stop_after(stats: dict[str, float]) -> bool:
        seen.append({**stats, "elapsed": time.perf_counter() - t0})
        print(f"  update {len(seen)}: {stats['env_steps']:.0f} steps in {stats['env_seconds']:.1f} s, update "
              f"{stats['update_seconds']:.2f} s, inference {stats['inference_ms']:.1f} ms at "
              f"{stats['inference_batch']:.1f}, lag {stats['policy_lag']:.0f}", flush=True)
        return len(seen) < updates

    if peak is not None:  # count an update sample's FLOPs on the first rollout, before the first update
        rollout = trainer.collector.rollout

        def counting_rollout(agent: Any) -> Any:
            buffer, stats = rollout(agent)
            if not flops:
                flops.append(update_flops_per_sample(trainer, buffer))
            return buffer, stats

        trainer.collector.rollout = counting_rollout  # type: ignore[method-assign]
    try:
        trainer.train(10**9, callback=stop_after)
    finally:
        trainer.close()
    last = seen[-1]
    limit = num_envs * 1000.0 / step_ms
    rate = last["env_steps"] / last["env_seconds"]
    # Steady state: from the end of the first update (compilation, CUDA-graph capture and the first
    # fill are behind) to the end of the last; still every update of that window included.
    steady = ((last["env_steps"] - seen[0]["env_steps"]) / (last["env_seconds"] - seen[0]["env_seconds"])
              if len(seen) > 1 else rate)
    later = seen[1:] or seen
    update_s = sum(s["update_seconds"] for s in later) / len(later)
    samples = cfg.num_steps * cfg.num_epochs
    row = {"num_envs": num_envs, "train": train, "updates": updates, "device": device, "size": size,
           "batch_size": batch_size, "limit_steps_per_s": limit,
           "env_steps": int(last["env_steps"]), "seconds": round(last["env_seconds"], 2),
           "startup_seconds": round(last["elapsed"] - last["env_seconds"], 2),
           "inference_ms": round(sum(s["inference_ms"] for s in later) / len(later), 2),
           "inference_batch": round(sum(s["inference_batch"] for s in later) / len(later), 2),
           "steps_per_s": round(rate, 2), "fraction_of_limit": round(rate / limit, 4),
           "steady_steps_per_s": round(steady, 2), "steady_fraction_of_limit": round(steady / limit, 4),
           "update_seconds": round(update_s, 2), "first_update_seconds": round(seen[0]["update_seconds"], 2),
           "learner_samples_per_s": round(samples / update_s, 1),
           "rollout_fill_seconds": round(cfg.num_steps / limit, 2),
           "max_policy_lag": max(s["policy_lag"] for s in seen),
           "ratio_dev_first_update": seen[0].get("ratio_dev"),
           "meets_90_percent": rate >= 0.9 * limit, "steady_meets_90_percent": steady >= 0.9 * limit}
    if flops and peak:
        row["update_gflop_per_sample"] = round(flops[0] / 1e9, 2)
        row["update_mfu"] = round(flops[0] * samples / update_s / peak, 4)
    return row


def inference_latency(size: str, image_size: int, device: str, sizes: list[int], iters: int = 200) -> list[dict[str, Any]]:
    """p50 / p90 latency of the collector's batched behaviour inference (`DeviceActor`: CUDA graph,
    bf16 network), observation arrays in, actions out on the host."""
    import threading

    import numpy as np
    from stages.rl.device_actor import DeviceActor
    from stages.rl.policies import make_obs_adapter

    model = make_model(size, image_size, device).eval()
    env = FixedLatencyEnv(step_seconds=0.0, image_size=image_size)
    obs, _ = env.reset(seed=0)
    rows = []
    for frozen in (False, True):
        adapter = make_obs_adapter(model, env.observation_space, encoded=frozen)
        actor = DeviceActor(model, adapter, torch.device(device), bf16=device.startswith("cuda"), graphs=True,
                            lock=threading.Lock(), version=type("V", (), {"value": 0})())
        for b in sizes:
            batch = [obs] * b
            for _ in range(5):
                actor.infer(batch)
            times = []
            for _ in range(iters):
                t = time.perf_counter()
                actor.infer(batch)
                times.append(time.perf_counter() - t)
            times.sort()
            rows.append({"batch": b, "frozen_encoders": frozen, "p50_ms": round(1000 * times[len(times) // 2], 3),
                         "p90_ms": round(1000 * times[int(0.9 * len(times))], 3)})
            print(f"inference {'frozen' if frozen else 'full  '} batch {b}: p50 {rows[-1]['p50_ms']:.2f} ms", flush=True)
    return rows


def matmul_peak(device: str) -> float:
    """bf16 8192^3 matrix products per second on this GPU (the MFU denominator)."""
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n ** 3 * 20 / (start.elapsed_time(end) / 1000)


def measure_sac(num_envs: int, setting: str, seconds: float, step_ms: float, image_size: int, loop: str = "pool",
                seed: int = 0, device: str = "cpu", size: str = "tiny") -> dict[str, Any]:
    """``loop``: ``pool`` (env constructors: each env at its own pace, updates in a learner thread),
    ``vector`` (an AsyncVectorEnv: updates while the envs step, between step_async and step_wait)
    or ``sync`` (the same vector env without step_async: update, then step)."""
    from stages.rl.sac import SACTrainer

    torch.manual_seed(seed)
    model = make_model(size, image_size, device)
    fns = [functools.partial(FixedLatencyEnv, step_seconds=step_ms / 1000, image_size=image_size)
           for _ in range(num_envs)]
    t_start = time.perf_counter()
    env: Any = fns
    if loop != "pool":
        # One process per env, N = 1 included: the env must step outside the learner's process to overlap.
        env = gym.vector.AsyncVectorEnv(fns, shared_memory=False, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
        if loop == "sync":
            env = gym.vector.VectorWrapper(env)  # hides step_async: update, then step
    cfg = SACConfig(**{**SAC_COMMON, **SAC_SETTINGS[setting], "num_envs": num_envs})
    limit = num_envs * 1000.0 / step_ms
    trainer = None
    try:
        trainer = SACTrainer(model, env, cfg, device=device, seed=seed)
        trainer.log_interval = 10**9  # no progress callbacks inside the measured window
        update_time = [0.0]
        update = trainer.update

        def timed_update(batch: Any = None) -> dict[str, float]:
            t = time.perf_counter()
            out = update(batch)
            update_time[0] += time.perf_counter() - t
            return out

        trainer.update = timed_update  # type: ignore[method-assign]
        t_warm = time.perf_counter()
        trainer.train(cfg.learning_starts)  # random actions, no updates owed (but by the last step)
        warm = time.perf_counter() - t_warm
        steps = max(num_envs, int(round(seconds * limit / num_envs)) * num_envs)
        step0, updates0 = trainer.global_step, trainer.updates
        update_time[0] = 0.0
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        trainer.train(step0 + steps)
        elapsed = time.perf_counter() - t0
        taken, updates = trainer.global_step - step0, trainer.updates - updates0
    finally:
        if trainer is not None:
            trainer.close()
        if loop != "pool":
            env.close()
    rate = taken / elapsed
    return {"num_envs": num_envs, "setting": setting, "loop": loop, "storage": trainer.storage,
            "device": device, "size": size, "learner_samples_per_s": round(updates * cfg.batch_size / elapsed, 1),
            "utd_ratio": cfg.utd_ratio, "batch_size": cfg.batch_size, "limit_steps_per_s": limit,
            "env_steps": taken, "seconds": round(elapsed, 2), "steps_per_s": round(rate, 2),
            "fraction_of_limit": round(rate / limit, 4), "updates": updates,
            "update_ms": round(1000 * update_time[0] / max(updates, 1), 2),
            "update_share_of_time": round(update_time[0] / elapsed, 3),
            "warmup_seconds": round(warm, 2), "startup_seconds": round(t_warm - t_start, 2),
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "torch_threads": 1 if loop == "pool" else torch.get_num_threads(),
            "meets_90_percent": rate >= 0.9 * limit}


def format_sac_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| setting | loop | N | limit N×25 (steps/s) | measured (steps/s) | % of limit | update (ms) | "
             "updates' share of time | load (1 min) | ≥ 90% |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['loop']} | {r['num_envs']} | "
                     f"{r['limit_steps_per_s']:.0f} | {r['steps_per_s']:.1f} | {100 * r['fraction_of_limit']:.1f}% | "
                     f"{r['update_ms']:.1f} | {100 * r['update_share_of_time']:.0f}% | "
                     f"{r['load_average_1min'][0]:.1f}→{r['load_average_1min'][1]:.1f} | "
                     f"{'yes' if r['meets_90_percent'] else 'no'} |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg())}


def main_sac(args: argparse.Namespace) -> int:
    out = args.out if args.out is not None else SAC_RESULTS
    previous = json.loads(out.read_text()) if args.append and out.is_file() else None
    rows = list(previous["rows"]) if previous else []
    for setting in args.sac_settings:
        for n in args.envs:
            row = measure_sac(n, setting, args.seconds, args.step_ms, args.image_size, loop=args.loop,
                              device=args.device, size=args.size)
            print(f"{setting} {row['loop']} N={n}: {row['steps_per_s']:.1f} steps/s = "
                  f"{100 * row['fraction_of_limit']:.1f}% of {row['limit_steps_per_s']:.0f} "
                  f"(update {row['update_ms']:.1f} ms, {100 * row['update_share_of_time']:.0f}% of the time)", flush=True)
            rows = [r for r in rows if (r["setting"], r["loop"], r["num_envs"]) != (setting, row["loop"], n)]
            rows.append(row)
    print(format_sac_table(rows))
    result = {"benchmark": "parallel_envs", "algo": "sac", "step_ms": args.step_ms, "image_size": args.image_size,
              "model": args.size, "seconds_per_measurement": args.seconds,
              "sac": {"common": SAC_COMMON, "settings": SAC_SETTINGS}, "loops": SAC_LOOPS,
              "machine": machine(), "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| train | N | limit N×25 (steps/s) | measured (steps/s) | % of limit | steady % | update (s) | "
             "learner samples/s | MFU | fill 2048 (s) | ≥ 90% |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{100 * r['update_mfu']:.1f}%" if "update_mfu" in r else "-"
        lines.append(f"| {r['train']} | {r['num_envs']} | {r['limit_steps_per_s']:.0f} | {r['steps_per_s']:.1f} | "
                     f"{100 * r['fraction_of_limit']:.1f}% | {100 * r.get('steady_fraction_of_limit', 0):.1f}% | "
                     f"{r['update_seconds']:.1f} | {r.get('learner_samples_per_s', 0):.0f} | {mfu} | "
                     f"{r['rollout_fill_seconds']:.1f} | {'yes' if r['meets_90_percent'] else 'no'} |")
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
    parser.add_argument("--out", type=Path, default=None,
                        help=f"default: {RESULTS.name} (ppo) or {SAC_RESULTS.name} (sac)")
    parser.add_argument("--algo", choices=["ppo", "sac"], default="ppo")
    parser.add_argument("--sac-settings", nargs="+", choices=sorted(SAC_SETTINGS),
                        default=["heads_b256_utd025", "heads_b256_utd05", "fusion_b256_utd025", "fusion_b64_utd025"])
    parser.add_argument("--seconds", type=float, default=40.0,
                        help="sac: measured steps = this many seconds at the limit N x 25 steps/s")
    parser.add_argument("--loop", choices=["pool", "vector", "sync"], default="pool",
                        help="sac: env constructors stepped each at its own pace with a learner thread (pool), "
                             "an AsyncVectorEnv with updates between step_async and step_wait (vector), or "
                             "update-then-step (sync)")
    parser.add_argument("--append", action="store_true", help="sac: keep the other rows of the results file")
    parser.add_argument("--device", default="cpu", help="the learner's device (cuda: the behaviour policy infers there too)")
    parser.add_argument("--size", default="tiny", help="DrivingVLA size (tiny on CPU, base on a GPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="PPO minibatch (default: 64 on CPU, 256 on CUDA)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile the PPO update")
    parser.add_argument("--latency", type=int, nargs="*", default=None,
                        help="also time the batched behaviour inference at these batch sizes (CUDA)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.algo == "sac":
        return main_sac(args)
    args.out = args.out if args.out is not None else RESULTS
    cuda = args.device.startswith("cuda")
    batch_size = args.batch_size or (256 if cuda else 64)
    compile_update = {"auto": None, "on": True, "off": False}[args.compile]
    peak = matmul_peak(args.device) if cuda else None
    modes = ["frozen", "full"] if args.train == "both" else [args.train]
    result: dict[str, Any] = {"benchmark": "parallel_envs", "step_ms": args.step_ms, "image_size": args.image_size,
                              "ppo": {"num_steps": 2048, "num_epochs": 10, "batch_size": batch_size},
                              "model": args.size, "device": args.device,
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
                              "rows": []}
    if cuda:
        result["gpu"] = torch.cuda.get_device_name(0)
        result["matmul_peak_flops_per_s"] = peak

    def save() -> None:  # after every row: a run cut short keeps what it measured
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    if args.latency:
        result["inference_latency"] = inference_latency(args.size, args.image_size, args.device, args.latency)
        save()
    for mode in modes:
        for n in (args.full_envs if mode == "full" and args.train == "both" else args.envs):
            updates = args.updates if args.updates is not None else (2 if n >= 4 else 1)
            row = measure(n, mode, max(1, updates), args.step_ms, args.image_size, device=args.device, size=args.size,
                          batch_size=batch_size, compile_update=compile_update, peak=peak)
            print(f"{mode:6s} N={n}: {row['steps_per_s']:.1f} steps/s = {100 * row['fraction_of_limit']:.1f}% "
                  f"of {row['limit_steps_per_s']:.0f} (steady {100 * row['steady_fraction_of_limit']:.1f}%; update "
                  f"{row['update_seconds']:.1f} s, {row['learner_samples_per_s']:.0f} samples/s, "
                  f"MFU {row.get('update_mfu', float('nan')):.3f}, inference {row['inference_ms']:.1f} ms "
                  f"at {row['inference_batch']:.1f})", flush=True)
            result["rows"].append(row)
            save()
    print(format_table(result["rows"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
