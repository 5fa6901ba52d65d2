"""How long a no-change re-run of the smoke pipeline takes (target: <= 10 s), and where the time goes.

    python -m benchmarks.pipeline_rerun                  # a fresh project copy: first run, then re-runs
    python -m benchmarks.pipeline_rerun --reruns 5 --profile 25
    python -m benchmarks.pipeline_rerun --workdir /path/to/a/copy    # a copy that has already run once

Builds a throwaway git + DVC copy of the project (as the integration tests do), runs the smoke
pipeline once on a Prefect test-harness API, then times re-runs with nothing changed: the flow
called in this process, and the `drivevla pipeline` command (a new process: imports, flow run
registration, DVC's checks, artifacts). ``--profile N`` prints the N slowest functions (cumulative)
of one in-process re-run. Prints a Markdown table and writes benchmarks/results/pipeline_rerun.json.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "pipeline_rerun.json"
TARGET_S = 10.0


def _flow_run(repo: Path) -> tuple[float, dict[str, str]]:
    from flows.pipeline import SUMMARY_FILE, pipeline

    t0 = time.perf_counter()
    pipeline(workdir=str(repo))
    seconds = time.perf_counter() - t0
    stages = json.loads((repo / SUMMARY_FILE).read_text())["stages"]
    return seconds, {name: info["status"] for name, info in stages.items()}


def _cli_run(repo: Path) -> float:
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PYTHONPATH=str(repo), PREFECT_API_URL=PREFECT_API_URL.value(), SDL_VIDEODRIVER="dummy",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows", "pipeline"], cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"drivevla pipeline failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return seconds


def _profile(repo: Path, top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    _flow_run(repo)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_rerun", description=__doc__.splitlines()[0])
    parser.add_argument("--reruns", type=int, default=3, help="timed no-change re-runs of each kind")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the N slowest functions")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="an existing git + DVC copy of the project (default: a fresh one in a temp folder)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    from prefect.testing.utilities import prefect_test_harness

    from tests.integration.helpers import make_project_repo

    with tempfile.TemporaryDirectory(prefix="drivevla-rerun-") as tmp, prefect_test_harness(server_startup_timeout=120):
        repo = args.workdir.resolve() if args.workdir else make_project_repo(Path(tmp) / "repo")
        first_s, _ = _flow_run(repo)  # with --workdir: the run that brings it up to date, if needed
        flow_s, statuses = [], {}
        for _ in range(args.reruns):
            seconds, statuses = _flow_run(repo)
            flow_s.append(seconds)
        cli_s = [_cli_run(repo) for _ in range(args.reruns)]
        profile = _profile(repo, args.profile) if args.profile else ""

    ran = sorted(name for name, status in statuses.items() if status != "skipped")
    result = {
        "first_run_s": round(first_s, 2),
        "rerun_flow_s": [round(s, 2) for s in flow_s], "rerun_flow_median_s": round(statistics.median(flow_s), 2),
        "rerun_cli_s": [round(s, 2) for s in cli_s], "rerun_cli_median_s": round(statistics.median(cli_s), 2),
        "stages_rerun": ran, "target_s": TARGET_S,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_1m": os.getloadavg()[0]},
    }
    print("| smoke pipeline, nothing changed | median s | runs (s) |")
    print("|---|---|---|")
    print(f"| first run ({'every stage runs' if not args.workdir else 'existing workspace'}) | {result['first_run_s']} | 1 |")
    print(f"| re-run, flow in this process | {result['rerun_flow_median_s']} | {result['rerun_flow_s']} |")
    print(f"| re-run, `drivevla pipeline` command | {result['rerun_cli_median_s']} | {result['rerun_cli_s']} |")
    print(f"\nstages that ran again: {ran or 'none'}; target <= {TARGET_S} s")
    if profile:
        print("\n" + profile)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
