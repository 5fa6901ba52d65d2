"""Stages 1 and 2 resume after being killed: run a stage in a subprocess, kill it once its first epoch
is saved, run it again and check that it continues from that epoch and finishes."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stages.checkpoint import read_state
from tests.integration.helpers import ROOT, venv_env

SMALL = ["env.max_episode_steps=45", "data.episodes=4"]


def _cmd(stage: str, extra: list[str]) -> list[str]:
    args = [sys.executable, "-m", f"stages.{stage}", "--preset", "smoke", "--params", "none.yaml"]
    for item in [*SMALL, *extra]:
        args += ["--set", item]
    return args


def _env() -> dict[str, str]:
    # One torch thread: the test measures resumption, not speed, and the machine may be shared.
    return venv_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    pytest.importorskip("highway_env")
    work = tmp_path_factory.mktemp("stage12")
    proc = subprocess.run(_cmd("data", []), cwd=work, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


def _kill_after_first_epoch(stage: str, work: Path, extra: list[str]) -> int:
    """Start ``stage``, wait for its resume file, kill it; return the epoch the file holds."""
    resume = work / "runs" / stage / "resume.pt"
    proc = subprocess.Popen(_cmd(stage, extra), cwd=work, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not resume.exists():
            assert proc.poll() is None, f"{stage} exited ({proc.returncode}) before saving an epoch"
            assert time.monotonic() < deadline, f"{stage} saved no epoch within 240 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    saved = read_state(resume)["epoch"]
    assert 1 <= saved, saved
    return saved


@pytest.mark.parametrize("stage,epochs", [("pretrain", 4), ("offline", 4)])
def test_stage_resumes_from_its_last_saved_epoch(workdir, stage, epochs):
    extra = [f"{stage}.epochs={epochs}"]
    if stage == "offline":
        assert (workdir / "checkpoints/pretrain/config.json").exists(), "run after the pretrain case"
    saved = _kill_after_first_epoch(stage, workdir, extra)
    if saved >= epochs:
        pytest.fail(f"{stage} finished all {epochs} epochs before it could be killed; raise the epoch count")
    before = read_state(workdir / "runs" / stage / "resume.pt")["history"]
    proc = subprocess.run(_cmd(stage, extra), cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming after epoch {saved} of {epochs}" in proc.stderr
    history = json.loads((workdir / "metrics" / f"{stage}_history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert history[:saved] == json.loads(json.dumps(before))   # the saved epochs are kept, not redone
    # Only the remaining epochs ran in the second process (each logs "<stage> epoch N: ...").
    ran = [int(n) for n in re.findall(rf"{stage} epoch (\d+): ", proc.stderr)]
    assert ran == list(range(saved + 1, epochs + 1))
    assert not (workdir / "runs" / stage / "resume.pt").exists()
    assert (workdir / "checkpoints" / stage / "model.safetensors").exists()


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "code ran")


@pytest.mark.parametrize("content", ["garbage", "pickled code"])
def test_a_corrupt_resume_state_is_moved_aside_and_the_stage_runs_from_scratch(workdir, tmp_path, content):
    """``runs/pretrain/resume.pt`` unreadable (garbage bytes) or holding a pickled object that would
    run code: the stage warns, keeps the file as ``resume.pt.corrupt``, runs from epoch 1 and finishes."""
    work = tmp_path / "work"
    shutil.copytree(workdir / "data", work / "data")
    resume = work / "runs" / "pretrain" / "resume.pt"
    resume.parent.mkdir(parents=True)
    marker = tmp_path / "marker"
    if content == "garbage":
        resume.write_bytes(b"\x00\x17not a torch file" * 50)
    else:
        torch.save({"format": 2, "key": None, "state": {"epoch": 1, "x": _RunsCode(marker)}}, resume)
    proc = subprocess.run(_cmd("pretrain", ["pretrain.epochs=1"]), cwd=work, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "runs/pretrain/resume.pt" in proc.stderr and "moved it to runs/pretrain/resume.pt.corrupt" in proc.stderr
    assert (work / "runs" / "pretrain" / "resume.pt.corrupt").is_file() and not resume.exists()
    assert not marker.exists()
    assert re.findall(r"pretrain epoch (\d+): ", proc.stderr) == ["1"]
    assert (work / "checkpoints" / "pretrain" / "model.safetensors").is_file()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_upstream_checkpoint_stops_the_stage_with_the_file_named(workdir, tmp_path, damage):
    """The offline stage on a damaged ``checkpoints/pretrain/model.safetensors``: exit 1, one line naming
    the file and how to get it back, no traceback; the previous offline checkpoint is left as it was."""
    work = tmp_path / "work"
    shutil.copytree(workdir / "data", work / "data")
    from models import DrivingVLA
    from stages.config import build_config
    from stages.training import model_config

    DrivingVLA(model_config(build_config(preset="smoke", overrides=SMALL))).save_pretrained(
        work / "checkpoints" / "pretrain")
    weights = work / "checkpoints" / "pretrain" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000] if damage == "truncated" else b"garbage" * 100)
    earlier = work / "checkpoints" / "offline"
    earlier.mkdir(parents=True)
    (earlier / "model.safetensors").write_bytes(b"the previous offline output")
    proc = subprocess.run(_cmd("offline", ["offline.epochs=1"]), cwd=work, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and str(weights.relative_to(work)) in error
    assert "re-run the stage" in error and "dvc checkout" in error
    assert (earlier / "model.safetensors").read_bytes() == b"the previous offline output"


def test_dagger_rounds_join_the_data_and_the_best_driving_epoch_is_kept(workdir, tmp_path):
    assert (workdir / "checkpoints/pretrain/config.json").exists(), "run after the pretrain case"
    work = tmp_path / "w"
    shutil.copytree(workdir, work, ignore=shutil.ignore_patterns("runs"))
    extra = ["offline.epochs=3", "offline.dagger_rounds=1", "offline.dagger_start_epoch=1",
             "offline.dagger_episodes=2", "offline.select_episodes=2", "offline.select_from_epoch=2"]
    proc = subprocess.run(_cmd("offline", extra), cwd=work, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The round was recorded before epoch 2, from the learner's drives, and trained on.
    index = json.loads((work / "data/dagger/index.json").read_text())
    assert index["round_epochs"] == [1]
    round_manifest = json.loads((work / "data/dagger/round-00/manifest.json").read_text())
    assert len(round_manifest["episodes"]) == 2 and all(e["perturbed"] for e in round_manifest["episodes"])
    # Epochs 2 and 3 were driven on the validation episodes; the model written is the better of them.
    history = json.loads((work / "metrics/offline_history.json").read_text())
    scores = {h["epoch"]: h["val_closed_loop_route_completion"] for h in history if "val_closed_loop_route_completion" in h}
    assert sorted(scores) == [2, 3]
    metrics = json.loads((work / "metrics/offline.json").read_text())
    best = max(scores, key=lambda e: (scores[e], -e))
    assert metrics["selected_epoch"] == best and metrics["val_closed_loop_route_completion"] == scores[best]
