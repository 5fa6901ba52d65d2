"""What the integration tests share: throwaway copies of the project (git + DVC repos in tmp dirs),
killing a run at a chosen point, and scoring a policy on Pendulum."""
from __future__ import annotations

import os
import shutil
import socket
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CODE = ("flows", "tasks", "stages", "models", "infra")
FILES = ("dvc.yaml", ".dvcignore")


def venv_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["SDL_VIDEODRIVER"] = "dummy"
    env["PYTHONPATH"] = ""
    env.update(extra)
    return env


def sh(cmd: list[str], cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=venv_env(**extra), capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def make_project_repo(dest: Path, params: dict | None = None) -> Path:
    """A git repository holding the project's code, dvc.yaml and a params.yaml, with DVC initialised."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in CODE:
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    for name in FILES:
        shutil.copy2(ROOT / name, dest / name)
    if params is None:
        # The repository's params.yaml lists every section dvc.yaml tracks (DVC refuses a missing one).
        params = {**(yaml.safe_load((ROOT / "params.yaml").read_text()) or {}), "preset": "smoke"}
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / ".gitignore").write_text("__pycache__/\nruns/\n.dvc-storage/\n")
    sh(["git", "init", "-q"], dest)
    sh(["git", "config", "user.email", "test@drivevla.org"], dest)
    sh(["git", "config", "user.name", "drivevla tests"], dest)
    sh([sys.executable, "-m", "dvc", "init", "-q"], dest)
    sh([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], dest)
    sh([sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(dest / ".dvc-storage")], dest)
    sh(["git", "add", "-A"], dest)
    sh(["git", "commit", "-q", "-m", "project"], dest)
    return dest


def free_port() -> int:
    """A TCP port nobody listens on now (for a torchrun rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float, poll: float = 0.1) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; fail if it ends first or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ready():
                break
            time.sleep(poll)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read() if proc.stdout else ''}"
        assert ready(), f"the run did not get to the kill point within {timeout} s"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


def pendulum_return(act: Callable, seeds: Iterable[int]) -> float:
    """Mean return over Pendulum-v1 episodes seeded ``seeds`` of ``act``: a batch of one observation
    (float32 tensor) to a batch of one action (the deterministic policy)."""
    import gymnasium as gym
    import numpy as np
    import torch

    env = gym.make("Pendulum-v1")
    returns = []
    with torch.no_grad():
        for seed in seeds:
            obs, _ = env.reset(seed=seed)
            total, done = 0.0, False
            while not done:
                action = act(torch.as_tensor(obs[None], dtype=torch.float32))[0].numpy()
                obs, reward, terminated, truncated, _ = env.step(action)
                total, done = total + float(reward), terminated or truncated
            returns.append(total)
    env.close()
    return float(np.mean(returns))
