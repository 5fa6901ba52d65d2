"""Closed-loop quality of the stage-2 (imitation) policy over several seeds, beside the expert's.

For each seed, the benchmark trains stage 2 as the pipeline does — by default the data stage
(recordings and dataset of that seed), pretrain and offline; ``--stages offline`` retrains only
offline on the seed-0 dataset and pretrain checkpoint — and drives the policy (deterministic) on
the same held-out episodes: seeds ``EVAL_SEED + i``, the online stage's held-out seeds for run seed
0 (its "before" figures), far from every data seed. Per seed and pooled over the seeds (mean and
spread): route completion, collision and off-road rates, their sum (the failure rate), routes
completed, driving score, and the stage times. ``--expert`` adds the scripted expert's row on the
same episodes; ``--checkpoint`` drives an existing checkpoint instead of training.

Results accumulate, keyed by ``--label``, in ``benchmarks/results/stage2_closed_loop.json``;
``--table`` prints the markdown table of every label (docs/data-and-offline.md holds it).

    python -m benchmarks.stage2_closed_loop --label after --seeds 0 1 2 --expert
    python -m benchmarks.stage2_closed_loop --label before --seeds 0
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

RESULTS = Path("benchmarks/results/stage2_closed_loop.json")
EVAL_SEED = 1_000_000          # stages.online.EVAL_SEED_OFFSET + run seed 0
STAGES = ("data", "pretrain", "offline")
FAILURES = ("collision", "off_road", "off_route")

log = logging.getLogger("stage2_closed_loop")


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    """Stages write a few files relative to the working directory (plots, resume points)."""
    old = Path.cwd()
    path.mkdir(parents=True, exist_ok=True)
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def seed_config(preset: str, seed: int, overrides: list[str], root: Path, shared: Path | None):
    """The pipeline config of one seed, every output under ``root`` (the dataset and pretrain
    checkpoint under ``shared`` when only offline is retrained)."""
    from stages.config import build_config

    data_root = (shared or root).resolve()
    paths = [f"data.out={data_root}/data/sim", f"data.nuscenes_out={data_root}/data/nuscenes-sim",
             f"data.built={data_root}/data/train", f"pretrain.out={data_root}/checkpoints/pretrain",
             f"offline.out={root.resolve()}/checkpoints/offline", f"metrics_dir={root.resolve()}/metrics"]
    return build_config(preset=preset, overrides=[f"seed={seed}", *paths, *overrides])


def train_stage2(cfg, stages: tuple[str, ...], root: Path) -> dict[str, float]:
    """Run ``stages`` in order for ``cfg``; return each one's wall time (s)."""
    import importlib

    times = {}
    for name in stages:
        done = {"pretrain": cfg.pretrain.out, "offline": cfg.offline.out}.get(name)
        if done is not None and (Path(done) / "training.json").is_file():
            log.info("seed %d: %s already trained in %s", cfg.seed, name, done)   # a rerun after a time-out
            continue
        module = importlib.import_module("stages.data.stage" if name == "data" else f"stages.{name}")
        t0 = time.perf_counter()
        with _cwd(root):
            module.run(cfg)
        times[name] = round(time.perf_counter() - t0, 1)
        log.info("seed %d: %s took %.0f s", cfg.seed, name, times[name])
    return times


class ExpertPolicy(torch.nn.Module):
    """The scripted expert behind the model interface `rollout_policy` drives (``act``, ``tokenize``)."""

    def __init__(self, env: Any) -> None:
        super().__init__()
        from stages.envs import ExpertDriver

        self.env, self.expert = env, ExpertDriver()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.zeros(len(texts), 1, dtype=torch.long)

    def act(self, image, state, tokens, deterministic: bool = True):
        action = torch.as_tensor(self.expert.act(self.env))[None]
        return action, torch.zeros(1), torch.zeros(1)


def drive(model: Any, env_cfg, episodes: int, expert: bool = False) -> dict[str, Any]:
    """Drive ``episodes`` held-out episodes; the figures and the per-episode records."""
    from stages.envs import make_env
    from stages.metrics.driving_score import summarise
    from stages.rl.evaluation import rollout_policy, torch_threads

    env = make_env(env_cfg, seed=EVAL_SEED)
    try:
        policy = ExpertPolicy(env) if expert else model
        with torch_threads(1):
            runs = [rollout_policy(policy, env, EVAL_SEED + i, True, "cpu") for i in range(episodes)]
    finally:
        env.close()
    reasons = [r["done_reason"] for r in runs]
    collision = np.array([r["collision"] for r in runs])
    off_road = np.array([d in ("off_road", "off_route") for d in reasons]) & ~collision
    rc = np.array([r["route_completion"] for r in runs])
    summary = summarise(runs)
    return {
        "episodes": episodes,
        "route_completion": float(rc.mean()),
        "collision_rate": float(collision.mean()),
        "off_road_rate": float(off_road.mean()),
        "failure_rate": float((collision | off_road).mean()),
        "completed_rate": float((rc >= 0.999).mean()),
        "driving_score": float(summary["driving_score"]),
        "mean_speed": float(summary["mean_speed"]),
        "done_reasons": summary["done_reasons"],
        "route_completion_per_episode": [round(float(x), 4) for x in rc],
    }


