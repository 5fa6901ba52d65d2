"""Data-parallel SAC through torchrun (2 gloo processes on the CPU): each rank steps its own
Pendulum env into its own replay buffer, the averaged gradients keep the parameters identical on
both ranks, rank 0 alone writes the checkpoint (with both ranks' buffers), and a second launch
resumes from it on both ranks.

The ranks run this file as a script (``torchrun ... test_ddp_sac.py OUT_DIR TOTAL``)."""
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
FIRST, SECOND = 400, 600  # env steps of both ranks together
LEARNING_STARTS = 100


def run(out_dir: str, total: int) -> None:
    """One rank's training run."""
    import gymnasium as gym

    from stages.accel import distributed
    from stages.rl.checkpoint import TrainingCheckpoint
    from stages.rl.configs import SACConfig
    from stages.rl.sac import SACTrainer
    from stages.rl.sac_networks import MLPActor

    torch.set_num_threads(1)
    out = Path(out_dir)
    with distributed("cpu") as dist:
        save = TrainingCheckpoint.save

        def save_and_say(self, state):  # which rank writes the checkpoint file
            print(f"rank {dist.rank} wrote the checkpoint at step {state['global_step']}", flush=True)
            return save(self, state)

        TrainingCheckpoint.save = save_and_say
        # Different initial weights on the ranks: the trainer starts them all from rank 0's.
        torch.manual_seed(dist.rank)
        env = gym.make("Pendulum-v1")
        config = SACConfig(learning_rate=1e-3, gamma=0.98, tau=0.02, batch_size=64, buffer_size=10_000,
                           learning_starts=LEARNING_STARTS, q_hidden_dim=32)
        trainer = SACTrainer(MLPActor.for_env(env, hidden_dim=32), env, config, seed=0, dist=dist)
        trainer.log_interval = 100
        trainer.train(total, save_dir=out / "run", checkpoint_every_steps=200)
        torch.save({"model": trainer.model.state_dict(), "critic": trainer.critic.state_dict(),
                    "critic_target": trainer.critic_target.state_dict(), "log_alpha": trainer.log_alpha.detach(),
                    "global_step": trainer.global_step, "updates": trainer.updates,
                    "first_states": trainer.buffer._online.states[:8].copy(),
                    "online_size": trainer.buffer.online_size},
                   out / f"rank{dist.rank}-{total}.pt")


def _torchrun(out: Path, total: int) -> str:
    from tests.integration.helpers import free_port  # here: the ranks run this file as a script

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), __file__, str(out), str(total)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _assert_same(a: dict, b: dict) -> None:
    for part in ("model", "critic", "critic_target"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert torch.equal(a["log_alpha"], b["log_alpha"])


def test_two_ranks_keep_identical_parameters_and_rank0_alone_checkpoints(tmp_path):
    out = _torchrun(tmp_path, FIRST)
    r0, r1 = (torch.load(tmp_path / f"rank{r}-{FIRST}.pt", weights_only=False) for r in (0, 1))
    _assert_same(r0, r1)
    # Training moved them (the same way on both ranks): not the initial weights.
    assert r0["updates"] == r1["updates"] > 0
    assert r0["global_step"] == r1["global_step"] == FIRST  # both ranks' steps: 200 each
    assert r0["online_size"] == r1["online_size"] == FIRST // 2
    # Each rank stepped envs of its own (seeds seed + 1000 * rank).
    assert not (r0["first_states"] == r1["first_states"]).all()

    assert "rank 0 wrote the checkpoint" in out and "rank 1 wrote" not in out
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["state"]
    assert saved["global_step"] == FIRST and saved["world_size"] == 2
    assert len(saved["ranks"]) == 2 and all("buffer" in part for part in saved["ranks"])
    assert (tmp_path / "run" / "scalars.jsonl").is_file()

    # A second launch resumes on both ranks from rank 0's file and stays in step.
    out = _torchrun(tmp_path, SECOND)
    assert out.count(f"sac: resumed at step {FIRST}") == 2, out[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}-{SECOND}.pt", weights_only=False) for r in (0, 1))
    _assert_same(r0, r1)
    assert r0["global_step"] == SECOND
    # Each rank got its own buffer back and added its share of the new steps.
    assert r0["online_size"] == r1["online_size"] == SECOND // 2


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    run(sys.argv[1], int(sys.argv[2]))
