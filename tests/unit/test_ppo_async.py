"""Asynchronous collection: what the collector writes is what the behaviour policy did, and the
trainer learns from it with at most one update of lag."""
import functools

import numpy as np
import pytest
import torch

from models import DrivingVLA, DrivingVLAConfig
from stages.envs.testing import FixedLatencyEnv
from stages.rl.async_collector import AsyncCollector, CollectorError
from stages.rl.configs import PPOConfig
from stages.rl.policies import make_obs_adapter
from stages.rl.ppo import PPOTrainer

EPISODE = 6


def _fns(n: int, step_seconds: float = 0.002) -> list:
    return [functools.partial(FixedLatencyEnv, step_seconds=step_seconds, image_size=32, max_episode_steps=EPISODE)
            for _ in range(n)]


def _model() -> DrivingVLA:
    torch.manual_seed(0)
    return DrivingVLA(DrivingVLAConfig.from_size("tiny", image_size=32, max_text_length=32)).eval()


@pytest.mark.parametrize("encoded", [False, True])
def test_collector_rows_are_what_the_behaviour_policy_did(encoded):
    model, gamma, T = _model(), 0.9, 8
    collector = AsyncCollector(_fns(2))
    adapter = make_obs_adapter(model, collector.observation_space, encoded=encoded)
    try:
        collector.start(model, adapter, rollout_len=T, action_dim=3, gamma=gamma, seed=0)
        buffer, stats = collector.get()
        fields = {k: torch.from_numpy(v.reshape(2 * T, *v.shape[2:]).copy()) for k, v in buffer.obs.items()}
        actions = torch.from_numpy(buffer.actions.reshape(2 * T, 3).copy())
        with torch.no_grad():
            log_prob, _, value = adapter.policy(model).evaluate_actions(*adapter.model_inputs(fields), actions)
        # Same weights (version 0) → the stored log-probs and values are the model's own.
        np.testing.assert_allclose(buffer.log_probs.reshape(-1), log_prob.numpy(), atol=2e-3)
        np.testing.assert_allclose(buffer.values.reshape(-1), value.numpy(), atol=1e-5)
        # FixedLatencyEnv pays throttle - brake; the step that truncates carries gamma * V(final obs).
        paid = buffer.actions[..., 0] - buffer.actions[..., 2]
        extra = buffer.rewards - paid
        ends = np.zeros((T, 2), bool)
        ends[EPISODE - 1] = True
        np.testing.assert_allclose(extra[~ends], 0.0, atol=1e-5)
        assert np.all(np.abs(extra[ends]) > 0)  # the bootstrap term: gamma * V(s_T) is never exactly 0
        # dones[t]: the observation at t starts an episode (the one after a truncation).
        assert buffer.dones[EPISODE].all() and not buffer.dones[1:EPISODE].any()
        assert stats["policy_lag"] == 0.0 and len(stats["episode_returns"]) == 2
        collector.release(buffer)
        collector.publish(model)
        buffer2, stats2 = collector.get()
        assert stats2["policy_lag"] <= 1.0
        assert collector.steps_taken >= 4 * T
    finally:
        collector.stop()


def test_async_trainer_counts_steps_and_updates_with_bounded_lag():
    cfg = PPOConfig(num_steps=32, batch_size=16, num_epochs=2, num_envs=2, async_collection=True)
    trainer = PPOTrainer(_model(), _fns(2), cfg, seed=1)
    seen = []
    try:
        trainer.train(96, callback=seen.append)
    finally:
        trainer.close()
    assert [s["global_step"] for s in seen] == [32.0, 64.0, 96.0]
    assert trainer.updates == 3
    assert max(s["policy_lag"] for s in seen) <= 1.0
    assert all(s["env_steps"] >= s["global_step"] for s in seen)


def test_a_failing_env_surfaces_as_collector_error():
    with pytest.raises(CollectorError, match="step_seconds"):
        AsyncCollector([functools.partial(FixedLatencyEnv, step_seconds=-1.0)])
