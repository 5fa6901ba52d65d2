"""Does the policy follow its text command? Command following per command, the counterfactual rate and
the scripted expert's ceiling, on held-out seeds.

    python -m benchmarks.language                                    # the expert alone (the ceiling)
    python -m benchmarks.language --checkpoint demo=checkpoints/online --seeds 10
    python -m benchmarks.language --checkpoint a=ckpt/a --checkpoint b=ckpt/b --scenarios highway,urban

Every seed of every scenario is driven once per command that decides the manoeuvre (urban: turn left /
go straight / turn right; highway: change to the left / right lane, follow the lane; roundabout: the
first / second / third exit; merge), the command chosen at reset, by the expert and by each checkpoint
(see stages/evaluate_commands.py; the judge is stages/metrics/commands.py). Prints a Markdown table and
writes benchmarks/results/language.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from models import DrivingVLA
from stages.common import torch_threads
from stages.envs import SCENARIOS as ALL_SCENARIOS, EnvConfig
from stages.evaluate_commands import command_scenarios, drive_commands, expert_driver, model_driver
from stages.metrics.commands import summarise

RESULTS = Path(__file__).resolve().parent / "results" / "language.json"
SCENARIOS = ("highway", "urban", "roundabout", "merge")
SEED_OFFSET = 2_000_000          # the evaluate stage's held-out seeds


def _fmt(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.2f}"


def format_table(results: dict[str, Any]) -> str:
    names = list(results["drivers"])
    head = ["scenario", "command"] + [f"{n} ({results['drivers'][n]['episodes']} ep)" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = results["drivers"][names[0]]
    for scenario, commands in first["by_scenario"].items():
        for command in commands:
            row = [scenario, command] + [_fmt(results["drivers"][n]["by_scenario"].get(scenario, {}).get(command))
                                         for n in names]
            lines.append("| " + " | ".join(row) + " |")
    for key, label in (("command_following_rate", "**all commands**"),
                       ("counterfactual_rate", "**counterfactual: both of a same-seed pair followed**"),
                       ("counterfactual_differs", "counterfactual: the pair's manoeuvres differ at all")):
        lines.append("| " + " | ".join(["", label] + [_fmt(results["drivers"][n][key]) for n in names]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.language", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR",
                        help="a save_pretrained folder to drive (repeatable)")
    parser.add_argument("--seeds", type=int, default=10, help="held-out seeds per scenario")
    parser.add_argument("--seed", type=int, default=0, help="the config seed (seeds are seed + 2,000,000 + i)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--no-expert", action="store_true", help="skip the expert's ceiling")
    parser.add_argument("--sample", action="store_true", help="sample the policy's actions (default: its mode)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (one observation at a time: "
                                                                 "more threads only contend on a busy machine)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    scenarios = [s for s in args.scenarios.split(",") if s]
    if command_scenarios(scenarios) != scenarios:
        parser.error(f"--scenarios {args.scenarios}: each needs a command to choose, one of "
                     f"{command_scenarios(ALL_SCENARIOS)}")
    seeds = [args.seed + SEED_OFFSET + i for i in range(args.seeds)]
    runs: list[tuple[str, Any, EnvConfig]] = []
    if not args.no_expert:
        runs.append(("expert", expert_driver(), EnvConfig()))
    for spec in args.checkpoint:
        name, _, path = spec.partition("=")
        if not path:
            parser.error(f"--checkpoint {spec}: write NAME=DIR")
        model = DrivingVLA.from_pretrained(path).eval()
        runs.append((name, model_driver(model, "cpu", not args.sample),
                     EnvConfig(image_size=model.config.image_size)))
    if not runs:
        parser.error("nothing to drive: give --checkpoint or drop --no-expert")

    results: dict[str, Any] = {"seeds": seeds, "scenarios": scenarios, "deterministic": not args.sample,
                               "checkpoints": dict(s.partition("=")[::2] for s in args.checkpoint),
                               "drivers": {}, "seconds": {}, "episodes": {}}
    for name, driver, env_cfg in runs:
        t0 = time.perf_counter()
        with torch_threads(args.threads):
            records = drive_commands(env_cfg, driver, scenarios, seeds)
        results["seconds"][name] = round(time.perf_counter() - t0, 1)
        results["drivers"][name] = summarise(list(records.values()))
        results["episodes"][name] = list(records.values())
        print(f"{name}: {len(records)} episodes in {results['seconds'][name]} s", flush=True)
        # Written after every driver: a long run stopped half-way keeps what it measured.
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(format_table(results))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
