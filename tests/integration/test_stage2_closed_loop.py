"""A small-budget stage 2 keeps the road: data, pretrain and offline on a fixed seed, then the policy
drives held-out episodes and must complete most of its routes without leaving the road. The budget
is a few minutes on one core; the thresholds sit below what this config reached (docs/data-and-offline.md,
"Closed loop") and above a policy that drifts off the road."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.integration.helpers import ROOT, venv_env

SMALL = ["env.max_episode_steps=100", "data.episodes=12", "data.waypoint_stride=2", "model.trajectory_length=5",
         "pretrain.epochs=1", "offline.epochs=6", "offline.ego_mlp_epochs=2"]
EPISODES = 10
MIN_ROUTE_COMPLETION = 0.7
MAX_OFF_ROAD_RATE = 0.2


@pytest.mark.slow
def test_small_stage2_keeps_the_road(tmp_path):
    pytest.importorskip("highway_env")
    env = venv_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for stage in ("data", "pretrain", "offline"):
        args = [sys.executable, "-m", f"stages.{stage}", "--preset", "smoke", "--params", "none.yaml"]
        for item in SMALL:
            args += ["--set", item]
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{stage}: {proc.stderr[-3000:]}"
    assert (tmp_path / "data" / "dagger" / "index.json").is_file()     # the DVC output, also without rounds

    from models import DrivingVLA
    from stages.config import build_config
    from stages.envs import make_env
    from stages.rl.evaluation import rollout_policy, torch_threads

    cfg = build_config(preset="smoke", overrides=SMALL)
    model = DrivingVLA.from_pretrained(tmp_path / "checkpoints" / "offline")
    drive_env = make_env(cfg.env, seed=1_000_000)
    with torch_threads(1):
        runs = [rollout_policy(model, drive_env, 1_000_000 + i) for i in range(EPISODES)]
    drive_env.close()
    completion = float(np.mean([r["route_completion"] for r in runs]))
    off_road = float(np.mean([r["done_reason"] in ("off_road", "off_route") for r in runs]))
    assert completion >= MIN_ROUTE_COMPLETION, (completion, [r["done_reason"] for r in runs])
    assert off_road <= MAX_OFF_ROAD_RATE, (off_road, [r["done_reason"] for r in runs])
