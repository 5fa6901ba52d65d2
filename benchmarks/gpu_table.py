"""Issue 17's GPU table: merge the JSON files of `benchmarks/gpu_table.sh` into
benchmarks/results/parallel_envs_gpu.json and print the Markdown tables for docs/gpu.md.

    python -m benchmarks.gpu_table benchmarks/results/gpu_run
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "parallel_envs_gpu.json"
PPO_FILES = ("ppo_full_n4.json", "ppo_full_n8.json", "ppo_frozen_n16.json")


def merge(src: Path) -> dict[str, Any]:
    env = (src / "env.txt").read_text().strip().splitlines() if (src / "env.txt").exists() else []
    result: dict[str, Any] = {"benchmark": "parallel_envs on a GPU (issue 17)", "environment": env,
                              "ppo_rows": [], "sac_rows": [], "inference_latency": None}
    for name in PPO_FILES:
        if (src / name).exists():
            d = json.loads((src / name).read_text())
            result["ppo_rows"] += d["rows"]
            result["inference_latency"] = d.get("inference_latency") or result["inference_latency"]
            for key in ("gpu", "date", "machine", "matmul_peak_flops_per_s", "step_ms", "image_size", "ppo", "model"):
                result.setdefault(key, d.get(key))
    if (src / "sac_n8.json").exists():
        d = json.loads((src / "sac_n8.json").read_text())
        result["sac_rows"], result["sac"] = d["rows"], d.get("sac")
    return result


def tables(result: dict[str, Any]) -> str:
    lines = ["| algo | train | N | limit (steps/s) | whole clock (steps/s) | % of limit | steady % | update (s) | "
             "fill (s) | learner samples/s | update MFU | inference ms @ batch | max lag | >= 90% |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["ppo_rows"]:
        mfu = f"{100 * r['update_mfu']:.1f}%" if "update_mfu" in r else "-"
        lines.append(
            f"| PPO | {r['train']} | {r['num_envs']} | {r['limit_steps_per_s']:.0f} | {r['steps_per_s']:.1f} | "
            f"{100 * r['fraction_of_limit']:.1f}% | {100 * r['steady_fraction_of_limit']:.1f}% | "
            f"{r['update_seconds']:.1f} (first {r['first_update_seconds']:.1f}) | {r['rollout_fill_seconds']:.1f} | "
            f"{r['learner_samples_per_s']:.0f} | {mfu} | {r['inference_ms']:.1f} @ {r['inference_batch']:.1f} | "
            f"{r['max_policy_lag']:.0f} | {'yes' if r['meets_90_percent'] else 'no'} "
            f"(steady {'yes' if r['steady_meets_90_percent'] else 'no'}) |")
    for r in result["sac_rows"]:
        lines.append(
            f"| SAC | {r['setting']} | {r['num_envs']} | {r['limit_steps_per_s']:.0f} | {r['steps_per_s']:.1f} | "
            f"{100 * r['fraction_of_limit']:.1f}% | - | {r['update_ms']:.1f} ms an update "
            f"({100 * r['update_share_of_time']:.0f}% of the time) | - | {r['learner_samples_per_s']:.0f} | - | - | - | "
            f"{'yes' if r['meets_90_percent'] else 'no'} |")
    if result["inference_latency"]:
        by: dict[int, dict[bool, dict[str, float]]] = {}
        for x in result["inference_latency"]:
            by.setdefault(x["batch"], {})[x["frozen_encoders"]] = x
        lines += ["", "| batch | every parameter: p50 (ms) | p90 | frozen encoders: p50 (ms) | p90 |", "|---|---|---|---|---|"]
        for b, v in sorted(by.items()):
            lines.append(f"| {b} | {v[False]['p50_ms']:.2f} | {v[False]['p90_ms']:.2f} | "
                         f"{v[True]['p50_ms']:.2f} | {v[True]['p90_ms']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m benchmarks.gpu_table OUT_DIR (the folder benchmarks/gpu_table.sh wrote)")
        return 2
    result = merge(Path(args[0]))
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(tables(result))
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
