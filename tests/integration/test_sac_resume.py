"""A SAC run killed with SIGKILL resumes from its last checkpoint at the saved step count, runs to
the same total, and the resumed learner keeps learning (Pendulum-v1, the MLP actor).

The run itself is this file executed as a script (``python test_sac_resume.py SAVE_DIR TOTAL``),
so the test can kill a real process between two checkpoints."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

from stages.checkpoint import read_state
from tests.integration.helpers import kill_when, pendulum_return

ROOT = Path(__file__).resolve().parents[2]
TOTAL = 5000
LEARNING_STARTS = 500
CHECKPOINT_EVERY = 500
KILL_AFTER = 1500  # steps in the checkpoint before the kill: early, the policy is still poor


def _config():
    from stages.rl.configs import SACConfig

    # rl-zoo's Pendulum settings with 64-unit networks and batch 128: ~-150 by 5000 steps.
    return SACConfig(learning_rate=1e-3, gamma=0.98, tau=0.02, batch_size=128, buffer_size=100_000,
                     learning_starts=LEARNING_STARTS, q_hidden_dim=64)


def _trainer():
    import gymnasium as gym

    from stages.rl.sac import SACTrainer
    from stages.rl.sac_networks import MLPActor

    torch.manual_seed(0)
    env = gym.make("Pendulum-v1")
    return SACTrainer(MLPActor.for_env(env, hidden_dim=64), env, _config(), seed=0)


def run(save_dir: str, total: int) -> None:
    """The training run the test starts (and kills, and starts again)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")
    torch.set_num_threads(1)
    trainer = _trainer()
    trainer.log_interval = 250
    trainer.train(total, save_dir=save_dir, checkpoint_every_steps=CHECKPOINT_EVERY)
    print(f"finished at step {trainer.global_step} after {trainer.updates} updates", flush=True)


def _start(save_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, __file__, str(save_dir), str(TOTAL)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _load(path: Path) -> dict:
    return read_state(path)  # plain data: read without unpickling code


def _evaluate(state: dict, seeds=range(100, 104)) -> float:
    """Mean return of the deterministic policy of a saved state."""
    trainer = _trainer()
    trainer.model.load_state_dict(state["model"])
    return pendulum_return(lambda obs: trainer.model.act(obs, deterministic=True), seeds)


def test_killed_sac_run_resumes_at_the_checkpoint_and_keeps_learning(tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    first = _start(tmp_path)
    kill_when(first, lambda: ckpt.exists() and _load(ckpt)["global_step"] >= KILL_AFTER, timeout=120, poll=0.05)
    killed = _load(ckpt)
    killed_at = killed["global_step"]
    assert KILL_AFTER <= killed_at < TOTAL and killed_at % CHECKPOINT_EVERY == 0
    assert "buffer" in killed and killed["buffer"]["touched"] > 0  # a small buffer travels with it
    logged_before = max(p["step"] for p in map(json.loads, (tmp_path / "scalars.jsonl").read_text().splitlines()))

    second = _start(tmp_path)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    assert f"resumed at step {killed_at} " in out, out[-3000:]
    assert f"finished at step {TOTAL}" in out

    final = _load(ckpt)
    assert final["global_step"] == TOTAL
    # Updates neither lost nor repeated across the kill: one per env step from learning_starts on.
    assert final["updates"] == TOTAL - LEARNING_STARTS + 1
    # The scalars go on from where the killed run was (appended to the same file) up to the total.
    steps = [p["step"] for p in map(json.loads, (tmp_path / "scalars.jsonl").read_text().splitlines())]
    assert max(steps) == TOTAL and logged_before < TOTAL
    # The resumed run learned: its policy is far better than the one it resumed from.
    before, after = _evaluate(killed), _evaluate(final)
    print(f"\ndeterministic return at the kill (step {killed_at}): {before:.0f}; at step {TOTAL}: {after:.0f}")
    assert after > before + 300 and after > -600


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
