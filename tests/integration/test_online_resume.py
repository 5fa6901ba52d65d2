"""A killed online stage resumes at its saved step count and keeps learning to the same total."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from stages.checkpoint import read_state
from stages.config import build_config
from tests.integration.helpers import kill_when
from stages.training import model_config

ROOT = Path(__file__).resolve().parents[2]
TOTAL = 512
ARGS = ["--preset", "smoke", "--set", f"online.total_timesteps={TOTAL}", "--set", "online.eval_episodes=2",
        "--set", "online.ppo.num_steps=32", "--set", "online.ppo.batch_size=16", "--set", "online.ppo.num_epochs=1"]


def _stage(cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "SDL_VIDEODRIVER": "dummy", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "stages.online", "--params", "none.yaml", *ARGS], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _load(path: Path) -> dict:
    return read_state(path)  # plain data: read without unpickling code


def test_killed_online_run_resumes_at_the_saved_step_and_finishes(tmp_path):
    cfg = build_config(preset="smoke")
    from models import DrivingVLA

    torch.manual_seed(0)
    DrivingVLA(model_config(cfg)).save_pretrained(tmp_path / cfg.offline.out)
    ckpt = tmp_path / "runs" / "online" / "checkpoint.pt"

    first = _stage(tmp_path)
    kill_when(first, lambda: ckpt.exists() and _load(ckpt)["updates"] >= 3, timeout=240, poll=0.2)
    killed_at = _load(ckpt)
    shutil.copy(ckpt, tmp_path / "at-kill.pt")
    assert 0 < killed_at["global_step"] < TOTAL
    assert not (tmp_path / "metrics" / "online.json").exists()

    second = _stage(tmp_path)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out
    assert f"resumed at step {killed_at['global_step']}" in out

    final = _load(ckpt)
    assert final["global_step"] == TOTAL
    assert final["updates"] == TOTAL // 32
    # Training went on from the killed run's weights: they changed after the resume.
    assert any(not torch.equal(final["model"][k], v) for k, v in killed_at["model"].items())
    import json

    metrics = json.loads((tmp_path / "metrics" / "online.json").read_text())
    assert metrics["timesteps"] == TOTAL
