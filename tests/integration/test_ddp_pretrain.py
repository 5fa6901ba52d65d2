"""Data-parallel pretraining through torchrun (gloo on CPU): 2 processes, with the embeddings gathered
for the contrastive loss, reproduce 1 process with the same global batch, also in micro-batches; only
rank 0 writes the checkpoint and metrics. And the compiled train step (`pretrain.compile`) trains on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stages.config import build_config
from tests.integration.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
# Odd: the two ranks' shares differ in size (7 and 8), and so do the micro-batches.
BATCH = 15


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Smoke data, built once."""
    from stages.data.stage import run as run_data

    path = tmp_path_factory.mktemp("ddp-pretrain")
    previous = Path.cwd()
    os.chdir(path)
    try:
        run_data(build_config(preset="smoke"))
    finally:
        os.chdir(previous)
    return path


def torchrun(workdir: Path, nproc: int, tag: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SDL_VIDEODRIVER": "dummy"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "stages.pretrain",
           "--params", "none.yaml", "--preset", "smoke", "--set", "pretrain.epochs=2",
           "--set", f"pretrain.batch_size={BATCH}", "--set", f"metrics_dir=metrics-{tag}",
           "--set", f"pretrain.out=checkpoints/pretrain-{tag}"]
    for item in extra:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_processes_match_one_with_the_same_global_batch(workdir):
    runs = {"one": torchrun(workdir, 1, "one"), "two": torchrun(workdir, 2, "two"),
            "two-accum": torchrun(workdir, 2, "two-accum", "pretrain.grad_accum_steps=3")}
    history = {tag: json.loads((workdir / f"metrics-{tag}/pretrain_history.json").read_text()) for tag in runs}
    assert len(history["one"]) == 2
    for tag in ("two", "two-accum"):
        assert len(history[tag]) == 2
        for e1, e2 in zip(history["one"], history[tag]):
            for key in ("loss", "temperature"):
                assert e2[key] == pytest.approx(e1[key], rel=1e-5, abs=1e-6), (tag, key, e1[key], e2[key])
        # The weights, not only the loss, are the one process's: to well within one step of the
        # learning rate (5e-4), which AdamW takes even on a gradient of rounding noise's size.
        want = load_file(str(workdir / "checkpoints/pretrain-one/model.safetensors"))
        got = load_file(str(workdir / f"checkpoints/pretrain-{tag}/model.safetensors"))
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=2e-4, msg=f"{tag}: {name}")
    # The checkpoint is written once, by rank 0, and records the world size.
    for tag, proc in runs.items():
        assert (proc.stdout + proc.stderr).count("saved DrivingVLA") == 1, tag
        facts = json.loads((workdir / f"checkpoints/pretrain-{tag}/training.json").read_text())
        assert facts["world_size"] == (1 if tag == "one" else 2)
    assert not list(workdir.glob("runs/pretrain/resume.pt"))


@pytest.mark.slow   # ~70 s on 2 shared cores with a cold inductor cache (15 s warm): compilation
def test_compiled_step_trains_like_the_eager_one(workdir):
    """``torch.compile`` of the encoders (on by default on CUDA only) gives the eager step's losses."""
    torchrun(workdir, 1, "eager", "pretrain.epochs=1", "pretrain.compile=false")
    compiled = torchrun(workdir, 1, "compiled", "pretrain.epochs=1", "pretrain.compile=true")
    h1 = json.loads((workdir / "metrics-eager/pretrain_history.json").read_text())
    h2 = json.loads((workdir / "metrics-compiled/pretrain_history.json").read_text())
    assert h2[0]["loss"] == pytest.approx(h1[0]["loss"], rel=1e-4)
    assert h2[0]["temperature"] == pytest.approx(h1[0]["temperature"], rel=1e-4)
    assert "saved DrivingVLA" in compiled.stdout + compiled.stderr
