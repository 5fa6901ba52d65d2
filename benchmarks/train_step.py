"""Training-step and inference benchmark of DrivingVLA (torch only, so it runs on the GPU machine).

Measures, on one device:
  * the device's matrix-product rate (bf16 on CUDA, fp32 on CPU), the ceiling for MFU;
  * offline (behaviour cloning) and pretrain (contrastive) train steps: samples/s, model FLOPs per
    sample counted with torch's FlopCounterMode, and model FLOPs utilisation (MFU);
  * a PPO update minibatch (evaluate_actions + backward + step) and batched policy inference
    (batch 1, 8, 64) latency.

    python -m benchmarks.train_step --device cuda --size base --batch 128        # the H100 run
    python -m benchmarks.train_step --device cpu --size tiny --batch 32          # regressions on CPU

Prints a table and writes benchmarks/results/train_step_<device>_<size>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from models import DrivingVLA, DrivingVLAConfig
from stages.accel import autocast, configure_backends, make_adamw, maybe_compile

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def matmul_rate(device: str) -> dict[str, float]:
    """Achievable dense matrix-product rate (FLOP/s): the denominator of MFU."""
    n, dtype = (8192, torch.bfloat16) if device.startswith("cuda") else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = timed(lambda: a @ b, device, iters=10 if device.startswith("cuda") else 5, warmup=3)
    return {"n": n, "dtype": str(dtype), "flops_per_s": 2 * n ** 3 / statistics.median(times)}


def make_batch(cfg: DrivingVLAConfig, model: DrivingVLA, batch: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (batch, cfg.image_size, cfg.image_size, 3)
    captions = [f"a car {i % 40} m ahead in lane {i % 3}, ego at {30 + i % 50} km/h, follow the lane"
                for i in range(batch)]
    return {
        "image": torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).to(device),
        "state": torch.randn(batch, cfg.state_dim, generator=g).to(device),
        "tokens": model.tokenize(["turn left at the next intersection"] * batch).to(device),
        "caption_tokens": model.tokenize(captions).to(device),
        "action": torch.rand(batch, 3, generator=g).clamp(0.01, 0.99).to(device),
        "trajectory": torch.randn(batch, cfg.trajectory_length, 2, generator=g).to(device),
    }


def bc_loss(model: DrivingVLA, b: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(b["image"], b["state"], b["tokens"])
    nll = -model.distribution(out.action_params).log_prob(b["action"]).mean()
    return nll + (out.trajectory - b["trajectory"]).norm(dim=-1).mean()


def clip_loss(model: DrivingVLA, b: dict[str, torch.Tensor]) -> torch.Tensor:
    zi, zt = model.encode_image(b["image"]), model.encode_text(b["caption_tokens"])
    logits = model.logit_scale.exp().clamp(max=100) * zi @ zt.t()
    target = torch.arange(len(zi), device=zi.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def ppo_loss(model: DrivingVLA, b: dict[str, torch.Tensor]) -> torch.Tensor:
    log_prob, entropy, value = model.evaluate_actions(b["image"], b["state"], b["tokens"], b["action"])
    ratio = (log_prob - log_prob.detach()).exp()
    return -(ratio * b["state"][:, 0]).mean() + 0.5 * value.pow(2).mean() - 0.01 * entropy.mean()


def profile_top_kernels(step: Callable[[], None], device: str, top: int = 12) -> list[dict[str, Any]]:
    """Where a step's device time goes: the top kernels by total time over 3 steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync(device)
    key = "device_time_total" if device.startswith("cuda") else "cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in prof.key_averages() if e.device_type.name == ("CUDA" if device.startswith("cuda") else "CPU"))
    return [{"name": e.key[:80], "ms_per_step": getattr(e, key) / 3e3, "share": getattr(e, key) / max(total, 1)}
            for e in events[:top]]


def train_step_bench(name: str, loss_fn, model: DrivingVLA, batch: dict[str, torch.Tensor], device: str,
                     compile_step: bool | None, iters: int, peak: float, profile_it: bool = False,
                     compile_mode: str | None = None) -> dict[str, Any]:
    opt = make_adamw(model.parameters(), lr=1e-4, weight_decay=0.01, device=device)
    model.train()

    def fwd_bwd() -> torch.Tensor:
        with autocast(device):
            loss = loss_fn(model, batch)
        loss.backward()
        return loss

    step_fwd_bwd = maybe_compile(fwd_bwd, compile_step, device, mode=compile_mode)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        step_fwd_bwd()
        opt.step()

    # FLOPs of one forward + backward (the model's work, not the optimiser's), counted eagerly.
    with FlopCounterMode(display=False) as counter:
        opt.zero_grad(set_to_none=True)
        fwd_bwd()
    flops = counter.get_total_flops()
    warmup = 5 if compile_step else 3
    times = timed(step, device, iters, warmup)
    n = len(batch["state"])
    median = statistics.median(times)
    row = {"bench": name, "batch": n, "step_ms_p50": 1e3 * median,
           "samples_per_s": n / median, "flops_per_sample": flops / n,
           "achieved_flops_per_s": flops / median, "mfu": flops / median / peak}
    if profile_it:
        row["top_kernels"] = profile_top_kernels(step, device)
    return row


