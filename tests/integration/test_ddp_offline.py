"""Data-parallel offline training through torchrun (gloo on CPU): 2 processes reproduce 1 process
with the same global batch, also in micro-batches, and only rank 0 writes the checkpoint and metrics."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.config import build_config
from tests.integration.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Smoke data and a pretrained checkpoint, made once."""
    from stages.data.stage import run as run_data
    from stages.pretrain import run as run_pretrain

    path = tmp_path_factory.mktemp("ddp")
    previous = Path.cwd()
    os.chdir(path)
    try:
        cfg = build_config(preset="smoke")
        run_data(cfg)
        run_pretrain(cfg)
    finally:
        os.chdir(previous)
    return path


def torchrun(workdir: Path, nproc: int, tag: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SDL_VIDEODRIVER": "dummy"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "stages.offline",
           "--params", "none.yaml", "--preset", "smoke", "--set", "offline.epochs=2",
           "--set", f"metrics_dir=metrics-{tag}", "--set", f"offline.out=checkpoints/offline-{tag}"]
    for item in extra:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_processes_match_one_with_the_same_global_batch(workdir):
    one = torchrun(workdir, 1, "one")
    two = torchrun(workdir, 2, "two")
    # Each rank's share (8) in two micro-batches of 4: masked means weighted over both.
    accum = torchrun(workdir, 2, "two-accum", "offline.grad_accum_steps=2")
    h1 = json.loads((workdir / "metrics-one/offline_history.json").read_text())
    for tag in ("two", "two-accum"):
        h2 = json.loads((workdir / f"metrics-{tag}/offline_history.json").read_text())
        assert len(h1) == len(h2) == 2
        for e1, e2 in zip(h1, h2):
            for key in ("train_control_nll", "train_trajectory", "train_trajectory_l2_m", "train_value_loss"):
                assert e2[key] == pytest.approx(e1[key], rel=1e-3, abs=1e-4), (tag, key, e1[key], e2[key])
    # The checkpoint is written once, by rank 0, and records the world size.
    for proc in (one, two, accum):
        assert (proc.stdout + proc.stderr).count("saved DrivingVLA") == 1
    facts = json.loads((workdir / "checkpoints/offline-two/training.json").read_text())
    assert facts["world_size"] == 2
