"""Prefect tasks that run a pipeline stage: through DVC (`dvc repro`) when the workspace is a DVC
repository, so outputs are versioned and unchanged stages are skipped; else by calling the stage's
``run`` directly. Both paths end in the same ``stages.<name>.run``.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from stages.config import load_config


class StageFailed(RuntimeError):
    """A stage's command exited non-zero."""


def stage_module(name: str):
    return importlib.import_module(f"stages.{name}.stage" if name == "data" else f"stages.{name}")


def subprocess_env() -> dict[str, str]:
    """DVC runs ``python -m stages.X`` through the shell: make ``python`` this interpreter."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("SDL_VIDEODRIVER", "dummy")
    return env


def _stream(cmd: list[str], cwd: Path, logger) -> None:
    proc = subprocess.Popen(cmd, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        # tqdm redraws with carriage returns; keep the log readable.
        line = line.rsplit("\r", 1)[-1]
        if line:
            logger.info(line)
            tail = (tail + [line])[-40:]
    if proc.wait() != 0:
        raise StageFailed(f"{' '.join(cmd)} exited with {proc.returncode}:\n" + "\n".join(tail))


@task(name="run-stage", task_run_name="stage-{name}")
def run_stage(name: str, workdir: str = ".", use_dvc: bool = True, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run one stage and return its metrics."""
    logger = get_run_logger()
    cwd = Path(workdir).resolve()
    if use_dvc:
        logger.info("stage %s: dvc repro (skipped if its deps and params are unchanged)", name)
        _stream([sys.executable, "-m", "dvc", "repro", "--single-item", name], cwd, logger)
        cfg = load_config(cwd / "params.yaml")
        metrics_file = cwd / cfg.metrics_dir / f"{name}.json"
        return json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    cfg = load_config(cwd / "params.yaml", overrides=overrides or [])
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        return stage_module(name).run(cfg)["metrics"]
    finally:
        os.chdir(previous)