KEYS = ("route_completion", "failure_rate", "collision_rate", "off_road_rate", "completed_rate", "driving_score")


def pooled(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, spread (population std) and range over the seeds of each figure."""
    out: dict[str, Any] = {"seeds": [r["seed"] for r in rows]}
    for k in KEYS:
        v = np.array([r[k] for r in rows], dtype=float)
        out[k] = {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}
    return out


def load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"eval_seed": EVAL_SEED, "labels": {}}


def save_label(path: Path, label: str, entry: dict[str, Any]) -> None:
    from stages.common import write_json

    results = load_results(path)
    results["labels"][label] = entry
    write_json(path, results)


def table(results: dict[str, Any]) -> str:
    lines = ["| policy | seed | route completion | collision + off-road | collision | off-road | "
             "completed | driving score |", "|---|---|---|---|---|---|---|---|"]
    for label, entry in results["labels"].items():
        rows = entry["rows"]
        for r in rows:
            lines.append(f"| {label} | {r['seed']} | {r['route_completion']:.3f} | {r['failure_rate']:.2f} | "
                         f"{r['collision_rate']:.2f} | {r['off_road_rate']:.2f} | {r['completed_rate']:.2f} | "
                         f"{r['driving_score']:.3f} |")
        if len(rows) > 1:
            p = entry["pooled"]
            cell = lambda k, f: f"{p[k]['mean']:{f}} ± {p[k]['std']:{f}}"  # noqa: E731
            lines.append(f"| **{label}, pooled** | {len(rows)} seeds | {cell('route_completion', '.3f')} | "
                         f"{cell('failure_rate', '.2f')} | {cell('collision_rate', '.2f')} | "
                         f"{cell('off_road_rate', '.2f')} | {cell('completed_rate', '.2f')} | "
                         f"{cell('driving_score', '.3f')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="stage2", help="the name of this row group in the results")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="none: only --expert")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--episodes", type=int, default=50, help="held-out episodes per policy")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="what each seed trains: data,pretrain,offline (default) or offline "
                             "(on the seed-0 dataset and pretrain checkpoint under --workdir/shared)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-stage2"))
    parser.add_argument("--data-from", default=None, metavar="DIR",
                        help="each seed's dataset and pretrain checkpoint under DIR (a pattern with {seed}), "
                             "made there by the data / pretrain stages if --stages names them")
    parser.add_argument("--checkpoint", type=Path, default=None, help="drive this checkpoint (no training)")
    parser.add_argument("--expert", action="store_true", help="also drive the scripted expert (label 'expert')")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads while training")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table", action="store_true", help="print the table of the results file and exit")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.table:
        print(table(load_results(args.out)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    from models import DrivingVLA

    stages = tuple(s for s in args.stages.split(",") if s)
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"--stages: unknown {sorted(unknown)}; choose from {STAGES}")
    shared = None
    if args.data_from is None and stages == ("offline",):
        shared = args.workdir / "shared"
        if not (shared / "checkpoints" / "pretrain" / "config.json").is_file():
            cfg0 = seed_config(args.preset, 0, args.overrides, shared, None)
            train_stage2(cfg0, ("data", "pretrain"), shared)
    rows = []
    for seed in args.seeds:
        root = args.workdir / f"{args.label}-seed{seed}"
        data_root = Path(args.data_from.format(seed=seed)) if args.data_from else shared
        cfg = seed_config(args.preset, seed, args.overrides, root, data_root)
        times: dict[str, float] = {}
        if args.checkpoint is None:
            times = train_stage2(cfg, stages, root)
        if args.checkpoint is None and "offline" not in stages:
            continue                      # only preparing the data / pretrain checkpoint of this seed
        ckpt = args.checkpoint or Path(cfg.offline.out)
        model = DrivingVLA.from_pretrained(ckpt)
        t0 = time.perf_counter()
        row = {"seed": seed, **drive(model, cfg.env, args.episodes), "stage_seconds": times,
               "eval_seconds": round(time.perf_counter() - t0, 1)}
        log.info("%s seed %d: route completion %.3f, failures %.2f (collision %.2f, off-road %.2f), DS %.3f",
                 args.label, seed, row["route_completion"], row["failure_rate"], row["collision_rate"],
                 row["off_road_rate"], row["driving_score"])
        rows.append(row)
        save_label(args.out, args.label, {"preset": args.preset, "stages": list(stages), "overrides": args.overrides,
                                          "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                                          "rows": rows, "pooled": pooled(rows)})
    if args.expert:
        cfg = seed_config(args.preset, 0, args.overrides, args.workdir / "expert", None)
        row = {"seed": "-", **drive(None, cfg.env, args.episodes, expert=True)}
        save_label(args.out, "expert", {"preset": args.preset, "rows": [row], "pooled": pooled([{**row, "seed": 0}])})
    print(table(load_results(args.out)))


if __name__ == "__main__":
    main()
