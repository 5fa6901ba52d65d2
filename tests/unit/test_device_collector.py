"""The collector's thread mode (behaviour inference on the learner's device, `stages.rl.device_actor`):
same rollouts as the CPU collector process for a fixed seed, weights published after an update
used by the next rollout (policy lag <= 1), and the CUDA path (``gpu`` marker)."""
from __future__ import annotations

import functools

import gymnasium as gym
import numpy as np
import pytest
import torch

from models import DrivingVLA, DrivingVLAConfig
from stages.envs.testing import FixedLatencyEnv
from stages.rl.async_collector import AsyncCollector, CollectorError
from stages.rl.configs import PPOConfig
from stages.rl.device_actor import bucket
from stages.rl.policies import MLPActorCritic, make_obs_adapter
from stages.rl.ppo import PPOTrainer

IMAGE = 32


def _tiny() -> DrivingVLA:
    torch.manual_seed(0)
    return DrivingVLA(DrivingVLAConfig.from_size("tiny", image_size=IMAGE)).eval()


def _first_rollout(model: torch.nn.Module, encoded: bool, device: str | None, rollout_len: int = 24) -> dict:
    # max_episode_steps=10: the rollout crosses truncations, so final-observation bootstraps are in it.
    fns = [functools.partial(FixedLatencyEnv, step_seconds=0.0, image_size=IMAGE, max_episode_steps=10)]
    collector = AsyncCollector(fns, context="spawn")
    try:
        adapter = make_obs_adapter(model, collector.observation_space, encoded=encoded)
        collector.start(model, adapter, rollout_len, 3, 0.99, seed=5, device=device)
        buffer, stats = collector.get()
        out = {"obs": {k: v.copy() for k, v in buffer.obs.items()}, "actions": buffer.actions.copy(),
               "log_probs": buffer.log_probs.copy(), "values": buffer.values.copy(),
               "rewards": buffer.rewards.copy(), "dones": buffer.dones.copy(), "stats": stats}
    finally:
        collector.close()
    return out


@pytest.mark.parametrize("encoded", [False, True], ids=["raw", "frozen-encoders"])
def test_thread_collector_on_the_learner_device_matches_the_cpu_process(encoded: bool) -> None:
    model = _tiny()
    cpu = _first_rollout(model, encoded, device=None)
    here = _first_rollout(model, encoded, device="cpu")
    assert here["obs"].keys() == cpu["obs"].keys()
    for name in cpu["obs"]:
        np.testing.assert_allclose(here["obs"][name], cpu["obs"][name], rtol=1e-5, atol=1e-5, err_msg=name)
    for key in ("actions", "log_probs", "values", "rewards"):
        np.testing.assert_allclose(here[key], cpu[key], rtol=1e-4, atol=1e-5, err_msg=key)
    np.testing.assert_array_equal(here["dones"], cpu["dones"])
    assert cpu["dones"][1:].any()  # episodes ended inside the rollout
    assert here["stats"]["policy_lag"] == cpu["stats"]["policy_lag"] == 0


def _values_of(model: MLPActorCritic, obs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(obs.reshape(-1, obs.shape[-1]))).value.numpy().reshape(obs.shape[:2])


@pytest.mark.parametrize("device", [None, "cpu"], ids=["cpu-process", "learner-thread"])
def test_weights_published_after_an_update_act_in_the_next_rollout(device: str | None) -> None:
    fns = [functools.partial(gym.make, "Pendulum-v1") for _ in range(2)]
    collector = AsyncCollector(fns, context="spawn")
    try:
        torch.manual_seed(0)
        model = MLPActorCritic.for_env(gym.make("Pendulum-v1"))
        adapter = make_obs_adapter(model, collector.observation_space)
        collector.start(model, adapter, 16, 1, 0.99, seed=0, device=device)
        first, stats = collector.get()
        np.testing.assert_allclose(first.values, _values_of(model, first.obs["obs"]), rtol=1e-5, atol=1e-5)
        assert stats["policy_lag"] == 0
        with torch.no_grad():  # "the update": every value moves by 100
            model.value_head[-1].bias += 100.0
        collector.publish(model)
        collector.release(first)
        lags = []
        for _ in range(2):  # the one being filled during the update may hold the old weights ...
            buffer, stats = collector.get()
            lags.append(stats["policy_lag"])
            last = buffer.values.copy(), buffer.obs["obs"].copy()
            collector.release(buffer)
        # ... the one after it acts with the published weights only
        np.testing.assert_allclose(last[0], _values_of(model, last[1]), rtol=1e-5, atol=1e-4)
        assert max(lags) <= 1 and lags[-1] == 0
    finally:
        collector.close()