@torch.no_grad()
def inference_bench(model: DrivingVLA, cfg: DrivingVLAConfig, device: str, sizes: list[int], iters: int,
                    compile_mode: str | None = None) -> list[dict]:
    """Deterministic actions at each batch size; ``compile_mode`` compiles the policy (on CUDA,
    "reduce-overhead" replays a CUDA graph: at batch 1 the launch overhead is most of the time)."""
    model.eval()
    rows = []

    def policy(image: torch.Tensor, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            return model.act(image, state, tokens, deterministic=True)[0]

    run_policy = torch.compile(policy, mode=compile_mode) if compile_mode else policy
    for bsz in sizes:
        b = make_batch(cfg, model, bsz, device)

        def act() -> None:
            run_policy(b["image"], b["state"], b["tokens"])

        times = sorted(timed(act, device, iters, warmup=5))
        rows.append({"bench": "policy_inference", "batch": bsz, "compile_mode": compile_mode or "eager",
                     "p50_ms": 1e3 * times[len(times) // 2], "p95_ms": 1e3 * times[int(0.95 * (len(times) - 1))],
                     "samples_per_s": bsz / statistics.median(times)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", default=None, help="tiny | small | base (default: base on CUDA, tiny on CPU)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--compile", dest="compile_step", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode of the train steps (default | max-autotune-no-cudagraphs | ...)")
    parser.add_argument("--inference-compile-mode", default=None,
                        help="compile the policy for the inference rows (e.g. reduce-overhead: CUDA graphs)")
    parser.add_argument("--benches", default="offline,pretrain,ppo,inference",
                        help="comma-separated subset of offline, pretrain, ppo, inference")
    parser.add_argument("--profile", action="store_true", help="record the top kernels of each train step")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = args.device
    cuda = device.startswith("cuda")
    size = args.size or ("base" if cuda else "tiny")
    batch = args.batch or (128 if cuda else 32)
    iters = args.iters or (20 if cuda else 5)
    configure_backends(device)
    torch.manual_seed(0)

    cfg = DrivingVLAConfig.from_size(size)
    peak = matmul_rate(device)
    benches = set(args.benches.split(","))
    unknown = benches - {"offline", "pretrain", "ppo", "inference"}
    if unknown:
        parser.error(f"--benches: unknown {sorted(unknown)}; choose from offline, pretrain, ppo, inference")
    rows: list[dict[str, Any]] = []
    for key, name, loss_fn in (("offline", "offline_bc_step", bc_loss), ("pretrain", "pretrain_clip_step", clip_loss)):
        if key not in benches:
            continue
        model = DrivingVLA(cfg).to(device).to(memory_format=torch.channels_last)
        b = make_batch(cfg, model, batch, device)
        rows.append(train_step_bench(name, loss_fn, model, b, device, args.compile_step, iters, peak["flops_per_s"],
                                     args.profile, args.compile_mode))
        del model
    model = DrivingVLA(cfg).to(device)
    if "ppo" in benches:
        rows.append(train_step_bench("ppo_update_minibatch", ppo_loss, model, make_batch(cfg, model, 64, device),
                                     device, args.compile_step, iters, peak["flops_per_s"], compile_mode=args.compile_mode))
    if "inference" in benches:
        rows += inference_bench(model, cfg, device, [1, 8, 64], iters=max(iters, 20),
                                compile_mode=args.inference_compile_mode)

    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "size": size, "parameters": sum(p.numel() for p in model.parameters()),
            "image_size": cfg.image_size, "compile": args.compile_step if args.compile_step is not None else cuda,
            "compile_mode": args.compile_mode or "default", "batch": batch,
            "matmul": peak, "cpus": os.cpu_count(),
            # CPU timings on a shared machine mean little without the load they were taken under.
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    print(f"\nDrivingVLA-{size} on {meta['device']} (torch {meta['torch']}), matmul peak "
          f"{peak['flops_per_s'] / 1e9:,.0f} GFLOP/s ({peak['dtype']})")
    print(f"{'bench':<22}{'batch':>6}{'ms (p50)':>11}{'samples/s':>12}{'GFLOP/sample':>14}{'MFU':>8}")
    for r in rows:
        ms = r.get("step_ms_p50", r.get("p50_ms"))
        gf = f"{r['flops_per_sample'] / 1e9:.2f}" if "flops_per_sample" in r else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        print(f"{r['bench']:<22}{r['batch']:>6}{ms:>11.2f}{r['samples_per_s']:>12.1f}{gf:>14}{mfu:>8}")
    for r in rows:
        for k in r.get("top_kernels", []):
            print(f"  {r['bench']:<20} {k['ms_per_step']:8.2f} ms {100 * k['share']:5.1f}%  {k['name']}")
    out = Path(args.out) if args.out else RESULTS / f"train_step_{'cuda' if cuda else 'cpu'}_{size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
