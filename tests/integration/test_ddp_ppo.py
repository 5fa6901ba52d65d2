"""Data-parallel PPO through torchrun (gloo on CPU): every rank collects its own rollouts, the gradients
are averaged, and the ranks end with bit-identical weights; rank 0 alone writes the checkpoint and
the scalars; ``target_kl`` early stopping is agreed over the ranks, so no rank is left waiting.

The same file is the worker script: torchrun runs it with ``python tests/integration/test_ddp_ppo.py``.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from tests.integration.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
NUM_STEPS, NUM_EPOCHS = 64, 8  # per rank
# A target_kl the ranks' own epoch KLs fall on both sides of now and then (each rank measures the
# shared policy's change on its own rollout): decided alone, one rank would stop while the other
# waits in the next gradient all-reduce.
TARGET_KL, UPDATES = 0.01, 6


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SDL_VIDEODRIVER": "dummy"}


def torchrun(args: list[str], cwd: Path, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc ARGS``; a hung collective fails the test at ``timeout``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# -- the worker (one rank) ------------------------------------------------------------------------

def _worker(out: Path, mode: str) -> None:
    import gymnasium as gym

    from stages.accel import distributed
    from stages.rl.checkpoint import TrainingCheckpoint
    from stages.rl.configs import PPOConfig
    from stages.rl.policies import MLPActorCritic
    from stages.rl.ppo import PPOTrainer

    torch.set_num_threads(1)
    with distributed("cpu") as dist:
        saves: list[int] = []
        real_save = TrainingCheckpoint.save

        def counting_save(self, state):  # counts the real writes, then does them
            saves.append(int(state["global_step"]))
            return real_save(self, state)

        TrainingCheckpoint.save = counting_save  # type: ignore[method-assign]
        agreed_kl: list[tuple[float, float]] = []
        real_mean = dist.mean

        def recording_mean(value: float) -> float:
            agreed = real_mean(value)
            agreed_kl.append((value, agreed))
            return agreed

        dist.mean = recording_mean  # type: ignore[method-assign]

        if mode == "sync":
            env = gym.make_vec("Pendulum-v1", num_envs=2, vectorization_mode="sync",
                               vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
            resets: list[tuple[int, list]] = []
            real_reset = env.reset

            def recording_reset(**kwargs):
                obs, info = real_reset(**kwargs)
                resets.append((kwargs.get("seed"), obs.tolist()))
                return obs, info

            env.reset = recording_reset  # type: ignore[method-assign]
            cfg = PPOConfig(num_steps=NUM_STEPS, batch_size=16, num_epochs=NUM_EPOCHS, num_envs=2,
                            learning_rate=0.01, target_kl=TARGET_KL)
            updates = UPDATES
        else:
            env = [functools.partial(gym.make, "Pendulum-v1")]
            resets = []
            cfg = PPOConfig(num_steps=NUM_STEPS, batch_size=32, num_epochs=2, num_envs=1, async_collection=True,
                            learning_rate=0.01, start_method="spawn")
            updates = 2
        # Each rank starts from different weights: the trainer must start them all from rank 0's.
        torch.manual_seed(dist.rank)
        model = MLPActorCritic.for_env(gym.make("Pendulum-v1"))
        start = {k: v.clone() for k, v in model.state_dict().items()}
        trainer = PPOTrainer(model, env, cfg, seed=0, dist=dist)
        seen: list[dict] = []
        try:
            trainer.train(updates * NUM_STEPS * dist.world_size, save_dir=out / "run", callback=seen.append)
            result = {"start": start, "params": {k: v.clone() for k, v in model.state_dict().items()},
                      "global_step": trainer.global_step, "updates": trainer.updates, "saves": list(saves),
                      "seen": seen, "resets": list(resets), "agreed_kl": list(agreed_kl)}
            if mode == "sync":
                # A new trainer on every rank resumes from rank 0's checkpoint and goes on in step.
                torch.manual_seed(100 + dist.rank)
                fresh = MLPActorCritic.for_env(gym.make("Pendulum-v1"))
                resumed = PPOTrainer(fresh, env, cfg.model_copy(update={"target_kl": None, "num_epochs": 1}),
                                     seed=0, dist=dist)
                resumed.train((updates + 1) * NUM_STEPS * dist.world_size, save_dir=out / "run")
                result["resumed"] = {"params": {k: v.clone() for k, v in fresh.state_dict().items()},
                                     "global_step": resumed.global_step, "updates": resumed.updates}
                result["saves"] = list(saves)
        finally:
            trainer.close()
            if mode == "sync":
                env.close()
        torch.save(result, out / f"rank{dist.rank}.pt")


# -- the tests --------------------------------------------------------------------------------------

def _results(out: Path) -> tuple[dict, dict]:
    return tuple(torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))  # type: ignore[return-value]


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_ranks_train_in_step_and_rank0_alone_writes(tmp_path):
    torchrun([str(Path(__file__)), str(tmp_path), "sync"], cwd=tmp_path)
    r0, r1 = _results(tmp_path)

    # Bit-identical weights on both ranks, and they did move away from rank 0's start.
    _assert_identical(r0["params"], r1["params"])
    assert any(not torch.equal(r0["start"][k], v) for k, v in r0["params"].items())
    assert any(not torch.equal(r0["start"][k], r1["start"][k]) for k in r0["start"])  # they started apart

    # Each rank stepped envs of its own: rank-offset seeds, different first observations.
    assert [seed for seed, _ in r0["resets"]] == [0] and [seed for seed, _ in r1["resets"]] == [1000]
    assert r0["resets"][0][1] != r1["resets"][0][1]

    # global_step counts both ranks' steps: UPDATES updates of 64 steps on each of 2 ranks.
    steps = [u * NUM_STEPS * 2 for u in range(1, UPDATES + 2)]  # and one more after the resume
    assert r0["global_step"] == r1["global_step"] == steps[UPDATES - 1]
    assert r0["updates"] == r1["updates"] == UPDATES
    assert [s["global_step"] for s in r0["seen"]] == steps[:UPDATES]

    # target_kl stopped epochs early, on the KL averaged over the ranks: both took the same
    # decisions, also where their own KLs lay on either side of target_kl.
    assert any(s["epochs"] < NUM_EPOCHS for s in r0["seen"])
    assert [s["epochs"] for s in r0["seen"]] == [s["epochs"] for s in r1["seen"]]
    assert [agreed for _, agreed in r0["agreed_kl"]] == [agreed for _, agreed in r1["agreed_kl"]]
    split = [(a > TARGET_KL) != (b > TARGET_KL) for (a, _), (b, _) in zip(r0["agreed_kl"], r1["agreed_kl"])]
    assert any(split), "the ranks' own KLs never fell on both sides of target_kl: the test shows nothing"

    # Rank 0 alone wrote the checkpoint (once per update) and the scalars.
    assert r0["saves"] == steps and r1["saves"] == []
    from stages.rl.scalars import read_scalars

    curves = read_scalars(tmp_path / "run" / "scalars.jsonl")
    assert [step for step, _ in curves["ppo/global_step"]] == steps
    lines = (tmp_path / "run" / "scalars.jsonl").read_text().splitlines()
    assert sum('"ppo/global_step"' in line for line in lines) == len(steps)  # one writer, not two

    # Resume: every rank loaded the checkpoint and went on from its step, still in step.
    assert r0["resumed"]["global_step"] == r1["resumed"]["global_step"] == steps[-1]
    assert r0["resumed"]["updates"] == UPDATES + 1
    _assert_identical(r0["resumed"]["params"], r1["resumed"]["params"])
    from stages.rl.checkpoint import TrainingCheckpoint

    saved = TrainingCheckpoint(tmp_path / "run").load()
    assert saved["global_step"] == steps[-1] and saved["updates"] == UPDATES + 1
    _assert_identical({k: v for k, v in saved["model"].items()}, r0["resumed"]["params"])


def test_two_ranks_with_async_collection_stay_in_step(tmp_path):
    torchrun([str(Path(__file__)), str(tmp_path), "async"], cwd=tmp_path)
    r0, r1 = _results(tmp_path)
    _assert_identical(r0["params"], r1["params"])
    assert any(not torch.equal(r0["start"][k], v) for k, v in r0["params"].items())
    assert r0["global_step"] == r1["global_step"] == 2 * NUM_STEPS * 2
    assert r0["saves"] == [128, 256] and r1["saves"] == []


def test_online_stage_under_torchrun_writes_its_outputs_once(tmp_path):
    """The online stage with 2 ranks on the smoke preset: rank 0 evaluates and writes; steps add up."""
    from models import DrivingVLA
    from stages.config import build_config
    from stages.training import model_config

    cfg = build_config(preset="smoke")
    torch.manual_seed(0)
    DrivingVLA(model_config(cfg)).save_pretrained(tmp_path / cfg.offline.out)
    total = 2 * 2 * cfg.online.ppo.num_steps  # two updates of two ranks
    proc = torchrun(["-m", "stages.online", "--params", "none.yaml", "--preset", "smoke",
                     "--set", f"online.total_timesteps={total}"], cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert log.count("saved DrivingVLA") == 1
    assert log.count("online: before fine-tuning") == 1 and log.count("online: after fine-tuning") == 1
    metrics = json.loads((tmp_path / "metrics" / "online.json").read_text())
    assert metrics["timesteps"] == total
    state = torch.load(tmp_path / "runs" / "online" / "checkpoint.pt", weights_only=False)["state"]
    assert state["global_step"] == total and state["updates"] == 2
    facts = json.loads((tmp_path / cfg.online.out / "training.json").read_text())
    assert facts["world_size"] == 2
    # Both ranks returned rank 0's metrics (the stage prints them once per rank).
    assert proc.stdout.count('"route_completion_gain"') == 2


def test_online_sac_under_torchrun_trains_data_parallel(tmp_path):
    """SAC joins the torchrun job: one rank writes the checkpoint and the metrics."""
    from models import DrivingVLA
    from stages.config import build_config
    from stages.training import model_config

    cfg = build_config(preset="smoke", overrides=["online.algo=sac"])
    torch.manual_seed(0)
    DrivingVLA(model_config(cfg)).save_pretrained(tmp_path / cfg.offline.out)
    args = ["-m", "stages.online", "--params", "none.yaml", "--preset", "smoke", "--set", "online.algo=sac"]
    proc = torchrun(args, cwd=tmp_path)
    assert (proc.stdout + proc.stderr).count("saved DrivingVLA") == 1
    assert json.loads((tmp_path / "metrics" / "online.json").read_text())["timesteps"] >= cfg.online.total_timesteps


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