@pytest.mark.parametrize("device", [None, "cpu"], ids=["cpu-process", "learner-thread"])
def test_an_env_a_whole_rollout_ahead_waits_alone(device: str | None) -> None:
    # Env 0 steps at once, env 1 takes 20 ms: env 0 fills its column of both buffers long before
    # env 1 fills its first. It must wait for the learner's buffer without holding env 1 up (the
    # collector used to block on that buffer with env 1's step unwritten: neither ever filled).
    fns = [functools.partial(FixedLatencyEnv, step_seconds=s, image_size=IMAGE, max_episode_steps=10)
           for s in (0.0, 0.02)]
    collector = AsyncCollector(fns, context="spawn")
    collector.stall_seconds = 60.0  # a regression fails here instead of hanging
    try:
        model = _tiny()
        adapter = make_obs_adapter(model, collector.observation_space)
        collector.start(model, adapter, 4, 3, 0.99, seed=0, num_slots=2, device=device)
        lags = []
        for _ in range(4):
            buffer, stats = collector.get()
            lags.append(stats["policy_lag"])
            collector.publish(model)
            collector.release(buffer)
        assert max(lags) <= 1
    finally:
        collector.close()


@pytest.mark.parametrize("device", [None, "cpu"], ids=["cpu-process", "learner-thread"])
def test_a_stuck_env_raises_instead_of_waiting_forever(device: str | None) -> None:
    fns = [functools.partial(FixedLatencyEnv, step_seconds=60.0, image_size=IMAGE)]
    collector = AsyncCollector(fns, context="spawn")
    collector.stall_seconds = 1.0
    try:
        model = _tiny()
        collector.start(model, make_obs_adapter(model, collector.observation_space), 4, 3, 0.99, device=device)
        with pytest.raises(CollectorError, match="no env step came back for 1 s"):
            collector.get()
    finally:
        collector.close()


def test_batches_run_at_power_of_two_buckets() -> None:
    assert [bucket(k) for k in (1, 2, 3, 5, 8, 9, 16, 17)] == [1, 2, 4, 8, 8, 16, 16, 32]


def test_ppo_on_cpu_can_infer_in_a_learner_thread() -> None:
    fns = [functools.partial(FixedLatencyEnv, step_seconds=0.0, image_size=IMAGE, max_episode_steps=10)
           for _ in range(2)]
    cfg = PPOConfig(num_steps=32, batch_size=16, num_epochs=1, num_envs=2, async_collection=True,
                    collector_device="learner", start_method="spawn")
    trainer = PPOTrainer(_tiny(), fns, cfg, seed=0)
    seen: list[dict[str, float]] = []
    try:
        trainer.train(10**6, callback=lambda s: seen.append(s) or len(seen) < 2)
    finally:
        trainer.close()
    assert trainer.collector_device == torch.device("cpu") and not trainer.bf16
    assert len(seen) == 2 and all(s["policy_lag"] <= 1 for s in seen)
    assert seen[0]["ratio_dev"] < 1e-4  # lag 0, same precision: the update sees the behaviour's numbers
    assert all(np.isfinite(s["policy_loss"]) for s in seen)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("freeze", [False, True], ids=["full", "frozen-encoders"])
def test_cuda_collector_graphs_bf16_and_lag(freeze: bool) -> None:
    fns = [functools.partial(FixedLatencyEnv, step_seconds=0.005, image_size=IMAGE, max_episode_steps=10)
           for _ in range(3)]
    cfg = PPOConfig(num_steps=48, batch_size=16, num_epochs=2, num_envs=3, async_collection=True,
                    freeze_encoders=freeze, compile=False)
    trainer = PPOTrainer(_tiny(), fns, cfg, device="cuda", seed=0)
    seen: list[dict[str, float]] = []
    try:
        trainer.train(10**6, callback=lambda s: seen.append(s) or len(seen) < 3)
    finally:
        trainer.close()
    assert trainer.collector_device == torch.device("cuda") and trainer.bf16
    assert len(seen) == 3 and all(s["policy_lag"] <= 1 for s in seen)
    # bf16 network, fp32 distribution: an unchanged policy's ratio stays near 1 (batch-size kernels differ)
    assert seen[0]["ratio_dev"] < 0.05
    assert all(np.isfinite(s["policy_loss"]) and np.isfinite(s["value_loss"]) for s in seen)
